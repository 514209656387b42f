"""Child stages' command lines: ``pipeline`` and ``search`` run the project's own commands as child processes,
and every such command line is built here, by one function per stage, from typed settings.

A parent resolves its config once into :class:`Training` (layout, precision and FP8, optimizer and
communication overlap, activation recomputation), :class:`Batches`, :class:`Schedule` and :class:`KD`; the
functions below turn them into ``key=value`` arguments. So a key the pipeline passes to its distillation also
reaches the search's finalists, spelled as the child command spells it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from nemo_minitron.data.blend import blend_arg

# model.* keys of distill (conf/distill.yaml) that set precision and FP8, and activation recomputation
PRECISION_KEYS = ("transformer_impl", "precision", "fp8", "fp8_recipe", "fp8_margin", "fp8_amax_history_len",
                  "fp8_amax_compute_algo", "fp8_param", "fp8_first_last_layers_bf16", "num_layers_at_start_in_bf16",
                  "num_layers_at_end_in_bf16", "teacher_fp8")
RECOMPUTE_KEYS = ("recompute_granularity", "recompute_method", "recompute_num_layers")
OPTIM_KEYS = ("distributed_optimizer", "overlap_grad_reduce", "overlap_param_gather", "bucket_size")


def value(v) -> str:
    """A config value as an override's right-hand side: null, true/false, or as written."""
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def list_arg(key: str, values) -> str:
    """``key=["a","b"]``: a list override whose items stay strings whatever the paths contain."""
    return f"{key}=[{','.join(json.dumps(str(v)) for v in values)}]"


def _pairs(node, keys) -> tuple:
    return tuple((k, node[k]) for k in keys if node is not None and k in node)


@dataclass(frozen=True)
class Training:
    """What a parent's config says about every training child (distill, finetune, teacher correction, the
    search's finalists) and the layout of its parallel stages (prune, evaluate)."""

    tp: int = 1
    pp: int = 1
    sequence_parallel: bool | None = None
    precision: tuple = ()  # ((key, value), ...) of PRECISION_KEYS, as configured
    recompute: tuple = ()  # of RECOMPUTE_KEYS
    optim: tuple = ()  # of OPTIM_KEYS

    @classmethod
    def of(cls, layout, precision, optim) -> "Training":
        """From config nodes: ``layout`` holds ``tensor/pipeline_model_parallel_size`` and ``sequence_parallel``;
        ``precision`` the precision, FP8 and recompute keys (those it has); ``optim`` the optimizer keys."""
        return cls(tp=int(layout.tensor_model_parallel_size), pp=int(layout.pipeline_model_parallel_size),
                   sequence_parallel=layout.get("sequence_parallel"), precision=_pairs(precision, PRECISION_KEYS),
                   recompute=_pairs(precision, RECOMPUTE_KEYS), optim=_pairs(optim, OPTIM_KEYS))

    @property
    def fp8(self) -> bool:
        return bool(dict(self.precision).get("fp8"))

    def model_keys(self) -> dict:
        """The model.* keys of ``distill`` (conf/distill.yaml), resolvable by ``precision.resolve``."""
        return dict(self.precision)

    def distill_args(self) -> list[str]:
        return ([*self.layout_args(), f"trainer.strategy.sequence_parallel={value(self.sequence_parallel)}"]
                + [f"model.{k}={value(v)}" for k, v in (*self.precision, *self.recompute)]
                + [f"optim.{k}={value(v)}" for k, v in self.optim])

    def finetune_args(self) -> list[str]:
        prec = dict(self.precision).get("precision")
        return ([*self.layout_args(), f"trainer.strategy.sequence_parallel={value(self.sequence_parallel)}",
                 f"trainer.precision={value(prec)}"]
                + [f"trainer.{k}={value(v)}" for k, v in self.recompute]
                + [f"optim.{k}={value(v)}" for k, v in self.optim])

    def layout_args(self) -> list[str]:
        """The layout keys, spelled the same in every command (``config.LAYOUT_ALIASES``)."""
        return [f"trainer.strategy.tensor_model_parallel_size={self.tp}",
                f"trainer.strategy.pipeline_model_parallel_size={self.pp}"]

    def prune_args(self) -> list[str]:
        """prune: the layout, and FP8-capable target shapes when the student will train in FP8."""
        return [*self.layout_args(), *(["prune.fp8_shapes=true"] if self.fp8 else [])]


@dataclass(frozen=True)
class Batches:
    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    num_val_samples: int | None = None  # None: the child's default

    def args(self) -> list[str]:
        out = [f"data.seq_length={self.seq_length}", f"data.micro_batch_size={self.micro_batch_size}",
               f"data.global_batch_size={self.global_batch_size}"]
        return out + ([f"data.num_val_samples={self.num_val_samples}"] if self.num_val_samples is not None else [])


