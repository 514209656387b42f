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


def run(cfg) -> None:
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
    kind, path, spec = describe(cfg.model)
    spec.validate_layout(tp, pp)
    from nemo_minitron.data import blend
    from nemo_minitron.data.tokenizer import fingerprint_of

    blend.check_tokenizer(cfg.data, fingerprint_of(path), "data", model=cfg.model)
    windows = indexed.windows(cfg.data, e.num_samples, e.seq_length, offset=e.offset)
    check_vocab(spec, int(windows.max()), f"dataset {cfg.data}")
    if cfg.output_json:
        out = Path(cfg.output_json)
        if not out.parent.exists():
            raise UserError(f"output_json directory {out.parent} does not exist")
    tasks, unavailable = [], {}
    if e.tasks:
        from nemo_minitron import downstream

        tasks, unavailable = downstream.check_tasks(list(e.tasks), e.task_include_path, e.download)
        if unavailable and not tasks:
            raise UserError("no requested task can run: " + "; ".join(f"{t}: {w}" for t, w in unavailable.items()))

    t0 = time.time()
    parallel.initialize(tp, pp)
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
    if parallel.is_rank0():
        print(f"{kind} model {path}: loss {res['loss']:.4f}  perplexity {res['perplexity']:.2f}  "
              f"tokens {res['tokens']}  ({time.time() - t0:.1f}s, {layout})")
        if cfg.output_json:
            tmp = Path(str(cfg.output_json) + ".partial")
            tmp.write_text(json.dumps(res, indent=2))
            tmp.replace(cfg.output_json)
            print(f"wrote metrics: {Path(cfg.output_json).absolute()}")
    parallel.destroy()
