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

DEFAULT_CHUNK_TOKENS = 1024


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


def _log_softmax_stats(x: torch.Tensor, group, world: int):
    """Per-row global max and log-sum-exp of a vocab-sharded [n, v_local] fp32 block."""
    m = x.max(dim=-1).values
    _all_reduce(m, dist.ReduceOp.MAX, group, world)
    s = torch.exp(x - m.unsqueeze(-1)).sum(dim=-1)
    _all_reduce(s, dist.ReduceOp.SUM, group, world)
    return m + torch.log(s)


class _VocabParallelKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, temperature, reverse, vocab_size, chunk):
        group, rank, world = _tp_group()
        n, v = student.shape
        keep = _valid_columns(v, rank, vocab_size)
        out = torch.empty(n, dtype=torch.float32, device=student.device)
        lse_s = torch.empty_like(out)
        lse_t = torch.empty_like(out)
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            s = student[a:b, :keep].float() / temperature
            t = teacher[a:b, :keep].float() / temperature
            ls, lt = _log_softmax_stats(s, group, world), _log_softmax_stats(t, group, world)
            lse_s[a:b], lse_t[a:b] = ls, lt
            log_ps, log_pt = s - ls.unsqueeze(-1), t - lt.unsqueeze(-1)
            if reverse:  # sum_v p_s (log p_s - log p_t)
                part = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
            else:  # sum_v p_t (log p_t - log p_s)
                part = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
            out[a:b] = part
            del s, t, log_ps, log_pt
        _all_reduce(out, dist.ReduceOp.SUM, group, world)
        ctx.save_for_backward(student, teacher, lse_s, lse_t, out)
        ctx.cfg = (temperature, reverse, keep, chunk)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        student, teacher, lse_s, lse_t, kl = ctx.saved_tensors
        temperature, reverse, keep, chunk = ctx.cfg
        grad = torch.zeros_like(student)
        n = student.shape[0]
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            log_ps = student[a:b, :keep].float() / temperature - lse_s[a:b].unsqueeze(-1)
            log_pt = teacher[a:b, :keep].float() / temperature - lse_t[a:b].unsqueeze(-1)
            ps = log_ps.exp()
            if reverse:  # d/ds_i: p_s,i (log p_s,i - log p_t,i - KL)
                g = ps * (log_ps - log_pt - kl[a:b].unsqueeze(-1))
            else:  # d/ds_i: p_s,i - p_t,i
                g = ps - log_pt.exp()
            g *= (grad_out[a:b] / temperature).unsqueeze(-1)
            grad[a:b, :keep] = g.to(grad.dtype)
            del log_ps, log_pt, ps, g
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
