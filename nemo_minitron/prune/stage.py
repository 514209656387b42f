"""The pruning stage as one function over a loaded model: depth first, then width.

Used by ``nemo-minitron prune`` and by the NeMo callbacks, so both do exactly the same thing.
"""

from __future__ import annotations

from nemo_minitron.model.spec import ModelSpec
from nemo_minitron.prune.depth import drop_layers, layer_scores
from nemo_minitron.prune.width import prune_width


def prune(model, spec: ModelSpec, targets: dict, *, num_layers=None, explicit_drop=None,
          depth_method: str = "lm_loss", depth_windows=None, windows=None, scores=None,
          micro_batch_size: int = 4, tp: int = 1, pp: int = 1, progress: bool = True, **width_kw):
    """Returns (model, spec, depth_info | None, width scores | None, width plan | None).

    ``explicit_drop``: 1-indexed layers to drop; else ``num_layers`` (if below the current count) selects
    layers by ``depth_method`` on ``depth_windows``. Width ``targets`` are then applied with importance
    from ``windows`` (or the given ``scores``), measured on the depth-pruned model.
    """
    depth_info = plan = None
    if explicit_drop:
        depth_info = {"method": "explicit", "drop": sorted(i - 1 for i in explicit_drop), "scores": None}
    elif num_layers is not None and num_layers != spec.num_layers:
        depth_info = layer_scores(model, spec, depth_windows, micro_batch_size, depth_method, num_layers, progress)
    if depth_info is not None:
        model, spec = drop_layers(model, spec, depth_info["drop"], tp, pp)
    if targets:
        model, spec, scores, plan = prune_width(model, spec, targets, windows=windows, scores=scores,
                                                micro_batch_size=micro_batch_size, tp=tp, pp=pp,
                                                progress=progress, **width_kw)
    return model, spec, depth_info, scores, plan
