"""``nemo-minitron evaluate``: held-out LM loss and perplexity, at any TP/PP/DP layout (each DP rank
evaluates its share of the windows; the loss is of all of them)."""

from __future__ import annotations

import json
import math
import time
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


def run(cfg) -> None:
    """One model, or a list of them (``model=[A,B,..]``, ``output_json=[a.json,b.json,..]``): every one is
    checked before any is loaded, then each is evaluated in turn on the same windows in this process."""
    e = cfg.eval
    tp = cfg.trainer.strategy.tensor_model_parallel_size
    pp = cfg.trainer.strategy.pipeline_model_parallel_size
    for name in ("num_samples", "seq_length", "micro_batch_size"):
        if e[name] < 1:
            raise UserError(f"eval.{name} must be >= 1 (got {e[name]})")
    layout = parallel.Layout.resolve(parallel.world_size_from_env(), tp, pp, sequence_parallel=False)
    if e.num_samples % (e.micro_batch_size * layout.dp):
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
        spec.validate_layout(tp, pp)
        blend.check_tokenizer(cfg.data, fingerprint_of(path), "data", model=model_arg)
        checked.append((path, out, spec))
    windows = indexed.windows(cfg.data, e.num_samples, e.seq_length, offset=e.offset)
    top_id = int(windows.max())
    for path, out, spec in checked:
        check_vocab(spec, top_id, f"dataset {cfg.data}")
        if out is not None and not Path(out).parent.exists():
            raise UserError(f"output_json directory {Path(out).parent} does not exist")
    tasks, unavailable = [], {}
    if e.tasks:
        from nemo_minitron import downstream

        tasks, unavailable = downstream.check_tasks(list(e.tasks), e.task_include_path, e.download)
        if unavailable and not tasks:
            raise UserError("no requested task can run: " + "; ".join(f"{t}: {w}" for t, w in unavailable.items()))

    parallel.initialize(tp, pp)
    for path, out, _ in checked:
        _evaluate_one(cfg, path, out, windows, tasks, unavailable, tp, pp, layout)
    parallel.destroy()


def _evaluate_one(cfg, path, out, windows, tasks, unavailable, tp, pp, layout) -> None:
    e = cfg.eval
    t0 = time.time()
    model, spec, kind = load_model(path, tp, pp)
    res = heldout_loss(model, windows, e.micro_batch_size)
    res.update(model=str(path), data=str(cfg.data), seq_length=e.seq_length, num_samples=e.num_samples)
    if tasks and parallel.is_rank0():
        from nemo_minitron import downstream

        for t, w in unavailable.items():
            print(f"task {t} unavailable: {w}")
        res["tasks"] = downstream.run_tasks(kind, path, tasks, e.task_include_path, e.task_limit)
        res["tasks_unavailable"] = unavailable
        for t, metrics in res["tasks"].items():
            print(f"task {t}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    del model
    if parallel.is_rank0():
        print(f"{kind} model {path}: loss {res['loss']:.4f}  perplexity {res['perplexity']:.2f}  "
              f"tokens {res['tokens']}  ({time.time() - t0:.1f}s, {layout})", flush=True)
        if out:
            tmp = Path(str(out) + ".partial")
            tmp.write_text(json.dumps(res, indent=2))
            tmp.replace(out)
            print(f"wrote metrics: {Path(out).absolute()}", flush=True)
