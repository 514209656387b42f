"""The pruning stage as one function over a loaded model: depth first, then width.

Used by ``nemo-minitron prune`` and by the NeMo callbacks, so both do exactly the same thing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nemo_minitron.errors import UserError
from nemo_minitron.model.spec import ModelSpec
from nemo_minitron.prune.depth import drop_layers, layer_scores
from nemo_minitron.prune.width import prune_width

REPORT_DIR = "pruning"  # beside the pruned checkpoint's context/ and weights/


def load_scores(path) -> dict:
    """Width scores saved by an earlier run: a pruned checkpoint directory or a scores.pt."""
    p = Path(path)
    if p.is_dir():
        p = p / REPORT_DIR / "scores.pt" if (p / REPORT_DIR).is_dir() else p / "scores.pt"
    if not p.is_file():
        raise UserError(f"prune.scores={path}: no scores.pt found")
    try:  # a file a user names: tensors and plain values only (weights_only), onto the host
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"prune.scores={p}: cannot read ({e.__class__.__name__}: not a scores.pt written by "
                        "prune or search)") from None


def check_split(calibration_samples: int, depth_samples: int, micro_batch_size: int, dp: int) -> None:
    """The calibration windows must split into micro-batches on every DP rank (each calibrates on its share)."""
    if calibration_samples % (micro_batch_size * dp) or depth_samples % (micro_batch_size * dp):
        per = "data.micro_batch_size" + (f" x data-parallel size {dp} (each DP rank calibrates on its share)"
                                         if dp > 1 else "")
        raise UserError(f"data.calibration_samples ({calibration_samples}) and prune.depth_samples "
                        f"({depth_samples}) must be divisible by {per}")


def check_reconstruction(reconstruction: str, damping, merge_pruned_heads: bool = False, section: str = "prune") -> None:
    from nemo_minitron.prune.reconstruct import RECONSTRUCTIONS

    if reconstruction not in RECONSTRUCTIONS:
        raise UserError(f"{section}.reconstruction={reconstruction!r}: one of {', '.join(RECONSTRUCTIONS)}")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping >= 0:
        raise UserError(f"{section}.reconstruction_damping={damping!r} must be a number >= 0 (relative to the "
                        "Gram matrix's mean diagonal)")
    if reconstruction != "none" and merge_pruned_heads:
        raise UserError("prune.merge_pruned_heads=true and prune.reconstruction=least_squares are alternatives "
                        "(the refit already folds pruned heads into the kept ones, by least squares): set "
                        "prune.reconstruction=none to merge")


def inputs(spec: ModelSpec, targets: dict, depth: bool, explicit_drop, scores_path, calibration,
           calibration_samples: int, depth_samples: int, seq_length: int, micro_batch_size: int, dp: int = 1,
           reconstruction: str = "none"):
    """Validate and read what :func:`prune` consumes, before any model is built: (width scores or None,
    calibration windows or None; enough windows for both width calibration and depth scoring). Least-squares
    reconstruction needs the calibration windows also when the width scores are given."""
    from nemo_minitron.checkpoint.loader import check_vocab
    from nemo_minitron.data import indexed
    from nemo_minitron.prune.plan import check_scores

    scores = windows = None
    if scores_path:
        if depth:
            raise UserError("prune.scores holds width scores of a full-depth model; it cannot be combined "
                            "with depth pruning (run depth and width as two prune commands)")
        scores = load_scores(scores_path)
        check_scores(scores, spec, f"prune.scores={scores_path}")
    refit = bool(targets) and reconstruction != "none"
    if (targets and scores is None) or (depth and not explicit_drop) or refit:
        if not calibration:
            raise UserError("data.calibration=PREFIX is required" + (
                " (least-squares reconstruction refits on it; prune.reconstruction=none does without)" if refit
                and scores is not None else " (or prune.scores=PATH from an earlier run)"))
        if min(calibration_samples, seq_length, micro_batch_size, depth_samples) < 1:
            raise UserError("data.calibration_samples, data.seq_length, data.micro_batch_size and "
                            "prune.depth_samples must be >= 1")
        check_split(calibration_samples, depth_samples, micro_batch_size, dp)
        windows = indexed.windows(calibration, max(calibration_samples, depth_samples), seq_length)
        check_vocab(spec, int(windows.max()), f"dataset {calibration}")
    return scores, windows


def prune(model, spec: ModelSpec, targets: dict, *, num_layers=None, explicit_drop=None,
          depth_method: str = "lm_loss", depth_windows=None, windows=None, scores=None,
          micro_batch_size: int = 4, tp: int = 1, pp: int = 1, progress: bool = True, **width_kw):
    """Returns (model, spec, depth_info | None, width scores | None, width plan | None, reconstruction info |
    None).

    ``explicit_drop``: 1-indexed layers to drop; else ``num_layers`` (if below the current count) selects
    layers by ``depth_method`` on ``depth_windows``. Width ``targets`` are then applied with importance
    from ``windows`` (or the given ``scores``), measured on the depth-pruned model.
    """
    depth_info = plan = recon = None
    if explicit_drop:
        depth_info = {"method": "explicit", "drop": sorted(i - 1 for i in explicit_drop), "scores": None}
    elif num_layers is not None and num_layers != spec.num_layers:
        depth_info = layer_scores(model, spec, depth_windows, micro_batch_size, depth_method, num_layers, progress)
    if depth_info is not None:
        model, spec = drop_layers(model, spec, depth_info["drop"], tp, pp)
    if targets:
        model, spec, scores, plan, recon = prune_width(model, spec, targets, windows=windows, scores=scores,
                                                       micro_batch_size=micro_batch_size, tp=tp, pp=pp,
                                                       progress=progress, **width_kw)
    return model, spec, depth_info, scores, plan, recon
