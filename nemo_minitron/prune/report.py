"""The pruning report next to the pruned checkpoint: shapes, parameter counts, importance plots."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nemo_minitron.model import count_params
from nemo_minitron.model.spec import ModelSpec
from nemo_minitron.prune.plan import MOE_DIMS, WIDTH_DIMS, WidthPlan


def save_scores(path: Path, scores: dict, meta: dict | None = None) -> None:
    """Width importance to ``path`` (``prune.scores=`` / ``search.scores=`` read it back): host copies, so the
    file loads anywhere (and with ``weights_only=True``)."""
    out = {k: scores[k].detach().cpu() for k in ("heads", "ffn", "hidden", "experts", "expert_ffn",
                                                 "expert_output_norm", "expert_router_mass") if k in scores}
    if "calibration_loss" in scores:
        out["calibration_loss"] = float(scores["calibration_loss"])
    torch.save(out | ({"meta": meta} if meta is not None else {}), path)


def _plot(path: Path, values: torch.Tensor, kept: torch.Tensor | None, title: str, xlabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = values.detach().double().flatten().cpu()  # plotted on the host
    order = torch.argsort(v, descending=True)
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    ax.plot(range(len(v)), v[order].numpy(), lw=1.2, color="#3465a4", label="importance (sorted)")
    if kept is not None:
        mask = torch.zeros(len(v), dtype=torch.bool)
        mask[kept.flatten().cpu()] = True
        k = int(mask.sum())
        ax.axvline(k - 0.5, color="#cc0000", ls="--", lw=1, label=f"kept {k} of {len(v)}")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("score (log)")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_heads(path: Path, heads: torch.Tensor, plan: WidthPlan, src: ModelSpec) -> None:
    """Every layer's head importance (layers x heads, log scale, heads grouped by query group); kept heads
    marked with a dot (all of them when heads are not pruned)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = heads.detach().double().cpu().clamp_min(1e-30).log10()
    L, H = v.shape
    per = src.num_attention_heads // src.num_query_groups
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * H + 2), max(3.0, 0.22 * L + 1.2)), dpi=110)
    im = ax.imshow(v.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="log10 score")
    for l in range(L):
        kept = (range(H) if plan.groups is None else
                torch.cat([g * per + h for g, h in zip(plan.groups[l].tolist(), plan.heads[l])]).cpu().tolist())
        ax.scatter(list(kept), [l] * len(kept), s=9, c="white", edgecolors="black", linewidths=0.4)
    for g in range(1, src.num_query_groups):
        ax.axvline(g * per - 0.5, color="white", lw=0.8)
    ax.set_xlabel(f"head ({src.num_query_groups} query groups of {per}; dot = kept)")
    ax.set_ylabel("layer")
    xt, yt = range(0, H, max(1, H // 32)), range(0, L, max(1, L // 16))
    ax.set_xticks(xt, [str(i + 1) for i in xt])  # 1-indexed, as the layers
    ax.set_yticks(yt, [str(i + 1) for i in yt])
    ax.set_title("attention head importance, every layer")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_depth(path: Path, depth: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = torch.as_tensor(depth["scores"]).detach().double().cpu()  # plotted on the host
    per_block = depth["method"] == "contiguous"
    drop = set(depth["drop"])
    x = list(range(1, len(v) + 1))
    colors = ["#cc0000" if (i - 1 == depth["drop"][0] if per_block else i - 1 in drop) else "#3465a4" for i in x]
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    ax.bar(x, v.numpy(), color=colors)
    ax.set_xlabel("first layer of the dropped block (1-indexed)" if per_block else "layer (1-indexed)")
    ax.set_ylabel({"block_influence": "block influence (1 - cos)", "lm_loss": "LM loss without the layer",
                   "contiguous": "LM loss without the block"}[depth["method"]])
    ax.set_title(f"depth importance ({depth['method']}); red = dropped")
    if depth["method"] != "block_influence":
        ax.axhline(depth["base_loss"], color="black", lw=0.8, ls=":", label=f"all layers {depth['base_loss']:.3f}")
        lo, hi = min(float(v.min()), depth["base_loss"]), float(v.max())
        pad = 0.05 * (hi - lo) + 1e-6
        ax.set_ylim(lo - pad, hi + pad)  # losses differ by little: show the differences, not the zero
        ax.legend(fontsize=8)
    ax.set_xticks(x if len(x) <= 32 else x[:: max(1, len(x) // 16)])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(out_dir: Path, src: ModelSpec, dst: ModelSpec, scores: dict | None, plan: WidthPlan | None,
          meta: dict, depth: dict | None = None, reconstruction: dict | None = None) -> dict:
    """``src`` -> (depth) -> (width) -> ``dst``; width scores are those of the depth-pruned model."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {}
    rep_depth = None
    if depth is not None:
        rep_depth = {"method": depth["method"], "dropped_layers": [i + 1 for i in depth["drop"]],
                     "scores": [round(float(x), 6) for x in (depth.get("scores") if depth.get("scores") is not None else [])],
                     "base_loss": depth.get("base_loss"), "forward_equivalents": depth.get("forward_equivalents"),
                     "prefix_reuse": depth.get("prefix_reuse")}
        if depth.get("scores") is not None and len(depth["scores"]):
            _plot_depth(out_dir / "depth_scores.png", depth)
            plots["depth"] = "depth_scores.png"
    if plan is None:
        return _finish(out_dir, src, dst, plots, meta, rep_depth, None)
    if reconstruction is not None:
        meta = {**meta, "reconstruction_info": reconstruction}
    save_scores(out_dir / "scores.pt", scores, meta)
    _plot(out_dir / "importance_hidden.png", scores["hidden"], plan.hidden, "embedding channels", "channel (sorted)")
    plots["hidden"] = "importance_hidden.png"
    if "experts" in scores:  # a mixture of experts: the experts of layer 1 and the neurons of its first expert
        _plot(out_dir / "importance_experts.png", scores["experts"][0],
              None if plan.experts is None else plan.experts[0], "experts, layer 1", "expert (sorted)")
        plots["experts"] = "importance_experts.png"
        first = 0 if plan.experts is None else int(plan.experts[0][0])
        _plot(out_dir / "importance_ffn.png", scores["expert_ffn"][0][first],
              None if plan.expert_ffn is None else plan.expert_ffn[0][first],
              f"expert {first} MLP neurons, layer 1", "neuron (sorted)")
    else:
        _plot(out_dir / "importance_ffn.png", scores["ffn"][0],
              None if plan.ffn is None else plan.ffn[0], "MLP neurons, layer 1", "neuron (sorted)")
    plots["ffn"] = "importance_ffn.png"
    _plot_heads(out_dir / "importance_heads.png", scores["heads"], plan, src)
    plots["heads"] = "importance_heads.png"
    return _finish(out_dir, src, dst, plots, meta, rep_depth, plan)


def _finish(out_dir, src, dst, plots, meta, depth, plan) -> dict:
    dims = ("num_layers", *WIDTH_DIMS, *(MOE_DIMS if src.moe else ()))
    shapes = {d: {"source": getattr(src, d), "pruned": getattr(dst, d)} for d in dims}
    rep = {"shapes": shapes, "kv_channels": dst.kv_channels,
           "params": {"source": count_params(src), "pruned": count_params(dst),
                      **({"source_active": count_params(src, active=True), "pruned_active": count_params(dst, active=True)}
                         if src.moe else {})},
           "plots": plots, "plan": None if plan is None else plan.summary(), "depth": depth, **meta}
    (out_dir / "report.json").write_text(json.dumps(rep, indent=2))
    lines = ["# Pruning report", "", "| dimension | source | pruned |", "|---|---|---|"]
    lines += [f"| {d} | {s['source']} | {s['pruned']} |" for d, s in shapes.items()]
    lines += [f"| parameters | {rep['params']['source']:,} | {rep['params']['pruned']:,} |"]
    if "source_active" in rep["params"]:
        lines += [f"| active parameters (top-{src.moe_router_topk} experts) | {rep['params']['source_active']:,} | "
                  f"{rep['params']['pruned_active']:,} |"]
    lines += ["",
              f"head_dim (kv_channels) kept at {dst.kv_channels}."
              + (" Width scores: `scores.pt` (reuse with `prune.scores=...`)." if plan is not None else ""), ""]
    if depth is not None:
        lines += [f"Depth ({depth['method']}): dropped layers {depth['dropped_layers']} (1-indexed)."]
        if depth.get("forward_equivalents") is not None:
            lines[-1] += f" Scoring cost: {depth['forward_equivalents']} forward passes over the depth windows"
            lines[-1] += (" (the layers before each skipped one are not re-run: their output is cached)."
                          if depth.get("prefix_reuse") else ".")
        if depth["scores"]:
            lines += ["", "| " + ("block start" if depth["method"] == "contiguous" else "layer") + " | score |",
                      "|---|---|"] + [f"| {i + 1} | {v:.4f} |" for i, v in enumerate(depth["scores"])]
        lines.append("")
    for k in ("calibration_samples", "seq_length", "seq_agg", "batch_agg", "calibration_loss", "scores_from",
              "reconstruction"):
        if k in meta:
            lines.append(f"- {k}: {meta[k]}")
    lines += _reconstruction_lines(meta.get("reconstruction_info"))
    lines += [""] + [f"![{k}]({v})" for k, v in plots.items()]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    return rep


def _reconstruction_lines(info: dict | None) -> list:
    """The least-squares refit: relative output error of each refitted layer on the calibration tokens."""
    if not info:
        return []
    rows = info.get("layers") or []
    kinds = [k for k in ("heads", "ffn") if rows and k in rows[0]]
    names = {"heads": "linear_proj (heads)", "ffn": "linear_fc2 (neurons)"}
    mean = {k: (sum(r[k]["before"] for r in rows) / len(rows), sum(r[k]["after"] for r in rows) / len(rows))
            for k in kinds}
    line = f"Least-squares reconstruction (damping {info['damping']})"
    if info.get("hidden_inputs_refitted"):
        line += ": every linear_qkv / linear_fc1 refitted for the pruned embedding channels"
    if kinds:
        line += ("; relative squared output error of the refitted layers on the calibration tokens, pruned as is "
                 "-> refitted (mean over layers: " + ", ".join(f"{names[k]} {b:.4f} -> {a:.4f}"
                                                              for k, (b, a) in mean.items()) + ")")
    line += f". Cost: {info.get('forward_equivalents')} forward passes, {info.get('seconds')} s."
    if info.get("heldout"):
        h = info["heldout"]
        line += (f" Loss on the validation windows ({h['windows'][0]} x {h['windows'][1] - 1} tokens): "
                 f"{h['trimmed']:.4f} trimmed -> {h['least_squares']:.4f} refitted.")
    lines = ["", line]
    if kinds:
        lines += ["", "| layer | " + " | ".join(names[k] for k in kinds) + " |", "|---|" + "---|" * len(kinds)]
        lines += [f"| {r['layer']} | " + " | ".join(f"{r[k]['before']:.4f} -> {r[k]['after']:.4f}" for k in kinds)
                  + " |" for r in rows]
    return lines
