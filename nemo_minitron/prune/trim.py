"""Apply a width plan to a full (TP-gathered) megatron state dict, local or Transformer Engine names.

Works on whatever part of the model the dict holds (one pipeline stage's layers, with or without the
embedding and output layer), so each stage trims its own layers. Trimmed tensors: embedding and output
layer columns, every norm of the residual stream (also TE's fused ``layer_norm_weight``), ``linear_qkv`` rows
(per kept group: its kept query heads, its key and value head) and columns, and its bias rows likewise (Qwen2),
``linear_proj`` rows and columns, the gate and up halves of ``linear_fc1``, ``linear_fc2``. The per-head q/k
norms (Qwen3) act on head_dim, which pruning keeps: they are copied unchanged. ``_extra_state`` (TE FP8 scaling state) is dropped: it
describes the old shapes and is re-created on load.

Mixture-of-experts layers: the router keeps the rows of the kept experts (and the kept hidden columns); a kept
expert keeps its own kept neurons (the gate and up rows of its ``linear_fc1``, the columns of its ``linear_fc2``)
and is renumbered by its rank among the kept experts (:func:`expert_rename`); a dropped expert is not copied.
"""

from __future__ import annotations

import re

import torch

from nemo_minitron.model.shards import expert_name, split_expert
from nemo_minitron.model.spec import ModelSpec
from nemo_minitron.prune.plan import WidthPlan

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_MLP_LINEARS = (".linear_fc1.weight", ".linear_fc2.weight")  # an expert's, after its index


def expert_rename(name: str, plan: WidthPlan, layer_offset: int = 0):
    """The pruned model's name for ``name`` (a layer-local name on a stage whose first layer is ``layer_offset``):
    kept experts renumbered 0.. in their order, None for a dropped expert, any other name unchanged."""
    e = split_expert(name) if plan.experts is not None else None
    if e is None:
        return name
    kept = plan.experts[e[0] + layer_offset].tolist()
    return expert_name(name, kept.index(e[1]) - e[1]) if e[1] in kept else None


def new_spec(spec: ModelSpec, targets: dict) -> ModelSpec:
    """Pruned model config: the targets, with head_dim (kv_channels) preserved explicitly."""
    return spec.replace(kv_channels=spec.kv_channels, **targets)


def _qkv(w, spec, plan: WidthPlan, l: int):
    """``linear_qkv`` weight [rows, hidden] or bias [rows]: the kept groups' kept query heads, key and value."""
    G, d = spec.num_query_groups, spec.kv_channels
    per = spec.num_attention_heads // G
    rest = w.shape[1:]
    x = w.reshape(G, per + 2, d, *rest)
    if plan.groups is None:
        return w
    blocks = [torch.cat([x[g, hk], x[g, per:per + 2]]) for g, hk in zip(plan.groups[l].tolist(), plan.heads[l])]
    return torch.stack(blocks).reshape(-1, *rest)


def _proj(w, spec, plan: WidthPlan, l: int, merge: bool):
    if plan.groups is None:
        return w
    G, d = spec.num_query_groups, spec.kv_channels
    per = spec.num_attention_heads // G
    y = w.reshape(w.shape[0], G, per, d)
    cols = []
    for j, g in enumerate(plan.groups[l].tolist()):
        kept = y[:, g].clone()  # [h, per, d]
        if merge:
            # fold each pruned head's output projection into a kept head of the same group (they share
            # K and V): pruned heads, most important first, pair with kept heads, least important first
            # (the reverse pairing of 2407.14679); exact when the paired heads attend alike.
            order = plan.kept_by_score[l][j].tolist()[::-1]
            for i, p in enumerate(plan.pruned_heads[l][j].tolist()):
                k = order[i % len(order)]
                kept[:, k] += y[:, g, p]
        cols.append(kept[:, plan.heads[l][j]])
    return torch.stack(cols, dim=1).reshape(w.shape[0], -1)


def _mlp_linear(w, keep, fc1: bool, hk):
    """An MLP's ``linear_fc1`` (rows [gate; up] per neuron, columns the hidden channels) or ``linear_fc2`` (the
    reverse) with its kept neurons ``keep`` and kept hidden channels ``hk`` (None: all)."""
    if fc1:
        if keep is not None:
            gate, up = w.chunk(2, dim=0)
            w = torch.cat([gate[keep], up[keep]])
        return w[:, hk] if hk is not None else w
    w = w[:, keep] if keep is not None else w
    return w[hk] if hk is not None else w


def trim(sd: dict, spec: ModelSpec, plan: WidthPlan, merge_pruned_heads: bool = False) -> dict:
    hk, out = plan.hidden, {}
    for name, w in sd.items():
        if name.endswith("_extra_state"):
            continue
        m = _LAYER.match(name)
        if m is None:
            if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                w = w[:, hk] if hk is not None else w
            elif name == "decoder.final_layernorm.weight":
                w = w[hk] if hk is not None else w
            out[name] = w.clone()
            continue
        l, suffix = int(m.group(1)), m.group(2)
        if suffix in ("self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"):
            pass  # per-head norms over head_dim (kept)
        elif suffix.endswith("layernorm.weight") or suffix.endswith("layer_norm_weight"):
            w = w[hk] if hk is not None else w
        elif suffix == "self_attention.linear_qkv.weight":
            w = _qkv(w, spec, plan, l)
            w = w[:, hk] if hk is not None else w
        elif suffix == "self_attention.linear_qkv.bias":
            w = _qkv(w, spec, plan, l)
        elif suffix == "self_attention.linear_proj.weight":
            w = _proj(w, spec, plan, l, merge_pruned_heads)
            w = w[hk] if hk is not None else w
        elif suffix in ("mlp.linear_fc1.weight", "mlp.linear_fc2.weight"):
            w = _mlp_linear(w, plan.ffn[l] if plan.ffn is not None else None, suffix == "mlp.linear_fc1.weight", hk)
        elif suffix == "mlp.router.weight":
            w = w[plan.experts[l]] if plan.experts is not None else w
            w = w[:, hk] if hk is not None else w
        elif split_expert(name) is not None and split_expert(name)[2] in _MLP_LINEARS:
            _, j, linear = split_expert(name)
            keep = plan.expert_ffn[l][j] if plan.expert_ffn is not None else None
            w = _mlp_linear(w, keep, linear == _MLP_LINEARS[0], hk)
        else:
            raise KeyError(f"do not know how to prune {name}")
        out[name] = w.contiguous().clone()
    return out
