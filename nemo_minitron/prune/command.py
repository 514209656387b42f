"""``nemo-minitron prune``: width pruning of a NeMo checkpoint, written as a smaller NeMo checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from nemo_minitron import parallel
from nemo_minitron.checkpoint import nemo as ck
from nemo_minitron.checkpoint.loader import check_vocab, describe, load_model
from nemo_minitron.data import indexed
from nemo_minitron.errors import UserError
from nemo_minitron.model import count_params
from nemo_minitron.prune import report
from nemo_minitron.prune.importance import BATCH_AGGS, HEAD_IMPORTANCE, SEQ_AGGS
from nemo_minitron.prune.plan import WIDTH_DIMS, check_scores, validate_targets
from nemo_minitron.prune.width import prune_width

REPORT_DIR = "pruning"


def load_scores(path) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / REPORT_DIR / "scores.pt" if (p / REPORT_DIR).is_dir() else p / "scores.pt"
    if not p.is_file():
        raise UserError(f"prune.scores={path}: no scores.pt found")
    try:
        return torch.load(p, weights_only=False)
    except Exception as e:
        raise UserError(f"prune.scores={p}: cannot read ({e.__class__.__name__})") from None


def run(cfg) -> None:
    tp = cfg.trainer.strategy.tensor_model_parallel_size
    pp = cfg.trainer.strategy.pipeline_model_parallel_size
    p, d = cfg.prune, cfg.data
    # ---- everything that can be refused is refused here, before any model is built -------------------
    parallel.validate_layout(parallel.world_size_from_env(), tp, pp)
    kind, src_path, spec = describe(cfg.model)
    spec.validate_layout(tp, pp)
    targets = validate_targets(spec, {k: p[k] for k in WIDTH_DIMS}, tp)
    if not targets:
        raise UserError("no pruning target given (set any of " + ", ".join(f"prune.{k}" for k in WIDTH_DIMS) + ")")
    if p.seq_agg not in SEQ_AGGS or p.batch_agg not in BATCH_AGGS:
        raise UserError(f"prune.seq_agg must be one of {SEQ_AGGS}, prune.batch_agg one of {BATCH_AGGS}")
    if p.head_importance not in HEAD_IMPORTANCE:
        raise UserError(f"prune.head_importance must be one of {HEAD_IMPORTANCE}")
    ck.check_output(Path(cfg.output), cfg.overwrite)
    scores = None
    if p.scores:
        scores = load_scores(p.scores)
        check_scores(scores, spec, f"prune.scores={p.scores}")
        windows = None
    else:
        if not d.calibration:
            raise UserError("data.calibration=PREFIX is required (or prune.scores=PATH from an earlier run)")
        if d.calibration_samples < 1 or d.seq_length < 1 or d.micro_batch_size < 1:
            raise UserError("data.calibration_samples, data.seq_length and data.micro_batch_size must be >= 1")
        if d.calibration_samples % d.micro_batch_size:
            raise UserError("data.calibration_samples must be divisible by data.micro_batch_size")
        windows = indexed.windows(d.calibration, d.calibration_samples, d.seq_length)
        check_vocab(spec, int(windows.max()), f"dataset {d.calibration}")

    # ---- work --------------------------------------------------------------------------------------
    t0 = time.time()
    parallel.initialize(tp, pp)
    model, spec, _ = load_model(src_path, tp, pp)
    meta = {"source": str(src_path), "seq_agg": p.seq_agg, "batch_agg": p.batch_agg,
            "head_importance": p.head_importance, "merge_pruned_heads": bool(p.merge_pruned_heads)}
    if scores is None:
        meta.update(calibration=str(d.calibration), calibration_samples=d.calibration_samples,
                    seq_length=d.seq_length)
    else:
        meta["scores_from"] = str(p.scores)
    pruned, spec2, scores, plan = prune_width(
        model, spec, targets, windows=windows, scores=scores, micro_batch_size=d.micro_batch_size,
        seq_agg=p.seq_agg, batch_agg=p.batch_agg, head_importance=p.head_importance,
        merge_pruned_heads=p.merge_pruned_heads, tp=tp, pp=pp)
    if "calibration_loss" in scores:
        meta["calibration_loss"] = round(scores["calibration_loss"], 5)
    tok = ck.tokenizer_dir(src_path) if kind == "nemo" else src_path
    out = ck.save(cfg.output, pruned, spec2, tokenizer_dir=tok, overwrite=cfg.overwrite,
                  extra=lambda tmp: report.write(tmp / REPORT_DIR, spec, spec2, scores, plan, meta))
    if parallel.is_rank0():
        shape = ", ".join(f"{k} {getattr(spec, k)}->{getattr(spec2, k)}" for k in WIDTH_DIMS if k in targets)
        print(f"pruned {shape}: {count_params(spec) / 1e6:.2f}M -> {count_params(spec2) / 1e6:.2f}M params "
              f"({time.time() - t0:.1f}s); report in {out / REPORT_DIR}")
        print(f"wrote checkpoint: {out}")
    parallel.destroy()
