"""Candidate student shapes within a parameter budget (plain functions, no model needed).

A candidate is a dict of the five pruned dimensions (``num_layers``, ``hidden_size``, ``ffn_hidden_size``,
``num_attention_heads``, ``num_query_groups``); ``head_dim`` (kv_channels) is kept, as in Minitron. The
values per dimension come from ``space`` (explicit lists) or from ``fractions`` of the source rounded to
``multiple`` (hidden, ffn), to whole heads per query group (heads), or to the pipeline split (layers).
Every emitted candidate passes the same checks the prune command applies (:func:`validate_targets`,
``ModelSpec.validate_layout`` at the given TP/PP/EP, FP8 GEMM sizes when asked), so it builds and shards.

A mixture of experts has no dense MLP: its dimensions (:func:`dims_of`) are ``num_moe_experts`` (fractions of the
source's experts, multiples of EP, at least top-k) and ``moe_ffn_hidden_size`` (each expert's width) instead of
``ffn_hidden_size``. ``params_kind="active"`` measures the budget in the parameters one token runs through (its
top-k experts); each MoE candidate records both counts.
"""

from __future__ import annotations

import itertools
import re

from nemo_minitron.errors import UserError
from nemo_minitron.model import count_params
from nemo_minitron.model.spec import ModelSpec
from nemo_minitron.prune.plan import WIDTH_DIMS, validate_targets

DIMS = ("num_layers", *WIDTH_DIMS)
MOE_SEARCH_DIMS = ("num_layers", "hidden_size", "num_moe_experts", "moe_ffn_hidden_size", "num_attention_heads",
                   "num_query_groups")
PARAMS_KINDS = ("total", "active")
_SHORT = {"num_layers": "L", "hidden_size": "h", "ffn_hidden_size": "f", "num_moe_experts": "e",
          "moe_ffn_hidden_size": "m", "num_attention_heads": "a", "num_query_groups": "g"}


def dims_of(spec: ModelSpec) -> tuple:
    """The searchable dimensions of ``spec`` (a mixture of experts: experts and expert width for the MLP's)."""
    return MOE_SEARCH_DIMS if spec.moe else DIMS


def default_dims(spec: ModelSpec, dims) -> list:
    """``search.dims`` for this model: the dense default's ``ffn_hidden_size`` is, for a mixture of experts, its
    two expert dimensions."""
    if not spec.moe:
        return list(dims)
    return [x for d in dims for x in (("num_moe_experts", "moe_ffn_hidden_size") if d == "ffn_hidden_size" else (d,))]


def params_of(spec: ModelSpec, kind: str = "total") -> int:
    if kind not in PARAMS_KINDS:
        raise UserError(f"search.params_kind={kind!r}: one of {', '.join(PARAMS_KINDS)}")
    if kind == "active" and not spec.moe:
        raise UserError("search.params_kind=active counts the parameters of the experts a token is routed to: the "
                        "model is not a mixture of experts (use total)")
    return count_params(spec, active=kind == "active")
_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


def parse_budget(value, source_params: int) -> int:
    """``search.params``: an absolute count (``67000000``, ``"70M"``, ``"4.5B"``), a fraction of the source
    (``0.5``) or a percentage (``"50%"``). Returns parameters."""
    text = str(value).strip().lower().replace("_", "")
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)(e[+-]?\d+)?\s*([kmbt%]?)", text)
    if not m:
        raise UserError(f"search.params={value!r}: give a parameter count (67000000, 70M, 4.5B), a fraction "
                        f"of the source (0.5) or a percentage (50%)")
    x = float(m.group(1) + (m.group(2) or ""))
    unit = m.group(3)
    if unit == "%":
        x = x / 100 * source_params
    elif unit:
        x *= _SUFFIX[unit]
    elif x <= 1:
        x *= source_params
    elif "." in m.group(1) or m.group(2):
        raise UserError(f"search.params={value!r}: a fraction of the source is at most 1 (use 0.5 or 50%; "
                        f"absolute counts are whole numbers or take a suffix: 70M, 4.5B)")
    n = int(round(x))
    if not 0 < n < source_params:
        raise UserError(f"search.params={value!r} = {n:,} parameters: the budget must be below the source "
                        f"model's {source_params:,}")
    return n


def name_of(shape: dict) -> str:
    return "-".join(f"{_SHORT[k]}{shape[k]}" for k in _SHORT if k in shape)


def shape_of(spec: ModelSpec) -> dict:
    return {k: getattr(spec, k) for k in dims_of(spec)}


