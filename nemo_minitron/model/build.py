"""Instantiate NeMo's config for this platform and layout, and build the megatron model chunk."""

from __future__ import annotations

import torch

from nemo_minitron import platform
from nemo_minitron.model.spec import ModelSpec


def instantiate(spec: ModelSpec, tp: int = 1, pp: int = 1, **extra):
    """NeMo config object for ``spec`` at TP/PP, with the platform's settings (fusions off on CPU).

    ``vocab_size`` is the padded one (NeMo builds a preset ``vocab_size`` as is, and megatron's vocab-parallel
    layers need a multiple of TP); the real one is ``unpadded_vocab_size`` (:func:`real_vocab`)."""
    cls = spec.config_cls()
    args = dict(spec.args)
    args.update(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, vocab_size=spec.padded_vocab(tp))
    args.update(platform.config_overrides())
    args.update(extra)
    if args.get("expert_model_parallel_size", 1) > 1 and tp > 1 and not args.get("sequence_parallel"):
        _megatron_warnings_import()
    if "pipeline_dtype" not in args:
        args["pipeline_dtype"] = (
            torch.bfloat16 if args.get("bf16") else torch.float16 if args.get("fp16") else torch.float32
        )
    config = cls(**args)
    config.unpadded_vocab_size = spec.vocab_size
    return config


def _megatron_warnings_import() -> None:
    """megatron-core 0.15.3's ``model_parallel_config`` calls ``warnings.warn`` for EP > 1 with TP > 1 and no sequence
    parallelism (a warning meant for training; inference and pruning run so) but never imports ``warnings``: the
    config would raise NameError. Bind the module it meant."""
    import warnings

    from megatron.core import model_parallel_config

    if not hasattr(model_parallel_config, "warnings"):
        model_parallel_config.warnings = warnings


def real_vocab(config) -> int:
    """The vocabulary without megatron's padding rows, for a config made by :func:`instantiate`."""
    return getattr(config, "unpadded_vocab_size", None) or config.vocab_size


def build(spec: ModelSpec, tp: int = 1, pp: int = 1, tokenizer=None, initialize: bool = True, **extra):
    """Build this rank's megatron ``GPTModel`` (TE spec with TE+CUDA, local spec otherwise).

    Parallel state must be initialized (:func:`nemo_minitron.parallel.initialize`). ``initialize=False``
    skips random weight init, for models whose weights are loaded right after.
    """
    if spec.moe:  # the experts are split as the parallel state says (initialized with the run's EP)
        from megatron.core import parallel_state as ps

        extra.setdefault("expert_model_parallel_size", ps.get_expert_model_parallel_world_size())
    spec.validate_layout(tp, pp, extra.get("expert_model_parallel_size", 1))
    config = instantiate(spec, tp, pp, perform_initialization=initialize, **extra)
    model = config.configure_model(tokenizer)
    model.to(platform.device())
    if config.bf16 or config.fp16:
        dtype = torch.bfloat16 if config.bf16 else torch.float16
        model.to(dtype)
    return model


def unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def expert_params(spec: ModelSpec, active: bool = False) -> int:
    """Parameters in the experts of every layer (gate, up and down projections; not the router); ``active``: only
    the top-k experts a token runs through. 0 for a dense model."""
    if not spec.moe:
        return 0
    experts = spec.moe_router_topk if active else spec.num_moe_experts
    return spec.num_layers * experts * 3 * spec.hidden_size * spec.moe_ffn_hidden_size


def count_params(spec: ModelSpec, active: bool = False) -> int:
    """Parameter count of the whole (unsharded) model, from its shapes alone. For a mixture of experts
    ``active=True`` counts the parameters one token runs through (its top-k experts, the whole router)."""
    h, f, L = spec.hidden_size, spec.ffn_hidden_size, spec.num_layers
    heads, groups, d = spec.num_attention_heads, spec.num_query_groups, spec.kv_channels
    v = spec.vocab_size
    mlp = spec.num_moe_experts * h if spec.moe else 3 * h * f  # a mixture of experts: its router (experts below)
    per_layer = h * (heads + 2 * groups) * d + heads * d * h + mlp + 2 * h
    per_layer += (heads + 2 * groups) * d * spec.qkv_bias + 2 * d * spec.qk_norm  # q/k/v biases, q/k norms
    emb = v * h * (1 if spec.tied else 2)
    return L * per_layer + emb + h + expert_params(spec, active)
