"""``nemo-minitron evaluate``: held-out LM loss and perplexity, and downstream accuracy (``eval.tasks``), at any
TP/PP/DP layout (each DP rank evaluates its share of the windows and of the task requests; the results are of
all of them, the same as one process)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from nemo_minitron import parallel
from nemo_minitron.checkpoint.loader import check_vocab, describe, load_model
from nemo_minitron.data import indexed
from nemo_minitron.errors import UserError
from nemo_minitron.model.forward import lm_loss


def heldout_loss(model, windows, micro_batch_size: int) -> dict:
    """{'loss', 'perplexity', 'tokens'} of ``model`` on ``windows`` ([n, L+1] tokens)."""
    import torch

    with torch.no_grad():
        loss_sum, tokens = lm_loss(model, windows, micro_batch_size, forward_only=True)
    loss = loss_sum / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(tokens)}


def _as_list(value) -> list:
    from omegaconf import OmegaConf

    if OmegaConf.is_list(value) or isinstance(value, (list, tuple)):
        return [str(v) if v is not None else None for v in value]
    return [value if value is None else str(value)]


@dataclass(frozen=True)
class Downstream:
    """``eval.tasks`` and its settings, resolved from the config once (the command's edge)."""

    tasks: tuple = ()
    limit: int | float | None = None    # documents per task (a count, or a fraction), a seeded subset
    num_fewshot: int | None = None      # None: each task's default (lm-eval's)
    seed: int = 1234                    # the subset's draw
    batch_size: int = 16                # sequences per forward
    batch_tokens: int = 8192            # padded tokens per forward (long prompts run in smaller batches)
    include_path: str | None = None     # a directory of the user's own lm-eval task YAMLs

    @classmethod
    def of(cls, e) -> "Downstream":
        limit = e.get("limit")
        if isinstance(limit, float) and limit.is_integer() and limit > 1:
            limit = int(limit)
        return cls(tasks=tuple(str(t) for t in (e.get("tasks") or [])), limit=limit, num_fewshot=e.get("num_fewshot"),
                   seed=int(e.get("seed", 1234)), batch_size=int(e.get("batch_size", 16)),
                   batch_tokens=int(e.get("batch_tokens", 8192)), include_path=e.get("task_include_path"))

    def prepare(self):
        from nemo_minitron import downstream

        if self.batch_size < 1 or self.batch_tokens < 1:
            raise UserError(f"eval.batch_size and eval.batch_tokens must be >= 1 (got {self.batch_size}, "
                            f"{self.batch_tokens})")
        return downstream.prepare(list(self.tasks), self.num_fewshot, self.limit, self.seed, self.include_path)

    def check(self, key: str) -> None:
        """Every task built now, before a pipeline's or search's work: an unknown, generative or data-less one
        is refused, naming ``key`` (the stage that scores them builds the same requests again)."""
        if self.tasks:
            prep = self.prepare()
            if prep.unavailable:
                raise UserError(f"{key}: " + "; ".join(f"{t}: {w}" for t, w in prep.unavailable.items()))

    def covered_by(self, out_json: Path) -> bool:
        """``out_json`` (an evaluate output) exists and holds every one of these tasks."""
        return out_json.is_file() and set(self.tasks) <= set(json.loads(out_json.read_text()).get("tasks", {}))


def run(cfg) -> None:
    """One model, or a list of them (``model=[A,B,..]``, ``output_json=[a.json,b.json,..]``): every one is
    checked (and every task built) before any is loaded, then each is evaluated in turn on the same windows
    and task requests in this process."""
    e = cfg.eval
    tp = cfg.trainer.strategy.tensor_model_parallel_size
    pp = cfg.trainer.strategy.pipeline_model_parallel_size
    ep = parallel.expert_parallel_size(cfg.trainer.strategy)
    tasks = Downstream.of(e)
    data = cfg.get("data")
    if data is None and not tasks.tasks:
        raise UserError("nothing to evaluate: give data=PREFIX (held-out loss) and/or eval.tasks=[..] (accuracy)")
    for name in ("num_samples", "seq_length", "micro_batch_size"):
        if e[name] < 1:
            raise UserError(f"eval.{name} must be >= 1 (got {e[name]})")
    layout = parallel.Layout.resolve(parallel.world_size_from_env(), tp, pp, sequence_parallel=False, ep=ep)
    if data is not None and e.num_samples % (e.micro_batch_size * layout.dp):
        raise UserError(f"eval.num_samples={e.num_samples} is not divisible by eval.micro_batch_size={e.micro_batch_size}"
                        + (f" x data-parallel size {layout.dp} (each DP rank evaluates its share)" if layout.dp > 1 else ""))
    models, outs = _as_list(cfg.model), _as_list(cfg.output_json)
    if not models:
        raise UserError("model=[] names no model")
    if outs == [None]:
        outs = [None] * len(models)
    if len(outs) != len(models):
        raise UserError(f"output_json names {len(outs)} file(s) for {len(models)} model(s): give one per model")
    from nemo_minitron.data import blend
    from nemo_minitron.data.tokenizer import fingerprint_of

    checked = []
    for model_arg, out in zip(models, outs):
        _, path, spec = describe(model_arg)
        spec.validate_layout(tp, pp, ep)
        if data is not None:
            blend.check_tokenizer(data, fingerprint_of(path), "data", model=model_arg)
        checked.append((path, out, spec))
    windows = None
    if data is not None:
        windows = indexed.windows(data, e.num_samples, e.seq_length, offset=e.offset)
        top_id = int(windows.max())
        for path, out, spec in checked:
            check_vocab(spec, top_id, f"dataset {data}")
    for path, out, spec in checked:
        if out is not None and not Path(out).parent.exists():
            raise UserError(f"output_json directory {Path(out).parent} does not exist")
    prep = None
    if tasks.tasks:
        prep = tasks.prepare()
        if parallel.is_rank0():
            for t, w in prep.unavailable.items():
                print(f"task {t} unavailable: {w}")
            print(f"tasks: {', '.join(prep.names)}: {prep.num_documents()} documents"
                  + (f" (eval.limit={tasks.limit}, seed {tasks.seed})" if tasks.limit is not None else ""), flush=True)

    parallel.initialize(tp, pp, ep=ep)
    for path, out, _ in checked:
        _evaluate_one(cfg, path, out, windows, prep, tasks, tp, pp, layout)
    parallel.destroy()


def downstream_scores(model, path, spec, prep, tasks: Downstream) -> dict:
    """lm-eval's scores of ``model`` (this rank's chunk of the checkpoint at ``path``) on ``prep``'s tasks."""
    from nemo_minitron import downstream
    from nemo_minitron.data import tokenizer as tok
    from nemo_minitron.downstream.lm import MegatronLM

    lm = MegatronLM(model, tok.load(path), max_length=spec.get("seq_length"), batch_size=tasks.batch_size,
                    batch_tokens=tasks.batch_tokens,
                    log=(lambda m: print(m, flush=True)) if parallel.is_rank0() else (lambda *_: None))
    t0 = time.time()
    res = downstream.score(prep, lm)
    st = lm.stats
    if parallel.is_rank0():
        print(f"downstream: {st['requests']} requests as {st['sequences']} sequences ({st['tokens']} tokens) "
              f"in {time.time() - t0:.1f}s", flush=True)
    return res


def format_tasks(res: dict) -> list[str]:
    from nemo_minitron.downstream import headline

    lines = []
    for t, entry in res.items():
        key, value, err = headline(entry)
        shots = entry["num_fewshot"]
        lines.append(f"task {t}: {key} {value:.4f}" + (f" +- {err:.4f}" if err is not None else "")
                     + f"  ({entry['n']} documents, {shots}-shot, {entry['split']})")
    return lines


def _evaluate_one(cfg, path, out, windows, prep, tasks: Downstream, tp, pp, layout) -> None:
    e = cfg.eval
    t0 = time.time()
    model, spec, kind = load_model(path, tp, pp)
    res = {"model": str(path)}
    if windows is not None:
        res.update(heldout_loss(model, windows, e.micro_batch_size))
        res.update(data=str(cfg.data), seq_length=e.seq_length, num_samples=e.num_samples)
    if prep is not None:
        res["tasks"] = downstream_scores(model, path, spec, prep, tasks)
        res["tasks_unavailable"] = prep.unavailable
        res["tasks_settings"] = {"limit": tasks.limit, "num_fewshot": tasks.num_fewshot, "seed": tasks.seed}
    del model
    if parallel.is_rank0():
        for line in format_tasks(res.get("tasks", {})):
            print(line)
        loss = f"loss {res['loss']:.4f}  perplexity {res['perplexity']:.2f}  tokens {res['tokens']}  " \
            if "loss" in res else ""
        print(f"{kind} model {path}: {loss}({time.time() - t0:.1f}s, {layout})", flush=True)
        if out:
            tmp = Path(str(out) + ".partial")
            tmp.write_text(json.dumps(res, indent=2))
            tmp.replace(out)
            print(f"wrote metrics: {Path(out).absolute()}", flush=True)
