"""The pipeline's report: report.json (for machines), report.md + PNG plots (for people), a terminal table.

Every number comes from the run's own files: eval/*.json (held-out loss), distill/metrics.jsonl (training
curves), pruned/pruning/ (importance plots), stages.json (wall time), and the exported Hugging Face model
re-evaluated with ``transformers`` on the same held-out tokens.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curves(run_dir: Path, out: Path) -> bool:
    from nemo_minitron.distill.train import read_metrics

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=110)
    drawn = False
    runs = [(f"{d.parent.name} distill", d, c) for d, c in zip(
        sorted(run_dir.glob("round*/distill"), key=lambda d: int(d.parent.name[5:] or 0)),
        ("#73d216", "#f57900", "#75507b", "#c17d11"))]
    runs += [("distill", run_dir / "distill", "#3465a4"), ("scratch", run_dir / "scratch", "#888a85")]
    for name, rdir, color in runs:
        m = read_metrics(rdir / "metrics.jsonl")
        if not m["train"]:
            continue
        steps = sorted(m["train"])
        ax.plot(steps, [m["train"][s]["loss"] for s in steps], color=color, lw=1.2,
                label=f"{name}: train {'LM loss' if name == 'scratch' else 'KD loss'}")
        if m["val"]:
            vs = sorted(m["val"])
            ax.plot(vs, [m["val"][s] for s in vs], "o--", color=color, ms=4, label=f"{name}: held-out LM loss")
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Training curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return True


def _bars(entries: dict, out: Path) -> None:
    plt = _plt()
    names = list(entries)
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=110)
    vals = [entries[n]["heldout_loss"] for n in names]
    palette = {"teacher": "#4e9a06", "pruned": "#cc0000", "distilled": "#3465a4", "scratch": "#888a85"}
    ax.bar(names, vals, color=[palette.get(n, "#ad7fa8" if n.endswith("pruned") else "#729fcf") for n in names])
    if len(names) > 4:
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("Held-out loss")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def downstream_table(tasks: dict) -> dict:
    """{model: {task: {metric, value, stderr, n, num_fewshot, split}}} (each task's headline metric) -> the
    report's downstream section: per task and the average, and each model's share of the teacher's average."""
    from nemo_minitron.downstream import headline

    table = {}
    for name, res in tasks.items():
        rows = {}
        for t, entry in res.items():
            key, value, err = headline(entry)
            rows[t] = {"metric": key, "value": value, "stderr": err, "n": entry["n"],
                       "num_fewshot": entry["num_fewshot"], "split": entry["split"]}
        table[name] = rows
    names = list(table)
    common = [t for t in table[names[0]] if all(t in table[n] for n in names)] if names else []
    out = {"tasks": common, "models": table, "average": {}, "share_of_teacher": {}}
    for n in names:
        vals = [table[n][t]["value"] for t in common]
        out["average"][n] = sum(vals) / len(vals) if vals else None
    base = out["average"].get("teacher")
    for n in names:
        avg = out["average"][n]
        out["share_of_teacher"][n] = avg / base if base and avg is not None else None
    return out


def _downstream_bars(down: dict, out: Path) -> None:
    plt = _plt()
    names, tasks = list(down["models"]), down["tasks"] + ["average"]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(tasks) + 2), 3.6), dpi=110)
    width = 0.8 / max(1, len(names))
    palette = {"teacher": "#4e9a06", "pruned": "#cc0000", "distilled": "#3465a4", "scratch": "#888a85"}
    for i, n in enumerate(names):
        vals = [down["models"][n][t]["value"] for t in down["tasks"]] + [down["average"][n]]
        errs = [down["models"][n][t]["stderr"] or 0.0 for t in down["tasks"]] + [0.0]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(tasks))]
        ax.bar(xs, vals, width, yerr=errs, capsize=2, label=n, color=palette.get(n, "#ad7fa8"))
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels([t if t == "average" else f"{t}\n{down['models'][names[0]][t]['metric']}" for t in tasks],
                       fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=len(names))
    ax.set_title("Downstream accuracy (+- standard error)")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def downstream_lines(down: dict) -> list[str]:
    names, first = list(down["models"]), next(iter(down["models"].values()))
    lines = ["## Downstream accuracy", "",
             "| task | metric | docs | shots | split | " + " | ".join(names) + " |",
             "|---|---|---|---|---|" + "---|" * len(names)]
    for t in down["tasks"]:
        f = first[t]
        cells = []
        for n in names:
            e = down["models"][n][t]
            cells.append(f"{e['value']:.4f}" + (f" +- {e['stderr']:.4f}" if e["stderr"] is not None else ""))
        lines.append(f"| {t} | {f['metric']} | {f['n']} | {f['num_fewshot']} | {f['split']} | " + " | ".join(cells) + " |")
    lines.append("| **average** | | | | | " + " | ".join(f"{down['average'][n]:.4f}" for n in names) + " |")
    if down["share_of_teacher"].get("teacher"):
        lines.append("| share of the teacher's average | | | | | " + " | ".join(
            f"{100 * down['share_of_teacher'][n]:.1f}%" for n in names) + " |")
    lines += ["", "lm-eval's tasks, prompts and metrics, scored by the project's megatron forward; every model on the "
              "same requests (a seeded subset when `evaluate.limit` is set). acc_norm where lm-eval reports it.", ""]
    return lines


