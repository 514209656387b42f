"""The pruning report next to the pruned checkpoint: shapes, parameter counts, importance plots."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nemo_minitron.model import count_params
from nemo_minitron.model.spec import ModelSpec
from nemo_minitron.prune.plan import WIDTH_DIMS, WidthPlan


def _plot(path: Path, values: torch.Tensor, kept: torch.Tensor | None, title: str, xlabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = values.double().flatten()
    order = torch.argsort(v, descending=True)
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    ax.plot(range(len(v)), v[order].numpy(), lw=1.2, color="#3465a4", label="importance (sorted)")
    if kept is not None:
        mask = torch.zeros(len(v), dtype=torch.bool)
        mask[kept.flatten()] = True
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


def write(out_dir: Path, src: ModelSpec, dst: ModelSpec, scores: dict, plan: WidthPlan, meta: dict) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({k: scores[k] for k in ("heads", "ffn", "hidden")} | {"meta": meta}, out_dir / "scores.pt")
    plots = {}
    _plot(out_dir / "importance_hidden.png", scores["hidden"], plan.hidden, "embedding channels", "channel (sorted)")
    plots["hidden"] = "importance_hidden.png"
    _plot(out_dir / "importance_ffn.png", scores["ffn"][0],
          None if plan.ffn is None else plan.ffn[0], "MLP neurons, layer 1", "neuron (sorted)")
    plots["ffn"] = "importance_ffn.png"
    heads_kept = None
    if plan.groups is not None:
        per = src.num_attention_heads // src.num_query_groups
        heads_kept = torch.cat([g * per + h for g, h in zip(plan.groups[0].tolist(), plan.heads[0])])
    _plot(out_dir / "importance_heads.png", scores["heads"][0], heads_kept, "attention heads, layer 1", "head (sorted)")
    plots["heads"] = "importance_heads.png"
    shapes = {d: {"source": getattr(src, d), "pruned": getattr(dst, d)} for d in WIDTH_DIMS}
    rep = {"shapes": shapes, "kv_channels": dst.kv_channels,
           "params": {"source": count_params(src), "pruned": count_params(dst)},
           "plots": plots, "plan": plan.summary(), **meta}
    (out_dir / "report.json").write_text(json.dumps(rep, indent=2))
    lines = ["# Pruning report", "", "| dimension | source | pruned |", "|---|---|---|"]
    lines += [f"| {d} | {s['source']} | {s['pruned']} |" for d, s in shapes.items()]
    lines += [f"| parameters | {rep['params']['source']:,} | {rep['params']['pruned']:,} |", "",
              f"head_dim (kv_channels) kept at {dst.kv_channels}. Scores: `scores.pt` "
              f"(reuse with `prune.scores=...`).", ""]
    for k in ("calibration_samples", "seq_length", "seq_agg", "batch_agg", "calibration_loss", "scores_from"):
        if k in meta:
            lines.append(f"- {k}: {meta[k]}")
    lines += [""] + [f"![{k}]({v})" for k, v in plots.items()]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    return rep
