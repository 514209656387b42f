"""Least-squares reconstruction: refit the layers that consume pruned channels (``prune.reconstruction``).

Minitron (and every implementation of it) keeps the surviving weights unchanged and leaves all repair to
distillation. But the pruned channels' contribution to a layer's output is, on real data, largely a linear
function of the kept channels, and the calibration windows show which. For a linear layer ``y = W a`` whose
input channels ``P`` are pruned and ``K`` kept, with the Gram matrix ``G = sum a a^T`` over the calibration
tokens, the kept columns become

    W_K' = W_K + W_P G_PK (G_KK + lambda I)^-1,     lambda = damping x mean(diag G_KK)

the ridge-regularized least-squares fit of the unpruned output ``W a`` from ``a_K`` (ridge towards the
original weights: with nothing pruned, ``W' = W`` exactly). This is FLAP's / OBS-style structured
compensation (ZipLM, SlimGPT), solved in closed form per layer:

- MLP neurons: ``linear_fc2`` refitted from the kept neurons' activations (its input);
- attention heads / query groups: ``linear_proj`` refitted from the kept heads' outputs (its input);
- embedding channels (hidden size): every ``linear_qkv`` and ``linear_fc1`` (the consumers of the normalized
  residual stream) refitted so that the pruned channels' share of their input is predicted from the kept
  channels. The pruned model's stream has no pruned channels to measure, so these Gram matrices are the
  source model's (one pass per layer, before trimming); the change of each token's RMS norm over fewer
  channels is not modelled. A layer with a bias (Qwen2's ``linear_qkv``) is fitted with an intercept: its
  input gets a constant channel whose weight is the bias (``[W | b]`` from ``[a_K | 1]``), so the bias absorbs
  the pruned channels' mean contribution. The output layer is not refitted (tied to the embedding in most small models).
  The other refits then run, layer by layer, on the hidden-pruned model.

Mixture-of-experts layers: each kept expert's ``linear_fc2`` is refitted from its kept neurons on the tokens
routed to it (its input is the router-weighted activation, so the fit is of what the expert adds to the stream);
for embedding channels, the router and each expert's ``linear_fc1`` are the consumers refitted beside
``linear_qkv`` (each expert on its own routed tokens).

Layers are refitted in order, each on the inputs produced by the already-refitted layers before it (errors do
not compound), with one layer's Gram matrix in memory at a time (``ffn x ffn`` in float64: Llama-3.1-8B's
14,336 is 1.6 GB). Each pass runs only the layers it needs (:class:`~nemo_minitron.prune.replay.PrefixReplay`:
the layer before is replayed from a cache, the layers after and the output layer are skipped).
Tensor parallelism: the layer's input is all-gathered over TP, so every TP rank assembles the full Gram
matrix, solves the same system and keeps its own column shard. Data parallelism: Gram matrices are summed
over DP. Pipeline parallelism: the stage holding the layer does the work; the others run the schedule.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from nemo_minitron.model.forward import lm_loss
from nemo_minitron.model.spec import ModelSpec
from nemo_minitron.prune.plan import WidthPlan
from nemo_minitron.prune.replay import PrefixReplay

RECONSTRUCTIONS = ("none", "least_squares")


def refit(W: torch.Tensor, G: torch.Tensor, kept: torch.Tensor, damping: float) -> torch.Tensor:
    """Kept columns of ``W`` ([out, n]) refitted to reproduce ``W a`` from ``a[kept]``, given ``G`` ([n, n], the
    Gram matrix of ``a``). Returns [out, len(kept)] in float64."""
    return refit_from_rows(W, G[kept.to(G.device)], kept, damping)


def refit_from_rows(W: torch.Tensor, GK: torch.Tensor, kept: torch.Tensor, damping: float) -> torch.Tensor:
    """:func:`refit` from the kept rows of the Gram matrix alone (``GK = G[kept]``, [len(kept), n]): all the
    solve reads, so cached statistics need not hold (or gather) the pruned rows."""
    W, GK = W.double(), GK.double()
    n, dev = W.shape[1], W.device
    kept = kept.to(dev)
    pruned = torch.ones(n, dtype=torch.bool, device=dev)
    pruned[kept] = False
    P = pruned.nonzero().squeeze(1)
    WK = W[:, kept]
    if P.numel() == 0:
        return WK.clone()
    GKK = GK[:, kept]
    lam = damping * GKK.diagonal().mean().clamp_min(1e-30)
    A = GKK + lam * torch.eye(len(kept), dtype=torch.float64, device=dev)
    rhs = GK[:, P] @ W[:, P].T  # G_KP W_P^T
    chol, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        delta_t = torch.cholesky_solve(rhs, chol)
    else:  # singular without damping (a dead channel): least squares
        delta_t = torch.linalg.lstsq(A, rhs).solution
    return WK + delta_t.T


def output_error(W: torch.Tensor, W_new_full: torch.Tensor, G: torch.Tensor) -> float:
    """Relative squared error of ``W_new_full a`` against ``W a`` on the calibration inputs (Gram ``G``)."""
    W, E, G = W.double(), (W_new_full.double() - W.double()), G.double()
    den = float(((W @ G) * W).sum())
    return float(((E @ G) * E).sum()) / max(den, 1e-30)


class _Gram:
    """Forward pre-hook accumulating the Gram matrix of a linear layer's input.

    ``split="input"`` (row-parallel ``linear_proj`` / ``linear_fc2``: the input's channels are split over TP):
    the input is all-gathered over TP, every TP rank holds the full matrix. ``split="none"`` (column-parallel
    ``linear_qkv`` / ``linear_fc1`` / output layer: the input is whole on every TP rank, or split along the
    sequence under sequence parallelism, then the matrices are summed over TP)."""

    def __init__(self, module, split: str = "input", eps: float | None = None, intercept: bool = False):
        self.G, self.split, self.eps, self.intercept = None, split, eps, intercept
        self.sp = split == "none" and getattr(module, "sequence_parallel", False)
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        from megatron.core import parallel_state as ps

        x = args[0].detach()
        if hasattr(module, "layer_norm_weight") and self.eps is not None:  # TE: the norm is fused into the linear
            from nemo_minitron.prune.importance import _rms_norm

            x = _rms_norm(x, module.layer_norm_weight, self.eps)
        x = x.reshape(-1, x.shape[-1]).float()
        tp = ps.get_tensor_model_parallel_world_size() if dist.is_initialized() else 1
        if tp > 1 and self.split == "input":
            parts = [torch.empty_like(x) for _ in range(tp)]
            dist.all_gather(parts, x.contiguous(), group=ps.get_tensor_model_parallel_group())
            x = torch.cat(parts, dim=1)
        if self.intercept:  # a constant channel last: its Gram row holds the input's sum and the token count
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        g = (x.T @ x).double()
        self.G = g if self.G is None else self.G.add_(g)

    def result(self) -> torch.Tensor:
        from megatron.core import parallel_state as ps

        from nemo_minitron import parallel

        self.handle.remove()
        if self.sp and ps.get_tensor_model_parallel_world_size() > 1:  # each TP rank saw a slice of the sequence
            dist.all_reduce(self.G, group=ps.get_tensor_model_parallel_group())
        parallel.data_parallel_all_reduce(self.G)  # DP > 1: each DP rank saw its share of the windows
        return self.G


def _full_weight(module) -> torch.Tensor:
    """A row-parallel layer's weight with its input dimension gathered over TP ([out, n])."""
    from megatron.core import parallel_state as ps

    w = module.weight.detach()
    tp = ps.get_tensor_model_parallel_world_size() if dist.is_initialized() else 1
    if tp == 1:
        return w.clone()
    parts = [torch.empty_like(w) for _ in range(tp)]
    dist.all_gather(parts, w.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=1)


def _set_weight(module, full: torch.Tensor) -> None:
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size() if dist.is_initialized() else 1
    shard = full.chunk(tp, dim=1)[ps.get_tensor_model_parallel_rank() if tp > 1 else 0]
    with torch.no_grad():
        module.weight.copy_(shard.to(module.weight.dtype))


def _refit_module(module, gram: _Gram, kept: torch.Tensor, damping: float) -> dict:
    """Refit ``module`` (whose input Gram ``gram`` holds), zero its pruned columns. {'before', 'after'}: the
    relative output errors of plain pruning and of the refit."""
    G = gram.result()
    W = _full_weight(module).double()
    WK = refit(W, G, kept, damping)
    plain = torch.zeros_like(W)
    plain[:, kept] = W[:, kept]
    new = torch.zeros_like(W)
    new[:, kept] = WK
    err = {"before": output_error(W, plain, G), "after": output_error(W, new, G)}
    _set_weight(module, new)
    return err


def bias_of(module):
    """A linear layer's bias, or None (megatron's local layers hold None, Transformer Engine's an empty tensor)."""
    b = getattr(module, "bias", None)
    return b if isinstance(b, torch.Tensor) and b.numel() > 0 else None


def _hidden_consumers(layer) -> list:
    """The modules of a layer whose input is the normalized residual stream (every one holds ``weight`` [out, h])."""
    if not hasattr(layer.mlp, "router"):
        return ["self_attention.linear_qkv", "mlp.linear_fc1"]
    return ["self_attention.linear_qkv", "mlp.router"] + \
        [f"mlp.experts.local_experts.{j}.linear_fc1" for j in range(len(layer.mlp.experts.local_experts))]


def _hidden_input_refits(model, spec: ModelSpec, kept: torch.Tensor, windows, micro_batch_size: int,
                         damping: float) -> dict:
    """Refitted kept columns of every layer's ``linear_qkv`` and ``linear_fc1`` (this rank's rows), fitted on
    the source model: the pruned embedding channels' share of their (normalized) input, predicted from the kept
    channels. {local parameter name: [rows, len(kept)]} (and {bias name: [rows]} for a layer with a bias, fitted
    as an intercept). One pass per layer, one h x h matrix per site."""
    out = {}
    replay = PrefixReplay(model)
    layers = {replay.off + j: layer for j, layer in enumerate(model.decoder.layers)}
    for l in range(spec.num_layers):
        layer = layers.get(l)
        grams = {}
        if layer is not None:
            eps = model.config.layernorm_epsilon
            grams = {name: _Gram(layer.get_submodule(name), "none", eps, bias_of(layer.get_submodule(name)) is not None)
                     for name in _hidden_consumers(layer)}
        with torch.no_grad(), replay.run(max(l - 1, 0), record=l - 1 if l > 0 else None, last=l,
                                         skip_output_layer=True):
            lm_loss(model, windows, micro_batch_size)
        for name, gram in grams.items():
            module, prefix = layer.get_submodule(name), f"decoder.layers.{l - replay.off}.{name}"
            W, b = module.weight.detach(), bias_of(module)
            if b is None:
                out[f"{prefix}.weight"] = refit(W, gram.result(), kept, damping)
                continue
            n = W.shape[1]  # the constant channel is column n of [W | b]
            fit = refit(torch.cat([W, b.detach()[:, None]], dim=1), gram.result(),
                        torch.cat([kept, kept.new_tensor([n])]), damping)
            out[f"{prefix}.weight"], out[f"{prefix}.bias"] = fit[:, :-1], fit[:, -1]
    return out


def kept_head_columns(plan: WidthPlan, spec: ModelSpec, l: int) -> torch.Tensor:
    """Kept input columns of ``linear_proj`` in layer ``l``: the kept heads' head_dim blocks."""
    per, d = spec.num_attention_heads // spec.num_query_groups, spec.kv_channels
    heads = torch.cat([g * per + h for g, h in zip(plan.groups[l].tolist(), plan.heads[l])]).sort().values
    return (heads[:, None] * d + torch.arange(d, device=heads.device)[None, :]).reshape(-1)


def reconstruct(model, spec: ModelSpec, plan: WidthPlan, windows: torch.Tensor, micro_batch_size: int,
                damping: float = 0.01, tp: int = 1, pp: int = 1, progress: bool = True, hidden: bool = True):
    """(pruned model chunk, pruned spec, info): :func:`~nemo_minitron.prune.width.prune_model` with every
    ``linear_proj`` / ``linear_fc2`` that loses input channels refitted by least squares on ``windows``.
    ``model`` is left unchanged. ``info``: per layer, the relative output errors before/after, and the cost."""
    from tqdm import tqdm

    from nemo_minitron import parallel
    from nemo_minitron.prune.depth import forward_equivalents
    from nemo_minitron.prune.width import prune_model

    t0 = time.time()
    heads = plan.groups is not None
    ffn = plan.ffn is not None or (plan.expert_ffn is not None and "moe_ffn_hidden_size" in plan.targets)
    # 1) the embedding channels first (not refitted); heads and neurons stay, to be masked layer by layer
    hidden_plan = WidthPlan(hidden=plan.hidden, targets={k: v for k, v in plan.targets.items() if k == "hidden_size"})
    hidden_refits, layer_cost = {}, 0.0
    if hidden and plan.hidden is not None:  # one pass per layer on the source model: layers l-1 and l
        hidden_refits = _hidden_input_refits(model, spec, plan.hidden, windows, micro_batch_size, damping)
        layer_cost += 2 * spec.num_layers - 1
    work, wspec = prune_model(model, spec, hidden_plan, tp, pp)
    if hidden_refits:
        params = dict(work.named_parameters())
        with torch.no_grad():
            for name, w in hidden_refits.items():
                params[name].copy_(w.to(params[name].dtype))
    rest = WidthPlan(ffn=plan.ffn, groups=plan.groups, heads=plan.heads, pruned_heads=plan.pruned_heads,
                     kept_by_score=plan.kept_by_score, experts=plan.experts, expert_ffn=plan.expert_ffn,
                     targets={k: v for k, v in plan.targets.items() if k != "hidden_size"})
    info = {"damping": damping, "layers": [], "passes": 0, "hidden_inputs_refitted": bool(hidden_refits)}
    if not (heads or ffn):
        if plan.experts is not None:  # experts dropped, none of their neurons: nothing left to refit
            work, wspec = prune_model(work, wspec, rest, tp, pp)
        info["forward_equivalents"] = round(forward_equivalents(spec, layer_cost) - forward_equivalents(spec, 0), 2)
        info["seconds"] = round(time.time() - t0, 1)
        return work, wspec, info
    replay = PrefixReplay(work)
    layers = {replay.off + j: layer for j, layer in enumerate(work.decoder.layers)}
    quiet = not (progress and parallel.is_rank0())
    work.eval()
    for l in tqdm(range(spec.num_layers), desc="reconstruction (layers refitted)", disable=quiet):
        row = {"layer": l + 1}
        first = True
        for kind in (["heads"] if heads else []) + (["ffn"] if ffn else []):
            layer = layers.get(l)
            grams = {}  # module -> its input's Gram; a mixture of experts: every kept expert's linear_fc2
            if layer is not None and kind == "heads":
                grams[layer.self_attention.linear_proj] = (_Gram(layer.self_attention.linear_proj),
                                                           kept_head_columns(plan, spec, l))
            elif layer is not None and plan.expert_ffn is not None:
                grams = {e.linear_fc2: (_Gram(e.linear_fc2), plan.expert_ffn[l][j])
                         for j, e in enumerate(layer.mlp.experts.local_experts) if j in plan.expert_ffn[l]}
            elif layer is not None:
                grams[layer.mlp.linear_fc2] = (_Gram(layer.mlp.linear_fc2), plan.ffn[l])
            # the first pass of layer l runs layer l-1 from its cached input (recording layer l's input);
            # a second pass starts at layer l from that record
            start = max(l - 1, 0) if first else l
            record = l - 1 if first and l > 0 else None
            with torch.no_grad(), replay.run(start, record=record, last=l, skip_output_layer=True):
                lm_loss(work, windows, micro_batch_size)
            layer_cost += (l - start + 1)
            info["passes"] += 1
            first = False
            errs = [_refit_module(module, gram, kept, damping) for module, (gram, kept) in grams.items()]
            if errs:  # experts: the mean relative errors over the kept experts
                row[kind] = {k: sum(e[k] for e in errs) / len(errs) for k in errs[0]}
        info["layers"].append(row)
    # per-layer errors live on the stage holding the layer: collect them everywhere
    if dist.is_initialized() and pp > 1:
        from megatron.core import parallel_state as ps

        parts = [None] * pp
        dist.all_gather_object(parts, [r for r in info["layers"] if r["layer"] - 1 in layers],
                               group=ps.get_pipeline_model_parallel_group())
        info["layers"] = sorted((r for p in parts for r in p), key=lambda r: r["layer"])
    # cost: the layers run, in full forward passes (the output layer is skipped in every pass)
    info["forward_equivalents"] = round(forward_equivalents(spec, layer_cost) - forward_equivalents(spec, 0), 2)
    info["seconds"] = round(time.time() - t0, 1)
    pruned, spec2 = prune_model(work, wspec, rest, tp, pp)
    return pruned, spec2, info
