"""Pruning every candidate shape from one set of cached importance scores, and its loss right after.

Plain functions over megatron modules (any TP/PP; every rank holds its chunk). The source model is never
modified: each candidate is built as a new model (depth: drop the layers the cached layer scores rank
lowest for that depth; width: keep the units the cached width scores, restricted to the kept layers,
rank highest), evaluated, and dropped.
"""

from __future__ import annotations

import torch

from nemo_minitron import parallel
from nemo_minitron.evaluate import heldout_loss
from nemo_minitron.model.spec import ModelSpec
from nemo_minitron.prune.depth import drop_layers, layer_scores
from nemo_minitron.prune.plan import WIDTH_DIMS, make_plan
from nemo_minitron.prune.reconstruct import reconstruct
from nemo_minitron.prune.stats import one_shot
from nemo_minitron.prune.width import prune_model

PER_LAYER = ("block_influence", "lm_loss")  # one score per layer: any depth reads the same scores


def depth_drops(model, spec: ModelSpec, windows, micro_batch_size: int, method: str, layer_counts,
                progress: bool = True) -> tuple[dict, dict | None]:
    """({num_layers: sorted 0-indexed layers to drop}, the first scoring's info for the report)."""
    L = spec.num_layers
    drops, first = {}, None
    for n in sorted({int(x) for x in layer_counts if int(x) != L}, reverse=True):
        if method in PER_LAYER and first is not None:
            drops[n] = sorted(torch.argsort(first["scores"])[: L - n].tolist())
            continue
        info = layer_scores(model, spec, windows, micro_batch_size, method, n, progress)
        first = first or info
        drops[n] = info["drop"]
    return drops, first


def prune_candidate(model, spec: ModelSpec, shape: dict, drops: dict, scores: dict, tp: int = 1, pp: int = 1,
                    refit: dict | None = None):
    """(model, spec) of one candidate shape, from the source ``model`` and the cached scores. ``refit``:
    ``{stats, damping}``, the width-pruned layers refitted in closed form from cached calibration statistics
    (:func:`~nemo_minitron.prune.stats.one_shot`, no forward pass; what ranking uses); ``{windows,
    micro_batch_size, damping}``, the sequential least-squares reconstruction on the calibration windows (each
    layer on the refitted layers' output; what the finalists' checkpoints get); None: trimmed only."""
    L = spec.num_layers
    drop = drops[shape["num_layers"]] if shape["num_layers"] != L else []
    targets = {k: shape[k] for k in WIDTH_DIMS if shape[k] != getattr(spec, k)}
    if refit and "stats" in refit:  # width first, on the source layout (each stage holds its layers' statistics)
        m, s = model, spec
        if targets:
            plan = make_plan(parallel.to_device(scores), spec, targets)
            m, s = one_shot(model, spec, plan, refit["stats"], refit["damping"], tp, pp,
                            layers=set(range(L)) - set(drop))
        return drop_layers(m, s, drop, tp, pp) if drop else (m, s)
    kept = [i for i in range(L) if i not in set(drop)]
    m, s = model, spec
    if drop:
        m, s = drop_layers(model, spec, drop, tp, pp)
    if targets:
        sub = {"heads": scores["heads"][kept], "ffn": scores["ffn"][kept], "hidden": scores["hidden"]}
        plan = make_plan(parallel.to_device(sub), s, targets)
        if refit:
            m, s, _ = reconstruct(m, s, plan, refit["windows"], refit["micro_batch_size"], refit["damping"], tp, pp,
                                  progress=False)
        else:
            m, s = prune_model(m, s, plan, tp, pp)
    return m, s


def score_candidates(model, spec: ModelSpec, candidates: list[dict], drops: dict, scores: dict, windows,
                     micro_batch_size: int, tp: int = 1, pp: int = 1, progress: bool = True,
                     refit: dict | None = None) -> list[dict]:
    """Each candidate with ``pruned_loss`` (LM loss on ``windows`` right after pruning, and the refit
    ``refit`` asks for, see :func:`prune_candidate`) filled in."""
    from tqdm import tqdm

    bar = tqdm(candidates, desc="search: prune + evaluate candidates", unit="cand",
               disable=not (progress and parallel.is_rank0()))
    out = []
    for c in bar:
        m, _ = prune_candidate(model, spec, c, drops, scores, tp, pp, refit)
        res = heldout_loss(m, windows, micro_batch_size)
        del m
        out.append({**c, "pruned_loss": res["loss"]})
        bar.set_postfix(cand=c["name"], loss=f"{res['loss']:.3f}")
    return out
