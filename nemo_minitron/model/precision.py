"""Precision and layer implementation: ``model.transformer_impl``, bf16, FP8 (the production GPU path).

:func:`resolve` turns the ``model.*`` keys of a config into NeMo/megatron ``TransformerConfig`` fields and
refuses, before any work, the combinations that cannot run: Transformer Engine requested where it is not
importable, FP8 without Transformer Engine or without a GPU of compute capability >= 8.9 (Hopper/Ada;
MXFP8 needs >= 10.0, Blackwell), megatron's own rule that delayed scaling cannot keep the first/last layers
in bf16, unknown formats/recipes. :func:`check_fp8_shapes` refuses model dimensions FP8 GEMMs cannot take
(per-tensor-parallel-rank sizes must be multiples of 16), which is how pruning targets are validated when
FP8 is configured.
"""

from __future__ import annotations

from dataclasses import dataclass

from nemo_minitron.errors import UserError

TRANSFORMER_IMPLS = ("transformer_engine", "local")
PRECISIONS = ("bf16", "fp16", "fp32")
FP8_FORMATS = ("hybrid", "e4m3")
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")


@dataclass
class Platform:
    cuda: bool
    te: bool
    capability: tuple | None  # (major, minor) of GPU 0


# what a dry run plans for (a launch on the cluster, not on this machine): an H100 with Transformer Engine
TARGET = Platform(cuda=True, te=True, capability=(9, 0))


def current() -> Platform:
    from nemo_minitron import platform

    cap = None
    if platform.has_cuda():
        import torch

        cap = tuple(torch.cuda.get_device_capability(0))
    return Platform(platform.has_cuda(), platform.has_transformer_engine(), cap)


def name(precision: str | None, cuda: bool, key: str = "model.precision") -> str:
    """The precision setting ``key``, validated; null means bf16 with CUDA and fp32 on CPU (fastest there)."""
    precision = precision or ("bf16" if cuda else "fp32")
    if precision not in PRECISIONS:
        raise UserError(f"{key}={precision!r}: one of {', '.join(PRECISIONS)}")
    return precision


def dtype_fields(precision: str) -> dict:
    """TransformerConfig dtype fields of a model held in ``precision`` (a frozen teacher, an evaluated model)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    return dict(bf16=precision == "bf16", fp16=precision == "fp16", params_dtype=dtype, pipeline_dtype=dtype,
                autocast_dtype=dtype)


def resolve(m, env: Platform | None = None, prefix: str = "model") -> dict:
    """``model.*`` settings -> config fields (``transformer_layer_spec``, dtypes, fp8_*). ``prefix``: where the keys
    live in the command's config (``model``, or ``trainer`` for ``search``), for the messages."""
    env = env or current()
    impl = m.get("transformer_impl") or ("transformer_engine" if env.te and env.cuda else "local")
    if impl not in TRANSFORMER_IMPLS:
        raise UserError(f"{prefix}.transformer_impl={impl!r}: one of {', '.join(TRANSFORMER_IMPLS)}")
    if impl == "transformer_engine" and not env.te:
        raise UserError(f"{prefix}.transformer_impl=transformer_engine: Transformer Engine is not importable here "
                        "(use NVIDIA's NeMo container, or model.transformer_impl=local)")
    from nemo.collections.llm.gpt.model.base import local_layer_spec, transformer_engine_layer_spec

    out = {"transformer_impl": impl,
           "transformer_layer_spec": transformer_engine_layer_spec if impl == "transformer_engine" else local_layer_spec}
    precision = name(m.get("precision"), env.cuda, f"{prefix}.precision")
    out.update(dtype_fields(precision))
    fp8 = m.get("fp8")
    if not fp8:
        return out
    recipe = m.get("fp8_recipe") or "delayed"
    if fp8 not in FP8_FORMATS:
        raise UserError(f"{prefix}.fp8={fp8!r}: one of {', '.join(FP8_FORMATS)} (or null)")
    if recipe not in FP8_RECIPES:
        raise UserError(f"{prefix}.fp8_recipe={recipe!r}: one of {', '.join(FP8_RECIPES)}")
    if not env.te:
        raise UserError(f"{prefix}.fp8 needs Transformer Engine, which is not importable here")
    if impl != "transformer_engine":
        raise UserError(f"{prefix}.fp8 needs {prefix}.transformer_impl=transformer_engine (the local spec has no FP8 GEMMs)")
    if not env.cuda:
        raise UserError(f"{prefix}.fp8 needs a GPU")
    need = (10, 0) if recipe == "mxfp8" else (8, 9)
    if env.capability is None or tuple(env.capability) < need:
        have = ".".join(map(str, env.capability)) if env.capability else "unknown"
        raise UserError(f"{prefix}.fp8 with recipe {recipe} needs compute capability >= {need[0]}.{need[1]} "
                        f"({'Blackwell' if recipe == 'mxfp8' else 'Hopper/Ada'}); this GPU has {have}")
    bf16_ends = bool(m.get("fp8_first_last_layers_bf16"))
    if bf16_ends and recipe == "delayed":
        raise UserError(f"{prefix}.fp8_first_last_layers_bf16 needs a current-scaling recipe "
                        "(tensorwise, mxfp8 or blockwise): delayed scaling cannot keep those layers in bf16")
    out.update(fp8=fp8, fp8_recipe=recipe, fp8_margin=int(m.get("fp8_margin") or 0),
               fp8_amax_history_len=int(m.get("fp8_amax_history_len") or 1),
               fp8_amax_compute_algo=m.get("fp8_amax_compute_algo") or "most_recent",
               fp8_param=bool(m.get("fp8_param")), first_last_layers_bf16=bf16_ends,
               num_layers_at_start_in_bf16=int(m.get("num_layers_at_start_in_bf16") or 1),
               num_layers_at_end_in_bf16=int(m.get("num_layers_at_end_in_bf16") or 1))
    return out


