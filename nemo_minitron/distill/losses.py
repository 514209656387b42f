"""Distillation losses as plain functions over (tensor-parallel) logits and hidden states.

``kl_div`` is the logit loss: forward KL(teacher || student) or reverse KL(student || teacher) with a
temperature, computed **vocab-parallel** (each tensor-parallel rank holds a slice of the vocabulary; only
per-token max and sums are all-reduced, full logits are never gathered) and **chunked over tokens**: the
forward keeps only per-token statistics and the backward recomputes probabilities chunk by chunk, so the
loss adds about one copy of the logits (their gradient) to peak memory instead of the 4-5 fp32 copies of
``F.kl_div(F.log_softmax(s), F.softmax(t))``. ``bench/kl_memory.py`` measures the ratio.

Vocabulary entries at or above ``vocab_size`` (padding rows from ``make_vocab_size_divisible_by``) are
excluded from both distributions, so a teacher and a student that differ only by padding agree.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

DEFAULT_CHUNK_TOKENS = 0  # 0: automatic, ~16M logits (64 MiB fp32) per chunk


def _tp_group():
    from megatron.core import parallel_state

    if not dist.is_initialized() or not parallel_state.model_parallel_is_initialized():
        return None, 0, 1
    return (parallel_state.get_tensor_model_parallel_group(),
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size())


def _all_reduce(t: torch.Tensor, op, group, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _valid_columns(local_vocab: int, rank: int, vocab_size: int | None) -> int:
    """How many leading columns of this rank's vocab slice are real tokens (the rest is padding)."""
    if vocab_size is None:
        return local_vocab
    return max(0, min(local_vocab, vocab_size - rank * local_vocab))


