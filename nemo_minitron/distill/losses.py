"""Distillation losses as plain functions over (tensor-parallel) logits and hidden states.

``kl_div`` is the logit loss: forward KL(teacher || student) or reverse KL(student || teacher) with a
temperature, computed **vocab-parallel** (each tensor-parallel rank holds a slice of the vocabulary; only
per-token max and sums are all-reduced, full logits are never gathered) and **chunked over tokens**: the
forward keeps only per-token statistics and the backward recomputes probabilities chunk by chunk, so the
loss adds about one copy of the logits (their gradient) to peak memory instead of the 4-5 fp32 copies of
``F.kl_div(F.log_softmax(s), F.softmax(t))``. ``bench/kl_memory.py`` measures the ratio.

Vocabulary entries at or above ``vocab_size`` (padding rows from ``make_vocab_size_divisible_by``) are
excluded from both distributions, so a teacher and a student that differ only by padding agree.

``fused_output_loss`` goes one step further (``distill.fused_output``, the default): it takes the final
hidden states and the output-layer weights of both models and computes the logits, the same vocab-parallel
KL (and megatron's vocab-parallel cross-entropy) and their gradients with respect to the student's hidden
states and output weight chunk of tokens by chunk, so neither model's full logits, nor their gradient, are
ever held. ``bench/kd_step_memory.py`` measures a whole step against the materialized-logits path.
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


def _workspace(rows: int, cols: int, device, blocks: int = 4, user: str = "kl") -> torch.Tensor:
    """Reusable fp32 blocks ``[blocks, rows, cols]``, one buffer per ``user`` and device (fresh allocations
    per chunk cost page faults on CPU); the old buffer is dropped before a larger one is allocated."""
    key = (user, str(device))
    need = blocks * rows * cols
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() < need:
        _WORKSPACE.pop(key, None)
        buf = torch.empty(need, dtype=torch.float32, device=device)
        _WORKSPACE[key] = buf
    return buf[:need].view(blocks, rows, cols)


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


# --------------------------------------------------------------------------------------------------
# the output layer fused with the loss: logits are never held in full
# --------------------------------------------------------------------------------------------------
FUSED_BLOCK_BYTES = 256 << 20  # automatic chunks: at most this many bytes per fp32 [tokens, vocab shard] block
FUSED_MIN_CHUNKS = 8  # ... and at least this many chunks, so the blocks stay a fraction of one logits copy


def fused_chunk_rows(tokens: int, v_local: int, chunk_tokens: int = 0) -> int:
    """Tokens per chunk of :func:`fused_output_loss`: ``chunk_tokens`` if > 0, else the largest count whose
    fp32 ``[chunk, v_local]`` block stays under ``FUSED_BLOCK_BYTES`` and that splits the tokens into at
    least ``FUSED_MIN_CHUNKS`` chunks."""
    if chunk_tokens > 0:
        return max(1, min(tokens, chunk_tokens))
    by_bytes = FUSED_BLOCK_BYTES // (4 * max(1, v_local))
    return max(1, min(tokens, by_bytes, -(-tokens // FUSED_MIN_CHUNKS)))


def fused_output_bytes(tokens: int, v_local: int, student_hidden: int, lm: bool = False,
                       chunk_tokens: int = 0, weight_bytes: int = 4) -> int:
    """Peak extra bytes of :func:`fused_output_loss` for one micro-batch: the fp32 chunk blocks (4, 5 with
    the cross-entropy term), the fp32 weight-gradient accumulator, the hidden-state gradient, and with
    16-bit weights (``weight_bytes=2``) the 16-bit logit block and weight-gradient product of one chunk."""
    rows = fused_chunk_rows(tokens, v_local, chunk_tokens)
    total = 4 * ((5 if lm else 4) * rows * v_local + v_local * student_hidden) + weight_bytes * tokens * student_hidden
    if weight_bytes < 4:
        total += weight_bytes * (rows * v_local + v_local * student_hidden)
    return total


def _logits_into(out: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> None:
    """``out`` (fp32 block) = h @ w^T, the output layer's matmul in the weight's dtype."""
    if h.dtype == torch.float32 and w.dtype == torch.float32:
        torch.matmul(h, w.t(), out=out)
    else:
        out.copy_(torch.matmul(h.to(w.dtype), w.t()))


class _FusedOutputLoss(torch.autograd.Function):
    """Output layers of student and teacher + vocab-parallel KL (+ cross-entropy), chunk of tokens by chunk.

    Inputs are the final hidden states ``[n, h]`` (the student's already in the output layer's
    tensor-parallel region) and this rank's vocabulary shard of each output weight ``[v, h]``. For each
    chunk the logit blocks are computed, the softmax statistics all-reduced over the TP group (max, sum of
    exponentials, the label's logit: the reductions of :func:`kl_div` and megatron's
    ``vocab_parallel_cross_entropy``), the per-token losses and the gradient ``G`` of the weighted objective
    with respect to the chunk's student logits; ``G @ W`` (hidden-state gradient) and ``G^T h`` (weight
    gradient, accumulated in fp32) are formed at once, so the logits are never recomputed. The loss is the
    last operation of the step, so the backward only scales the two stored gradients by the incoming
    scalar, in place (one backward per forward, as for :class:`_VocabParallelKL`).
    """

    @staticmethod
    def forward(ctx, hs, ws, ht, wt, labels, weights, opts):
        kd_w, lm_w, temperature, reverse, vocab_size, chunk, need_grad = opts
        group, rank, world = _tp_group()
        n, v = hs.shape[0], ws.shape[0]
        kd, lm = kd_w > 0, lm_w > 0
        keep = _valid_columns(v, rank, vocab_size)
        rows = fused_chunk_rows(n, v, chunk)
        need_h = need_grad and ctx.needs_input_grad[0]
        need_w = need_grad and ctx.needs_input_grad[1]
        dev = hs.device
        grad_h = torch.empty_like(hs) if need_h else None
        grad_w = torch.zeros(ws.shape, dtype=torch.float32, device=dev) if need_w else None
        kl_tok = torch.zeros(n, dtype=torch.float32, device=dev)
        ce_tok = torch.zeros(n, dtype=torch.float32, device=dev)
        weights = weights.float()
        ws_blocks = _workspace(rows, v, dev, blocks=(4 if kd else 2) + (1 if lm and kd else 0), user="fused")
        if lm:
            local = labels - rank * v
            on_rank = (local >= 0) & (local < v)
            local = torch.where(on_rank, local, torch.zeros_like(local))
        for a in range(0, n, rows):
            b = min(n, a + rows)
            r = b - a
            blocks = [w[:r] for w in ws_blocks]
            zs = blocks[0]
            _logits_into(zs, hs[a:b], ws)
            if kd:
                zt, ps, pt = blocks[1], blocks[2], blocks[3]
                _logits_into(zt, ht[a:b], wt)
            g = blocks[-1] if lm else (blocks[2] if kd else None)  # the chunk's d objective / d student logits
            # one MAX all-reduce: CE's max over the whole shard, the KL's over real tokens at temperature
            maxes = []
            if lm:
                maxes.append(zs.amax(dim=-1))
            if kd:  # max(z) / T == max(z / T) exactly (division by T > 0 is monotone and correctly rounded)
                maxes += [zs[:, :keep].amax(dim=-1), zt[:, :keep].amax(dim=-1)]
                if temperature != 1.0:
                    maxes[-2], maxes[-1] = maxes[-2] / temperature, maxes[-1] / temperature
            mx = _all_reduce(torch.stack(maxes), dist.ReduceOp.MAX, group, world)
            sums = []
            if lm:  # megatron's vocab-parallel cross-entropy: log(sum exp(z - m)) - (z_label - m)
                m1 = mx[0]
                torch.sub(zs, m1.unsqueeze(-1), out=g)
                pred = zs.gather(1, local[a:b].unsqueeze(-1)).squeeze(-1) - m1
                pred = torch.where(on_rank[a:b], pred, torch.zeros_like(pred))
                g.exp_()
                sums += [g.sum(dim=-1), pred]
            if kd:
                ms, mt = mx[-2], mx[-1]
                xs, xt = zs[:, :keep], zt[:, :keep]
                for x, m, p in ((xs, ms, ps[:, :keep]), (xt, mt, pt[:, :keep])):
                    if temperature != 1.0:
                        x.div_(temperature)
                    x.sub_(m.unsqueeze(-1))
                    torch.exp(x, out=p)
                    sums.append(p.sum(dim=-1))
            sm = _all_reduce(torch.stack(sums), dist.ReduceOp.SUM, group, world)
            if lm:
                z1, pred = sm[0], sm[1]
                ce_tok[a:b] = torch.log(z1) - pred
                if need_grad:  # c * lm_w * (softmax - onehot(label))
                    coef = weights[a:b] * lm_w
                    g.mul_((coef / z1).unsqueeze(-1))
                    rows_on = on_rank[a:b]
                    idx = torch.arange(r, device=dev)[rows_on]
                    g[idx, local[a:b][rows_on]] -= coef[rows_on]
            if kd:
                zsum_s, zsum_t = sm[-2], sm[-1]
                log_ps, log_pt, p_s, p_t = xs, xt, ps[:, :keep], pt[:, :keep]
                log_ps.sub_(torch.log(zsum_s).unsqueeze(-1))
                p_s.div_(zsum_s.unsqueeze(-1))
                log_pt.sub_(torch.log(zsum_t).unsqueeze(-1))
                p_t.div_(zsum_t.unsqueeze(-1))
                coef = (weights[a:b] * (kd_w * temperature)).unsqueeze(-1)  # d(T^2 KL)/dz = T * dKL/d(z/T)
                if reverse:  # KL = sum p_s (log p_s - log p_t); grad p_s (log p_s - log p_t - KL)
                    diff = log_ps.sub_(log_pt)
                    kl = _all_reduce(torch.einsum("ij,ij->i", p_s, diff), dist.ReduceOp.SUM, group, world)
                    if need_grad:  # into the p_s block (a * b == b * a exactly)
                        p_s.mul_(diff.sub_(kl.unsqueeze(-1))).mul_(coef)
                else:  # KL = sum p_t (log p_t - log p_s); grad p_s - p_t
                    kl = _all_reduce(torch.einsum("ij,ij->i", p_t, log_pt.sub_(log_ps)), dist.ReduceOp.SUM,
                                     group, world)
                    if need_grad:
                        p_s.sub_(p_t).mul_(coef)
                kl_tok[a:b] = kl
                if need_grad:
                    if lm:
                        g[:, :keep].add_(p_s)
                    elif keep < v:  # g is the p_s block: its padding columns get no gradient
                        g[:, keep:].zero_()
            if need_grad:
                gl = g if ws.dtype == torch.float32 else g.to(ws.dtype)
                if need_h:
                    if gl.dtype == grad_h.dtype:
                        torch.matmul(gl, ws, out=grad_h[a:b])
                    else:
                        grad_h[a:b].copy_(torch.matmul(gl, ws))
                if need_w:
                    h = hs[a:b]
                    if gl.dtype == torch.float32 and h.dtype == torch.float32:
                        grad_w.addmm_(gl.t(), h)
                    else:
                        grad_w.add_(torch.matmul(gl.t(), h.to(gl.dtype)))
        kd_sum = (kl_tok * (temperature ** 2) * weights).sum() if kd else torch.zeros((), device=dev)
        lm_sum = (ce_tok * weights).sum() if lm else torch.zeros((), device=dev)
        objective = kd_w * kd_sum + lm_w * lm_sum
        ctx.save_for_backward(grad_h, grad_w)
        ctx.ws_dtype = ws.dtype
        ctx.mark_non_differentiable(kd_sum, lm_sum)
        return objective, kd_sum, lm_sum

    @staticmethod
    def backward(ctx, grad_obj, _grad_kd, _grad_lm):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h.mul_(grad_obj.to(grad_h.dtype))
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_obj.float()).to(ctx.ws_dtype)
        return grad_h, grad_w, None, None, None, None, None


def fused_output_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                      teacher_hidden: torch.Tensor | None, teacher_weight: torch.Tensor | None,
                      labels: torch.Tensor | None, weights: torch.Tensor, kd_weight: float = 1.0,
                      lm_weight: float = 0.0, temperature: float = 1.0, reverse: bool = False,
                      vocab_size: int | None = None, chunk_tokens: int = 0):
    """``kd_weight * sum_i w_i T^2 KL_i + lm_weight * sum_i w_i CE_i`` from final hidden states, without the
    logits: returns ``(objective, kd_sum, lm_sum)`` (fp32 scalars; only ``objective`` has a gradient).

    ``student_hidden`` ``[n, h_s]`` (in the output layer's tensor-parallel region: its gradient is this
    rank's part, all-reduced by the caller's copy-to-region), ``student_weight`` ``[v, h_s]`` this rank's
    vocabulary shard of the output layer (or the tied embedding), ``teacher_hidden`` ``[n, h_t]`` and
    ``teacher_weight`` ``[v, h_t]`` the same for the frozen teacher (only needed when ``kd_weight > 0``),
    ``labels`` ``[n]`` (global token ids; only needed when ``lm_weight > 0``), ``weights`` ``[n]`` the loss
    mask. Same values and gradients as ``kl_div`` / megatron's ``vocab_parallel_cross_entropy`` on the
    materialized logits: columns at or above ``vocab_size`` are excluded from the KL, the cross-entropy
    normalizes over the whole (padded) shard as megatron's does.
    """
    if kd_weight > 0:
        if teacher_weight.shape[0] != student_weight.shape[0]:
            raise ValueError(f"student vocab shard {student_weight.shape[0]} and teacher vocab shard "
                             f"{teacher_weight.shape[0]} differ: vocabularies must match up to padding")
        teacher_hidden, teacher_weight = teacher_hidden.detach(), teacher_weight.detach()
    opts = (float(kd_weight), float(lm_weight), float(temperature), bool(reverse), vocab_size, int(chunk_tokens),
            torch.is_grad_enabled())
    return _FusedOutputLoss.apply(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                  labels, weights.detach(), opts)


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
