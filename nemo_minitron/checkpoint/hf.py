"""Hugging Face checkpoints of every supported family (:mod:`~nemo_minitron.model.families`) <-> megatron-core
GPT state dicts.

Declared as small per-tensor mappings (as NeMo's ``io.state_transform``): plain renames, plus the transforms
that change layout: q/k/v are interleaved per query group into ``linear_qkv`` (megatron's order: the group's
query heads, then its key head, then its value head), their biases likewise into ``linear_qkv.bias`` (Qwen2),
and gate/up are stacked into ``linear_fc1`` ([gate; up]). Per-head q/k norms (Qwen3) are renames. Which of
these apply is decided by the spec's features (``spec.qkv_bias``, ``spec.qk_norm``, ``spec.moe``), not by
family names. Norm names differ between the local spec (``input_layernorm``, ``pre_mlp_layernorm``) and the
Transformer Engine spec, which fuses them into the next linear layer as ``layer_norm_weight``.

Mixture-of-experts layers (``spec.moe``; the family's :class:`~nemo_minitron.model.families.MoE` names the
HF tensors): the router is ``mlp.router.weight`` [experts, hidden], expert ``j`` is
``mlp.experts.local_experts.{j}.linear_fc1`` ([gate; up]) / ``linear_fc2`` (megatron's ``SequentialMLP``; TE's
grouped experts name them ``mlp.experts.linear_fc1.weight{j}``, read as well), and ``pre_mlp_layernorm`` stays
its own module under both specs (the router, not a linear layer, follows it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nemo_minitron.checkpoint import embedded
from nemo_minitron.errors import UserError
from nemo_minitron.model.spec import ModelSpec

# mcore name (per layer, local spec) -> TE-spec name
TE_NORM_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}

_RENAMES = {  # per-layer HF suffix -> mcore suffix (local spec)
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
}
_DENSE_RENAMES = {"mlp.down_proj.weight": "mlp.linear_fc2.weight"}
_QK_NORM_RENAMES = {  # spec.qk_norm: per-head RMSNorm weights [head_dim], the same in both layer specs
    "self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
    "self_attn.k_norm.weight": "self_attention.k_layernorm.weight",
}


def _renames(spec: ModelSpec) -> dict:
    return {**_RENAMES, **(_QK_NORM_RENAMES if spec.qk_norm else {}), **({} if spec.moe else _DENSE_RENAMES)}


def _qkv_names(spec: ModelSpec) -> tuple:
    """(HF suffix, megatron suffix) of the q/k/v tensors merged into ``linear_qkv``: weights, and biases if any."""
    return (("weight", "self_attention.linear_qkv.weight"),) + \
        ((("bias", "self_attention.linear_qkv.bias"),) if spec.qkv_bias else ())


def layer_key(i: int, suffix: str, te: bool = False, moe: bool = False) -> str:
    if te and suffix in TE_NORM_NAMES and not (moe and suffix == "pre_mlp_layernorm.weight"):
        suffix = TE_NORM_NAMES[suffix]
    return f"decoder.layers.{i}.{suffix}"


ROUTER = "mlp.router.weight"


def expert_key(i: int, j: int, linear: str) -> str:
    """megatron name of expert ``j``'s ``linear`` (``linear_fc1`` / ``linear_fc2``) weight in layer ``i``."""
    return f"decoder.layers.{i}.mlp.experts.local_experts.{j}.{linear}.weight"


def _expert_tensor(sd: dict, i: int, j: int, linear: str):
    """Expert ``j``'s weight under megatron's sequential or TE's grouped-GEMM name."""
    key = expert_key(i, j, linear)
    return sd[key] if key in sd else sd[f"decoder.layers.{i}.mlp.experts.{linear}.weight{j}"]


def _moe_to_mcore(sd: dict, spec: ModelSpec, i: int, out: dict) -> None:
    names, p = spec.family.moe, f"model.layers.{i}."
    out[layer_key(i, ROUTER)] = sd[p + names.router]
    for j in range(spec.num_moe_experts):
        e = p + names.expert.format(j=j)
        out[expert_key(i, j, "linear_fc1")] = torch.cat([sd[e + f"{names.gate}.weight"], sd[e + f"{names.up}.weight"]])
        out[expert_key(i, j, "linear_fc2")] = sd[e + f"{names.down}.weight"]


