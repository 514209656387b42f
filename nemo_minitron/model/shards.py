"""Tensor/pipeline sharding of megatron GPT parameters, by name (the rules in STACK.md).

``linear_qkv`` rows are grouped per query group, so TP shards are contiguous row blocks; ``linear_fc1``
holds [gate; up] and each rank holds [gate_r; up_r]; ``linear_proj``/``linear_fc2`` split columns;
embedding and output layer split vocabulary rows; norms are replicated. Layer indices are local to a
pipeline stage and offset by ``pp_rank * layers_per_stage``. Experts (mixtures of experts) are split over the
expert-parallel ranks: EP rank ``r`` holds global experts ``r * n .. r * n + n - 1`` as its local experts ``0 .. n-1``,
each split over the expert tensor-parallel group like a dense MLP.
"""

from __future__ import annotations

import re

import torch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_EXPERT = re.compile(r"^(decoder\.layers\.(\d+)\.mlp\.experts\.local_experts\.)(\d+)(\..*)$")


def split_expert(name: str):
    """(layer, expert, suffix after the expert index) of an expert's parameter name, else None."""
    m = _EXPERT.match(name)
    return None if m is None else (int(m.group(2)), int(m.group(3)), m.group(4))


def expert_parallel(model):
    """(EP size, EP rank, local experts per rank) of ``model`` under the initialized parallel state; (1, 0, 0)
    for a dense model."""
    from megatron.core import parallel_state as ps

    mlp = model.decoder.layers[0].mlp if len(model.decoder.layers) else None
    if mlp is None or not hasattr(mlp, "router"):
        return 1, 0, 0
    return (ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank(),
            len(mlp.experts.local_experts))


def expert_name(name: str, shift: int, n_local: int | None = None):
    """``name`` with its expert index moved by ``shift`` (local -> global: ``+rank * n``; global -> local:
    ``-rank * n``); None when the result is not one of this rank's ``n_local`` experts. Other names unchanged."""
    m = _EXPERT.match(name)
    if m is None:
        return name
    j = int(m.group(3)) + shift
    if n_local is not None and not 0 <= j < n_local:
        return None
    return f"{m.group(1)}{j}{m.group(4)}"


def is_expert(name: str) -> bool:
    return _EXPERT.match(name) is not None


def split_kind(name: str) -> str:
    """How a parameter is split over tensor-parallel ranks: 'row', 'col', 'fc1' or 'none'."""
    if name.endswith("_extra_state") or "norm" in name.rsplit(".", 1)[-1] or "layernorm" in name:
        return "none"
    if is_vocab(name):
        return "row"
    if ".linear_qkv." in name:
        return "row"
    if ".linear_fc1." in name:
        return "fc1"
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return "col"
    return "none"


def is_vocab(name: str) -> bool:
    """The tensors whose rows are the vocabulary (padded by megatron to a multiple of TP)."""
    return name.endswith(("word_embeddings.weight", "output_layer.weight"))