def _chunk_rows(chunk: int, v_local: int) -> int:
    """Rows per chunk: ``chunk`` if given, else about 8M elements (32 MiB in fp32) per block."""
    return chunk if chunk > 0 else max(1, (1 << 23) // max(1, v_local))


_WORKSPACE: dict = {}


def _workspace(rows: int, cols: int, device) -> torch.Tensor:
    """Four reusable fp32 blocks [4, rows, cols] (fresh allocations per chunk cost page faults on CPU)."""
    key = str(device)
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() < 4 * rows * cols:
        buf = torch.empty(4 * rows * cols, dtype=torch.float32, device=device)
        _WORKSPACE[key] = buf
    return buf[: 4 * rows * cols].view(4, rows, cols)


def release_workspace() -> None:
    _WORKSPACE.clear()


def _softmax_block(logits: torch.Tensor, a: int, b: int, keep: int, temperature: float, group, world: int,
                   x: torch.Tensor, p: torch.Tensor):
    """Rows [a, b) of vocab-sharded logits -> log p into ``x`` and p into ``p`` (fp32 blocks), normalized
    over the full vocabulary (all-reduce of the row max and of the row sum of exponentials)."""
    x.copy_(logits[a:b, :keep])
    if temperature != 1.0:
        x.div_(temperature)
    m = x.amax(dim=-1, keepdim=True)
    _all_reduce(m, dist.ReduceOp.MAX, group, world)
    x.sub_(m)
    torch.exp(x, out=p)
    z = p.sum(dim=-1, keepdim=True)
    _all_reduce(z, dist.ReduceOp.SUM, group, world)
    x.sub_(torch.log(z))
    p.div_(z)


class _VocabParallelKL(torch.autograd.Function):
    """Per-token KL over vocab-sharded logits, fused with its gradient.

    One pass over the logits in chunks of rows computes both distributions (two ``exp`` per logit in
    all), the KL and d KL / d student; the backward only scales that gradient by the incoming one, in
    place. Peak extra memory: the gradient (one copy of the logits, in their dtype, which any backward
    must produce) plus a reusable workspace of four fp32 blocks of one chunk (32 MiB each by default).
    """

    @staticmethod
    def forward(ctx, student, teacher, temperature, reverse, vocab_size, chunk):
        group, rank, world = _tp_group()
        n, v = student.shape
        keep = _valid_columns(v, rank, vocab_size)
        rows = min(n, _chunk_rows(chunk, v))
        need_grad = ctx.needs_input_grad[0]
        out = torch.empty(n, dtype=torch.float32, device=student.device)
        grad = None
        if need_grad:
            grad = torch.empty_like(student)
            if keep < v:
                grad[:, keep:] = 0  # padding columns
        ws = _workspace(rows, keep, student.device)
        for a in range(0, n, rows):
            b = min(n, a + rows)
            log_ps, ps, log_pt, pt = (w[: b - a] for w in ws)
            _softmax_block(student, a, b, keep, temperature, group, world, log_ps, ps)
            _softmax_block(teacher, a, b, keep, temperature, group, world, log_pt, pt)
            if reverse:  # KL = sum_v p_s (log p_s - log p_t); dKL/ds = p_s (log p_s - log p_t - KL) / T
                diff = log_ps.sub_(log_pt)
                kl = torch.einsum("ij,ij->i", ps, diff)
                _all_reduce(kl, dist.ReduceOp.SUM, group, world)
                if need_grad:
                    grad[a:b, :keep] = diff.sub_(kl.unsqueeze(-1)).mul_(ps).div_(temperature)
            else:  # KL = sum_v p_t (log p_t - log p_s); dKL/ds = (p_s - p_t) / T
                kl = torch.einsum("ij,ij->i", pt, log_pt.sub_(log_ps))
                _all_reduce(kl, dist.ReduceOp.SUM, group, world)
                if need_grad:
                    grad[a:b, :keep] = ps.sub_(pt).div_(temperature) if temperature != 1.0 else ps.sub_(pt)
            out[a:b] = kl
        if need_grad:
            ctx.save_for_backward(grad)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        grad.mul_(grad_out.unsqueeze(-1).to(grad.dtype))  # in place: the saved gradient is used once
        return grad, None, None, None, None, None


def kl_div(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
           reverse: bool = False, vocab_size: int | None = None,
           chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Per-token KL divergence between vocab-parallel logits ``[..., v_local]`` -> ``[...]`` (fp32).

    Forward KL(teacher || student) by default, reverse KL(student || teacher) with ``reverse=True``;
    both at ``temperature`` and multiplied by ``temperature**2`` (so gradients keep their scale, as in
    Hinton et al.). The teacher gets no gradient. Student and teacher slices must have the same width;
    ``vocab_size`` (the unpadded vocabulary) masks padding columns of both.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: vocabularies must match up to padding")
    lead = student_logits.shape[:-1]
    s = student_logits.reshape(-1, student_logits.shape[-1])
    t = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    out = _VocabParallelKL.apply(s, t, float(temperature), bool(reverse), vocab_size, int(chunk_tokens))
    return out.reshape(lead) * (temperature ** 2)


def kl_div_reference(student_logits, teacher_logits, temperature: float = 1.0, reverse: bool = False):
    """The naive full-vocabulary KL (materializes every intermediate): the ground truth for tests/bench."""
    log_ps = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_pt = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    if reverse:
        return (log_ps.exp() * (log_ps - log_pt)).sum(-1) * temperature ** 2
    return F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(-1) * temperature ** 2


def match_vocab(student_logits: torch.Tensor, teacher_logits: torch.Tensor):
    """Cut both logit tensors to their common width (TP=1: vocabularies differing only by padding)."""
    v = min(student_logits.shape[-1], teacher_logits.shape[-1])
    return student_logits[..., :v], teacher_logits[..., :v]


# --------------------------------------------------------------------------------------------------
# intermediate states
# --------------------------------------------------------------------------------------------------
def hidden_loss(student_h: torch.Tensor, teacher_h: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Per-token loss between hidden states ``[s, b, h]`` of equal width -> ``[s, b]`` (fp32).

    ``cosine``: 1 - cos(student, teacher); ``mse``: mean squared error over the hidden dimension.
    """
    s, t = student_h.float(), teacher_h.detach().float()
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(s, t, dim=-1)
    if kind == "mse":
        return ((s - t) ** 2).mean(-1)
    raise ValueError(f"unknown intermediate loss {kind!r} (cosine or mse)")
