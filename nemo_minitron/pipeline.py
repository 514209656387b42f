"""``nemo-minitron pipeline``: the whole Minitron recipe in one run directory, resumable stage by stage.

    RUN/teacher/                 imported teacher (NeMo 2 checkpoint)
    RUN/data/{train,calibration,heldout}.{bin,idx}
    RUN/teacher_corrected/       optional teacher correction (finetune run; model/ inside)
    RUN/pruned/                  pruned student (+ pruning/ report, plots, importance scores)
    RUN/distill/                 distillation run (checkpoints/, tb/, metrics.jsonl, student/)
    RUN/scratch/                 optional: the student's shape trained from random init on the same tokens
    RUN/eval/*.json              held-out loss of each model
    RUN/export/hf/, RUN/export/student.nemo
    RUN/report.md, report.json, *.png, stages.json (wall time per stage), logs/<stage>.log

Every stage is the project's own command, run as a child process (``launcher.command`` prefixes the
parallel ones, e.g. ``srun`` inside a SLURM allocation), and is skipped when its output is complete.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from nemo_minitron import stages
from nemo_minitron.terminal import RAW_ENV, relay, worth_showing
from nemo_minitron.errors import UserError

PARALLEL = {"prune", "distill", "finetune", "evaluate", "search"}
_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


class Runner:
    def __init__(self, run_dir: Path, launcher: str | None):
        self.run_dir, self.launcher = run_dir, launcher
        self.logs = run_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.times_path = run_dir / "stages.json"
        self.times = json.loads(self.times_path.read_text()) if self.times_path.is_file() else {}

    def stage(self, name: str, command: str, args: list, done) -> None:
        """Run ``nemo-minitron command args`` unless ``done()``; record its wall time."""
        if done():
            print(f"[{name}] complete, skipped", flush=True)
            return
        cmd = [sys.executable, "-m", "nemo_minitron.cli", command, *map(str, args)]
        if command in PARALLEL and self.launcher:
            launcher = shlex.split(self.launcher)
            cmd = [*launcher, *cmd[1:]] if launcher[0] == "torchrun" else [*launcher, *cmd]
        env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV} | {RAW_ENV: "raw"}  # the log keeps all
        shown = [c if len(c) < 160 else c[:100] + f"...({c.count(',') + 1} items)" for c in map(str, cmd)]
        print(f"[{name}] {' '.join(shlex.quote(c) for c in shown)}", flush=True)
        t0 = time.time()
        with open(self.logs / f"{name}.log", "a", newline="") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
            tail = relay(proc.stdout, log, f"[{name}] ")
            rc = proc.wait()
        if rc != 0 or not done():  # one line: the stage's own error line (or its last shown one) and its log
            said = [x.strip() for x in tail if x.startswith("error: ")] or [x.strip() for x in tail if worth_showing(x)]
            why = f": {said[-1].removeprefix('error: ')}" if said else ""
            raise UserError(f"stage {name} failed (exit {rc}){why}; its log: {self.logs / f'{name}.log'}")
        self.times[name] = round(self.times.get(name, 0.0) + time.time() - t0, 1)
        self.times_path.write_text(json.dumps(self.times, indent=2))


def _is_ckpt(path: Path) -> bool:
    from nemo_minitron.checkpoint import nemo

    return nemo.is_checkpoint(path) and (path / "weights" / "nemo_minitron.json").is_file()


def _data_source(spec, split: str):
    """'shakespeare:<split>' -> its files; an existing PREFIX or a blend of prefixes ([0.3, /a, 0.7, /b],
    training only) -> None (use as is); else files/glob to preprocess."""
    if not isinstance(spec, str):
        if split != "train":
            raise UserError(f"data.{split}: one dataset prefix or text files (blends are for data.train)")
        from nemo_minitron.data.blend import Blend

        Blend.parse(spec, "data.train")  # the blend's syntax now; its files when the distill stage starts
        return None
    if spec.startswith("shakespeare:"):
        from nemo_minitron.data.corpus import shakespeare_files

        return ",".join(str(f) for f in shakespeare_files(spec.split(":", 1)[1]))
    if Path(spec + ".bin").is_file() and Path(spec + ".idx").is_file():
        return None
    return spec


TARGETS = ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "num_moe_experts",
           "moe_ffn_hidden_size", "num_layers", "drop_layers")


def _merged(base, override) -> dict:
    out = {key: base[key] for key in base}
    out.update(dict(override or {}))
    return out


def _round_prune(base, override) -> dict:
    """A round's prune settings: its own targets only; the other prune.* settings as the pipeline's."""
    return _merged({key: (None if key in TARGETS else base[key]) for key in base}, override)


def _check_rounds(cfg, tp: int, pp: int, dry: bool = False) -> tuple[list, list | None]:
    """The iterative rounds (then the final prune), each checked against the shape the previous one leaves,
    before any work. Returns the rounds as plain dicts, and the shapes: the teacher's, then the one each
    round and the final prune leave (None when the teacher's shape cannot be read here). ``dry``: for a dry run
    (a mixture of experts is planned, not refused)."""
    from omegaconf import OmegaConf

    from nemo_minitron.launch_plan import spec_of
    from nemo_minitron.prune.depth import validate_depth
    from nemo_minitron.prune.plan import MOE_DIMS, WIDTH_DIMS, validate_targets

    rounds = OmegaConf.to_container(cfg.rounds, resolve=True) or []
    if not isinstance(rounds, list) or any(not isinstance(x, dict) or set(x) - {"prune", "distill"} for x in rounds):
        raise UserError("rounds: a list of {prune: {...}, distill: {...}} entries (earlier prune -> distill rounds)")
    if cfg.iterative_teacher not in ("previous", "original"):
        raise UserError(f"iterative_teacher={cfg.iterative_teacher!r}: previous | original")
    steps = [_round_prune(cfg.prune, x.get("prune")) for x in rounds] + [_merged(cfg.prune, None)]
    for i, x in enumerate(rounds, 1):
        bad = set(x.get("prune") or {}) - set(cfg.prune) | set(x.get("distill") or {}) - set(cfg.distill)
        if bad:
            raise UserError(f"rounds[{i}]: unknown key(s) {sorted(bad)} (prune.* and distill.* keys of the pipeline)")
    try:
        spec = spec_of(cfg.teacher)
    except UserError as e:
        from nemo_minitron.checkpoint import archive

        if not archive.is_archive(cfg.teacher):
            raise UserError(f"teacher={cfg.teacher}: {e}") from None
        archive.check(cfg.teacher)  # a .nemo teacher: the import stage unpacks it
        spec = None
    if spec is not None:
        from nemo_minitron import parallel

        ep = parallel.expert_parallel_size(cfg.trainer.strategy)
        try:
            spec.validate_layout(tp, pp, ep)  # EP on a dense teacher: refused, never ignored
        except UserError as e:
            raise UserError(f"teacher={cfg.teacher}: {e}") from None
        if not dry:
            spec.require_dense("pipeline")
    shapes = [spec] if spec is not None else None
    for i, step in enumerate(steps, 1):
        where = f"round {i}" if i <= len(rounds) else "prune"
        if not any(step[t] is not None for t in TARGETS):
            raise UserError(f"{where}: no pruning target: set prune.hidden_size / ffn_hidden_size / "
                            "num_attention_heads / num_query_groups / num_moe_experts / moe_ffn_hidden_size / "
                            "num_layers / drop_layers")
        from nemo_minitron.prune.stage import check_reconstruction

        try:
            check_reconstruction(step["reconstruction"], step["reconstruction_damping"])
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        if spec is None:
            continue
        try:
            drop = validate_depth(spec, step["num_layers"], step["drop_layers"], pp, step["depth_method"])
            targets = validate_targets(spec, {d: step[d] for d in WIDTH_DIMS + MOE_DIMS}, tp)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        n = spec.num_layers - len(drop) if drop else (step["num_layers"] or spec.num_layers)
        spec = spec.replace(kv_channels=spec.kv_channels, num_layers=n, **targets)
        shapes.append(spec)
        if cfg.model.get("fp8"):
            from nemo_minitron.model.precision import check_fp8_shapes

            check_fp8_shapes({k: getattr(spec, k) for k in (*WIDTH_DIMS, "kv_channels")}, tp, f"{where} targets")
    return rounds, shapes


def _training(cfg) -> stages.Training:
    """The layout, precision and optimizer keys every parallel stage gets (checked here, before any work: FP8
    needs a GPU and Transformer Engine)."""
    from nemo_minitron.model import precision

    precision.resolve(cfg.model)
    return stages.Training.of(cfg.trainer.strategy, cfg.model, cfg.optim)


def _kd_batches(k) -> stages.Batches:
    return stages.Batches(k["seq_length"], k["micro_batch_size"], k["global_batch_size"], k["global_batch_size"] * 2)


def _kd_schedule(k, lr=None) -> stages.Schedule:
    return stages.Schedule(max_steps=k["max_steps"], lr=k["lr"] if lr is None else lr, min_lr=k["min_lr"],
                           warmup_steps=k["warmup_steps"], val_check_interval=k["val_check_interval"],
                           checkpoint_every=k["checkpoint_every"], log_every=5)


def _prune_distill(r, tag: str, teacher: Path, pruned: Path, kd: Path, p, k, prefixes, training: stages.Training,
                   iterative_teacher: str, original_teacher: Path, heldout: tuple) -> Path:
    """Prune ``teacher`` into ``pruned``, distill it into ``kd`` (resumable); returns the student checkpoint."""
    settings = stages.Prune(targets={t: p[t] for t in TARGETS if t != "drop_layers"}, drop_layers=p["drop_layers"],
                            depth_method=p["depth_method"], calibration_samples=p["calibration_samples"],
                            seq_length=p["seq_length"], reconstruction=p["reconstruction"],
                            reconstruction_damping=p["reconstruction_damping"])
    refit = p["reconstruction"] != "none"  # the report compares the refitted student with the trimmed one
    r.stage(f"{tag}prune", "prune",
            stages.prune_args(teacher, pruned, prefixes["calibration"], settings, training,
                              *((prefixes["heldout"], *heldout) if refit else ())),
            lambda: _is_ckpt(pruned))
    kd_teacher = teacher if iterative_teacher == "previous" else original_teacher
    r.stage(f"{tag}distill", "distill",
            stages.distill_args(kd_teacher, pruned, kd, prefixes["train"], prefixes["heldout"], _kd_batches(k),
                                _kd_schedule(k), stages.KD.of(k), training),
            lambda: _is_ckpt(kd / "student"))
    return kd / "student"


def _check_tasks(e):
    """evaluate.tasks, resolved and built once here (unknown, generative or data-less tasks refused before
    any work); the evaluate stage builds the same requests again."""
    from nemo_minitron.evaluate import Downstream

    tasks = Downstream.of({"tasks": e.get("tasks"), "limit": e.get("limit"), "num_fewshot": e.get("num_fewshot"),
                           "seed": e.get("seed", 1234)})
    tasks.check("evaluate.tasks")
    return tasks


def _check_given_data(cfg) -> None:
    """Datasets given as prefixes (the run preprocesses the others with the teacher's tokenizer) were
    tokenized by the teacher's tokenizer, by their sidecars; before any work."""
    given = {s: list(cfg.data[s]) if OmegaConf.is_list(cfg.data[s]) else str(cfg.data[s])
             for s in ("train", "calibration", "heldout")}
    prefixes = {s: v for s, v in given.items() if _data_source(v, s) is None}
    if not prefixes:
        return
    from nemo_minitron.data import blend
    from nemo_minitron.data.tokenizer import fingerprint_of

    expected = fingerprint_of(cfg.teacher)
    for split, value in prefixes.items():
        blend.check_tokenizer(value, expected, f"data.{split}", model=cfg.teacher)


def run(cfg) -> None:
    run_dir = Path(cfg.run_dir).absolute()
    tp, pp = cfg.trainer.strategy.tensor_model_parallel_size, cfg.trainer.strategy.pipeline_model_parallel_size
    d = cfg.data
    training = _training(cfg)  # the environment first (FP8 needs a GPU and TE), then the shapes
    rounds, _ = _check_rounds(cfg, tp, pp)
    _check_given_data(cfg)
    tasks = _check_tasks(cfg.evaluate)
    given = {s: list(d[s]) if OmegaConf.is_list(d[s]) else str(d[s]) for s in ("train", "calibration", "heldout")}
    sources = {s: _data_source(v, s) for s, v in given.items()}
    # one pipeline per run directory, locked after the checks (a refusal writes nothing); only RUN itself, so
    # the stages (child processes writing RUN/pruned, RUN/distill, ...) lock their own outputs there
    from nemo_minitron.runlock import RunLock, clear

    with RunLock(run_dir, "pipeline"):
        if cfg.overwrite and run_dir.exists():
            clear(run_dir)  # everything but this run's lock
        _run(cfg, run_dir, training, rounds, given, sources, tasks)


def _run(cfg, run_dir: Path, training: stages.Training, rounds: list, given: dict, sources: dict,
         tasks) -> None:
    from nemo_minitron.checkpoint import nemo

    p, k, e = cfg.prune, cfg.distill, cfg.evaluate
    run_dir.mkdir(parents=True, exist_ok=True)
    r = Runner(run_dir, cfg.launcher.command)
    t_start = time.time()

    # 1. teacher
    teacher = run_dir / "teacher"
    src = str(cfg.teacher)
    if Path(src).is_dir() and nemo.is_checkpoint(Path(src)):
        teacher = Path(src).absolute()
    else:
        r.stage("import", "import", [f"source={src}", f"output={teacher}", "overwrite=true"],
                lambda: _is_ckpt(teacher))

    # 2. data
    prefixes = {}
    for split, files in sources.items():
        prefix = run_dir / "data" / split
        if files is None:
            prefixes[split] = given[split] if isinstance(given[split], list) else Path(given[split])
            continue
        prefixes[split] = prefix
        r.stage(f"preprocess_{split}", "preprocess",
                [f"input={files}", f"tokenizer={teacher}", f"output_prefix={prefix}", "overwrite=true"],
                lambda prefix=prefix: all(Path(f"{prefix}.{ext}").is_file() for ext in ("bin", "idx", "json")))

    # 3. teacher correction
    if cfg.teacher_correction.enabled:
        tc = run_dir / "teacher_corrected"
        tcfg = cfg.teacher_correction
        r.stage("teacher_correction", "finetune",
                stages.finetune_args(teacher, tc, prefixes["train"],
                                     stages.Batches(k.seq_length, k.micro_batch_size, k.global_batch_size),
                                     stages.Schedule(max_steps=tcfg.max_steps, lr=tcfg.lr, min_lr=tcfg.lr / 10),
                                     training),
                lambda: _is_ckpt(tc / "model"))
        teacher = tc / "model"

    # 4-5. prune -> distill; with `rounds`, earlier prune -> distill rounds first (iterative compression:
    # each round's distilled student is the next round's source and, by default, its teacher)
    original_teacher = teacher
    round_models = {}
    for i, rnd in enumerate(rounds, 1):
        rp, rk = _round_prune(p, rnd.get("prune")), _merged(k, rnd.get("distill"))
        rdir = run_dir / f"round{i}"
        student = _prune_distill(r, f"round{i}_", teacher, rdir / "pruned", rdir / "distill", rp, rk, prefixes,
                                 training, cfg.iterative_teacher, original_teacher, (e.num_samples, e.seq_length))
        round_models[f"round{i}_pruned"] = rdir / "pruned"
        round_models[f"round{i}_distilled"] = student
        teacher = student
    pruned, kd = run_dir / "pruned", run_dir / "distill"
    _prune_distill(r, "", teacher, pruned, kd, p, k, prefixes, training, cfg.iterative_teacher, original_teacher,
                   (e.num_samples, e.seq_length))
    scratch = run_dir / "scratch"
    if e.scratch_baseline:  # the student's shape from random weights, on the distillation's tokens
        r.stage("scratch", "finetune",
                stages.finetune_args(pruned, scratch, prefixes["train"], _kd_batches(k), _kd_schedule(k, lr=1e-3),
                                     training, validation=prefixes["heldout"], random_init=True),
                lambda: _is_ckpt(scratch / "model"))

    # 6. evaluate
    models = {"teacher": original_teacher, **round_models, "pruned": pruned, "distilled": kd / "student"}
    if e.scratch_baseline:
        models["scratch"] = scratch / "model"
    # one process evaluates every model not evaluated yet (NeMo is imported, the windows read and the tasks
    # built once: every model is scored on the same requests); a model evaluated without a task asked now is redone
    outs = {name: run_dir / "eval" / f"{name}.json" for name in models}
    (run_dir / "eval").mkdir(exist_ok=True)

    todo = [name for name in models if not tasks.covered_by(outs[name])]
    r.stage("evaluate", "evaluate",
            stages.evaluate_args([models[n] for n in todo], [outs[n] for n in todo], prefixes["heldout"],
                                 e.num_samples, e.seq_length, training, tasks=tasks),
            lambda: all(tasks.covered_by(outs[n]) for n in models))

    # 7. export
    exports = {}
    if cfg.export.hf:
        hf_dir = run_dir / "export" / "hf"
        (run_dir / "export").mkdir(exist_ok=True)
        r.stage("export_hf", "export", [f"model={kd / 'student'}", "format=hf", f"output={hf_dir}",
                                        f"export.dtype={cfg.export.dtype}", "overwrite=true"],
                lambda: (hf_dir / "config.json").is_file())
        exports["hf"] = str(hf_dir)
    if cfg.export.nemo:
        nf = run_dir / "export" / "student.nemo"
        (run_dir / "export").mkdir(exist_ok=True)
        r.stage("export_nemo", "export", [f"model={kd / 'student'}", "format=nemo", f"output={nf}", "overwrite=true"],
                lambda: nf.is_file())
        exports["nemo"] = str(nf)

    # 8. report
    from nemo_minitron import report

    t0 = time.time()
    rep = report.write(run_dir, models, exports, prefixes["heldout"], e.num_samples, e.seq_length, r.times)
    r.times["report"] = round(time.time() - t0, 1)
    r.times_path.write_text(json.dumps(r.times, indent=2))
    print(report.summary(rep))
    print(f"total wall time this invocation: {time.time() - t_start:.0f}s")
    print(f"wrote report: {run_dir / 'report.md'}")


def dry_run(cfg) -> None:
    """The distillation launch this pipeline would make, with the student shape from the prune targets."""
    from nemo_minitron import launch_plan as lp

    lp.spec_of(cfg.teacher)  # the teacher's shape must be readable for a plan (its error, not skipped)
    tp, pp = cfg.trainer.strategy.tensor_model_parallel_size, cfg.trainer.strategy.pipeline_model_parallel_size
    from nemo_minitron import parallel
    from nemo_minitron.model import count_params

    ep = parallel.expert_parallel_size(cfg.trainer.strategy)
    rounds, shapes = _check_rounds(cfg, tp, pp, dry=True)  # every step validated; the shape each one leaves
    for i, rnd in enumerate(rounds, 1):  # iterative rounds: each prunes the previous student
        steps = _merged(cfg.distill, rnd.get("distill"))["max_steps"]
        print(f"round {i}: {count_params(shapes[i - 1]) / 1e9:.2f}B -> {count_params(shapes[i]) / 1e9:.2f}B params "
              f"({lp.describe_shape(shapes[i])}), {steps} distillation steps")
    t_spec, s_spec = shapes[-2], shapes[-1]
    k = cfg.distill
    nodes, gpus = cfg.launcher.nodes, cfg.launcher.gpus_per_node
    from nemo_minitron.model.precision import name as precision_name

    from nemo_minitron.model import recompute

    m = cfg.model
    rec = recompute.resolve(m.recompute_granularity, m.recompute_method, m.recompute_num_layers, s_spec.num_layers // pp)
    plan = lp.plan(t_spec, s_spec, nodes, gpus, tp, pp, k.seq_length, k.micro_batch_size, k.global_batch_size,
                   fused_output=k.fused_output, lm=k.lm_weight > 0, sequence_parallel=cfg.trainer.strategy.sequence_parallel,
                   distributed_optimizer=bool(cfg.optim.distributed_optimizer),
                   precision=precision_name(cfg.model.precision, cuda=True), recompute=rec, ep=ep)
    print(lp.show(plan, lp.describe_shape(t_spec), lp.describe_shape(s_spec)))
    if t_spec.moe:
        print("  note: the pipeline's distillation of a mixture of experts is not available yet (import, prune, evaluate "
              "and export are): a run refuses it; this is the launch it will need")
    print(f"  distillation: {k.max_steps} steps = {k.max_steps * plan['tokens_per_step'] / 1e9:.1f}B tokens")
    train = cfg.data.train
    if isinstance(train, str) and not Path(train + ".idx").is_file():
        print(f"  data: {train} is not a preprocessed prefix yet (preprocessed by the run); not reported")
    else:
        from nemo_minitron.data import blend

        settings = blend.training_settings(list(train) if OmegaConf.is_list(train) else train, k.seq_length,
                                           k.micro_batch_size, k.global_batch_size)
        print(blend.plan_or_note(settings, k.max_steps, f"{Path(cfg.run_dir).absolute() / 'distill' / 'data_index'}"))
    print("dry run: nothing was launched")
