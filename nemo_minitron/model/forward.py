"""Forward (and backward) of the LM loss over micro-batches, with megatron's pipeline schedules.

One code path for TP=1, TP>1 and PP>1: ``get_forward_backward_func()`` picks the schedule; the loss is
computed on the last pipeline stage and its (sum, count) is broadcast to every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from nemo_minitron import platform


def _position_ids(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def split_window(window: torch.Tensor):
    """[b, L+1] token windows -> (inputs [b, L], labels [b, L])."""
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()


def vocab_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per-token cross-entropy of vocab-parallel ``logits`` ([..., V/TP], this TP rank's columns) against
    ``labels`` ([...]), with megatron's padding columns (global index >= ``vocab_size``) excluded: the same
    value at every TP size, whatever the padding rows of the output layer hold."""
    from megatron.core import parallel_state, tensor_parallel

    logits = logits.float()
    logits = mask_vocab_padding(logits, vocab_size, parallel_state.get_tensor_model_parallel_rank(),
                                torch.finfo(logits.dtype).min)
    return tensor_parallel.vocab_parallel_cross_entropy(logits, labels)


def mask_vocab_padding(logits: torch.Tensor, vocab_size: int, tp_rank: int, fill: float) -> torch.Tensor:
    """This TP rank's vocab-parallel ``logits`` ([..., V/TP]) with megatron's padding columns (global index
    >= ``vocab_size``) set to ``fill``."""
    v = logits.shape[-1]
    keep = max(0, min(v, vocab_size - tp_rank * v))
    if keep < v:
        logits = logits.masked_fill(torch.arange(v, device=logits.device) >= keep, fill)
    return logits


def padding_of(model) -> int | None:
    """The real vocabulary size when ``model`` (megatron GPTModel, possibly wrapped) has padding rows, else None."""
    from nemo_minitron.model.build import real_vocab, unwrap

    inner = unwrap(model)
    real = real_vocab(inner.config)
    return real if getattr(inner, "vocab_size", real) > real else None