FP8_FIELDS = ("fp8", "fp8_recipe", "fp8_margin", "fp8_amax_history_len", "fp8_amax_compute_algo", "fp8_param",
              "first_last_layers_bf16", "num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16")


@dataclass(frozen=True)
class FP8:
    """A run's FP8 settings as :func:`resolve` returns them (megatron ``TransformerConfig`` names).

    NeMo's strategy copies its precision plugin's settings over the model's ``TransformerConfig`` when it
    connects the model (``update_config_with_dtype_overrides``): the plugin must be given these too
    (:meth:`plugin_kwargs`), or the student trains with ``fp8=None`` whatever its config said."""

    fp8: str
    fp8_recipe: str = "delayed"
    fp8_margin: int = 0
    fp8_amax_history_len: int = 1
    fp8_amax_compute_algo: str = "most_recent"
    fp8_param: bool = False
    first_last_layers_bf16: bool = False
    num_layers_at_start_in_bf16: int = 1
    num_layers_at_end_in_bf16: int = 1

    @classmethod
    def of(cls, fields: dict) -> "FP8 | None":
        """The FP8 settings among resolved config ``fields`` (None when FP8 is off)."""
        if not fields.get("fp8"):
            return None
        return cls(**{k: fields[k] for k in FP8_FIELDS if k in fields})

    def plugin_kwargs(self) -> dict:
        """Keyword arguments of NeMo's ``MegatronMixedPrecision`` (its name for ``fp8_param``:
        ``fp8_param_gather``)."""
        kw = {k: getattr(self, k) for k in FP8_FIELDS if k != "fp8_param"}
        kw["fp8_param_gather"] = self.fp8_param
        return kw

    def describe(self) -> str:
        ends = (f", first {self.num_layers_at_start_in_bf16} / last {self.num_layers_at_end_in_bf16} layers bf16"
                if self.first_last_layers_bf16 else "")
        return f"fp8={self.fp8} ({self.fp8_recipe}{', fp8 params' if self.fp8_param else ''}{ends})"


def describe(config) -> str:
    """A built model's precision in one phrase, from its ``TransformerConfig``: "bf16 fp8=hybrid (tensorwise)"."""
    dtype = "bf16" if config.bf16 else "fp16" if config.fp16 else "fp32"
    fp8 = FP8.of({k: getattr(config, k, None) for k in FP8_FIELDS})
    return f"{dtype} {fp8.describe() if fp8 else 'fp8=off'}"


def check_fp8_shapes(dims: dict, tp: int = 1, what: str = "model") -> None:
    """Refuse dimensions FP8 GEMMs cannot take: each tensor-parallel shard's GEMM sizes must be multiples of 16.

    ``dims``: hidden_size, ffn_hidden_size, moe_ffn_hidden_size, num_attention_heads, num_query_groups, kv_channels
    (any subset).
    """
    h, f, m = dims.get("hidden_size"), dims.get("ffn_hidden_size"), dims.get("moe_ffn_hidden_size")
    heads, groups, d = dims.get("num_attention_heads"), dims.get("num_query_groups"), dims.get("kv_channels")
    checks = [("hidden_size", h), ("ffn_hidden_size / TP", f // tp if f else None),
              ("moe_ffn_hidden_size / TP", m // tp if m else None)]
    if heads and d:
        checks.append(("num_attention_heads x head_dim / TP", heads * d // tp))
    if groups and d:
        checks.append(("num_query_groups x head_dim / TP", groups * d // tp))
    bad = [f"{name} = {v}" for name, v in checks if v is not None and v % 16]
    if bad:
        raise UserError(f"{what}: FP8 GEMMs need multiples of 16: {', '.join(bad)}")