def _round_down(x: float, m: int) -> int:
    return int(x // m) * m


def dim_values(spec: ModelSpec, dim: str, fractions, multiple: int, tp: int, pp: int, ep: int = 1) -> list[int]:
    """Automatic values of one dimension from fractions of the source."""
    src = getattr(spec, dim)
    vals = set()
    if dim == "num_moe_experts":  # whole experts per EP rank, never fewer than the experts a token is routed to
        for f in fractions:
            v = src if f >= 1 else _round_down(f * src, ep)
            if v >= max(ep, spec.moe_router_topk):
                vals.add(v)
    elif dim in ("hidden_size", "ffn_hidden_size", "moe_ffn_hidden_size"):
        step = multiple * (tp if dim != "hidden_size" else 1)
        for f in fractions:
            v = src if f >= 1 else _round_down(f * src, step)
            if v >= step or v == src:
                vals.add(v)
    elif dim == "num_layers":
        for f in fractions:
            v = src if f >= 1 else max(pp, int(round(f * src / pp)) * pp)
            vals.add(min(v, src))
    elif dim == "num_query_groups":
        for f in fractions:
            v = src if f >= 1 else max(1, int(round(f * src)))
            if src % v == 0 or v == src:  # whole groups of the source's structure
                vals.add(v)
    elif dim == "num_attention_heads":
        # heads are kept within their query groups: groups x (1 .. heads per group); the group count is
        # filled in when candidates are combined (see enumerate_candidates)
        per = spec.num_attention_heads // spec.num_query_groups
        vals.update(range(1, per + 1))
    return sorted(vals)


def enumerate_candidates(spec: ModelSpec, budget: int, tolerance: float, *, dims=DIMS, space=None,
                         fractions=(0.5, 0.625, 0.75, 0.875, 1.0), multiple: int = 64, tp: int = 1, pp: int = 1,
                         fp8_shapes: bool = False, max_candidates: int | None = None, ep: int = 1,
                         params_kind: str = "total") -> tuple[list[dict], dict]:
    """(candidates sorted by parameter count, stats). Each candidate: shape dims + ``params`` (of
    ``params_kind``) + ``name``; a mixture of experts' also ``total_params`` and ``active_params``.

    ``dims``: the dimensions searched automatically; the others stay at the source's value unless
    ``space[dim]`` lists values. Heads are enumerated as query groups x heads per group.
    """
    DIMS = dims_of(spec)  # noqa: N806 (this model's dimensions)
    params_of(spec, params_kind)  # the kind is valid for this model
    space = {k: v for k, v in (space or {}).items() if v is not None}
    bad = [k for k in list(dims) + list(space) if k not in DIMS]
    if bad:
        raise UserError(f"search dimension(s) {bad}: one of {', '.join(DIMS)}"
                        + (" (a mixture of experts: its MLP dimensions are the experts and their width)"
                           if spec.moe and "ffn_hidden_size" in bad else ""))
    if not 0 <= tolerance < 1:
        raise UserError(f"search.tolerance={tolerance} must be in [0, 1)")
    if multiple < 1:
        raise UserError(f"search.multiple={multiple} must be >= 1")
    if any(not 0 < f <= 1 for f in fractions):
        raise UserError(f"search.fractions={list(fractions)}: each must be in (0, 1]")
    values = {}
    for d in DIMS:
        if d in space:
            vs = sorted({int(v) for v in space[d]})
            if not vs or min(vs) < 1 or max(vs) > getattr(spec, d):
                raise UserError(f"search.space.{d}={space[d]}: values must be between 1 and the source's "
                                f"{getattr(spec, d)}")
            values[d] = vs
        elif d in dims:
            values[d] = dim_values(spec, d, fractions, multiple, tp, pp, ep)
        else:
            values[d] = [getattr(spec, d)]
    per_group = "num_attention_heads" in dims and "num_attention_heads" not in space
    lo, hi = budget * (1 - tolerance), budget * (1 + tolerance)
    seen, out = set(), []
    stats = {"combinations": 0, "invalid": 0, "outside_budget": 0}
    from nemo_minitron.model.precision import check_fp8_shapes

    for combo in itertools.product(*(values[d] for d in DIMS)):
        shape = dict(zip(DIMS, combo))
        if per_group:
            shape["num_attention_heads"] *= shape["num_query_groups"]
        key = tuple(shape[d] for d in DIMS)
        if key in seen:
            continue
        seen.add(key)
        stats["combinations"] += 1
        if shape == shape_of(spec):
            continue
        try:
            validate_targets(spec, {k: shape[k] for k in DIMS if k != "num_layers"}, tp)
            s2 = spec.replace(kv_channels=spec.kv_channels, **shape)
            s2.validate_layout(tp, pp, ep)
            if fp8_shapes:
                check_fp8_shapes({**shape, "kv_channels": spec.kv_channels}, tp, "candidate")
        except UserError:
            stats["invalid"] += 1
            continue
        n = params_of(s2, params_kind)
        if not lo <= n <= hi:
            stats["outside_budget"] += 1
            continue
        counts = {"total_params": count_params(s2), "active_params": count_params(s2, active=True)} if spec.moe else {}
        out.append({**shape, "params": n, **counts, "name": name_of(shape)})
    stats["within_budget"] = len(out)
    if max_candidates and len(out) > max_candidates:
        out.sort(key=lambda c: (abs(c["params"] - budget), c["name"]))
        out = out[:max_candidates]
        stats["kept_closest_to_budget"] = max_candidates
    out.sort(key=lambda c: (c["params"], c["name"]))
    return out, stats
