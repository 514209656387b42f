"""Downstream tasks through lm-evaluation-harness (``evaluate eval.tasks=[...]``).

Before any model is loaded, every requested task is resolved and its data located: a task whose data is
neither local (``dataset_kwargs.data_files``) nor in the Hugging Face datasets cache is reported as
unavailable by name (``eval.download=true`` lets lm-eval fetch it when the machine is online). A NeMo
checkpoint is exported to a temporary Hugging Face directory (fp32) and run with lm-eval's ``hf`` model.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from nemo_minitron.errors import UserError


def _task_manager(include_path):
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("eval.tasks needs lm-evaluation-harness: pip install 'lm-eval==0.4.13' "
                        "(or the project's [eval] extra)") from None
    return TaskManager(include_path=str(include_path) if include_path else None)


def _data_available(cfg: dict, download: bool) -> str | None:
    """None when the task's data can be read, else why not."""
    path, name = cfg.get("dataset_path"), cfg.get("dataset_name")
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if files:
        flat = files.values() if isinstance(files, dict) else [files]
        paths = [p for f in flat for p in ([f] if isinstance(f, str) else f)]
        missing = [p for p in paths if not Path(p).exists()]
        return f"data files missing: {missing}" if missing else None
    if path is None:
        return "the task names no dataset"
    if download:
        return None
    import datasets

    old = datasets.config.HF_DATASETS_OFFLINE
    datasets.config.HF_DATASETS_OFFLINE = True
    try:
        datasets.load_dataset_builder(path, name)
        return None
    except Exception:
        return f"dataset {path}{'/' + name if name else ''} is not in the local Hugging Face cache " \
               "(offline; eval.download=true fetches it)"
    finally:
        datasets.config.HF_DATASETS_OFFLINE = old


def check_tasks(tasks: list, include_path=None, download: bool = False) -> tuple[list, dict]:
    """(available task names, {unavailable task: reason}); unknown names are an error."""
    tm = _task_manager(include_path)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise UserError(f"unknown lm-eval task(s): {', '.join(unknown)} (lm-eval knows {len(tm.all_tasks)}; "
                        f"eval.task_include_path adds your own YAML tasks)")
    ok, missing = [], {}
    for t in tasks:
        entry = tm.task_index[t]
        why = _data_available(entry.cfg or {}, download) if getattr(entry.kind, "name", "") == "TASK" else None
        if why:
            missing[t] = why
        else:
            ok.append(t)
    return ok, missing


def run_tasks(kind: str, path: Path, tasks: list, include_path=None, limit=None, batch_size: int = 8) -> dict:
    """{task: {metric: value}} from lm-eval on ``path`` (HF dir, or a NeMo checkpoint exported first)."""
    import lm_eval
    import torch

    from nemo_minitron.checkpoint.export import export_hf

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = path
        if kind == "nemo":
            hf_dir = export_hf(path, Path(tmp) / "hf", dtype="fp32")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        out = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={hf_dir},dtype=float32", tasks=list(tasks), batch_size=batch_size,
            device=device, limit=limit, task_manager=_task_manager(include_path), log_samples=False)
    res = {}
    for t, metrics in out["results"].items():
        res[t] = {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float)) and "stderr" not in k}
    return res
