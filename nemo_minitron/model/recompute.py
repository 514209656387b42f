"""Activation recomputation: ``*.recompute_granularity`` / ``recompute_method`` / ``recompute_num_layers``
(Megatron-LM's ``--recompute-granularity``, ``--recompute-method``, ``--recompute-num-layers``), validated into
megatron ``TransformerConfig`` fields before any work.

- ``selective``: the core attention (softmax and its inputs, the largest activation at long sequences) is
  recomputed in the backward; everything else is kept. Megatron's recommended default for large models.
- ``full`` with ``uniform``: the layers of each stage form groups of ``recompute_num_layers``; only each group's
  input is kept and the group is re-run in the backward. With ``block``: the first ``recompute_num_layers`` layers
  of each pipeline stage are recomputed, the others keep their activations.
"""

from __future__ import annotations

from nemo_minitron.errors import UserError

GRANULARITIES = ("selective", "full")
METHODS = ("uniform", "block")


def resolve(granularity, method, num_layers, layers_per_stage: int, prefix: str = "model") -> dict:
    """TransformerConfig fields (``recompute_*``) for the given keys; every field None when off."""
    off = {"recompute_granularity": None, "recompute_method": None, "recompute_num_layers": None}
    if granularity is None:
        if method is not None or num_layers is not None:
            raise UserError(f"{prefix}.recompute_method / recompute_num_layers need "
                            f"{prefix}.recompute_granularity=full")
        return off
    if granularity not in GRANULARITIES:
        raise UserError(f"{prefix}.recompute_granularity={granularity!r}: one of {', '.join(GRANULARITIES)} (or null)")
    if granularity == "selective":
        if method is not None or num_layers is not None:
            raise UserError(f"{prefix}.recompute_granularity=selective recomputes the core attention of every layer: "
                            f"{prefix}.recompute_method / recompute_num_layers are for full recomputation only")
        return {**off, "recompute_granularity": "selective"}
    if method not in METHODS:
        raise UserError(f"{prefix}.recompute_granularity=full needs {prefix}.recompute_method: one of "
                        f"{', '.join(METHODS)} (got {method!r})")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= layers_per_stage:
        raise UserError(f"{prefix}.recompute_num_layers={num_layers!r} must be between 1 and the {layers_per_stage} "
                        f"layers of a pipeline stage")
    return {"recompute_granularity": "full", "recompute_method": method, "recompute_num_layers": num_layers}
