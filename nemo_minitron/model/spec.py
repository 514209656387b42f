"""Portable model description: NeMo config class + constructor args (what a checkpoint stores)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from nemo_minitron.errors import UserError
from nemo_minitron.model import families

# Fields that describe the run, not the model: never persisted, always set at build time.
RUNTIME_FIELDS = {
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size",
    "sequence_parallel",
    "context_parallel_size",
    "use_cpu_initialization",
    "perform_initialization",
    "pipeline_dtype",
    "autocast_dtype",
    "bias_dropout_fusion",
    "masked_softmax_fusion",
    "bias_activation_fusion",
    "persist_layer_norm",
    "apply_rope_fusion",
    "gradient_accumulation_fusion",
    "cross_entropy_loss_fusion",
    "fp8",
    "fp8_recipe",
    "fp8_param",
    "transformer_layer_spec",
    "generation_config",
}

SUPPORTED_HF_ARCHITECTURES = families.HF_ARCHITECTURES


@dataclass
class ModelSpec:
    """NeMo config class name (``LlamaConfig``, ``Llama31Config``, ``Qwen2Config``, ``Qwen3Config``: see
    :mod:`~nemo_minitron.model.families`) plus its portable arguments."""

    config_class: str = "LlamaConfig"
    args: dict = field(default_factory=dict)

    def get(self, key, default=None):
        return self.args.get(key, default)

    @property
    def num_layers(self) -> int:
        return self.args["num_layers"]

    @property
    def hidden_size(self) -> int:
        return self.args["hidden_size"]

    @property
    def ffn_hidden_size(self) -> int:
        return self.args["ffn_hidden_size"]

    @property
    def num_attention_heads(self) -> int:
        return self.args["num_attention_heads"]

    @property
    def num_query_groups(self) -> int:
        return self.args.get("num_query_groups") or self.args["num_attention_heads"]

    @property
    def kv_channels(self) -> int:
        return self.args.get("kv_channels") or self.hidden_size // self.num_attention_heads

    @property
    def vocab_size(self) -> int:
        return self.args["vocab_size"]

    @property
    def family(self) -> families.Family:
        return families.of_config_class(self.config_class)

    @property
    def qkv_bias(self) -> bool:
        """``linear_qkv`` has a bias (Qwen2): its rows are grouped and pruned like the weight's."""
        return bool(self.args.get("add_qkv_bias", self.family.features["add_qkv_bias"]))

    @property
    def qk_norm(self) -> bool:
        """Per-head RMSNorm of queries and keys (Qwen3): ``q_layernorm`` / ``k_layernorm`` of size head_dim."""
        return bool(self.args.get("qk_layernorm", self.family.features["qk_layernorm"]))

    @property
    def moe(self) -> bool:
        """Every decoder layer's MLP is a mixture of experts (``num_moe_experts`` routed SwiGLU experts)."""
        return bool(self.args.get("num_moe_experts"))

    @property
    def num_moe_experts(self) -> int:
        return int(self.args.get("num_moe_experts") or 0)

    @property
    def moe_ffn_hidden_size(self) -> int:
        """One expert's MLP width (megatron's default: ``ffn_hidden_size``)."""
        return int(self.args.get("moe_ffn_hidden_size") or self.ffn_hidden_size)

    @property
    def moe_router_topk(self) -> int:
        return int(self.args.get("moe_router_topk") or 2)

    @property
    def tied(self) -> bool:
        return bool(self.args.get("share_embeddings_and_output_weights", False))

    def padded_vocab(self, tp: int = 1) -> int:
        """The vocabulary rows megatron builds at TP=``tp``: ``vocab_size`` rounded up to a multiple of
        ``make_vocab_size_divisible_by * tp`` (Megatron-LM's ``_vocab_size_with_padding``). The rows past
        ``vocab_size`` are padding: no token reaches them and every loss masks their logits."""
        div = int(self.args.get("make_vocab_size_divisible_by", 128)) * tp
        return -(-self.vocab_size // div) * div

    def replace(self, **changes) -> "ModelSpec":
        args = copy.deepcopy(self.args)
        args.update(changes)
        return ModelSpec(self.config_class, args)

    def config_cls(self):
        return self.family.nemo_class(self.config_class)

    def model_cls(self):
        """NeMo's model class for this family (what a checkpoint's context names)."""
        return self.family.nemo_class(self.family.nemo_model)

    def require_dense(self, what: str) -> None:
        """Refuse ``what`` (a command or stage) for a mixture-of-experts model, where it is not built yet."""
        if self.moe:
            raise UserError(f"{what} does not support mixture-of-experts models yet ({self.config_class}, "
                            f"{self.num_moe_experts} experts, top-{self.moe_router_topk}): import, export, convert, "
                            "evaluate, prune (one process), distill, finetune and the dry runs do")

    def validate_layout(self, tp: int, pp: int, ep: int = 1) -> None:
        """Refuse a TP/PP/EP layout this model cannot be split into (before any work)."""
        h, g = self.num_attention_heads, self.num_query_groups
        if ep > 1 and not self.moe:
            raise UserError(f"expert_model_parallel_size={ep}: the model has no experts (not a mixture of experts)")
        if ep > 1 and self.num_moe_experts % ep:
            raise UserError(f"num_moe_experts={self.num_moe_experts} is not divisible by "
                            f"expert_model_parallel_size={ep}")
        if h % g:
            raise UserError(f"num_attention_heads={h} is not divisible by num_query_groups={g}")
        for name, val in (
            ("num_attention_heads", h),
            ("num_query_groups", g),
            ("moe_ffn_hidden_size", self.moe_ffn_hidden_size) if self.moe else ("ffn_hidden_size", self.ffn_hidden_size),
        ):  # the vocabulary is padded to a multiple of TP (padded_vocab), not refused
            if val % tp:
                raise UserError(f"{name}={val} is not divisible by tensor_model_parallel_size={tp}")
        if self.num_layers % pp:
            raise UserError(
                f"num_layers={self.num_layers} is not divisible by pipeline_model_parallel_size={pp}"
            )


def from_hf_config(hf: dict) -> ModelSpec:
    """Translate a Hugging Face ``config.json`` (as a dict) of a supported family into a :class:`ModelSpec`.

    Mirrors NeMo 2.7.3's importers (``HFLlamaImporter.config``, ``HFQwen2Importer.config``,
    ``HFQwen3Importer.config``) and goes further where they lose information (Qwen2's tied embeddings and
    every family's explicit ``head_dim``); refuses what it cannot represent, naming the field, instead of
    converting it wrongly.
    """
    fam = families.of_hf_config(hf)
    if "rope_parameters" in hf and "rope_theta" not in hf:
        # transformers 5.x layout; transformers 4.57 would silently fall back to rope_theta=10000
        rp = hf["rope_parameters"]
        hf = dict(hf, rope_theta=rp.get("rope_theta"), rope_scaling=rp if rp.get("rope_type") != "default" else None)
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"):
        if key not in hf:
            raise UserError(f"config.json lacks {key!r}: not a {fam.name}-family causal LM config")
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size",
                "num_key_value_heads", "head_dim", "max_position_embeddings"):
        v = hf.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise UserError(f"config.json: {key}={v!r} is not a positive integer")
    for key in ("rope_theta", "rms_norm_eps"):
        v = hf.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
            raise UserError(f"config.json: {key}={v!r} is not a positive number")
    for key, why in fam.refuse.items():
        if hf.get(key):
            raise UserError(f"config.json: {why}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UserError(f"config.json: hidden_act={act!r} is not supported (SwiGLU MLPs: 'silu')")
    args = dict(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=hf["num_attention_heads"],
        num_query_groups=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        kv_channels=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        init_method_std=hf.get("initializer_range", 0.02),
        layernorm_epsilon=hf.get("rms_norm_eps", 1e-5),
        seq_length=hf.get("max_position_embeddings", 4096),
        rotary_base=hf.get("rope_theta", 10000.0),
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
        vocab_size=hf["vocab_size"],
        make_vocab_size_divisible_by=_divisor(hf["vocab_size"]),
        **fam.features,
    )
    dtype = str(hf.get("torch_dtype") or hf.get("dtype") or "float32")
    if "bfloat16" in dtype:
        args.update(bf16=True)
    elif "float16" in dtype:
        args.update(fp16=True)
    scaling = hf.get("rope_scaling") or None
    cls = fam.config_classes[0]
    if fam.moe is not None:
        args.update(_moe_args(hf, fam.moe))
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in fam.rope_scaling:
            allowed = ", ".join(repr(k) for k in fam.rope_scaling) or "none"
            raise UserError(f"config.json: rope_scaling type {kind!r} is not supported for {fam.name} "
                            f"(supported: {allowed})")
        cls = fam.rope_scaling[kind]
        args.update(
            scale_factor=scaling.get("factor", 8.0),
            low_freq_factor=scaling.get("low_freq_factor", 1.0),
            high_freq_factor=scaling.get("high_freq_factor", 4.0),
            old_context_len=scaling.get("original_max_position_embeddings", 8192),
        )
    return ModelSpec(cls, args)


def _moe_args(hf: dict, moe: families.MoE) -> dict:
    """megatron's MoE fields for a Hugging Face MoE config. The routing is kept exactly: softmax scores and top-k
    in both; transformers renormalizes the top-k probabilities when ``norm_topk_prob`` (Mixtral always), which is
    megatron's softmax over the top-k logits (``moe_router_pre_softmax=False``); without it the probabilities are
    the full softmax's (``moe_router_pre_softmax=True``)."""
    for key in (moe.num_experts, "num_experts_per_tok", moe.expert_width):
        v = hf.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"config.json: {key}={v!r} is not a positive integer")
    experts, topk = hf[moe.num_experts], hf["num_experts_per_tok"]
    if topk > experts:
        raise UserError(f"config.json: num_experts_per_tok={topk} is more than the {experts} experts "
                        f"({moe.num_experts})")
    step = hf.get("decoder_sparse_step", 1)
    if step != 1:
        raise UserError(f"config.json: decoder_sparse_step={step!r}: only models whose every layer is a mixture of "
                        "experts are supported (decoder_sparse_step=1)")
    if hf.get("num_shared_experts") or hf.get("shared_expert_intermediate_size"):
        raise UserError("config.json: shared experts are not supported for this family")
    renorm = True if moe.norm_topk_prob is None else bool(hf.get(moe.norm_topk_prob, moe.norm_topk_default))
    return dict(num_moe_experts=experts, moe_router_topk=topk, moe_ffn_hidden_size=hf[moe.expert_width],
                moe_router_pre_softmax=not renorm, moe_router_score_function="softmax",
                moe_router_load_balancing_type="aux_loss",
                moe_aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.001)))


def _divisor(vocab: int) -> int:
    base = 128
    while vocab % base:
        base //= 2
    return base


def tiny_spec(**overrides) -> ModelSpec:
    """A Llama-shaped model well under 1M parameters, for tests (GQA, SwiGLU, RMSNorm, RoPE)."""
    args = dict(
        num_layers=4,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=16,
        init_method_std=0.02,
        layernorm_epsilon=1e-5,
        seq_length=64,
        rotary_base=10000.0,
        share_embeddings_and_output_weights=False,
        vocab_size=256,
        make_vocab_size_divisible_by=128,
    )
    args.update(overrides)
    return ModelSpec("LlamaConfig", args)
