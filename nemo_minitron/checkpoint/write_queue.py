"""A results queue for megatron's checkpoint writer that survives SLURM's signals.

megatron's ``torch_dist`` writer (``dist_checkpointing.strategies.filesystem_async``) collects what its
writer processes wrote through a queue held by a ``multiprocessing.Manager``: a separate server process,
spawned on a process's first save and reused by every later save. That server starts with the default
signal dispositions, so SIGUSR1 kills it. SLURM delivers a job step's signals to every process of the step:
``--signal=USR1@T`` (our preemption warning) or ``scancel --signal=TERM`` kill the server, and the next save
(the very checkpoint the warning asked for) fails with ``ConnectionRefusedError`` or ``EOFError``.

:func:`install` gives megatron a queue whose server ignores SIGUSR1/SIGUSR2/SIGTERM/SIGINT (Python's own
manager server already ignores SIGINT, for the same reason: a terminal's Ctrl-C reaches the whole process
group) and dies with the process that started it (Linux ``PR_SET_PDEATHSIG``), so it never outlives a
killed rank. It is started from the standard library's ``multiprocessing``, so the server does not import
torch (about 2 s of CPU per saving process with megatron's own). This module imports nothing heavy: the
spawned server imports it to run :func:`_server_init`.
"""

from __future__ import annotations

import signal

_MANAGER = []  # keeps the server alive for this process's lifetime


def _server_init() -> None:
    """Runs first in the spawned server process."""
    for name in ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    try:  # Linux: SIGKILL when the process that started the server ends (however it ends)
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def install() -> None:
    """Use a signal-safe results queue for this process's megatron checkpoint saves (idempotent)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if _MANAGER:
        return
    import multiprocessing
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))  # spawn: never fork a CUDA process
    manager.start(initializer=_server_init)
    _MANAGER.append(manager)
    filesystem_async._results_queue = manager.Queue()
