"""``nemo-minitron search``: choose the student's shape for a parameter budget (Minitron's architecture search).

    DIR/candidates.json        every candidate within the budget: shape, params, loss right after pruning
    DIR/scores.pt              the cached width importance (calibrated once, on the source model)
    DIR/candidates/<name>/     the finalists' pruned checkpoints (top K by pruned loss, + the baseline)
    DIR/distill/<name>/        each finalist's short distillation (a normal distill run dir; student/)
    DIR/eval/<name>.json       its validation loss after the short distillation
    DIR/search.json, search.md the ranked table; DIR/winner.yaml the winner's shape and pruning settings
    DIR/logs/<stage>.log, DIR/stages.json (wall time per stage)

Phases (``search.phase``): ``rank`` (calibrate once, prune and evaluate every candidate, save the
finalists), ``distill`` (one finalist's short distillation + evaluation; ``search.candidate=I`` or
``$SLURM_ARRAY_TASK_ID``, so the finalists can run as a SLURM job array), ``report`` (the table), and
``all`` = the three in one job, one finalist after another. Every phase skips work that is complete, so
re-running the same command continues. Parallel phases run under ``launcher.command`` (like the pipeline).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from nemo_minitron import stages
from nemo_minitron.data import blend
from nemo_minitron.errors import UserError

PHASES = ("all", "rank", "distill", "report")
SCORES = ("val_loss", "downstream")
RANK_REFITS = ("one_shot", "sequential")


# --------------------------------------------------------------------------------------------------
# validation (before any work)
# --------------------------------------------------------------------------------------------------
def _settings(cfg, dry: bool = False):
    """(source kind, path, spec, budget, candidates, stats, baseline shape | None) — all checks, no model.
    ``dry``: the model may be a config.json alone (a launch plan for a model not downloaded yet)."""
    from nemo_minitron.checkpoint.loader import describe
    from nemo_minitron.search import space

    s = cfg.search
    tp = cfg.trainer.strategy.tensor_model_parallel_size
    pp = cfg.trainer.strategy.pipeline_model_parallel_size
    if dry:
        from nemo_minitron.launch_plan import spec_of

        kind, path, spec = "nemo", cfg.model, spec_of(cfg.model)
    else:
        kind, path, spec = describe(cfg.model)
    if kind != "nemo":
        raise UserError(f"model={cfg.model} is a Hugging Face directory: import it first (nemo-minitron import "
                        f"source=... output=CKPT); it is the teacher of the short distillations")
    from nemo_minitron import parallel

    ep = parallel.expert_parallel_size(cfg.trainer.strategy)
    if not dry:  # a dry run lists a mixture of experts' candidates; a run cannot distill its finalists yet
        spec.require_dense("search")
    spec.validate_layout(tp, pp, ep)
    params_kind = s.get("params_kind", "total")
    source_params = space.params_of(spec, params_kind)
    budget = space.parse_budget(s.params, source_params)
    for key in ("top_k", "distill_steps", "eval_samples", "rank_samples", "eval_seq_length", "max_candidates"):
        if not isinstance(s[key], int) or s[key] < 1:
            raise UserError(f"search.{key}={s[key]!r} must be a positive integer")

    dp = 1 if dry else parallel.world_size_from_env() // (tp * pp)  # the rank phase's DP (under launcher.command: 1)
    per = f"data.micro_batch_size={cfg.data.micro_batch_size}" + (f" x data-parallel size {dp}" if dp > 1 else "")
    for key, n in (("search.eval_samples", s.eval_samples), ("search.rank_samples", s.rank_samples),
                   ("data.calibration_samples", cfg.data.calibration_samples)):
        if n % (cfg.data.micro_batch_size * dp):
            raise UserError(f"{key}={n} is not divisible by {per}")
    from nemo_minitron.prune.depth import DEPTH_METHODS

    if s.depth_method not in DEPTH_METHODS:
        raise UserError(f"search.depth_method={s.depth_method!r}: one of {', '.join(DEPTH_METHODS)}")
    from nemo_minitron.prune.stage import check_reconstruction

    check_reconstruction(s.reconstruction, s.reconstruction_damping, section="search")
    if s.rank_refit not in RANK_REFITS:
        raise UserError(f"search.rank_refit={s.rank_refit!r}: one of {', '.join(RANK_REFITS)}")
    _score_tasks(cfg, build=not dry)
    if isinstance(s.stats_max_gib, bool) or not isinstance(s.stats_max_gib, (int, float)) or s.stats_max_gib < 0:
        raise UserError(f"search.stats_max_gib={s.stats_max_gib!r} must be a number of GiB >= 0")
    space_cfg = {k: (list(v) if v is not None else None) for k, v in s.space.items()}
    cands, stats = space.enumerate_candidates(
        spec, budget, s.tolerance, dims=space.default_dims(spec, s.dims), space=space_cfg, fractions=list(s.fractions),
        multiple=s.multiple, tp=tp, pp=pp, fp8_shapes=s.fp8_shapes, max_candidates=s.max_candidates, ep=ep,
        params_kind=params_kind)
    if not cands:
        raise UserError(f"no candidate shape has {budget / 1e6:.2f}M {'active ' if params_kind == 'active' else ''}"
                        f"parameters +-{s.tolerance:.0%} "
                        f"({stats['combinations']} combinations, {stats['invalid']} invalid at TP={tp} PP={pp}, "
                        f"{stats['outside_budget']} outside the budget): widen search.tolerance, add "
                        f"search.fractions, or lower search.multiple")
    baseline = None
    if s.baseline is not None:
        from nemo_minitron.prune.plan import validate_targets

        b = dict(s.baseline)
        dims = space.dims_of(spec)
        unknown = [k for k in b if k not in dims]
        if unknown:
            raise UserError(f"search.baseline: unknown dimension(s) {unknown} (one of {', '.join(dims)})")
        baseline = {**space.shape_of(spec), **{k: int(v) for k, v in b.items() if v is not None}}
        validate_targets(spec, {k: baseline[k] for k in dims if k != "num_layers"}, tp)
        if baseline["num_layers"] > spec.num_layers or baseline["num_layers"] % pp:
            raise UserError(f"search.baseline.num_layers={baseline['num_layers']}: at most {spec.num_layers} and "
                            f"divisible by pipeline_model_parallel_size={pp}")
        spec.replace(kv_channels=spec.kv_channels, **baseline).validate_layout(tp, pp, ep)
        baseline.update(params=space.params_of(spec.replace(kv_channels=spec.kv_channels, **baseline), params_kind),
                        name=space.name_of(baseline))
    return kind, path, spec, budget, cands, stats, baseline


def _finalists(doc: dict) -> list[dict]:
    """The candidates that get a short distillation, in order: top K by pruned loss, then the baseline."""
    by = {c["name"]: c for c in doc["candidates"]}
    if doc.get("baseline"):
        by.setdefault(doc["baseline"]["name"], doc["baseline"])
    return [by[n] for n in doc["finalists"]]


# --------------------------------------------------------------------------------------------------
# phase rank: in-process (under the launcher when parallel)
# --------------------------------------------------------------------------------------------------
def _stats_sites(spec, cands, baseline) -> tuple:
    """The layers whose inputs some candidate prunes (their statistics are gathered)."""
    from nemo_minitron.prune import stats as calstats
    from nemo_minitron.prune.plan import WIDTH_DIMS

    shapes = [*cands, *([baseline] if baseline else [])]
    return calstats.sites_for([k for k in WIDTH_DIMS if any(c[k] != getattr(spec, k) for c in shapes)])


def _stats_meta(cfg, path, tp: int, pp: int) -> dict:
    """What the calibration statistics are measured on (a cached set is reused only where all of it agrees)."""
    d = cfg.data
    return {"model": str(path), "calibration": str(d.calibration), "calibration_samples": int(d.calibration_samples),
            "seq_length": int(d.seq_length), "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
            "seq_agg": "mean", "batch_agg": "l2"}


def run_rank(cfg, out: Path) -> None:
    from nemo_minitron import parallel
    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.checkpoint.loader import check_vocab, load_model
    from nemo_minitron.data import indexed
    from nemo_minitron.evaluate import heldout_loss
    from nemo_minitron.prune import stats as calstats
    from nemo_minitron.prune.plan import check_scores
    from nemo_minitron.prune.report import save_scores
    from nemo_minitron.prune.stage import load_scores
    from nemo_minitron.prune.width import calibrate
    from nemo_minitron.search import rank

    s, d = cfg.search, cfg.data
    tp = cfg.trainer.strategy.tensor_model_parallel_size
    pp = cfg.trainer.strategy.pipeline_model_parallel_size
    parallel.validate_layout(parallel.world_size_from_env(), tp, pp)
    kind, path, spec, budget, cands, enum_stats, baseline = _settings(cfg)
    if (out / "candidates.json").is_file():
        if parallel.is_rank0():
            print(f"search: {out / 'candidates.json'} is complete, skipped")
        return
    eval_w = indexed.windows(d.validation, s.eval_samples, s.eval_seq_length)
    rank_w = indexed.windows(d.validation, s.rank_samples, s.eval_seq_length)  # the ranking's own windows
    check_vocab(spec, int(max(eval_w.max(), rank_w.max())), f"dataset {d.validation}")
    scores = None
    if s.scores:
        scores = load_scores(s.scores)
        check_scores(scores, spec, f"search.scores={s.scores}")
    one_shot = s.reconstruction != "none" and s.rank_refit == "one_shot"
    sites = _stats_sites(spec, cands, baseline) if one_shot else ()
    stats_dir = Path(s.stats).absolute() if s.stats else out / "stats"
    meta = _stats_meta(cfg, path, tp, pp)
    max_bytes = int(float(s.stats_max_gib) * 2 ** 30)
    cached = None
    if sites and (s.stats or (stats_dir / "meta.json").is_file()):  # refused before anything is built
        cached = calstats.load(stats_dir, meta, sites, -1, "search.stats" if s.stats else "cached statistics")
    depth_needed = any(c["num_layers"] != spec.num_layers for c in cands) or (
        baseline is not None and baseline["num_layers"] != spec.num_layers)
    cal_w = None
    if (scores is None and cached is None) or depth_needed or s.reconstruction != "none":
        if not d.calibration:
            raise UserError("data.calibration=PREFIX is required (importance scores"
                            + (", least-squares reconstruction)" if s.reconstruction != "none" else ")"))
        cal_w = indexed.windows(d.calibration, max(d.calibration_samples, s.depth_samples), d.seq_length)
        check_vocab(spec, int(cal_w.max()), f"dataset {d.calibration}")

    t0 = time.time()
    parallel.initialize(tp, pp)
    model, spec, _ = load_model(path, tp, pp)
    if parallel.is_rank0():
        print(f"search: {len(cands)} candidates within {budget / 1e6:.2f}M +-{s.tolerance:.0%} parameters "
              f"({enum_stats['combinations']} shapes enumerated, {enum_stats['invalid']} invalid at TP={tp} PP={pp}, "
              f"{enum_stats['outside_budget']} outside the budget)", flush=True)
    stats = None
    if sites:  # one calibration pass for the scores and the statistics of every candidate's refit
        size = calstats.bytes_per_rank(spec, sites, tp, pp)
        where = "in memory" if size <= max_bytes else f"on disk in {stats_dir}, read per layer"
        if cached is not None:
            stats = calstats.load(stats_dir, meta, sites, max_bytes)
            scores = scores or load_scores(stats_dir / "scores.pt")
            if parallel.is_rank0():
                print(f"search: calibration statistics and scores from {stats_dir} (no calibration pass; "
                      f"{size / 2 ** 30:.2f} GiB per rank, {where})", flush=True)
        else:
            measured, stats = calstats.collect(model, cal_w[: d.calibration_samples], d.micro_batch_size, sites,
                                               {**meta, "bytes_per_rank": size})
            stats.save(stats_dir)
            if parallel.is_rank0():
                save_scores(stats_dir / "scores.pt", measured)
                print(f"search: calibration statistics of {', '.join(sites)} for every layer ({size / 2 ** 30:.2f} "
                      f"GiB per rank, {where}) in {stats_dir}", flush=True)
            scores = scores or measured
            if size > max_bytes:
                stats.grams = {}
    elif scores is None:
        scores = calibrate(model, cal_w[: d.calibration_samples], d.micro_batch_size)
    counts = [c["num_layers"] for c in cands] + ([baseline["num_layers"]] if baseline else [])
    drops, depth_info = rank.depth_drops(model, spec, None if cal_w is None else cal_w[: s.depth_samples],
                                         d.micro_batch_size, s.depth_method, counts)
    source_loss = heldout_loss(model, eval_w, d.micro_batch_size)["loss"]
    damping = float(s.reconstruction_damping)
    sequential = None if s.reconstruction == "none" else {
        "windows": cal_w[: d.calibration_samples], "micro_batch_size": d.micro_batch_size, "damping": damping}
    ranking = {"stats": stats, "damping": damping} if stats is not None else sequential
    scored = rank.score_candidates(model, spec, cands, drops, scores, rank_w, d.micro_batch_size, tp, pp,
                                   refit=ranking)
    scored.sort(key=lambda c: c["pruned_loss"])
    for i, c in enumerate(scored):
        c["pruned_rank"] = i + 1
        if c["num_layers"] != spec.num_layers:
            c["drop_layers"] = [j + 1 for j in drops[c["num_layers"]]]
    finalists = [c["name"] for c in scored[: s.top_k]]
    if baseline is not None:
        match = [c for c in scored if c["name"] == baseline["name"]]
        if match:
            baseline = match[0]
        else:
            m, _ = rank.prune_candidate(model, spec, baseline, drops, scores, tp, pp, ranking)
            baseline["pruned_loss"] = heldout_loss(m, rank_w, d.micro_batch_size)["loss"]
            baseline["pruned_rank"] = None  # not a candidate (outside the budget or the enumerated values)
            if baseline["num_layers"] != spec.num_layers:
                baseline["drop_layers"] = [j + 1 for j in drops[baseline["num_layers"]]]
            del m
        if baseline["name"] not in finalists:
            finalists.append(baseline["name"])

    # the finalists' pruned checkpoints (sequential refit), then candidates.json (the phase's completion marker)
    by = {c["name"]: c for c in scored}
    if baseline is not None:
        by.setdefault(baseline["name"], baseline)
    tok = ck.tokenizer_dir(path) if kind == "nemo" else path
    for name in finalists:
        target = out / "candidates" / name
        if not ck.is_checkpoint(target):
            m, s2 = rank.prune_candidate(model, spec, by[name], drops, scores, tp, pp, sequential)
            ck.save(target, m, s2, tokenizer_dir=tok, overwrite=True)
            del m
        if stats is not None:  # the checkpoint's own loss on the ranking windows, beside the one-shot refit's
            from nemo_minitron.checkpoint.nemo import load_weights
            from nemo_minitron.model import build

            m = build(ck.read_spec(target), tp, pp, initialize=False)
            load_weights(target, m)
            by[name]["pruned_loss_sequential"] = heldout_loss(m, rank_w, d.micro_batch_size)["loss"]
            del m
    if parallel.is_rank0():
        save_scores(out / "scores.pt", scores)
        from nemo_minitron.model import count_params

        doc = {"source": str(path), "source_params": count_params(spec), "budget": budget,
               "tolerance": s.tolerance, "stats": enum_stats, "source_loss": source_loss,
               "eval": {"data": str(d.validation), "num_samples": s.eval_samples, "seq_length": s.eval_seq_length},
               "rank": {"num_samples": s.rank_samples, "refit": "one_shot" if stats is not None else (
                   "sequential" if sequential else "none")},
               "depth_method": s.depth_method, "reconstruction": s.reconstruction,
               "depth_scores": None if depth_info is None else [float(x) for x in depth_info["scores"]],
               "candidates": scored, "baseline": baseline, "finalists": finalists,
               "rank_seconds": round(time.time() - t0, 1)}
        tmp = out / "candidates.json.partial"
        tmp.write_text(json.dumps(doc, indent=2))
        tmp.replace(out / "candidates.json")
        print(f"search: ranked {len(scored)} candidates by loss after pruning ({time.time() - t0:.0f}s); "
              f"finalists: {', '.join(finalists)}", flush=True)
        print(f"wrote candidates: {out / 'candidates.json'}")
    parallel.destroy()


# --------------------------------------------------------------------------------------------------
# phase distill: one finalist (a distill run + an evaluation, as child processes)
# --------------------------------------------------------------------------------------------------
def _runner(cfg, out: Path):
    from nemo_minitron.pipeline import Runner

    return Runner(out, cfg.launcher.command)


def _training(cfg) -> stages.Training:
    """The finalists' distillation settings: layout (trainer.strategy.*), precision, FP8 and recompute
    (trainer.*), optimizer (optim.*)."""
    return stages.Training.of(cfg.trainer.strategy, cfg.trainer, cfg.optim)


def _finalist_distill_args(cfg, source, student: Path, run_dir: Path) -> list[str]:
    """``nemo-minitron distill``'s arguments for one finalist (``stages.distill_args``, as the pipeline's)."""
    k, d, s = cfg.distill, cfg.data, cfg.search
    return stages.distill_args(
        source, student, run_dir, d.train, d.validation,
        stages.Batches(k.seq_length, k.micro_batch_size, k.global_batch_size, k.global_batch_size),
        stages.Schedule(max_steps=s.distill_steps, lr=k.lr, min_lr=k.min_lr,
                        warmup_steps=min(k.warmup_steps, s.distill_steps), val_check_interval=s.distill_steps,
                        checkpoint_every=k.checkpoint_every, log_every=max(1, s.distill_steps // 10)),
        stages.KD.of(k), _training(cfg))


def run_distill(cfg, out: Path, index: int | None = None, runner=None, evaluate: bool = True) -> None:
    """One finalist's short distillation, then (``evaluate``) its evaluation."""
    from nemo_minitron.pipeline import _is_ckpt

    doc = _read_candidates(out)
    fin = _finalists(doc)
    if index is None:
        index = _candidate_index(cfg)
        if cfg.search.candidate is None and index >= len(fin):  # an array task with no finalist left
            print(f"search: array task {index}: there are {len(fin)} finalists, nothing to do")
            return
    if not 0 <= index < len(fin):
        raise UserError(f"search.candidate={index}: there are {len(fin)} finalists (0..{len(fin) - 1})")
    c = fin[index]
    r = runner or _runner(cfg, out)
    run_dir = out / "distill" / c["name"]
    r.stage(f"distill_{c['name']}", "distill",
            _finalist_distill_args(cfg, doc["source"], out / "candidates" / c["name"], run_dir),
            lambda: _is_ckpt(run_dir / "student"))
    if evaluate:
        _evaluate_stage(cfg, out, r, [c], f"evaluate_{c['name']}")


