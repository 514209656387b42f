"""``nemo-minitron distill`` and ``nemo-minitron finetune``: NeMo-trainer runs with exact resume.

Every check that can fail (checkpoints, vocabularies, layouts, batch sizes, data length) runs before the
trainer or any model is built.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from nemo_minitron import parallel, platform
from nemo_minitron.checkpoint import nemo as ck
from nemo_minitron.checkpoint.loader import describe
from nemo_minitron.data import blend
from nemo_minitron.data.blend import DataSettings
from nemo_minitron.errors import UserError
from nemo_minitron.model import count_params
from nemo_minitron.model.precision import FP8

STUDENT_DIR, MODEL_DIR, CORRECTED_DIR = "student", "model", "teacher_corrected"
EXIT_PREEMPTED = 3  # the batch script requeues the job on this status
EXIT_NONFINITE = 4  # trainer.max_nonfinite_steps consecutive non-finite steps: not requeued (it would recur)


class Preempted(Exception):
    def __init__(self, step: int):
        super().__init__(f"stopped at step {step} on a preemption signal (checkpoint saved)")
        self.step = step


def _nemo_source(source, what: str):
    kind, path, spec = describe(source)
    if kind != "nemo":
        raise UserError(f"{what}={source} is a Hugging Face directory: import it first "
                        "(nemo-minitron import source=... output=CKPT)")
    return path, spec


def _prepare_run_dir(out: Path, overwrite: bool, final: str) -> bool:
    """False when the run already finished (its final checkpoint is complete)."""
    if out.exists() and out.is_file():
        raise UserError(f"output {out} is a file, not a run directory")
    if overwrite:
        from nemo_minitron import runlock

        if parallel.dist.is_initialized():
            if parallel.is_rank0():
                runlock.clear(out)  # everything but the run lock this run holds
            parallel.barrier()
        else:  # the other ranks wait for rank 0's "emptied" mark before they look inside
            runlock.clear_for_launch(out, parallel.rank(), parallel.world_size_from_env())
    if (out / final).exists() and ck.is_checkpoint(out / final):
        return False
    if parallel.is_rank0():
        out.mkdir(parents=True, exist_ok=True)
    return True


@dataclass(frozen=True)
class FitSettings:
    """The trainer settings of one training run (``trainer.*``, ``checkpoint.*``), resolved at the edge."""

    max_steps: int
    val_check_interval: int
    log_every_n_steps: int
    num_nodes: int
    checkpoint_every: int
    checkpoint_keep: int
    layout: parallel.Layout = parallel.Layout()
    precision: str = "fp32"  # bf16 | fp16 | fp32: megatron mixed precision (fp32 main parameters)
    distributed_optimizer: bool = True
    optim_fully_reshardable: bool = True  # the optimizer checkpoint resumes at any TP/PP/DP
    max_nonfinite_steps: int = 3  # consecutive skipped (non-finite) steps that stop the run
    fp8: FP8 | None = None  # the trained model's FP8 settings (NeMo's precision plugin must carry them)
    overlap_grad_reduce: bool = False  # megatron DDP: gradient reduction overlapped with the backward
    overlap_param_gather: bool = False  # distributed optimizer: parameter all-gather overlapped with the forward
    bucket_size: int | None = None  # elements per gradient bucket (None: megatron's default)
    recompute_granularity: str | None = None  # activation recomputation (model.recompute): selective | full
    recompute_method: str | None = None
    recompute_num_layers: int | None = None

    @classmethod
    def from_config(cls, cfg, layout: parallel.Layout, precision: str,
                    max_steps: int | None = None, fp8: FP8 | None = None, recompute: dict | None = None,
                    cuda: bool | None = None) -> "FitSettings":
        """``recompute``: the resolved ``recompute_*`` fields (:func:`nemo_minitron.model.recompute.resolve`);
        ``cuda``: the platform the run is for (the overlap defaults; None: this machine's)."""
        t, c, o = cfg.trainer, cfg.checkpoint, cfg.optim
        steps = t.max_steps if max_steps is None else max_steps
        if steps < 1:
            raise UserError("trainer.max_steps must be >= 1")
        if t.max_nonfinite_steps < 1:
            raise UserError(f"trainer.max_nonfinite_steps must be >= 1 (got {t.max_nonfinite_steps})")
        dist_opt = bool(o.distributed_optimizer)
        cuda = platform.has_cuda() if cuda is None else cuda
        grad = (dist_opt and cuda) if o.get("overlap_grad_reduce") is None else bool(o.overlap_grad_reduce)
        param = (grad and dist_opt) if o.get("overlap_param_gather") is None else bool(o.overlap_param_gather)
        if param and not dist_opt:
            raise UserError("optim.overlap_param_gather=true needs optim.distributed_optimizer=true (only the "
                            "distributed optimizer all-gathers parameters)")
        if param and not grad:
            raise UserError("optim.overlap_param_gather=true needs optim.overlap_grad_reduce=true (as in Megatron-LM)")
        bucket = o.get("bucket_size")
        if bucket is not None and (isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 1):
            raise UserError(f"optim.bucket_size={bucket!r} must be a positive number of elements (or null)")
        return cls(max_steps=int(steps), val_check_interval=int(min(t.val_check_interval, steps)),
                   log_every_n_steps=int(t.log_every_n_steps), num_nodes=int(t.num_nodes),
                   checkpoint_every=int(c.every_n_steps), checkpoint_keep=int(c.keep), layout=layout,
                   precision=precision, distributed_optimizer=dist_opt,
                   optim_fully_reshardable=bool(c.optim_fully_reshardable),
                   max_nonfinite_steps=int(t.max_nonfinite_steps), fp8=fp8, overlap_grad_reduce=grad,
                   overlap_param_gather=param, bucket_size=bucket, **(recompute or {}))

    def model_fields(self, spec=None) -> dict:
        """TransformerConfig fields of the trained model that come from the run (activation recomputation; for a
        mixture of experts ``spec``, the expert parallelism)."""
        out = {"recompute_granularity": self.recompute_granularity, "recompute_method": self.recompute_method,
               "recompute_num_layers": self.recompute_num_layers}
        if spec is not None and spec.moe:
            out.update(expert_model_parallel_size=self.layout.ep, sequence_parallel=self.layout.sequence_parallel)
        return out


def _common_checks(cfg, tp: int, pp: int, spec, sequence_parallel, precision, sp_key: str,
                   precision_key: str, fp8: FP8 | None = None, recompute_keys=None,
                   recompute_prefix: str = "model", ep: int = 1, moe: bool = False) -> tuple[DataSettings, FitSettings]:
    """Layout, batch, precision, optimizer and data checks shared by distill and finetune; the resolved settings.
    ``recompute_keys``: the config section holding ``recompute_*`` (``model`` for distill, ``trainer`` for
    finetune)."""
    from nemo_minitron.model import recompute
    from nemo_minitron.model.precision import name as precision_name

    world = parallel.world_size_from_env()
    layout = parallel.Layout.resolve(world, tp, pp, sequence_parallel, sp_key=sp_key, ep=ep)
    if moe and tp > 1 and not layout.sequence_parallel:
        raise UserError(f"{sp_key}=false with a mixture of experts at TP={tp}: megatron's expert layers need sequence "
                        "parallelism when tensor parallelism is on (leave it null or set it true)")
    if world % cfg.trainer.num_nodes:
        raise UserError(f"world size {world} is not divisible by trainer.num_nodes={cfg.trainer.num_nodes}")
    precision = precision_name(precision, platform.has_cuda(), precision_key)
    data = blend.settings_from(cfg.data, platform.has_cuda())
    data.check_batches(layout.dp)
    if layout.sequence_parallel and data.seq_length % tp:
        raise UserError(f"data.seq_length={data.seq_length} is not divisible by TP={tp}: sequence parallelism "
                        f"splits each sequence over the tensor-parallel ranks (or set {sp_key}=false)")
    r = recompute_keys
    rec = recompute.resolve(r.get("recompute_granularity"), r.get("recompute_method"), r.get("recompute_num_layers"),
                            spec.num_layers // pp, recompute_prefix) if r is not None else None
    fit = FitSettings.from_config(cfg, layout, precision, fp8=fp8, recompute=rec)
    o = cfg.optim
    if o.lr <= 0 or o.min_lr < 0 or o.min_lr > o.lr:
        raise UserError(f"optim.lr must be > 0 and 0 <= optim.min_lr <= optim.lr (got {o.lr}, {o.min_lr})")
    from nemo_minitron.data.tokenizer import fingerprint_of

    source = cfg.student if "student" in cfg else cfg.model  # distill: the student's tokenizer; finetune: the model's
    expected = fingerprint_of(source)
    blend.check_tokenizer(data.train, expected, "data.train", model=source)
    blend.check_tokenizer(data.validation, expected, "data.validation", model=source)
    blend.check(data, spec.vocab_size)
    return data, fit


def _fit(model, data: DataSettings, fit: FitSettings, run_dir: Path, tp: int, pp: int, opt):
    from nemo_minitron.distill.train import NonFiniteStop, last_complete_checkpoint

    try:
        return _fit_inner(model, data, fit, run_dir, tp, pp, opt)
    except Preempted as e:
        if parallel.is_rank0():
            print(f"{e}; exit status {EXIT_PREEMPTED} (re-run or requeue to resume)", flush=True)
        raise SystemExit(EXIT_PREEMPTED) from None
    except NonFiniteStop as e:
        if parallel.is_rank0():
            import sys

            last = last_complete_checkpoint(run_dir / "checkpoints")
            print(f"error: {e}; nothing saved after it, the last good checkpoint is "
                  f"{last if last else 'none (the run had not saved one yet)'}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_NONFINITE) from None
    except BaseException as e:  # (torch's CheckpointException is a BaseException)
        # a checkpoint save that hit a full disk or a quota: one line, and no half-written checkpoint left
        from nemo_minitron.distill.train import drop_unfinished_checkpoints

        if isinstance(e, (KeyboardInterrupt, SystemExit, UserError)):
            raise
        err = ck.write_error(e)
        if err is None:
            raise
        drop_unfinished_checkpoints(run_dir / "checkpoints")
        raise UserError(f"cannot write in {run_dir}: {err.strerror or err} (the last complete checkpoint is "
                        f"{last_complete_checkpoint(run_dir / 'checkpoints') or 'none'}; re-run to resume)") from None


def _fit_inner(model, data: DataSettings, fit: FitSettings, run_dir: Path, tp: int, pp: int, opt):
    from nemo_minitron.data.module import GPTDataModule
    from nemo_minitron.distill.train import (MetricsLog, NonFiniteGuard, Preemption, build_trainer,
                                             drop_unfinished_checkpoints, resume)

    drop_unfinished_checkpoints(run_dir / "checkpoints")
    preemption = Preemption(run_dir)
    metrics = MetricsLog(run_dir / "metrics.jsonl", data.global_batch_size * data.seq_length, fit.max_steps,
                         every=fit.log_every_n_steps)
    trainer = build_trainer(run_dir, fit.layout, fit.precision, fit.max_steps, fit.val_check_interval,
                            data.num_val_samples // data.global_batch_size if data.has_validation else 0,
                            fit.checkpoint_every, fit.checkpoint_keep, [metrics, preemption], num_nodes=fit.num_nodes,
                            optim_fully_reshardable=fit.optim_fully_reshardable, fp8=fit.fp8,
                            overlap_grad_reduce=fit.overlap_grad_reduce, overlap_param_gather=fit.overlap_param_gather,
                            bucket_size=fit.bucket_size)
    model.optim = opt
    model.nonfinite_guard = NonFiniteGuard(fit.max_nonfinite_steps)
    model.metrics_path = run_dir / "metrics.jsonl"
    opt.connect(model)
    res = resume(run_dir)
    res.setup(trainer, model)
    if trainer.ckpt_path and parallel.is_rank0():
        print(f"resuming from {trainer.ckpt_path}", flush=True)
    from nemo.lightning.callback_group import CallbackGroup

    module = GPTDataModule(data, data.cache_dir(run_dir))
    CallbackGroup.get_instance().update_config(nemo_version="v2", trainer=trainer, data=module)  # as llm.train
    trainer.fit(model, module, ckpt_path=trainer.ckpt_path)
    if preemption.saved_step is not None:
        raise Preempted(preemption.saved_step)
    return trainer


def _optim(o, fit: FitSettings, lr=None, min_lr=None, warmup=None):
    from nemo_minitron.distill.train import optimizer

    return optimizer(lr or o.lr, o.min_lr if min_lr is None else min_lr,
                     o.warmup_steps if warmup is None else warmup, fit.max_steps, o.weight_decay, o.clip_grad,
                     o.adam_beta1, o.adam_beta2, distributed=fit.distributed_optimizer, precision=fit.precision)


def _optimizer_name(fit: FitSettings) -> str:
    name = f"distributed optimizer over DP={fit.layout.dp}" if fit.distributed_optimizer else "Adam"
    overlap = [w for w, on in (("gradient reduce", fit.overlap_grad_reduce), ("parameter gather", fit.overlap_param_gather))
               if on]
    if overlap:
        name += f", overlapped {' and '.join(overlap)}"
        name += f" (buckets of {fit.bucket_size:,})" if fit.bucket_size else ""
    return name


def finetune_run(data: DataSettings, fit: FitSettings, model_path: Path, spec, run_dir: Path, tp: int, pp: int,
                 opt, random_init: bool = False) -> Path:
    """LM fine-tuning of ``model_path`` into ``run_dir/model`` (resumable). Returns the checkpoint path."""
    from nemo_minitron.distill.model import InitializedGPTModel, save_student
    from nemo_minitron.model.build import instantiate

    final = run_dir / MODEL_DIR
    if not _prepare_run_dir(run_dir, False, MODEL_DIR):
        if parallel.is_rank0():
            print(f"fine-tuned model already complete: {final}")
        return final
    t0 = time.time()
    if parallel.is_rank0():
        print(f"fine-tuning {count_params(spec) / 1e6:.1f}M params{' from random init' if random_init else ''}, "
              f"{fit.max_steps} steps x {data.global_batch_size} x {data.seq_length} tokens "
              f"({fit.layout}, {fit.precision}, {_optimizer_name(fit)})", flush=True)
    model = InitializedGPTModel(instantiate(spec, tp, pp, **fit.model_fields(spec)),
                                init_from=None if random_init else str(model_path))
    _fit(model, data, fit, run_dir, tp, pp, opt)
    save_student(model, final, spec, ck.tokenizer_dir(model_path))
    if parallel.is_rank0():
        print(f"fine-tuned {fit.max_steps} steps in {time.time() - t0:.0f}s: {final}", flush=True)
    return final


def run_finetune(cfg) -> None:
    from nemo_minitron.distill.train import install_signal_handlers

    install_signal_handlers()
    st = cfg.trainer.strategy
    tp, pp, ep = st.tensor_model_parallel_size, st.pipeline_model_parallel_size, parallel.expert_parallel_size(st)
    path, spec = _nemo_source(cfg.model, "model")
    spec.validate_layout(tp, pp, ep)
    data, fit = _common_checks(cfg, tp, pp, spec, st.sequence_parallel, cfg.trainer.precision,
                               "trainer.strategy.sequence_parallel", "trainer.precision", recompute_keys=cfg.trainer,
                               recompute_prefix="trainer", ep=ep, moe=spec.moe)
    out = Path(cfg.output).absolute()
    from nemo_minitron.runlock import RunLock

    with RunLock(out, "finetune"):  # one run per directory (after the checks: a refusal writes nothing)
        if not cfg.overwrite and (out / MODEL_DIR).exists() and ck.is_checkpoint(out / MODEL_DIR):
            pass  # finished before: finetune_run says so
        elif cfg.overwrite:
            _prepare_run_dir(out, True, MODEL_DIR)
        final = finetune_run(data, fit, path, spec, out, tp, pp, _optim(cfg.optim, fit),
                             random_init=cfg.random_init)
    if parallel.is_rank0():
        print(f"wrote checkpoint: {final}")


def settings_from(cfg):
    from nemo_minitron.distill.pair import DistillSettings

    k = cfg.distill
    s = DistillSettings(kd_weight=k.kd_weight, lm_weight=k.lm_weight, temperature=k.temperature,
                        reverse_kl=k.reverse_kl, chunk_tokens=k.chunk_tokens, fused_output=k.fused_output,
                        intermediate_pairs=[list(p) for p in k.intermediate_pairs],
                        intermediate_loss=k.intermediate_loss, intermediate_weight=k.intermediate_weight,
                        intermediate_balance=k.intermediate_balance,
                        intermediate_projection=k.intermediate_projection)
    s.validate()
    if k.chunk_tokens < 0:
        raise UserError("distill.chunk_tokens must be >= 0 (0: automatic)")
    return s


def precision_overrides(cfg, s_spec, t_spec, tp: int):
    """Config fields for the student and the teacher from ``model.*`` (TE/local, bf16, FP8), refused early."""
    from nemo_minitron.model import precision

    over = precision.resolve(cfg.model)
    if not over.get("fp8"):
        return over, over
    precision.check_fp8_shapes({k: getattr(s_spec, k) for k in ("hidden_size", "ffn_hidden_size", "num_attention_heads",
                                                              "num_query_groups", "kv_channels")}, tp, "student")
    if cfg.model.teacher_fp8:
        precision.check_fp8_shapes({k: getattr(t_spec, k) for k in ("hidden_size", "ffn_hidden_size",
                                                                  "num_attention_heads", "num_query_groups",
                                                                  "kv_channels")}, tp, "teacher")
        return over, over
    fp8_keys = ("first_last_layers_bf16", "num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16")
    return over, {k: v for k, v in over.items() if not k.startswith("fp8") and k not in fp8_keys}  # bf16 teacher


def check_pair_layout(t_spec, s_spec, tp: int, pp: int, ep: int) -> None:
    """Both models split into TP x PP; with EP > 1, every mixture of experts among them into EP (a dense student of a
    mixture-of-experts teacher, or the reverse, is fine: EP splits only experts)."""
    if ep > 1 and not (t_spec.moe or s_spec.moe):
        raise UserError(f"trainer.strategy.expert_model_parallel_size={ep}: neither the teacher nor the student has "
                        "experts (not a mixture of experts)")
    for what, spec in (("teacher", t_spec), ("student", s_spec)):
        try:
            spec.validate_layout(tp, pp, ep if spec.moe else 1)
        except UserError as e:
            raise UserError(f"{what}: {e}") from None


def moe_overrides(m, s_spec) -> dict:
    """``model.moe_aux_loss_coeff`` for a mixture-of-experts student (null: the checkpoint's own)."""
    coeff = m.get("moe_aux_loss_coeff")
    if coeff is None:
        return {}
    if not s_spec.moe:
        raise UserError(f"model.moe_aux_loss_coeff={coeff}: the student has no experts (not a mixture of experts)")
    if isinstance(coeff, bool) or not isinstance(coeff, (int, float)) or coeff < 0:
        raise UserError(f"model.moe_aux_loss_coeff={coeff!r} must be a number >= 0 (0: no load-balancing loss)")
    return {"moe_aux_loss_coeff": float(coeff)}


def run(cfg) -> None:
    from nemo_minitron.distill.pair import check_tokenizers, check_vocab as check_pair_vocab
    from nemo_minitron.distill.train import install_signal_handlers

    install_signal_handlers()  # a SLURM warning that arrives while we load still leads to a clean stop

    st = cfg.trainer.strategy
    tp, pp, ep = st.tensor_model_parallel_size, st.pipeline_model_parallel_size, parallel.expert_parallel_size(st)
    # ---- everything that can be refused is refused here ---------------------------------------------
    t_path, t_spec = _nemo_source(cfg.teacher, "teacher")
    s_path, s_spec = _nemo_source(cfg.student, "student")
    check_pair_vocab(s_spec, t_spec)
    check_tokenizers(s_path, t_path)
    check_pair_layout(t_spec, s_spec, tp, pp, ep)
    settings = settings_from(cfg)
    s_over, t_over = precision_overrides(cfg, s_spec, t_spec, tp)
    s_over.update(moe_overrides(cfg.model, s_spec))
    for s_layer, t_layer in settings.intermediate_pairs:
        if not (-s_spec.num_layers <= s_layer < s_spec.num_layers and -t_spec.num_layers <= t_layer < t_spec.num_layers):
            raise UserError(f"distill.intermediate_pairs [{s_layer}, {t_layer}] is out of range (student has "
                            f"{s_spec.num_layers} layers, teacher {t_spec.num_layers})")
    data, fit = _common_checks(cfg, tp, pp, s_spec, cfg.trainer.strategy.sequence_parallel, cfg.model.precision,
                               "trainer.strategy.sequence_parallel", "model.precision", fp8=FP8.of(s_over),
                               recompute_keys=cfg.model, ep=ep, moe=s_spec.moe or t_spec.moe)
    correction = None
    if cfg.distill.teacher_correction:
        correction = FitSettings.from_config(cfg, fit.layout, fit.precision, cfg.finetune.max_steps)
    out = Path(cfg.output).absolute()
    from nemo_minitron.runlock import RunLock

    with RunLock(out, "distill"):  # one run per directory (after the checks: a refusal writes nothing)
        if not _prepare_run_dir(out, cfg.overwrite, STUDENT_DIR):
            if parallel.is_rank0():
                print(f"distillation already complete (overwrite=true to redo)\nwrote checkpoint: {out / STUDENT_DIR}")
            return

        # ---- work ---------------------------------------------------------------------------------------
        from nemo_minitron.distill.model import DistillationGPTModel, save_student
        from nemo_minitron.model.build import instantiate

        platform.activate()
        t0 = time.time()
        if cfg.distill.teacher_correction:
            f = cfg.finetune
            t_path = finetune_run(data, correction, t_path, t_spec, out / CORRECTED_DIR, tp, pp,
                                  _optim(cfg.optim, correction, lr=f.lr, min_lr=f.min_lr, warmup=f.warmup_steps))
        if parallel.is_rank0():
            print(f"distilling {count_params(t_spec) / 1e6:.1f}M-param teacher -> {count_params(s_spec) / 1e6:.1f}M-param "
                  f"student, {fit.max_steps} steps x {data.global_batch_size} x {data.seq_length} tokens "
                  f"({fit.layout}, {fit.precision}, {_optimizer_name(fit)})", flush=True)
        model = DistillationGPTModel(instantiate(s_spec, tp, pp, **s_over, **fit.model_fields(s_spec)),
                                     teacher_ckpt=str(t_path), settings=settings,
                                     init_from=str(s_path), teacher_overrides=t_over)
        _fit(model, data, fit, out, tp, pp, _optim(cfg.optim, fit))
        final = save_student(model, out / STUDENT_DIR, s_spec, ck.tokenizer_dir(s_path) or ck.tokenizer_dir(t_path))
        if parallel.is_rank0():
            print(f"distilled in {time.time() - t0:.0f}s; metrics in {out / 'metrics.jsonl'}, TensorBoard in {out / 'tb'}")
            print(f"wrote checkpoint: {final}")


def dry_run(cfg) -> None:
    """Validate and print the resolved launch without building anything (``--dry-run``)."""
    from nemo_minitron import launch_plan as lp

    t_spec, s_spec = lp.spec_of(cfg.teacher), lp.spec_of(cfg.student)
    from nemo_minitron.distill.pair import check_tokenizers, check_vocab as check_pair_vocab

    st = cfg.trainer.strategy
    tp, pp, ep = st.tensor_model_parallel_size, st.pipeline_model_parallel_size, parallel.expert_parallel_size(st)
    check_pair_vocab(s_spec, t_spec)
    check_tokenizers(cfg.student, cfg.teacher)
    check_pair_layout(t_spec, s_spec, tp, pp, ep)
    moe_overrides(cfg.model, s_spec)
    settings_from(cfg)
    from nemo_minitron.model.precision import name as precision_name

    gpus = cfg.trainer.devices or 8
    d = blend.settings_from(cfg.data, has_cuda=True)
    layout = parallel.Layout.resolve(cfg.trainer.num_nodes * gpus, tp, pp, cfg.trainer.strategy.sequence_parallel, ep=ep)
    from nemo_minitron.model import recompute

    m = cfg.model
    rec = recompute.resolve(m.recompute_granularity, m.recompute_method, m.recompute_num_layers, s_spec.num_layers // pp)
    fit = FitSettings.from_config(cfg, layout, precision_name(cfg.model.precision, cuda=True), recompute=rec, cuda=True)
    k = cfg.distill
    p = lp.plan(t_spec, s_spec, cfg.trainer.num_nodes, gpus, tp, pp, d.seq_length, d.micro_batch_size,
                d.global_batch_size, fused_output=k.fused_output, chunk_tokens=k.chunk_tokens, lm=k.lm_weight > 0,
                sequence_parallel=layout.sequence_parallel, distributed_optimizer=fit.distributed_optimizer,
                precision=fit.precision, recompute=rec, ep=ep)
    print(lp.show(p, lp.describe_shape(t_spec), lp.describe_shape(s_spec)))
    print(f"  {fit.max_steps} steps = {fit.max_steps * p['tokens_per_step'] / 1e9:.2f}B tokens")
    print(blend.plan_or_note(d, fit.max_steps, d.cache_dir(Path(cfg.output)).as_posix()))
    print("dry run: nothing was launched")
