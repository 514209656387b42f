"""``nemo-minitron prune``: depth and/or width pruning of a checkpoint, written as a smaller NeMo checkpoint.

Order when both are asked: depth first (layers scored on the source model and removed), then width
(importance calibrated on the depth-pruned model, so it measures the network that will be trained).
"""

from __future__ import annotations

import time
from pathlib import Path

from nemo_minitron import parallel
from nemo_minitron.checkpoint import nemo as ck
from nemo_minitron.checkpoint.loader import describe, load_model
from nemo_minitron.errors import UserError
from nemo_minitron.model import count_params
from nemo_minitron.prune import report
from nemo_minitron.prune.depth import validate_depth
from nemo_minitron.prune.importance import BATCH_AGGS, EXPERT_IMPORTANCE, HEAD_IMPORTANCE, SEQ_AGGS
from nemo_minitron.prune.plan import MOE_DIMS, WIDTH_DIMS, validate_targets
from nemo_minitron.prune.stage import REPORT_DIR, check_reconstruction, inputs, prune
from nemo_minitron.runlock import RunLock

def run(cfg) -> None:
    tp = cfg.trainer.strategy.tensor_model_parallel_size
    pp = cfg.trainer.strategy.pipeline_model_parallel_size
    p, d = cfg.prune, cfg.data
    # ---- everything that can be refused is refused here, before any model is built -------------------
    layout = parallel.Layout.resolve(parallel.world_size_from_env(), tp, pp, sequence_parallel=False)
    kind, src_path, spec = describe(cfg.model)
    spec.validate_layout(tp, pp)
    if spec.moe and layout.world > 1:
        raise UserError(f"pruning a mixture-of-experts model runs in one process for now (got {layout.world} "
                        f"processes: {layout})")
    explicit_drop = validate_depth(spec, p.num_layers, p.drop_layers, pp, p.depth_method)
    depth = bool(explicit_drop) or (p.num_layers is not None and p.num_layers != spec.num_layers)
    targets = validate_targets(spec, {k: p.get(k) for k in WIDTH_DIMS + MOE_DIMS}, tp)
    if p.fp8_shapes:
        from nemo_minitron.model.precision import check_fp8_shapes

        dims = {k: getattr(spec, k) for k in (*WIDTH_DIMS, "kv_channels")}
        dims.update({k: v for k, v in targets.items() if v is not None})
        check_fp8_shapes(dims, tp, "pruning targets")
    if not targets and not depth:
        raise UserError("no pruning target given (set prune.num_layers / prune.drop_layers or any of "
                        + ", ".join(f"prune.{k}" for k in WIDTH_DIMS) + ")")
    if p.seq_agg not in SEQ_AGGS or p.batch_agg not in BATCH_AGGS:
        raise UserError(f"prune.seq_agg must be one of {SEQ_AGGS}, prune.batch_agg one of {BATCH_AGGS}")
    if p.head_importance not in HEAD_IMPORTANCE:
        raise UserError(f"prune.head_importance must be one of {HEAD_IMPORTANCE}")
    expert_importance = p.get("expert_importance", "router_mass")
    if expert_importance not in EXPERT_IMPORTANCE:
        raise UserError(f"prune.expert_importance must be one of {EXPERT_IMPORTANCE}")
    check_reconstruction(p.reconstruction, p.reconstruction_damping, p.merge_pruned_heads)
    ck.check_output(Path(cfg.output), cfg.overwrite)
    from nemo_minitron.data import blend
    from nemo_minitron.data.tokenizer import fingerprint_of

    expected = fingerprint_of(src_path)  # None: the checkpoint holds no tokenizer (only the id range is checked)
    blend.check_tokenizer(d.calibration, expected, "data.calibration", model=cfg.model)
    blend.check_tokenizer(d.get("validation"), expected, "data.validation", model=cfg.model)
    scores, windows = inputs(spec, targets, depth, explicit_drop, p.scores, d.calibration, d.calibration_samples,
                             p.depth_samples, d.seq_length, d.micro_batch_size, layout.dp, p.reconstruction)
    validation = None
    if d.get("validation") and targets and p.reconstruction != "none":
        from nemo_minitron.checkpoint.loader import check_vocab
        from nemo_minitron.data import indexed

        if d.validation_samples % (d.micro_batch_size * layout.dp):
            raise UserError(f"data.validation_samples={d.validation_samples} is not divisible by "
                            f"data.micro_batch_size={d.micro_batch_size}" + (f" x data-parallel size {layout.dp}"
                                                                            if layout.dp > 1 else ""))
        validation = indexed.windows(d.validation, d.validation_samples, d.validation_seq_length or d.seq_length)
        check_vocab(spec, int(validation.max()), f"dataset {d.validation}")

    # ---- work --------------------------------------------------------------------------------------
    t0 = time.time()
    parallel.initialize(tp, pp)
    # one run per output; the lock lives beside it (OUTPUT.lock): the checkpoint is replaced as a whole
    target = Path(cfg.output).absolute()
    with RunLock(target, "prune", lock_path=target.with_name(target.name + ".lock")):
        if windows is not None and parallel.is_rank0():
            print(f"calibration over {layout}: {d.calibration_samples // layout.dp} windows per DP rank", flush=True)
        model, spec, _ = load_model(src_path, tp, pp)
        src_spec = spec
        meta = {"source": str(src_path), "seq_agg": p.seq_agg, "batch_agg": p.batch_agg,
                "head_importance": p.head_importance, **({"expert_importance": expert_importance} if spec.moe else {}),
                "merge_pruned_heads": bool(p.merge_pruned_heads),
                "reconstruction": p.reconstruction, "order": "depth, then width"}
        if depth and not explicit_drop:
            meta["depth_samples"] = p.depth_samples
        if targets:
            if scores is None:
                meta.update(calibration=str(d.calibration), calibration_samples=d.calibration_samples,
                            seq_length=d.seq_length)
            else:
                meta["scores_from"] = str(p.scores)
        model, spec, depth_info, scores, plan, recon = prune(
            model, spec, targets, num_layers=p.num_layers, explicit_drop=explicit_drop, depth_method=p.depth_method,
            depth_windows=None if windows is None else windows[: p.depth_samples],
            windows=None if windows is None else windows[: d.calibration_samples], scores=scores,
            micro_batch_size=d.micro_batch_size, tp=tp, pp=pp, seq_agg=p.seq_agg, batch_agg=p.batch_agg,
            head_importance=p.head_importance, expert_importance=expert_importance,
            merge_pruned_heads=p.merge_pruned_heads,
            reconstruction=p.reconstruction, reconstruction_damping=float(p.reconstruction_damping),
            validation=validation)
        if scores is not None and "calibration_loss" in scores:
            meta["calibration_loss"] = round(scores["calibration_loss"], 5)
        tok = ck.tokenizer_dir(src_path) if kind == "nemo" else src_path
        out = ck.save(cfg.output, model, spec, tokenizer_dir=tok, overwrite=cfg.overwrite,
                      extra=lambda tmp: report.write(tmp / REPORT_DIR, src_spec, spec, scores, plan, meta,
                                                     depth=depth_info, reconstruction=recon))
        if parallel.is_rank0():
            dims = ("num_layers", *WIDTH_DIMS, *(MOE_DIMS if spec.moe else ()))
            shape = ", ".join(f"{k} {getattr(src_spec, k)}->{getattr(spec, k)}" for k in dims
                              if getattr(src_spec, k) != getattr(spec, k))
            if depth_info:
                shape += f" (dropped layers {[i + 1 for i in depth_info['drop']]}, {depth_info['method']})"
            print(f"pruned {shape}: {count_params(src_spec) / 1e6:.2f}M -> {count_params(spec) / 1e6:.2f}M params "
                  f"({time.time() - t0:.1f}s); report in {out / REPORT_DIR}")
            if recon and "heldout" in recon:
                h = recon["heldout"]
                print(f"least-squares reconstruction: loss on {d.validation} {h['trimmed']:.4f} (trimmed) -> "
                      f"{h['least_squares']:.4f} (refitted)")
            print(f"wrote checkpoint: {out}")
    parallel.destroy()
