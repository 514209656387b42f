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

    v = logits.shape[-1]
    keep = max(0, min(v, vocab_size - parallel_state.get_tensor_model_parallel_rank() * v))
    logits = logits.float()
    if keep < v:
        pad = torch.arange(v, device=logits.device) >= keep
        logits = logits.masked_fill(pad, torch.finfo(logits.dtype).min)
    return tensor_parallel.vocab_parallel_cross_entropy(logits, labels)


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