def hf_transformers_loss(hf_dir: Path, heldout_prefix, num_samples: int, seq_length: int) -> float:
    """Mean per-token loss of the exported model, loaded by ``transformers``, on the evaluation windows."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from nemo_minitron.data import indexed

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    w = indexed.windows(heldout_prefix, num_samples, seq_length)
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in w.split(4):
            logits = model(batch[:, :-1]).logits
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1),
                                     reduction="sum").item()
            n += batch[:, 1:].numel()
    return total / n


def write(run_dir: Path, models: dict, exports: dict, heldout_prefix, num_samples: int, seq_length: int,
          times: dict) -> dict:
    from nemo_minitron.checkpoint import nemo
    from nemo_minitron.model import count_params

    run_dir = Path(run_dir)
    entries = {}
    for name, path in models.items():
        ev = json.loads((run_dir / "eval" / f"{name}.json").read_text())
        spec = nemo.read_spec(path)
        entries[name] = {"heldout_loss": ev["loss"], "perplexity": ev["perplexity"], "params": count_params(spec),
                         "checkpoint": str(path), "shape": {k: getattr(spec, k) for k in (
                             "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                             "num_query_groups", "kv_channels")}}
    rep = {**entries, "exports": dict(exports), "heldout": {"data": str(heldout_prefix), "num_samples": num_samples,
                                                            "seq_length": seq_length},
           "wall_time_s": dict(times)}
    if "hf" in exports:
        rep["exports"]["hf_transformers_heldout_loss"] = hf_transformers_loss(Path(exports["hf"]), heldout_prefix,
                                                                              num_samples, seq_length)
    from nemo_minitron.distill.train import read_metrics

    m = read_metrics(run_dir / "distill" / "metrics.jsonl")
    if m["train"]:
        last = m["train"][max(m["train"])]
        rep["distillation"] = {"steps": max(m["train"]), "tokens": last.get("consumed_tokens"),
                               "final_train_loss": last["loss"], "val_loss": {str(k): v for k, v in m["val"].items()}}
    plots = []
    if _curves(run_dir, run_dir / "training_curves.png"):
        plots.append("training_curves.png")
    _bars(entries, run_dir / "heldout_loss.png")
    plots.append("heldout_loss.png")
    tasks = {}
    for name in models:
        ev = json.loads((run_dir / "eval" / f"{name}.json").read_text())
        if ev.get("tasks"):
            tasks[name] = ev["tasks"]
    if tasks:
        rep["downstream"] = downstream_table(tasks)
        if rep["downstream"]["tasks"]:
            _downstream_bars(rep["downstream"], run_dir / "downstream.png")
            plots.append("downstream.png")
    prune_dir = Path(models["pruned"]) / "pruning"
    for png in sorted(prune_dir.glob("*.png")) if prune_dir.is_dir() else []:
        shutil.copy2(png, run_dir / f"pruning_{png.name}")
        plots.append(f"pruning_{png.name}")
    rep["plots"] = plots
    prune_rep = prune_dir / "report.json"
    recon = json.loads(prune_rep.read_text()).get("reconstruction_info") if prune_rep.is_file() else None
    if recon and recon.get("heldout"):
        rep["reconstruction"] = {"pruned_trimmed_heldout_loss": recon["heldout"]["trimmed"],
                                 "pruned_least_squares_heldout_loss": recon["heldout"]["least_squares"],
                                 "damping": recon["damping"]}
    (run_dir / "report.json").write_text(json.dumps(rep, indent=2))

    lines = ["# Minitron run report", "", f"Run directory: `{run_dir}`", "",
             "| model | params | held-out loss | perplexity | layers | hidden | ffn | heads / groups |",
             "|---|---|---|---|---|---|---|---|"]
    for name, e in entries.items():
        s = e["shape"]
        lines.append(f"| {name} | {e['params'] / 1e6:.1f}M | {e['heldout_loss']:.4f} | {e['perplexity']:.1f} | "
                     f"{s['num_layers']} | {s['hidden_size']} | {s['ffn_hidden_size']} | "
                     f"{s['num_attention_heads']} / {s['num_query_groups']} |")
    lines += ["", f"Held-out: {num_samples} windows of {seq_length} tokens from `{heldout_prefix}`.", ""]
    if "reconstruction" in rep:
        h = rep["reconstruction"]
        lines += [f"Least-squares reconstruction (prune.reconstruction=least_squares, damping {h['damping']}): "
                  f"the pruned student's held-out loss is {h['pruned_least_squares_heldout_loss']:.4f}, against "
                  f"{h['pruned_trimmed_heldout_loss']:.4f} "
                  "with its kept weights only trimmed (the `pruned` row is the refitted student).", ""]
    if "distillation" in rep:
        dd = rep["distillation"]
        lines += [f"Distillation: {dd['steps']} steps, {dd['tokens']} tokens; final train KD loss "
                  f"{dd['final_train_loss']:.4f}.", ""]
    if rep.get("downstream", {}).get("tasks"):
        lines += downstream_lines(rep["downstream"])
    if exports:
        lines += ["## Exports", ""]
        for k, v in exports.items():
            lines.append(f"- {k}: `{v}`")
        if "hf_transformers_heldout_loss" in rep["exports"]:
            lines.append(f"- the HF export loaded with `transformers` gives held-out loss "
                         f"{rep['exports']['hf_transformers_heldout_loss']:.4f} (distilled: "
                         f"{entries['distilled']['heldout_loss']:.4f})")
        lines.append("")
    lines += ["## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in times.items()]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
    return rep


def summary(rep: dict) -> str:
    names = [n for n, v in rep.items() if isinstance(v, dict) and "heldout_loss" in v]
    width = max([10] + [len(n) for n in names])
    rows = [f"{'model':<{width}} {'params':>9} {'held-out loss':>14} {'perplexity':>11}"]
    for name in names:
        e = rep[name]
        ppl = e["perplexity"] if e["perplexity"] < 1e6 else math.inf
        rows.append(f"{name:<{width}} {e['params'] / 1e6:>8.1f}M {e['heldout_loss']:>14.4f} {ppl:>11.1f}")
    down = rep.get("downstream")
    if down and down["tasks"]:
        rows.append("downstream (" + ", ".join(down["tasks"]) + "): average accuracy " + "  ".join(
            f"{n} {v:.4f}" for n, v in down["average"].items())
            + (f"  (distilled: {100 * down['share_of_teacher']['distilled']:.1f}% of the teacher)"
               if down["share_of_teacher"].get("distilled") else ""))
    ex = rep.get("exports", {})
    for k in ("hf", "nemo"):
        if k in ex:
            rows.append(f"export {k}: {ex[k]}")
    if "hf_transformers_heldout_loss" in ex:
        rows.append(f"HF export via transformers: held-out loss {ex['hf_transformers_heldout_loss']:.4f}")
    return "\n".join(rows)