def _score_tasks(cfg, build: bool = False):
    """``search.score``'s tasks as evaluate settings (None for val_loss); ``build``: every task built now, so an
    unknown or data-less one is refused before any work."""
    from nemo_minitron.evaluate import Downstream

    s = cfg.search
    score = s.get("score", "val_loss")
    if score not in SCORES:
        raise UserError(f"search.score={score!r}: one of {', '.join(SCORES)}")
    if score == "val_loss":
        return None
    tasks = Downstream.of({"tasks": s.get("score_tasks"), "limit": s.get("score_limit"),
                           "num_fewshot": s.get("score_num_fewshot"), "seed": s.get("score_seed", 1234)})
    if not tasks.tasks:
        raise UserError("search.score=downstream needs search.score_tasks=[..] (e.g. [mmlu], ModelOpt's default)")
    if build:
        tasks.check("search.score_tasks")
    return tasks


def _evaluate_stage(cfg, out: Path, r, finalists: list, name: str) -> None:
    """The distilled finalists' held-out loss (and, with search.score=downstream, their accuracy on
    search.score_tasks, every finalist on the same requests), every one not evaluated yet in one evaluate
    process."""
    d, s = cfg.data, cfg.search
    tasks = _score_tasks(cfg)
    evs = {c["name"]: out / "eval" / f"{c['name']}.json" for c in finalists}
    (out / "eval").mkdir(exist_ok=True)

    def evaluated(n):
        return evs[n].is_file() if tasks is None else tasks.covered_by(evs[n])

    todo = [c["name"] for c in finalists if not evaluated(c["name"])]
    r.stage(name, "evaluate",
            stages.evaluate_args([out / "distill" / n / "student" for n in todo], [evs[n] for n in todo],
                                 d.validation, s.eval_samples, s.eval_seq_length, _training(cfg),
                                 micro_batch_size=d.micro_batch_size, tasks=tasks),
            lambda: all(evaluated(c["name"]) for c in finalists))


