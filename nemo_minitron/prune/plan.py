"""Width targets -> keep indices ("plan"), from importance scores or at random (the baseline).

Every layer gets the same new shape (as in Minitron). Heads are ranked within their query group: a group
keeps its ``heads/groups`` most important heads; when query groups are pruned, groups are ranked by the
sum of their heads' scores and dropped whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nemo_minitron.errors import UserError
from nemo_minitron.model.spec import ModelSpec

WIDTH_DIMS = ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")
MOE_DIMS = ("num_moe_experts", "moe_ffn_hidden_size")  # mixture-of-experts models: experts, each expert's width


@dataclass
class WidthPlan:
    hidden: torch.Tensor | None = None                 # kept hidden channels (sorted)
    ffn: list | None = None                            # per layer: kept neurons (sorted)
    groups: list | None = None                         # per layer: kept query groups (sorted)
    heads: list | None = None                          # per layer, per kept group: kept heads within it
    pruned_heads: list | None = None                   # per layer, per kept group: pruned heads, most important first
    kept_by_score: list | None = None                  # per layer, per kept group: kept heads, most important first
    experts: list | None = None                        # MoE, per layer: kept experts (sorted; their new order)
    expert_ffn: list | None = None                     # MoE, per layer: {expert: its kept neurons (sorted)}
    targets: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"targets": dict(self.targets),
                "hidden_kept": None if self.hidden is None else self.hidden.tolist(),
                "ffn_kept_layer0": None if self.ffn is None else self.ffn[0].tolist(),
                "groups_kept": None if self.groups is None else [g.tolist() for g in self.groups],
                "heads_kept": None if self.heads is None else [[h.tolist() for h in l] for l in self.heads],
                "experts_kept": None if self.experts is None else [e.tolist() for e in self.experts]}


def validate_targets(spec: ModelSpec, targets: dict, tp: int = 1) -> dict:
    """Normalize and check width targets before any work. Returns {dim: int} for the given dims."""
    out = {}
    for dim, value in targets.items():
        if dim not in WIDTH_DIMS + MOE_DIMS:
            raise UserError(f"unknown pruning dimension {dim!r} (one of {', '.join(WIDTH_DIMS + MOE_DIMS)})")
        if value is None:
            continue
        if dim in MOE_DIMS and not spec.moe:
            raise UserError(f"prune.{dim}: the model is not a mixture of experts")
        if dim == "ffn_hidden_size" and spec.moe:
            raise UserError("prune.ffn_hidden_size: a mixture-of-experts model has no dense MLP; its experts' width is "
                            "prune.moe_ffn_hidden_size")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"prune.{dim}={value!r} must be a positive integer")
        src = getattr(spec, dim)
        if value > src:
            raise UserError(f"prune.{dim}={value} is larger than the source model's {src}")
        out[dim] = value
    heads = out.get("num_attention_heads", spec.num_attention_heads)
    groups = out.get("num_query_groups", spec.num_query_groups)
    if heads % groups:
        raise UserError(f"num_attention_heads={heads} is not divisible by num_query_groups={groups}")
    if heads // groups > spec.num_attention_heads // spec.num_query_groups:
        raise UserError(
            f"{heads} heads in {groups} query groups needs {heads // groups} heads per group, but the source has "
            f"{spec.num_attention_heads // spec.num_query_groups} (heads are kept within their groups)")
    if spec.moe and out.get("num_moe_experts", spec.num_moe_experts) < spec.moe_router_topk:
        raise UserError(f"prune.num_moe_experts={out['num_moe_experts']} is fewer than the {spec.moe_router_topk} "
                        "experts each token is routed to (moe_router_topk)")
    ffn = ("moe_ffn_hidden_size", out.get("moe_ffn_hidden_size", spec.moe_ffn_hidden_size)) if spec.moe else \
        ("ffn_hidden_size", out.get("ffn_hidden_size", spec.ffn_hidden_size))
    for dim, val in (ffn,
                     ("num_attention_heads", heads), ("num_query_groups", groups)):
        if val % tp:
            raise UserError(f"prune.{dim}={val} is not divisible by tensor_model_parallel_size={tp}")
    return out


def _topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(torch.topk(scores, k, sorted=True).indices).values


def make_plan(scores: dict, spec: ModelSpec, targets: dict) -> WidthPlan:
    """Keep the most important units. ``scores``: heads [L, H], ffn [L, F], hidden [h]."""
    plan = WidthPlan(targets=dict(targets))
    L = spec.num_layers
    if "hidden_size" in targets:
        plan.hidden = _topk_sorted(scores["hidden"], targets["hidden_size"])
    if "ffn_hidden_size" in targets:
        plan.ffn = [_topk_sorted(scores["ffn"][l], targets["ffn_hidden_size"]) for l in range(L)]
    if "num_attention_heads" in targets or "num_query_groups" in targets:
        G, per = spec.num_query_groups, spec.num_attention_heads // spec.num_query_groups
        g_new = targets.get("num_query_groups", G)
        per_new = targets.get("num_attention_heads", spec.num_attention_heads) // g_new
        plan.groups, plan.heads, plan.pruned_heads, plan.kept_by_score = [], [], [], []
        for l in range(L):
            hs = scores["heads"][l].reshape(G, per)
            gk = _topk_sorted(hs.sum(1), g_new)
            plan.groups.append(gk)
            order = [torch.argsort(hs[g], descending=True) for g in gk.tolist()]
            plan.heads.append([torch.sort(o[:per_new]).values for o in order])
            plan.kept_by_score.append([o[:per_new] for o in order])
            plan.pruned_heads.append([o[per_new:] for o in order])
    if "num_moe_experts" in targets or "moe_ffn_hidden_size" in targets:
        E, F = spec.num_moe_experts, spec.moe_ffn_hidden_size
        plan.experts = [_topk_sorted(scores["experts"][l], targets.get("num_moe_experts", E)) for l in range(L)]
        width = targets.get("moe_ffn_hidden_size", F)
        plan.expert_ffn = [{j: _topk_sorted(scores["expert_ffn"][l][j], width) for j in plan.experts[l].tolist()}
                           for l in range(L)]
    return plan


def random_scores(spec: ModelSpec, seed: int) -> dict:
    """Random importance: the baseline that keeps a random set of units of the same shape."""
    g = torch.Generator().manual_seed(seed)
    L = spec.num_layers
    out = {"heads": torch.rand(L, spec.num_attention_heads, generator=g, dtype=torch.float64),
           "ffn": torch.rand(L, spec.ffn_hidden_size, generator=g, dtype=torch.float64),
           "hidden": torch.rand(spec.hidden_size, generator=g, dtype=torch.float64)}
    if spec.moe:
        del out["ffn"]
        out["experts"] = torch.rand(L, spec.num_moe_experts, generator=g, dtype=torch.float64)
        out["expert_ffn"] = torch.rand(L, spec.num_moe_experts, spec.moe_ffn_hidden_size, generator=g,
                                       dtype=torch.float64)
    return out


def check_scores(scores: dict, spec: ModelSpec, where: str) -> None:
    want = {"heads": (spec.num_layers, spec.num_attention_heads), "hidden": (spec.hidden_size,)}
    if spec.moe:
        want.update(experts=(spec.num_layers, spec.num_moe_experts),
                    expert_ffn=(spec.num_layers, spec.num_moe_experts, spec.moe_ffn_hidden_size))
    else:
        want["ffn"] = (spec.num_layers, spec.ffn_hidden_size)
    for k, shape in want.items():
        if k not in scores or tuple(scores[k].shape) != shape:
            got = None if k not in scores else tuple(scores[k].shape)
            raise UserError(f"{where}: importance scores '{k}' have shape {got}, the model needs {shape} "
                            f"(scores from another model?)")