def _moe_to_hf(sd: dict, spec: ModelSpec, i: int, out: dict) -> None:
    names, p = spec.family.moe, f"model.layers.{i}."
    out[p + names.router] = sd[layer_key(i, ROUTER)]
    for j in range(spec.num_moe_experts):
        e = p + names.expert.format(j=j)
        out[e + f"{names.gate}.weight"], out[e + f"{names.up}.weight"] = _expert_tensor(sd, i, j, "linear_fc1").chunk(2)
        out[e + f"{names.down}.weight"] = _expert_tensor(sd, i, j, "linear_fc2")


def qkv_merge(q, k, v, heads: int, groups: int, d: int):
    """HF q/k/v projections (weights [rows, hidden] or biases [rows]) -> megatron ``linear_qkv``, interleaved per
    query group."""
    rest = q.shape[1:]
    per = heads // groups
    q = q.reshape(groups, per, d, *rest)
    k = k.reshape(groups, 1, d, *rest)
    v = v.reshape(groups, 1, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(groups * (per + 2) * d, *rest)


def qkv_split(qkv, heads: int, groups: int, d: int):
    """Inverse of :func:`qkv_merge`."""
    rest = qkv.shape[1:]
    per = heads // groups
    x = qkv.reshape(groups, per + 2, d, *rest)
    q = x[:, :per].reshape(heads * d, *rest)
    k = x[:, per].reshape(groups * d, *rest)
    v = x[:, per + 1].reshape(groups * d, *rest)
    return q, k, v


def hf_to_mcore(sd: dict, spec: ModelSpec, te: bool = False) -> dict:
    """Full (unsharded) HF state dict -> megatron GPTModel state dict."""
    heads, groups, d = spec.num_attention_heads, spec.num_query_groups, spec.kv_channels
    out = {"embedding.word_embeddings.weight": sd["model.embed_tokens.weight"]}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        for hf_name, mc_name in _renames(spec).items():
            out[layer_key(i, mc_name, te, spec.moe)] = sd[p + hf_name]
        for kind, mc_name in _qkv_names(spec):
            out[layer_key(i, mc_name, te)] = qkv_merge(
                sd[p + f"self_attn.q_proj.{kind}"], sd[p + f"self_attn.k_proj.{kind}"],
                sd[p + f"self_attn.v_proj.{kind}"], heads, groups, d,
            )
        if spec.moe:
            _moe_to_mcore(sd, spec, i, out)
            continue
        out[layer_key(i, "mlp.linear_fc1.weight", te)] = torch.cat(
            [sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]], dim=0
        )
    out["decoder.final_layernorm.weight"] = sd["model.norm.weight"]
    if not spec.tied:
        out["output_layer.weight"] = sd["lm_head.weight"]
    return out


def mcore_to_hf(sd: dict, spec: ModelSpec) -> dict:
    """Full megatron state dict (local or TE names) -> the family's HF state dict."""
    heads, groups, d = spec.num_attention_heads, spec.num_query_groups, spec.kv_channels
    te = any(k.endswith("layer_norm_weight") for k in sd)
    out = {"model.embed_tokens.weight": sd["embedding.word_embeddings.weight"]}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        for hf_name, mc_name in _renames(spec).items():
            out[p + hf_name] = sd[layer_key(i, mc_name, te, spec.moe)]
        for kind, mc_name in _qkv_names(spec):
            q, k, v = qkv_split(sd[layer_key(i, mc_name, te)], heads, groups, d)
            out[p + f"self_attn.q_proj.{kind}"], out[p + f"self_attn.k_proj.{kind}"] = q, k
            out[p + f"self_attn.v_proj.{kind}"] = v
        if spec.moe:
            _moe_to_hf(sd, spec, i, out)
            continue
        gate, up = sd[layer_key(i, "mlp.linear_fc1.weight", te)].chunk(2, dim=0)
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
    out["model.norm.weight"] = sd["decoder.final_layernorm.weight"]
    out["lm_head.weight"] = out["model.embed_tokens.weight"] if spec.tied else sd["output_layer.weight"]
    return out


# --------------------------------------------------------------------------------------------------
# reading a Hugging Face directory
# --------------------------------------------------------------------------------------------------
def read_config(path: Path) -> dict:
    path = Path(path)
    cfg = path / "config.json"
    if not path.is_dir():
        raise UserError(f"source {path} does not exist or is not a directory")
    if not cfg.is_file():
        raise UserError(f"{path} is not a Hugging Face checkpoint: config.json is missing")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg} is not valid JSON: {e}") from None


