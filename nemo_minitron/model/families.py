"""Model families, declared once: what each supported architecture is to Hugging Face, to NeMo and to
megatron-core.

A family is data, not code paths: the Hugging Face architectures it reads (and the one export writes), the
NeMo config and model classes its checkpoints are made of, and the megatron features it switches on. Every
other module asks the :class:`~nemo_minitron.model.spec.ModelSpec` for a *feature* (``spec.qkv_bias``,
``spec.qk_norm``), never for a family name, so pruning, reconstruction, sharding and the state-dict transforms
(:mod:`nemo_minitron.checkpoint.hf`) handle a feature once for every family that has it.

    family  HF architectures                       NeMo config (model)              features
    llama   LlamaForCausalLM, MistralForCausalLM   LlamaConfig, Llama31Config       -
            (Mistral without sliding window)       (LlamaModel)
    qwen2   Qwen2ForCausalLM (Qwen2, Qwen2.5)      Qwen2Config (Qwen2Model)         q/k/v biases
    qwen3   Qwen3ForCausalLM                       Qwen3Config (Qwen3Model)         q/k RMSNorm per head
    mixtral MixtralForCausalLM                     MixtralConfig (MixtralModel)     MoE: every layer's MLP is
                                                                                    top-k routed SwiGLU experts
    qwen3_moe Qwen3MoeForCausalLM                  Qwen3MoEConfig (Qwen3Model)      q/k RMSNorm, MoE layers

A mixture-of-experts family also declares its :class:`MoE` names: where the router and the experts sit in a
Hugging Face layer and which ``config.json`` keys hold the expert count, width, top-k and routing rule.

``features`` are megatron ``TransformerConfig`` fields; every imported spec stores them explicitly (a NeMo
checkpoint's context lists them), and the values here are the NeMo config classes' own defaults, for specs
written before a field was stored (``tests/test_families.py`` checks them against NeMo's classes).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from nemo_minitron.errors import UserError

FEATURES = ("add_qkv_bias", "qk_layernorm")


@dataclass(frozen=True)
class MoE:
    """A mixture-of-experts family's Hugging Face names. Every decoder layer's MLP is ``num_experts`` SwiGLU
    experts behind a linear router (softmax scores, top-k); megatron builds it as ``MoELayer`` (router +
    ``SequentialMLP`` on the local spec, ``TEGroupedMLP`` with Transformer Engine)."""

    router: str                     # per-layer HF suffix of the router weight [experts, hidden]
    expert: str                     # per-layer HF prefix of expert ``{j}``
    gate: str                       # the expert's projections under that prefix (SwiGLU: down(silu(gate) * up))
    up: str
    down: str
    num_experts: str                # config.json keys
    expert_width: str
    norm_topk_prob: str | None = None   # the key saying whether the top-k probabilities are renormalized
    #                                     (None: always renormalized, as Mixtral)
    norm_topk_default: bool = True      # its transformers default when config.json omits it
    hf_fields: dict = field(default_factory=dict)  # constant MoE config fields export writes


@dataclass(frozen=True)
class Family:
    name: str
    hf_architectures: tuple          # read by import; export writes the first
    hf_model_type: str
    nemo_module: str                 # where NeMo declares the family's config and model classes
    nemo_model: str                  # the NeMo model class a checkpoint's context names
    config_classes: tuple            # NeMo config classes of the family; the first is the default
    features: dict                   # megatron config fields the family fixes
    rope_scaling: dict = field(default_factory=dict)  # HF rope_type -> NeMo config class (others refused)
    refuse: dict = field(default_factory=dict)         # HF config key -> why a truthy value cannot be converted
    hf_fields: dict = field(default_factory=dict)      # constant HF config fields export writes
    moe: MoE | None = None                             # a mixture-of-experts family's expert names

    def nemo_class(self, name: str):
        return getattr(importlib.import_module(self.nemo_module), name)


_NO_SWA = "sliding-window attention is not supported"

FAMILIES = (
    Family("llama", ("LlamaForCausalLM", "MistralForCausalLM"), "llama", "nemo.collections.llm.gpt.model.llama",
           "LlamaModel", ("LlamaConfig", "Llama31Config"), {"add_qkv_bias": False, "qk_layernorm": False},
           rope_scaling={"llama3": "Llama31Config"},
           refuse={"attention_bias": "attention biases are not supported for Llama-family models (attention_bias)",
                   "mlp_bias": "MLP biases are not supported (mlp_bias)",
                   "sliding_window": f"{_NO_SWA} (sliding_window)"},
           hf_fields={"attention_bias": False, "mlp_bias": False, "hidden_act": "silu"}),
    Family("qwen2", ("Qwen2ForCausalLM",), "qwen2", "nemo.collections.llm.gpt.model.qwen2", "Qwen2Model",
           ("Qwen2Config",), {"add_qkv_bias": True, "qk_layernorm": False},
           refuse={"use_sliding_window": f"{_NO_SWA} (use_sliding_window)"},
           hf_fields={"use_sliding_window": False, "hidden_act": "silu"}),
    Family("qwen3", ("Qwen3ForCausalLM",), "qwen3", "nemo.collections.llm.gpt.model.qwen3", "Qwen3Model",
           ("Qwen3Config",), {"add_qkv_bias": False, "qk_layernorm": True},
           refuse={"use_sliding_window": f"{_NO_SWA} (use_sliding_window)",
                   "attention_bias": "attention biases on Qwen3 (attention_bias: q/k/v and output projection) "
                                     "are not supported"},
           hf_fields={"use_sliding_window": False, "attention_bias": False, "hidden_act": "silu"}),
    Family("mixtral", ("MixtralForCausalLM",), "mixtral", "nemo.collections.llm.gpt.model.mixtral", "MixtralModel",
           ("MixtralConfig",), {"add_qkv_bias": False, "qk_layernorm": False},
           refuse={"sliding_window": f"{_NO_SWA} (sliding_window)",
                   "router_jitter_noise": "router input jitter (router_jitter_noise) is not supported"},
           hf_fields={"sliding_window": None, "hidden_act": "silu", "router_jitter_noise": 0.0},
           moe=MoE("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{j}.", "w1", "w3", "w2",
                   "num_local_experts", "intermediate_size")),
    Family("qwen3_moe", ("Qwen3MoeForCausalLM",), "qwen3_moe", "nemo.collections.llm.gpt.model.qwen3", "Qwen3Model",
           ("Qwen3MoEConfig",), {"add_qkv_bias": False, "qk_layernorm": True},
           refuse={"use_sliding_window": f"{_NO_SWA} (use_sliding_window)",
                   "attention_bias": "attention biases on Qwen3 (attention_bias: q/k/v and output projection) "
                                     "are not supported",
                   "mlp_only_layers": "dense MLP layers between the MoE layers (mlp_only_layers) are not supported"},
           hf_fields={"use_sliding_window": False, "attention_bias": False, "hidden_act": "silu"},
           moe=MoE("mlp.gate.weight", "mlp.experts.{j}.", "gate_proj", "up_proj", "down_proj",
                   "num_experts", "moe_intermediate_size", norm_topk_prob="norm_topk_prob", norm_topk_default=False,
                   hf_fields={"decoder_sparse_step": 1, "mlp_only_layers": []})),
)

HF_ARCHITECTURES = tuple(a for f in FAMILIES for a in f.hf_architectures)


def of_config_class(name: str) -> Family:
    for f in FAMILIES:
        if name in f.config_classes:
            return f
    raise UserError(f"unknown model config class {name!r} (supported: "
                    f"{', '.join(c for f in FAMILIES for c in f.config_classes)})")


def of_hf_config(hf: dict) -> Family:
    archs = hf.get("architectures") or []
    for f in FAMILIES:
        if any(a in f.hf_architectures for a in archs):
            return f
    raise UserError(f"not a supported causal LM checkpoint: architectures={archs or 'missing'} "
                    f"(supported: {', '.join(HF_ARCHITECTURES)})")