@dataclass(frozen=True)
class Schedule:
    """A training child's length and learning rate (None: the child's default)."""

    max_steps: int
    lr: float
    min_lr: float | None = None
    warmup_steps: int | None = None
    val_check_interval: int | None = None
    checkpoint_every: int | None = None
    log_every: int | None = None

    def args(self) -> list[str]:
        keys = (("trainer.max_steps", self.max_steps), ("trainer.val_check_interval", self.val_check_interval),
                ("checkpoint.every_n_steps", self.checkpoint_every), ("optim.lr", self.lr),
                ("optim.min_lr", self.min_lr), ("optim.warmup_steps", self.warmup_steps),
                ("trainer.log_every_n_steps", self.log_every))
        return [f"{k}={v}" for k, v in keys if v is not None]


@dataclass(frozen=True)
class KD:
    kd_weight: float = 1.0
    lm_weight: float = 0.0
    temperature: float = 1.0
    fused_output: bool = True

    @classmethod
    def of(cls, node) -> "KD":
        return cls(node["kd_weight"], node["lm_weight"], node["temperature"], bool(node["fused_output"]))

    def args(self) -> list[str]:
        return [f"distill.kd_weight={self.kd_weight}", f"distill.lm_weight={self.lm_weight}",
                f"distill.temperature={self.temperature}", f"distill.fused_output={value(self.fused_output)}"]


def distill_args(teacher, student, output, train, validation, batches: Batches, schedule: Schedule, kd: KD,
                 training: Training) -> list[str]:
    """``nemo-minitron distill``'s arguments (``train``: a prefix or a blend)."""
    return [f"teacher={teacher}", f"student={student}", f"output={output}", f"data.train={blend_arg(train)}",
            *([f"data.validation={validation}"] if validation is not None else []), *batches.args(),
            *schedule.args(), *kd.args(), *training.distill_args()]


def finetune_args(model, output, train, batches: Batches, schedule: Schedule, training: Training,
                  validation=None, random_init: bool = False) -> list[str]:
    """``nemo-minitron finetune``'s arguments (teacher correction; the from-scratch baseline)."""
    return [f"model={model}", f"output={output}", f"data.train={blend_arg(train)}",
            *([f"data.validation={validation}"] if validation is not None else []), *batches.args(),
            *schedule.args(), *(["random_init=true"] if random_init else []), *training.finetune_args()]


def evaluate_args(models: list, outputs: list, data, num_samples: int, seq_length: int, training: Training,
                  micro_batch_size: int | None = None, tasks=None) -> list[str]:
    """``nemo-minitron evaluate`` of several models in one process; ``tasks``: an
    :class:`nemo_minitron.evaluate.Downstream` (``eval.tasks`` and its settings) or None."""
    args = [list_arg("model", [Path(m) for m in models]), f"data={data}", f"eval.num_samples={num_samples}",
            f"eval.seq_length={seq_length}",
            *([f"eval.micro_batch_size={micro_batch_size}"] if micro_batch_size is not None else []),
            list_arg("output_json", [Path(o) for o in outputs]), *training.layout_args()]
    if tasks is not None and tasks.tasks:
        args += [list_arg("eval.tasks", tasks.tasks), f"eval.limit={value(tasks.limit)}",
                 f"eval.num_fewshot={value(tasks.num_fewshot)}", f"eval.seed={tasks.seed}",
                 f"eval.batch_size={tasks.batch_size}", f"eval.batch_tokens={tasks.batch_tokens}"]
    return args


@dataclass(frozen=True)
class Prune:
    """A prune stage's targets and method (the pipeline's ``prune.*`` keys, or a round's)."""

    targets: dict = field(default_factory=dict)  # hidden_size, ffn_hidden_size, num_attention_heads, ...
    drop_layers: tuple | None = None
    depth_method: str = "lm_loss"
    calibration_samples: int = 1024
    seq_length: int = 256
    reconstruction: str = "least_squares"
    reconstruction_damping: float = 0.01


def prune_args(model, output, calibration, p: Prune, training: Training, validation=None,
               validation_samples: int | None = None, validation_seq_length: int | None = None) -> list[str]:
    """``nemo-minitron prune``'s arguments; with ``validation`` the report compares refitted and trimmed."""
    args = [f"model={model}", f"output={output}", "overwrite=true", f"data.calibration={calibration}",
            f"data.calibration_samples={p.calibration_samples}", f"data.seq_length={p.seq_length}",
            f"prune.depth_method={p.depth_method}", f"prune.reconstruction={p.reconstruction}",
            f"prune.reconstruction_damping={p.reconstruction_damping}", *training.prune_args()]
    args += [f"prune.{k}={v}" for k, v in p.targets.items() if v is not None]
    if p.drop_layers is not None:
        args.append(f"prune.drop_layers=[{','.join(str(i) for i in p.drop_layers)}]")
    if validation is not None:
        args += [f"data.validation={validation}", f"data.validation_samples={validation_samples}",
                 f"data.validation_seq_length={validation_seq_length}"]
    return args