def _read_candidates(out: Path) -> dict:
    p = out / "candidates.json"
    if not p.is_file():
        raise UserError(f"{p} does not exist: run search.phase=rank (or all) first")
    return json.loads(p.read_text())


# --------------------------------------------------------------------------------------------------
# phase report
# --------------------------------------------------------------------------------------------------
def _kendall_tau(a: list, b: list) -> float:
    """Rank agreement of two orderings of the same items (1 = same order, -1 = reversed)."""
    pos = {x: i for i, x in enumerate(b)}
    n, s = len(a), 0
    for i in range(n):
        for j in range(i + 1, n):
            s += 1 if pos[a[i]] < pos[a[j]] else -1
    return s / (n * (n - 1) / 2) if n > 1 else 1.0


def run_report(cfg, out: Path) -> dict:
    doc = _read_candidates(out)
    fin = _finalists(doc)
    missing = [c["name"] for c in fin if not (out / "eval" / f"{c['name']}.json").is_file()]
    if missing:
        raise UserError(f"finalists not distilled and evaluated yet: {', '.join(missing)} "
                        f"(run search.phase=distill for them, or search.phase=all)")
    base = doc.get("baseline")
    tasks = _score_tasks(cfg)
    rows = []
    for c in fin:
        ev = json.loads((out / "eval" / f"{c['name']}.json").read_text())
        row = {**c, "distilled_loss": ev["loss"], "checkpoint": str(out / "distill" / c["name"] / "student"),
               "pruned_checkpoint": str(out / "candidates" / c["name"]),
               "is_baseline": bool(base and c["name"] == base["name"]),
               "in_top_k": c["name"] in doc["finalists"][: cfg.search.top_k]}
        if tasks is not None:
            from nemo_minitron.downstream import headline

            missing = [t for t in tasks.tasks if t not in ev.get("tasks", {})]
            if missing:
                raise UserError(f"finalist {c['name']} was evaluated without {', '.join(missing)}: run "
                                "search.phase=distill for it again (its distillation is kept)")
            accs = {t: headline(ev["tasks"][t]) for t in tasks.tasks}
            row["distilled_tasks"] = {t: {"metric": k, "value": v, "stderr": e} for t, (k, v, e) in accs.items()}
            row["distilled_accuracy"] = sum(v for _, v, _ in accs.values()) / len(accs)
        rows.append(row)
    ranked_k = [r for r in rows if r["in_top_k"]]
    # the chosen score ranks (lower loss, or higher average accuracy; ties: the lower loss)
    key = (lambda r: r["distilled_loss"]) if tasks is None else (lambda r: (-r["distilled_accuracy"], r["distilled_loss"]))
    by_pruned = [r["name"] for r in sorted(ranked_k, key=lambda r: r["pruned_loss"])]
    by_distilled = [r["name"] for r in sorted(ranked_k, key=key)]
    by_loss = [r["name"] for r in sorted(ranked_k, key=lambda r: r["distilled_loss"])]
    for r in rows:
        r["distilled_rank"] = (by_distilled.index(r["name"]) + 1) if r["name"] in by_distilled else None
        r["loss_rank"] = (by_loss.index(r["name"]) + 1) if r["name"] in by_loss else None
        r["pruned_rank_among_finalists"] = (by_pruned.index(r["name"]) + 1) if r["name"] in by_pruned else None
    winner = min(ranked_k, key=key)
    result = {
        "source": doc["source"], "source_params": doc["source_params"], "source_loss": doc["source_loss"],
        "budget": doc["budget"], "tolerance": doc["tolerance"], "eval": doc["eval"],
        "distill_steps": cfg.search.distill_steps,
        "distill_tokens": cfg.search.distill_steps * cfg.distill.global_batch_size * cfg.distill.seq_length,
        "ranking_changed": by_pruned != by_distilled, "kendall_tau": _kendall_tau(by_pruned, by_distilled),
        "score": "val_loss" if tasks is None else "downstream",
        "score_tasks": None if tasks is None else {"tasks": list(tasks.tasks), "limit": tasks.limit,
                                                   "num_fewshot": tasks.num_fewshot, "seed": tasks.seed},
        "loss_and_score_agree": by_loss == by_distilled,
        "winner": winner["name"], "finalists": rows,
        "candidates": doc["candidates"], "stats": doc["stats"], "depth_method": doc["depth_method"],
        "rank": doc.get("rank")}
    if base:
        b = next(r for r in rows if r["is_baseline"])
        result["baseline"] = {"name": b["name"], "params": b["params"], "pruned_loss": b["pruned_loss"],
                              "distilled_loss": b["distilled_loss"],
                              "winner_minus_baseline": winner["distilled_loss"] - b["distilled_loss"]}
    (out / "search.json").write_text(json.dumps(result, indent=2))
    (out / "search.md").write_text(_markdown(result))
    _winner_yaml(out, winner, doc)
    return result


