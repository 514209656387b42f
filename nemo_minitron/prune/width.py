"""Width pruning over megatron modules: calibrate -> plan -> trim this rank's shard into a new model.

Plain functions, no trainer: :func:`calibrate` runs forward passes with the importance hooks and returns
full scores on every rank; :func:`prune_model` builds the pruned model at the same TP/PP layout. Each rank
gathers its stage's tensors over TP, trims them with the (identical) plan, and keeps its new TP shard.
"""

from __future__ import annotations

import time

import torch

from nemo_minitron import parallel
from nemo_minitron.model import build
from nemo_minitron.model.forward import lm_loss
from nemo_minitron.model.shards import transform_into
from nemo_minitron.model.spec import ModelSpec
from nemo_minitron.prune import importance
from nemo_minitron.prune.plan import WidthPlan
from nemo_minitron.prune.trim import new_spec, trim


def calibrate(model, windows: torch.Tensor, micro_batch_size: int, seq_agg: str = "mean",
              batch_agg: str = "l2", progress: bool = True, head_importance: str = "contribution",
              expert_importance: str = "router_mass") -> dict:
    """Importance scores (heads [L, H], ffn [L, F], hidden [h]; a mixture of experts: experts [L, E] and
    expert_ffn [L, E, F_expert] instead of ffn) from forward passes over ``windows``.

    With data parallelism each DP rank runs its share of every chunk of windows and the statistics are
    reduced over DP, so the scores are those of all windows (calibration scales with the number of nodes)."""
    from tqdm import tqdm

    n, L1 = windows.shape
    group = micro_batch_size * parallel.data_parallel_size()  # DP > 1: each chunk is split over the DP ranks
    step = group * max(1, min(8, n // group))
    bar = tqdm(total=n, unit="sample", desc="calibration", disable=not (progress and parallel.is_rank0()))
    t0, done, loss_sum = time.time(), 0, 0.0
    model.eval()
    with torch.no_grad(), importance.ImportanceRecorder(model, seq_agg, batch_agg, head_importance,
                                                                    expert_importance) as rec:
        for chunk in windows.split(step):
            s, _ = lm_loss(model, chunk, micro_batch_size, forward_only=True)
            loss_sum += s
            done += chunk.shape[0]
            bar.update(chunk.shape[0])
            bar.set_postfix(tok_per_s=int(done * (L1 - 1) / max(time.time() - t0, 1e-9)),
                            loss=f"{loss_sum / (done * (L1 - 1)):.3f}")
        local = rec.local_scores()
    bar.close()
    scores = importance.gather(local)
    scores["calibration_loss"] = loss_sum / (n * (L1 - 1))
    return scores


def prune_model(model, spec: ModelSpec, plan: WidthPlan, tp: int = 1, pp: int = 1,
                merge_pruned_heads: bool = False):
    """(pruned model chunk, pruned spec) at the same layout; ``model`` is left unchanged. Each tensor is
    gathered over TP, trimmed and re-split on the model's device, one at a time."""
    from nemo_minitron.model.shards import layer_offset
    from nemo_minitron.prune.trim import expert_rename

    spec2 = new_spec(spec, plan.targets)
    pruned = build(spec2, tp, pp, initialize=False)
    off = layer_offset(model)
    transform_into(model, pruned, lambda name, full: trim({name: full}, spec, plan, merge_pruned_heads)[name],
                   rename=lambda name: expert_rename(name, plan, off))
    pruned.eval()
    return pruned, spec2


def prune_width(model, spec: ModelSpec, targets: dict, windows=None, scores=None, micro_batch_size: int = 4,
                seq_agg: str = "mean", batch_agg: str = "l2", head_importance: str = "contribution",
                expert_importance: str = "router_mass", merge_pruned_heads: bool = False, tp: int = 1, pp: int = 1, progress: bool = True,
                reconstruction: str = "none", reconstruction_damping: float = 0.01, validation=None):
    """The whole width-pruning stage: (calibrate unless ``scores``) -> plan -> trim (-> least-squares refit of
    ``linear_proj`` / ``linear_fc2`` on ``windows`` with ``reconstruction="least_squares"``).

    Returns (pruned model chunk, pruned spec, scores, plan, reconstruction info or None). Used by
    ``nemo-minitron prune``, ``search`` and the pruning callbacks.
    """
    from nemo_minitron.prune.plan import make_plan

    if scores is None:
        scores = calibrate(model, windows, micro_batch_size, seq_agg, batch_agg, progress, head_importance,
                           expert_importance)
    plan = make_plan(parallel.to_device(scores), spec, targets)  # scores from a file are on the host
    if reconstruction == "least_squares":
        from nemo_minitron.prune.reconstruct import reconstruct

        if merge_pruned_heads:
            raise ValueError("merge_pruned_heads and least-squares reconstruction are alternatives")
        pruned, spec2, info = reconstruct(model, spec, plan, windows, micro_batch_size, reconstruction_damping,
                                          tp, pp, progress)
        if validation is not None:
            from nemo_minitron.evaluate import heldout_loss

            trimmed, _ = prune_model(model, spec, plan, tp, pp)
            info["heldout"] = {"least_squares": heldout_loss(pruned, validation, micro_batch_size)["loss"],
                               "trimmed": heldout_loss(trimmed, validation, micro_batch_size)["loss"],
                               "windows": list(validation.shape)}
            del trimmed
        return pruned, spec2, scores, plan, info
    pruned, spec2 = prune_model(model, spec, plan, tp, pp, merge_pruned_heads)
    return pruned, spec2, scores, plan, None