def weight_files(path: Path) -> list[Path]:
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{path}: weight shard(s) listed in the index are missing: {', '.join(missing)}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise UserError(f"{path}: no safetensors weights (model.safetensors or an index) found")


def check_tokenizer(path: Path) -> None:
    path = Path(path)
    if not any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise UserError(f"{path}: tokenizer is missing (no tokenizer.json / tokenizer.model)")


def check_safetensors(f: Path) -> None:
    """A whole safetensors file: its header parses and the file is as long as the header says."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 0 or 8 + n > size:
            raise UserError(f"{f} is truncated or not a safetensors file ({size} bytes; its header cannot be read)")
        try:
            header = json.loads(fh.read(n))
        except (ValueError, UnicodeDecodeError):
            raise UserError(f"{f} is corrupt: its safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise UserError(f"{f} is corrupt: its safetensors header is not a table of tensors")
    ends = [v.get("data_offsets", [0, 0])[1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    need = 8 + n + max(ends, default=0)
    if size < need:
        raise UserError(f"{f} is truncated ({size} bytes, its header needs {need}): re-download or re-save it")


def read_state_dict(path: Path) -> dict:
    from safetensors import safe_open

    sd = {}
    for f in weight_files(path):
        check_safetensors(f)
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    sd[k] = fh.get_tensor(k)
        except Exception as e:  # safetensors raises its own error types for truncated files
            raise UserError(f"{f}: cannot read weights ({e.__class__.__name__}: {e})") from None
    return sd


def check_state_dict(sd: dict, spec: ModelSpec) -> None:
    """Every tensor the architecture needs is present with the right shape."""
    need = {"model.embed_tokens.weight": (spec.vocab_size, spec.hidden_size),
            "model.norm.weight": (spec.hidden_size,)}
    if not spec.tied:
        need["lm_head.weight"] = (spec.vocab_size, spec.hidden_size)
    h, d = spec.hidden_size, spec.kv_channels
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        need[p + "self_attn.q_proj.weight"] = (spec.num_attention_heads * d, h)
        need[p + "self_attn.k_proj.weight"] = (spec.num_query_groups * d, h)
        need[p + "self_attn.v_proj.weight"] = (spec.num_query_groups * d, h)
        need[p + "self_attn.o_proj.weight"] = (h, spec.num_attention_heads * d)
        if spec.moe:
            names, f = spec.family.moe, spec.moe_ffn_hidden_size
            need[p + names.router] = (spec.num_moe_experts, h)
            for j in range(spec.num_moe_experts):
                e = p + names.expert.format(j=j)
                need[e + f"{names.gate}.weight"] = need[e + f"{names.up}.weight"] = (f, h)
                need[e + f"{names.down}.weight"] = (h, f)
        else:
            need[p + "mlp.gate_proj.weight"] = (spec.ffn_hidden_size, h)
            need[p + "mlp.up_proj.weight"] = (spec.ffn_hidden_size, h)
            need[p + "mlp.down_proj.weight"] = (h, spec.ffn_hidden_size)
        need[p + "input_layernorm.weight"] = (h,)
        need[p + "post_attention_layernorm.weight"] = (h,)
        if spec.qkv_bias:
            need[p + "self_attn.q_proj.bias"] = (spec.num_attention_heads * d,)
            need[p + "self_attn.k_proj.bias"] = (spec.num_query_groups * d,)
            need[p + "self_attn.v_proj.bias"] = (spec.num_query_groups * d,)
        if spec.qk_norm:
            need[p + "self_attn.q_norm.weight"] = (d,)
            need[p + "self_attn.k_norm.weight"] = (d,)
    for k, shape in need.items():
        if k not in sd:
            raise UserError(f"weights lack {k!r} (checkpoint does not match its config.json)")
        if tuple(sd[k].shape) != shape:
            raise UserError(f"{k} has shape {tuple(sd[k].shape)}, config.json implies {shape}")


# --------------------------------------------------------------------------------------------------
# sources by name: the embedded models (checkpoint/embedded.py)
# --------------------------------------------------------------------------------------------------
SMOLLM2_NAME = "smollm2-135m"


def smollm2_dir() -> Path:
    """The embedded default's Hugging Face directory (SmolLM2-135M-Instruct, dequantized Q4_1), cached."""
    return embedded.hf_dir(SMOLLM2_NAME)


def resolve_source(source: str) -> Path:
    """A path, or the Hugging Face directory of an embedded model named by ``source`` (built once)."""
    if source in embedded.EMBEDDED:
        return embedded.hf_dir(source)
    return Path(source).expanduser()