def fit_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` with ``rows`` rows: padding rows cut, or zero rows appended (a zero output row's logit is masked
    by every loss; no token id reaches an embedding padding row)."""
    if t.shape[0] >= rows:
        return t[:rows]
    return torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))])


def to_shard(name: str, full: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    kind = split_kind(name)
    if tp == 1 or kind == "none":
        return full
    if kind == "row":
        return full.chunk(tp, dim=0)[tp_rank]
    if kind == "col":
        return full.chunk(tp, dim=1)[tp_rank]
    gate, up = full.chunk(2, dim=0)
    return torch.cat([gate.chunk(tp, 0)[tp_rank], up.chunk(tp, 0)[tp_rank]], dim=0)


def from_shards(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    kind = split_kind(name)
    if len(shards) == 1 or kind == "none":
        return shards[0]
    if kind == "row":
        return torch.cat(shards, dim=0)
    if kind == "col":
        return torch.cat(shards, dim=1)
    halves = [s.chunk(2, dim=0) for s in shards]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)


def global_name(local: str, layer_offset: int) -> str:
    m = _LAYER.match(local)
    return f"decoder.layers.{int(m.group(1)) + layer_offset}.{m.group(2)}" if m else local


def local_name(name: str, layer_offset: int, layers_here: int):
    """Local name on a stage, or None when the tensor lives on another stage."""
    m = _LAYER.match(name)
    if not m:
        return name
    i = int(m.group(1)) - layer_offset
    return f"decoder.layers.{i}.{m.group(2)}" if 0 <= i < layers_here else None


def layer_offset(model) -> int:
    from megatron.core import parallel_state

    n = len(model.decoder.layers)
    return parallel_state.get_pipeline_model_parallel_rank() * n


def load_full_state_dict(model, full: dict) -> None:
    """Load a full (unsharded, global layer numbering) state dict into this rank's chunk."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    etp = parallel_state.get_expert_tensor_parallel_world_size()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    off, here = layer_offset(model), len(model.decoder.layers)
    ep, ep_rank, n_local = expert_parallel(model)
    own = model.state_dict()
    local = {}
    for name, tensor in full.items():
        ln = local_name(name, off, here)
        if ln is not None and ep > 1:
            ln = expert_name(ln, -ep_rank * n_local, n_local)  # another EP rank's expert: None
        if ln is None or ln not in own:
            continue  # e.g. output_layer on a non-last stage, embedding on a non-first stage
        if is_vocab(name):  # the vocabulary padded (or its padding cut) to the rows this layout builds
            tensor = fit_rows(tensor, own[ln].shape[0] * tp)
        local[ln] = to_shard(name, tensor, etp_rank, etp) if is_expert(name) else to_shard(name, tensor, tp_rank, tp)
    missing, _ = model.load_state_dict(local, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing:
        raise KeyError(f"state dict lacks {missing[:5]}")


def _gather_tp(name: str, t: torch.Tensor, tp: int, group) -> torch.Tensor:
    """The full tensor of ``name`` from every TP rank's shard ``t`` (on the shard's device)."""
    import torch.distributed as dist

    t = t.detach().contiguous()
    if tp == 1 or split_kind(name) == "none":
        return t
    bufs = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(bufs, t, group=group)
    return from_shards(name, bufs)


def gather_full(model, which: str = "param", across_pp: bool = True) -> dict:
    """Full tensors (params or grads) under global names, gathered over TP on every rank, and over PP
    too unless ``across_pp=False`` (then each stage gets its own layers only). The tensors stay on the
    model's device, in its dtype; :func:`nemo_minitron.parallel.to_host` makes host copies (for files)."""
    from megatron.core import parallel_state

    from nemo_minitron import parallel

    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    etp_group = parallel_state.get_expert_tensor_parallel_group()
    etp = parallel_state.get_expert_tensor_parallel_world_size()
    off = layer_offset(model)
    ep, ep_rank, n_local = expert_parallel(model)
    mine, experts = {}, {}
    for name, p in model.named_parameters():
        t = p.detach() if which == "param" else (p.main_grad if hasattr(p, "main_grad") else p.grad)
        if t is None:
            continue
        if is_expert(name):  # under its global expert index, gathered over the expert tensor-parallel group
            experts[expert_name(global_name(name, off), ep_rank * n_local)] = _gather_tp(name, t, etp, etp_group)
        else:
            mine[global_name(name, off)] = _gather_tp(name, t, tp, tp_group)
    if ep > 1:
        for part in parallel.all_gather_tensors(experts, parallel_state.get_expert_model_parallel_group()):
            mine.update(part)
    else:
        mine.update(experts)
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if pp == 1 or not across_pp:
        return mine
    full = {}
    for part in parallel.all_gather_tensors(mine, parallel_state.get_pipeline_model_parallel_group()):
        for k, v in part.items():
            full.setdefault(k, v)
    return full


def transform_into(src, dst, transform, rename=None) -> None:
    """Fill ``dst`` (a model chunk at the same TP/PP layout) from ``src``, one tensor at a time: each of
    ``src``'s parameters is gathered over TP, passed through ``transform(global_name, full) -> full'`` and
    ``dst``'s shard of the result is copied in. Peak memory: one full tensor (not the whole model).
    ``rename(local_name) -> local name in dst, or None`` maps parameters whose names change (pruned experts
    renumbered) or that ``dst`` no longer has (None: not copied)."""
    from megatron.core import parallel_state

    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    off = layer_offset(src)
    own = dict(dst.named_parameters())
    filled = set()
    with torch.no_grad():
        for name, p in src.named_parameters():
            new = rename(name) if rename is not None else name
            if new is None:
                continue  # the same decision on every rank: no TP gather is left unmatched
            if new not in own:
                raise KeyError(f"the new model has no parameter {new}")
            full = transform(global_name(name, off), _gather_tp(name, p, tp, tp_group))
            own[new].copy_(to_shard(name, full, tp_rank, tp))
            filled.add(new)
    missing = sorted(set(own) - filled)
    if missing:
        raise KeyError(f"parameters of the new model not filled: {missing[:5]}")
