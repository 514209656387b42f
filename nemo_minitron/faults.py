"""Test-only fault hooks: a run can be paused at a named point or given a non-finite loss on purpose.

Both are driven by environment variables that no user sets and cost one dictionary lookup when unset:

    NEMO_MINITRON_PAUSE_AT=<name>            pause_point(name) prints "paused at <name>" to stderr and
                                             sleeps (NEMO_MINITRON_PAUSE_SECONDS, default 600), so a test
                                             can SIGKILL the process in the middle of a write
    NEMO_MINITRON_NONFINITE=<term>@<steps>[:<micro-batch>]
                                             the loss term <term> (kd_loss, lm_loss, intermediate_loss) of
                                             micro-batch <micro-batch> (default 0) at the training steps
                                             <steps> (comma-separated, 1-based global steps) becomes NaN,
                                             e.g. ``kd_loss@3:1`` or ``lm_loss@3,4,5``; several
                                             separated by ``;``
"""

from __future__ import annotations

import os
import sys
import time


def pause_point(name: str) -> None:
    if os.environ.get("NEMO_MINITRON_PAUSE_AT") == name:
        print(f"paused at {name}", file=sys.stderr, flush=True)
        time.sleep(float(os.environ.get("NEMO_MINITRON_PAUSE_SECONDS", "600")))


def _nonfinite_spec():
    spec = os.environ.get("NEMO_MINITRON_NONFINITE")
    if not spec:
        return None
    out = []
    for one in spec.split(";"):
        term, _, rest = one.partition("@")
        steps, _, micro = rest.partition(":")
        out.append((term, {int(s) for s in steps.split(",") if s}, int(micro or 0)))
    return out


def loss_scale(term: str, step: int, micro_batch: int) -> float:
    """NaN where the test hook asks for a non-finite ``term`` at (step, micro_batch), else 1.0."""
    for t, steps, micro in _nonfinite_spec() or ():
        if t == term and step in steps and micro == micro_batch:
            return float("nan")
    return 1.0
