"""Depth pruning: layer importance and removal of whole transformer layers.

Methods (``prune.depth_method``):

- ``block_influence``: BI_i = 1 - mean cosine(x_in, x_out) of layer i over calibration tokens (ShortGPT;
  ModelOpt's choice). Low BI = the layer barely changes the residual stream -> dropped first.
- ``lm_loss``: calibration LM loss with layer i skipped (identity), per layer. Lowest loss -> dropped first.
- ``contiguous``: calibration LM loss with each contiguous block of ``L - N`` layers skipped; the block
  with the lowest loss is dropped (the paper found one contiguous block beat independently ranked layers).

Layers are skipped at run time (their forward returns the input), so scoring works unchanged under TP
and PP; every rank computes the same loss (broadcast from the last stage). With data parallelism each DP
rank scores its share of the windows and the sums are all-reduced. Layer numbers in the API and
the report are 1-indexed, like NeMo's ``drop_layers``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from nemo_minitron import parallel, platform
from nemo_minitron.errors import UserError
from nemo_minitron.model import build
from nemo_minitron.model.forward import lm_loss
from nemo_minitron.model.shards import gather_full, load_full_state_dict
from nemo_minitron.model.spec import ModelSpec
from nemo_minitron.prune.replay import PrefixReplay

DEPTH_METHODS = ("block_influence", "lm_loss", "contiguous")


def validate_depth(spec: ModelSpec, num_layers=None, drop_layers=None, pp: int = 1, method: str = "lm_loss") -> list | None:
    """Check depth targets before any work. Returns the 1-indexed explicit drop list (or None)."""
    L = spec.num_layers
    if method not in DEPTH_METHODS:
        raise UserError(f"prune.depth_method={method!r}: one of {', '.join(DEPTH_METHODS)}")
    if num_layers is not None:
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= L:
            raise UserError(f"prune.num_layers={num_layers!r} must be between 1 and the source's {L} layers")
    drop = None
    if drop_layers:
        drop = list(drop_layers)
        bad = [d for d in drop if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= L]
        if bad:
            raise UserError(f"prune.drop_layers: {bad} out of range 1..{L} (layers are 1-indexed)")
        if len(set(drop)) != len(drop):
            raise UserError(f"prune.drop_layers repeats a layer: {drop}")
        if len(drop) >= L:
            raise UserError("prune.drop_layers would drop every layer")
        if num_layers is not None and L - len(drop) != num_layers:
            raise UserError(f"prune.num_layers={num_layers} and prune.drop_layers={drop} disagree: dropping "
                            f"{len(drop)} of {L} layers leaves {L - len(drop)} (set one of them)")
    remaining = L - len(drop) if drop else num_layers
    if remaining is not None and remaining % pp:
        raise UserError(f"{remaining} remaining layers cannot be split over pipeline_model_parallel_size={pp}")
    return drop


@contextlib.contextmanager
def skipping(model, global_layers: set):
    """Run ``model`` with the given global (0-indexed) layers replaced by the identity."""
    with PrefixReplay(model).run(skip=frozenset(global_layers)):
        yield


def _loss(model, windows, mbs) -> float:
    with torch.no_grad():
        s, n = lm_loss(model, windows, mbs)
    return s / n


def block_influence(model, windows, micro_batch_size: int):
    """(BI per global layer [L] gathered over pipeline stages, LM loss of the same pass)."""
    from megatron.core import parallel_state as ps

    n_local = len(model.decoder.layers)
    sums = torch.zeros(n_local, dtype=torch.float64, device=platform.device())
    counts = torch.zeros(n_local, dtype=torch.float64, device=platform.device())
    handles = []
    for j, layer in enumerate(model.decoder.layers):
        def hook(module, args, kwargs, output, j=j):
            x = kwargs.get("hidden_states", args[0] if args else None)
            y = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)  # [s, b]
            sums[j] += cos.double().sum()
            counts[j] += cos.numel()
        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        loss = _loss(model, windows, micro_batch_size)
    finally:
        for h in handles:
            h.remove()
    parallel.data_parallel_all_reduce(sums)  # DP > 1: each DP rank saw its share of the windows
    parallel.data_parallel_all_reduce(counts)
    local = 1.0 - sums / counts
    if dist.is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
        local = torch.cat(parallel.all_gather_tensors(local, ps.get_pipeline_model_parallel_group()))
    return local.cpu(), loss  # a score per layer, for the plan and the report (host)


def forward_equivalents(spec: ModelSpec, layers_run: float) -> float:
    """Cost of running ``layers_run`` transformer layers plus the output layer, in full forward passes
    (matmul parameters as the cost: each layer's weights, and the vocabulary x hidden output layer)."""
    h, f, d = spec.hidden_size, spec.ffn_hidden_size, spec.kv_channels
    per_layer = h * d * (spec.num_attention_heads * 2 + spec.num_query_groups * 2) + 3 * h * f
    head = spec.vocab_size * h
    return (layers_run * per_layer + head) / (spec.num_layers * per_layer + head)


def _skip_scores(model, spec, windows, micro_batch_size, blocks, desc, quiet, reuse):
    """Loss with each block of layers skipped: ``blocks`` = [(start, k)] with consecutive starts 0, 1, ...
    Returns (losses, cost in forward-pass equivalents)."""
    from tqdm import tqdm

    L, vals, cost = spec.num_layers, [], 0.0
    replay = PrefixReplay(model) if reuse else None
    for n, (start, k) in enumerate(tqdm(blocks, desc=desc, disable=quiet)):
        skip = frozenset(range(start, start + k))
        if replay is None:
            with skipping(model, skip):
                vals.append(_loss(model, windows, micro_batch_size))
            cost += forward_equivalents(spec, L - k)
        else:  # layers before `start` replay the cache; layer `start` runs (skipped) for the next pass's
            keep_next = n + 1 < len(blocks)
            with replay.run(start, skip, record=start if keep_next else None):
                vals.append(_loss(model, windows, micro_batch_size))
            cost += forward_equivalents(spec, (L - start - k) + (1 if keep_next else 0))
    return torch.tensor(vals, dtype=torch.float64), cost


def layer_scores(model, spec: ModelSpec, windows, micro_batch_size: int, method: str, num_layers: int,
                 progress: bool = True, reuse_prefix: bool = True) -> dict:
    """{'method', 'scores' (per layer or per block start), 'drop' (0-indexed layers), 'base_loss',
    'forward_equivalents' (cost in full forward passes over the windows), 'prefix_reuse'}.

    ``reuse_prefix`` (``lm_loss``, ``contiguous``): the layers before the skipped ones are not re-run (see
    :class:`~nemo_minitron.prune.replay.PrefixReplay`); the scores are the same, at about half the cost."""
    from nemo_minitron import parallel

    L = spec.num_layers
    k = L - num_layers
    quiet = not (progress and parallel.is_rank0())
    if method == "block_influence":
        scores, base = block_influence(model, windows, micro_batch_size)  # one pass gives both
        drop = torch.argsort(scores)[:k].tolist()
        return {"method": method, "scores": scores, "drop": sorted(drop), "base_loss": base,
                "forward_equivalents": 1.0}
    base = _loss(model, windows, micro_batch_size)
    if method == "lm_loss":
        scores, cost = _skip_scores(model, spec, windows, micro_batch_size, [(i, 1) for i in range(L)],
                                    "depth: loss without each layer", quiet, reuse_prefix)
        drop = torch.argsort(scores)[:k].tolist()
    else:
        scores, cost = _skip_scores(model, spec, windows, micro_batch_size, [(s, k) for s in range(L - k + 1)],
                                    f"depth: loss without each block of {k}", quiet, reuse_prefix)
        best = int(torch.argmin(scores))
        drop = list(range(best, best + k))
    return {"method": method, "scores": scores, "drop": sorted(drop), "base_loss": base,
            "forward_equivalents": round(1.0 + cost, 2), "prefix_reuse": reuse_prefix}


def drop_layers(model, spec: ModelSpec, drop: list, tp: int = 1, pp: int = 1):
    """(new model chunk, new spec) without the given global 0-indexed layers, renumbered, re-split over PP."""
    keep = [i for i in range(spec.num_layers) if i not in set(drop)]
    if len(keep) % pp:
        raise UserError(f"{len(keep)} remaining layers cannot be split over pipeline_model_parallel_size={pp}")
    full = gather_full(model, "param", across_pp=True)
    new = {}
    for name, t in full.items():
        if name.startswith("decoder.layers."):
            i, rest = name[len("decoder.layers."):].split(".", 1)
            if int(i) not in keep:
                continue
            name = f"decoder.layers.{keep.index(int(i))}.{rest}"
        new[name] = t
    spec2 = spec.replace(num_layers=len(keep))
    model2 = build(spec2, tp, pp, initialize=False)
    load_full_state_dict(model2, new)
    model2.eval()
    return model2, spec2