def _shape_cols(c) -> str:
    return (f"{c['num_layers']} | {c['hidden_size']} | {c['ffn_hidden_size']} | "
            f"{c['num_attention_heads']} / {c['num_query_groups']}")


def _markdown(res: dict) -> str:
    lines = ["# Architecture search", "",
             f"Source `{res['source']}`: {res['source_params'] / 1e6:.2f}M parameters, validation loss "
             f"{res['source_loss']:.4f}. Budget {res['budget'] / 1e6:.2f}M +-{res['tolerance']:.0%}; "
             f"{len(res['candidates'])} candidates ({res['stats']['combinations']} shapes enumerated). "
             f"Loss: {res['eval']['num_samples']} x {res['eval']['seq_length']} tokens of `{res['eval']['data']}`.",
             "", f"## Finalists after a short distillation ({res['distill_steps']} steps, "
                 f"{res['distill_tokens']:,} tokens each)", "",
             "| rank after distillation | rank after pruning | candidate | params | layers | hidden | ffn | "
             "heads / groups | loss after pruning | loss after distillation |"
             + (" accuracy after distillation |" if res.get("score") == "downstream" else ""),
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if res.get("score") == "downstream" else "")]
    fin = sorted(res["finalists"], key=lambda r: (r["distilled_rank"] or 1 << 30, r["distilled_loss"]))
    for r in fin:
        tag = " (baseline)" if r["is_baseline"] else ""
        acc = f" {r['distilled_accuracy']:.4f} |" if "distilled_accuracy" in r else ""
        lines.append(f"| {r['distilled_rank'] or '-'} | {r.get('pruned_rank') or '-'} | {r['name']}{tag} | "
                     f"{r['params'] / 1e6:.2f}M | {_shape_cols(r)} | {r['pruned_loss']:.4f} | "
                     f"{r['distilled_loss']:.4f} |{acc}")
    if res.get("score") == "downstream":
        st = res["score_tasks"]
        lines += ["", f"Ranked by **downstream accuracy** (search.score=downstream): the average of "
                      f"{', '.join(st['tasks'])} (acc_norm where lm-eval reports it; "
                      f"limit {st['limit']}, {st['num_fewshot'] if st['num_fewshot'] is not None else 'default'}-shot), "
                      f"higher first. The validation-loss ranking "
                      f"{'agrees' if res['loss_and_score_agree'] else 'differs'}."]
    rank = res.get("rank") or {}
    if rank.get("refit") == "one_shot":
        lines += ["", f"Ranked on {rank['num_samples']} validation windows with each candidate refitted in closed form "
                      "from calibration statistics gathered once (`stats/`); the finalists' checkpoints get the "
                      "sequential refit. Their loss after pruning, one-shot -> sequential: "
                  + ", ".join(f"{r['name']} {r['pruned_loss']:.4f} -> {r['pruned_loss_sequential']:.4f}"
                              for r in fin if "pruned_loss_sequential" in r) + "."]
    lines += ["", f"Ranking changed by the distillation: **{'yes' if res['ranking_changed'] else 'no'}** "
                  f"(Kendall tau between the two rankings of the top K: {res['kendall_tau']:.2f}).",
              f"Winner: **{res['winner']}**."]
    if "baseline" in res:
        b = res["baseline"]
        lines.append(f"Baseline {b['name']} ({b['params'] / 1e6:.2f}M): {b['distilled_loss']:.4f} after the same "
                     f"distillation; winner - baseline = {b['winner_minus_baseline']:+.4f}.")
    lines += ["", "## Every candidate, ranked by loss right after pruning", "",
              "| rank | candidate | params | layers | hidden | ffn | heads / groups | loss after pruning |",
              "|---|---|---|---|---|---|---|---|"]
    for c in res["candidates"]:
        lines.append(f"| {c['pruned_rank']} | {c['name']} | {c['params'] / 1e6:.2f}M | {_shape_cols(c)} | "
                     f"{c['pruned_loss']:.4f} |")
    return "\n".join(lines) + "\n"