def lm_loss(model, windows: torch.Tensor, micro_batch_size: int, forward_only: bool = True):
    """Mean per-token LM loss of ``windows`` ([n, L+1] tokens). Returns (loss_sum, num_tokens) as floats.

    Forward only, with data parallelism (DP > 1) each DP rank runs its contiguous share of ``windows`` and
    the sums are all-reduced: every rank returns the loss of all of them (the same windows as one process,
    in micro-batches of the same composition when ``micro_batch_size`` divides the share).
    With ``forward_only=False`` the gradient of the *mean* loss is accumulated into the parameters'
    ``.grad`` (or ``main_grad`` under megatron DDP), identically at any TP/PP layout (no DP split).
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_minitron import parallel

    dev = platform.device()
    n_all, L1 = windows.shape
    split = forward_only and parallel.data_parallel_size() > 1
    if split:
        if n_all % (micro_batch_size * parallel.data_parallel_size()):
            raise ValueError(f"{n_all} samples do not split into micro-batches of {micro_batch_size} on each of "
                             f"{parallel.data_parallel_size()} data-parallel ranks")
        windows = parallel.data_parallel_shard(windows)
    n = windows.shape[0]
    if n % micro_batch_size:
        raise ValueError(f"{n} samples do not split into micro-batches of {micro_batch_size}")
    num_mb = n // micro_batch_size
    total_tokens = float(n * (L1 - 1))
    micro = list(windows.to(dev).split(micro_batch_size))

    real_vocab = padding_of(model)

    def forward_step(data_iterator, model):
        inputs, labels = split_window(next(data_iterator))
        if real_vocab is None:
            out = model(inputs, _position_ids(inputs), None, labels=labels)
        else:  # megatron's loss would count the padding columns: logits [b, s, V/TP], padding masked
            out = model(inputs, _position_ids(inputs), None)
            if parallel_state.is_pipeline_last_stage():
                out = vocab_cross_entropy(out, labels, real_vocab)

        def loss_func(output_tensor):
            loss_sum = output_tensor.float().sum()
            # schedules divide by num_microbatches; scale so the backward is d(mean loss)
            scaled = loss_sum * (num_mb / total_tokens)
            return scaled, {"loss_sum": loss_sum.detach().clone()}

        return out, loss_func

    fwd_bwd = get_forward_backward_func()
    out = fwd_bwd(
        forward_step_func=forward_step,
        data_iterator=iter(micro),
        model=[model],
        num_microbatches=num_mb,
        seq_length=L1 - 1,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    loss_sum = torch.zeros(1, dtype=torch.float64, device=dev)
    if parallel_state.is_pipeline_last_stage():
        for d in out:
            loss_sum += d["loss_sum"].double()
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        src = parallel_state.get_pipeline_model_parallel_last_rank()
        dist.broadcast(loss_sum, src=src, group=parallel_state.get_pipeline_model_parallel_group())
    if split:
        parallel.data_parallel_all_reduce(loss_sum)
    return float(loss_sum.item()), float(n_all * (L1 - 1))


def shares_contexts(model) -> bool:
    """Whether ``model`` can run a shared-context sequence (:func:`score_tokens`' ``layouts``): its core attention
    applies the attention mask it is given (megatron's ``DotProductAttention``; TE's fused attention is built
    causal and ignores one), and its positions are the ``position_ids`` it is given (rotary embeddings applied
    unfused, or learned absolute positions)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from nemo_minitron.model.build import unwrap

    inner = unwrap(model)
    cfg = inner.config
    if getattr(inner, "position_embedding_type", None) not in ("rope", "learned_absolute", "none") or \
            cfg.apply_rope_fusion or getattr(cfg, "multi_latent_attention", False) or cfg.window_size is not None:
        return False
    if inner.position_embedding_type == "rope" and not hasattr(inner, "rotary_pos_emb"):
        return False
    return all(type(layer.self_attention.core_attention) is DotProductAttention for layer in inner.decoder.layers)


def _layout_tensors(layouts: list, L: int, dev):
    """Per row (``None``: plain causal) -> (position ids [b, L], attention mask [b, 1, L, L], True = not seen).
    A token sees the earlier tokens of the shared context (branch 0) and of its own branch; padding is causal."""
    b = len(layouts)
    pos = torch.arange(L, device=dev).unsqueeze(0).repeat(b, 1)
    branch = torch.full((b, L), -1, dtype=torch.long, device=dev)
    for i, lay in enumerate(layouts):
        if lay is not None:
            p, br = lay
            pos[i, :len(p)] = torch.as_tensor(p, dtype=torch.long, device=dev)
            branch[i, :len(br)] = torch.as_tensor(br, dtype=torch.long, device=dev)
        else:
            branch[i] = 0
    causal = torch.ones(L, L, dtype=torch.bool, device=dev).tril()
    q, k = branch.unsqueeze(2), branch.unsqueeze(1)  # [b, L, 1], [b, 1, L]
    seen = causal & ((k == 0) | (k == q) | (q == -1))
    return pos, (~seen).unsqueeze(1)


@torch.no_grad()
def score_tokens(model, inputs: list, queries: list, micro_batch_size: int = 8, progress=None,
                 max_tokens: int | None = None, layouts: list | None = None) -> torch.Tensor:
    """Log-probabilities of chosen next tokens, for downstream tasks (lm-eval's log-likelihood requests).

    ``inputs``: token lists (any lengths); ``queries[i]``: ``(position, token)`` pairs of ``inputs[i]``, each asking
    for log p(token | inputs[i][:position + 1]). Returns a float64 tensor [num queries, 2] on the compute device,
    in query order (``inputs[0]``'s first), of (log-probability, 1.0 if the token is the argmax else 0.0), the
    same on every rank of this model-parallel group.

    The sequences are run in the order given, in consecutive micro-batches of at most ``micro_batch_size``
    sequences and ``max_tokens`` padded tokens (a 3,000-token 5-shot MMLU prompt runs alone or in twos, where 16
    of them would hold 16 x heads x 3000^2 attention scores), split where padding would cost more than a
    micro-batch more (:func:`micro_batches`) -- right-padded to the longest of each micro-batch (a causal
    model's earlier positions do not see the padding); one schedule call per micro-batch,
    so every PP stage exchanges activations of one shape. Only the queried positions reach the output layer
    (a forward pre-hook selects them), so the [tokens, vocabulary] logits of context positions are never formed.
    At TP > 1 the vocab-parallel log-softmax is reduced over the tensor-parallel group; megatron's padding
    columns are excluded. No data parallelism here: the caller gives each DP rank its share.
    ``progress(sequences done)`` is called after each micro-batch.

    ``layouts[i]`` (only where :func:`shares_contexts`): ``None`` for a plain causal sequence, or ``(positions,
    branches)`` per token of ``inputs[i]``: a context (branch 0) followed by continuations (branches 1, 2, ...),
    each continuation seeing the context and itself only, at its own positions -- the context of a
    multiple-choice question computed once for all its choices.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_minitron.model.build import real_vocab as real_vocab_of
    from nemo_minitron.model.build import unwrap

    dev = platform.device()
    inner = unwrap(model)
    vocab = real_vocab_of(inner.config)
    last = parallel_state.is_pipeline_last_stage()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    fwd_bwd = get_forward_backward_func()
    n_q = sum(len(q) for q in queries)
    out = torch.zeros(n_q, 2, dtype=torch.float64, device=dev)
    done = 0
    plan = micro_batches([len(x) for x in inputs], micro_batch_size, max_tokens)
    plan += [None] * (_expert_parallel_calls(len(plan)) - len(plan))
    for batch in plan:
        if batch is None:  # a forward pass whose result nobody reads: the other EP ranks' all-to-alls need this one
            seqs, qs, lays = [[0]], [[(0, 0)]], None
        else:
            start, end = batch
            seqs, qs = inputs[start:end], queries[start:end]
            lays = layouts[start:end] if layouts is not None else None
        L = max(len(x) for x in seqs)
        tokens = torch.zeros(len(seqs), L, dtype=torch.long, device=dev)
        for i, s in enumerate(seqs):
            tokens[i, :len(s)] = torch.as_tensor(s, dtype=torch.long, device=dev)
        # the distinct (row, position) pairs the output layer computes, and each query's pair + token
        pairs, where, toks = {}, [], []
        for i, q in enumerate(qs):
            for pos, tok in q:
                where.append(pairs.setdefault((i, int(pos)), len(pairs)))
                toks.append(int(tok))
        rows = torch.as_tensor([p[0] for p in pairs], dtype=torch.long, device=dev)
        cols = torch.as_tensor([p[1] for p in pairs], dtype=torch.long, device=dev)
        where_t = torch.as_tensor(where, dtype=torch.long, device=dev)
        toks_t = torch.as_tensor(toks, dtype=torch.long, device=dev)
        n = len(toks)
        hooks = []
        if last:  # hidden [s, b, h] -> the queried positions only, as [k, 1, h]
            hooks.append(inner.output_layer.register_forward_pre_hook(
                lambda _m, args: (args[0][cols, rows].unsqueeze(1), *args[1:])))
        if lays is not None and any(lay is not None for lay in lays):
            pos, mask = _layout_tensors(lays, L, dev)
            if getattr(inner, "rotary_pos_emb", None) is not None:  # rotary [L', 1, 1, d] -> each row's [L, b, 1, d]
                hooks.append(inner.rotary_pos_emb.register_forward_hook(
                    lambda _m, _a, emb: emb[pos.t()].squeeze(2)))
        else:
            pos, mask = _position_ids(tokens), None

        def forward_step(data_iterator, model):
            x = next(data_iterator)
            y = model(x, pos, mask)

            def loss_func(logits):
                res = _select_logprobs(logits[0], where_t, toks_t, vocab, tp_group, tp_rank)
                return res.new_zeros(()), {"scores": res}

            return y, loss_func

        try:
            data = fwd_bwd(forward_step_func=forward_step, data_iterator=iter([tokens]), model=[model],
                           num_microbatches=1, seq_length=L, micro_batch_size=len(seqs), forward_only=True)
        finally:
            for h in hooks:
                h.remove()
        chunk = data[0]["scores"] if last else torch.zeros(n, 2, dtype=torch.float64, device=dev)
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(chunk, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                           group=parallel_state.get_pipeline_model_parallel_group())
        if batch is None:
            continue
        out[done:done + n] = chunk
        done += n
        if progress is not None:
            progress(end)
    return out


def _expert_parallel_calls(calls: int) -> int:
    """The most forward passes any rank of this expert-parallel group makes (``calls`` without expert parallelism):
    every MoE layer's token all-to-all joins the whole group, so each rank must make as many passes as the busiest
    one, whatever its own share of the requests."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized() or parallel_state.get_expert_model_parallel_world_size() == 1:
        return calls
    t = torch.tensor([calls], dtype=torch.long, device=platform.device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=parallel_state.get_expert_model_parallel_group())
    return int(t.item())


def micro_batches(lengths: list, size: int, max_tokens: int | None = None, overhead: int = 64) -> list:
    """Consecutive ``(start, end)`` micro-batches of sequences of ``lengths`` (in the order given, usually longest
    first), at most ``size`` sequences and ``max_tokens`` padded tokens each (a longer sequence alone), with the
    least padded tokens + ``overhead`` tokens per micro-batch (dynamic programming over the split points): a
    471-token question among 200-token ones runs in a smaller micro-batch instead of padding 15 others to 471."""
    n = len(lengths)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j sequences
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        L = 0
        for i in range(j - 1, max(j - size, 0) - 1, -1):  # the last micro-batch is [i, j)
            L = max(L, lengths[i])
            if i < j - 1 and max_tokens is not None and (j - i) * L > max_tokens:
                break
            c = best[i] + (j - i) * L + overhead
            if c < best[j]:
                best[j], cut[j] = c, i
    out, j = [], n
    while j > 0:
        out.append((cut[j], j))
        j = cut[j]
    return out[::-1]


def _select_logprobs(logits: torch.Tensor, where: torch.Tensor, toks: torch.Tensor, vocab: int, tp_group,
                     tp_rank: int) -> torch.Tensor:
    """[k, V/TP] vocab-parallel logits of k positions -> [n, 2] (log p(toks[j] | position where[j]), greedy),
    computed in fp32 (fp64 for an fp64 model)."""
    logits = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    logits = mask_vocab_padding(logits, vocab, tp_rank, float("-inf"))
    v = logits.shape[-1]
    tp = dist.get_world_size(tp_group) if dist.is_initialized() else 1
    top = logits.max(dim=-1).values
    lse = torch.logsumexp(logits, dim=-1)  # this rank's columns; fused (one pass, no [k, V/TP] temporaries)
    local = toks - tp_rank * v
    mine = (local >= 0) & (local < v)
    picked = torch.where(mine, logits[where, local.clamp(0, v - 1)], torch.zeros((), device=logits.device))
    if tp > 1:  # log sum_r exp(lse_r), stable: around the largest lse_r
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=tp_group)
        m = lse.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
        sum_exp = (lse - m).exp()
        dist.all_reduce(sum_exp, group=tp_group)
        dist.all_reduce(picked, group=tp_group)
        lse = m + sum_exp.log()
    logprob = picked - lse[where]
    greedy = (picked >= top[where]).to(logprob.dtype)
    return torch.stack([logprob, greedy], dim=-1).double()