def _winner_yaml(out: Path, w: dict, doc: dict) -> None:
    """The winner as prune settings (and where its checkpoints are), for the full-length run."""
    import yaml

    prune = {k: w[k] for k in ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")}
    if w.get("drop_layers"):
        prune["drop_layers"] = w["drop_layers"]
    text = ("# The search's winner. Full-length run: nemo-minitron pipeline with these prune.* keys, or distill\n"
            "# the pruned checkpoint below further (the search pruned it from the cached scores in scores.pt).\n")
    text += yaml.safe_dump({"name": w["name"], "params": w["params"], "prune": prune,
                            "pruned_checkpoint": w["pruned_checkpoint"], "distilled_checkpoint": w["checkpoint"],
                            "loss_after_pruning": w["pruned_loss"], "loss_after_distillation": w["distilled_loss"],
                            "source": doc["source"]}, sort_keys=False)
    (out / "winner.yaml").write_text(text)


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------
def _candidate_index(cfg) -> int:
    i = cfg.search.candidate
    if i is None:
        env = os.environ.get("SLURM_ARRAY_TASK_ID")
        if env is None:
            raise UserError("search.phase=distill needs search.candidate=I (or run as a SLURM array task)")
        i = int(env)
    return int(i)


def _check_training_keys(cfg, env=None) -> stages.Training:
    """The finalists' distillation settings (sequence parallelism, precision, FP8, recompute, overlap), refused
    here, not in a child; ``env``: the platform they are for (None: this machine). Returns them."""
    from nemo_minitron import parallel
    from nemo_minitron.model import precision, recompute

    st = cfg.trainer.strategy
    if st.sequence_parallel and st.tensor_model_parallel_size == 1:
        parallel.Layout.resolve(st.pipeline_model_parallel_size, 1, st.pipeline_model_parallel_size,
                                st.sequence_parallel, sp_key="trainer.strategy.sequence_parallel")
    training = _training(cfg)
    precision.resolve(training.model_keys(), env, prefix="trainer")
    t = cfg.trainer  # the key combinations (the layer count is each finalist's: its distillation checks it)
    recompute.resolve(t.recompute_granularity, t.recompute_method, t.recompute_num_layers, 10 ** 9, "trainer")
    o = cfg.optim
    if o.overlap_param_gather and not o.distributed_optimizer:
        raise UserError("optim.overlap_param_gather=true needs optim.distributed_optimizer=true")
    return training


def run(cfg) -> None:
    s = cfg.search
    if s.phase not in PHASES:
        raise UserError(f"search.phase={s.phase!r}: one of {', '.join(PHASES)}")
    out = Path(cfg.output).absolute()
    for key in ("train", "validation"):
        if s.phase in ("all", "rank", "distill") and not cfg.data[key]:
            raise UserError(f"data.{key}=PREFIX is required")
    from nemo_minitron.data import indexed

    for key in ("validation", "calibration"):
        if cfg.data[key]:
            indexed.check_prefix(cfg.data[key])
    if cfg.data.train:  # a prefix or a blend; the distillations check its token ids against the vocabulary
        blend.check_blend(blend.Blend.parse(cfg.data.train, "data.train"), "data.train", None)
    if s.phase != "report":  # the data was tokenized by the model's tokenizer (by the prefixes' sidecars)
        from nemo_minitron.data.tokenizer import fingerprint_of

        expected = fingerprint_of(cfg.model)
        for key in ("calibration", "validation", "train"):
            blend.check_tokenizer(cfg.data[key], expected, f"data.{key}", model=cfg.model)
    _check_training_keys(cfg)
    # one run per output directory (phases rank, report, all). Not phase=distill: the finalists' array tasks
    # share DIR, and each one's distillation locks its own DIR/distill/<name>. The rank phase a driver
    # starts as a child on DIR goes on under the driver's lock (runlock: inherited by child processes).
    from nemo_minitron.runlock import RunLock, clear

    if s.phase == "rank":
        if cfg.launcher.command:
            _settings(cfg)
        with RunLock(out, "search"):
            out.mkdir(parents=True, exist_ok=True)
            if cfg.launcher.command:  # this process only drives: the phase runs under the launcher
                return _rank_stage(cfg, out, _runner(cfg, out))
            return run_rank(cfg, out)
    if s.phase == "distill":
        return run_distill(cfg, out)
    if s.phase == "report":
        with RunLock(out, "search"):
            res = run_report(cfg, out)
            print(summary(res))
            print(f"wrote search table: {out / 'search.md'}")
        return
    # all: validate everything here (cheap), then the phases in order
    _settings(cfg)
    with RunLock(out, "search"):
        if cfg.overwrite and out.exists():
            clear(out)  # everything but this run's lock
        out.mkdir(parents=True, exist_ok=True)
        r = _runner(cfg, out)
        t0 = time.time()
        _rank_stage(cfg, out, r)
        finalists = _finalists(_read_candidates(out))
        for i in range(len(finalists)):
            run_distill(cfg, out, i, runner=r, evaluate=False)
        _evaluate_stage(cfg, out, r, finalists, "evaluate")  # one process for all of them
        res = run_report(cfg, out)
        print(summary(res))
        print(f"search wall time this invocation: {time.time() - t0:.0f}s")
        print(f"wrote search table: {out / 'search.md'}")


def _rank_stage(cfg, out: Path, r) -> None:
    """The rank phase as a child process (under launcher.command when set)."""
    overrides = [a for a in cfg_overrides(cfg)
                 if not a.startswith(("search.phase=", "search.candidate=", "launcher.command=", "overwrite="))]
    r.stage("rank", "search", [*overrides, "search.phase=rank", "launcher.command=null"],
            lambda: (out / "candidates.json").is_file())


def cfg_overrides(cfg) -> list[str]:
    """The resolved config as key=value overrides (for the child rank phase)."""
    from omegaconf import OmegaConf

    flat = []

    def walk(node, prefix):
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and key != "search.baseline":
                walk(v, key + ".")
            else:
                flat.append(f"{key}={json.dumps(v) if isinstance(v, (list, dict)) else ('null' if v is None else v)}")

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def summary(res: dict) -> str:
    rows = [f"{'candidate':<28} {'params':>9} {'pruned':>8} {'distilled':>10}  rank (pruned -> distilled)"]
    for r in sorted(res["finalists"], key=lambda r: r["distilled_loss"]):
        tag = " baseline" if r["is_baseline"] else ""
        rows.append(f"{r['name']:<28} {r['params'] / 1e6:>8.2f}M {r['pruned_loss']:>8.4f} {r['distilled_loss']:>10.4f}"
                    f"  {r.get('pruned_rank') or '-'} -> {r['distilled_rank'] or '-'}{tag}")
    rows.append(f"winner: {res['winner']}; ranking changed by distillation: "
                f"{'yes' if res['ranking_changed'] else 'no'} (Kendall tau {res['kendall_tau']:.2f})")
    return "\n".join(rows)


def dry_run(cfg) -> None:
    """The candidates this search would consider, without loading the model."""
    _kind, path, spec, budget, cands, stats, baseline = _settings(cfg, dry=True)
    kind = cfg.search.get("params_kind", "total")
    print(f"source {path}: budget {budget / 1e6:.2f}M{' active' if kind == 'active' else ''} parameters "
          f"+-{cfg.search.tolerance:.0%}; {len(cands)} candidates ({stats})")
    for c in cands:
        both = f"  ({c['total_params'] / 1e6:.2f}M total, {c['active_params'] / 1e6:.2f}M active)" \
            if "active_params" in c else ""
        print(f"  {c['name']:<28} {c['params'] / 1e6:8.2f}M{both}")
    if spec.moe:
        print("note: a search's distillations of a mixture of experts are not available yet: a run refuses it; "
              "these are the candidates it will rank")
    if baseline:
        print(f"  baseline {baseline['name']} {baseline['params'] / 1e6:.2f}M")
    s = cfg.search
    if s.reconstruction != "none" and s.rank_refit == "one_shot" and not spec.moe:
        from nemo_minitron.prune import stats as calstats

        sites = _stats_sites(spec, cands, baseline)
        tp, pp = cfg.trainer.strategy.tensor_model_parallel_size, cfg.trainer.strategy.pipeline_model_parallel_size
        size = calstats.bytes_per_rank(spec, sites, tp, pp)
        where = "held in memory" if size <= s.stats_max_gib * 2 ** 30 else \
            f"above search.stats_max_gib={s.stats_max_gib}: kept on disk, read per layer"
        print(f"calibration statistics (Gram matrices of {', '.join(sites) or 'no site'}, float64, rows split over "
              f"TP={tp}, layers over PP={pp}): {size / 2 ** 30:.2f} GiB per rank, {where}; "
              f"{size * tp * pp / 2 ** 30:.2f} GiB on disk")
    from nemo_minitron.model import precision

    _check_training_keys(cfg, precision.TARGET)  # planned for the cluster's GPUs, not this machine
    k = cfg.distill
    out = Path(cfg.output).absolute()
    if cfg.data.train is not None:
        shown = " ".join(_finalist_distill_args(cfg, path, out / "candidates" / "FINALIST",
                                                out / "distill" / "FINALIST"))
        print(f"each finalist's distillation: nemo-minitron distill {shown}")
        settings = blend.training_settings(cfg.data.train, k.seq_length, k.micro_batch_size, k.global_batch_size)
        print(f"each finalist's distillation: {cfg.search.distill_steps} steps")
        print(blend.plan_or_note(settings, cfg.search.distill_steps, f"{Path(cfg.output).absolute()}/distill/<finalist>/data_index"))
    print("dry run: nothing was run")
