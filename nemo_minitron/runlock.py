"""One run per directory: ``distill``, ``finetune``, ``prune``, ``search`` and ``pipeline`` lock their output.

The lock is a file, ``DIR/.nemo-minitron.lock`` (``prune``, whose output is a checkpoint that is replaced
as a whole when it is published, locks ``OUTPUT.lock`` beside it instead), created atomically with
``os.open(O_CREAT | O_EXCL)`` and holding JSON: host, pid, start time, command, and the launch it belongs
to. A second run on the same directory finds it and is refused with one line naming the holder; a lock whose
process is gone (same host; the pid is checked together with the process's start time, so a reused pid
does not keep a dead run's lock alive) is taken over with a warning; a lock from another host is refused
(its process cannot be checked from here; the message says which file to remove), unless an earlier run of
the same SLURM job left it before the job was requeued (same SLURM_JOB_ID, lower SLURM_RESTART_COUNT:
SLURM never runs a job twice at once), which is taken over too. The lock is removed when the command
ends, normally or not; a directory the lock created and nothing else filled is removed with it, so a run
refused after taking the lock still leaves nothing behind.

Where it is taken: after a command's input checks (a refused input writes nothing, not even the lock) and
before anything is written into the directory. ``overwrite=true`` empties a locked directory with
:func:`clear`, which keeps the lock file.

Multi-rank runs take it once, on rank 0:

* torch.distributed already initialized (``prune`` takes it right after ``parallel.initialize``): rank 0
  takes it and broadcasts the outcome, so every rank refuses together.
* not yet initialized (``distill``/``finetune``, where NeMo's trainer initializes it later; ``search``'s
  rank phase started directly under a launcher): rank 0 (the launcher's RANK / SLURM_PROCID) takes it.
  Every other rank goes on at once when there is no lock file (no
  run holds the directory; rank 0 takes it now, or was quicker and has already released it, as a run that
  was complete does) or when the file holds rank 0's lock of this launch (same MASTER_ADDR/MASTER_PORT/
  torchrun run id/SLURM job and step, taken after this process started). While another run's lock is
  there (live, or stale until rank 0 takes it over) it waits and writes nothing: if rank 0 is refused, it
  exits with status 2 and the launcher ends the other ranks (torchrun does; our srun lines use
  ``--kill-on-bad-exit``); a rank still waiting after ``WAIT_S`` seconds refuses itself with the same line.

Child processes of a lock holder (the pipeline's and the search's stages, which may run under a launcher)
inherit the lock through ``$NEMO_MINITRON_RUN_LOCKS``: a stage that locks the very directory its parent
holds (``search`` runs its rank phase in a child on the same output) goes on without taking it again. Only
the exact directory is locked, never its parents: the pipeline's lock on RUN does not stop its stages
writing RUN/pruned (locked as RUN/pruned.lock) or RUN/distill.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from nemo_minitron.errors import UserError

LOCK_NAME = ".nemo-minitron.lock"
ENV = "NEMO_MINITRON_RUN_LOCKS"  # {lock path: [host, pid]} of the locks this process's ancestors hold
WAIT_S = 30.0  # how long a non-zero rank waits for rank 0's lock (torch.distributed not initialized yet)
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_STEP_ID")


def _process_start(pid: int | None = None) -> float | None:
    """The process's start time (epoch seconds), or None when it cannot be read."""
    try:
        import psutil

        return psutil.Process(pid or os.getpid()).create_time()
    except Exception:
        return None


_STARTED = _process_start() or time.time()


def _alive(pid: int, process_start: float | None) -> bool:
    """Whether ``pid`` on this host is still the process that wrote the lock."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists (another user's process)
    except OSError:
        return False
    try:
        import psutil

        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        if process_start is not None and abs(proc.create_time() - process_start) > 1.0:
            return False  # the pid was reused by another process
    except ImportError:
        pass
    except psutil.NoSuchProcess:
        return False
    except Exception:
        pass  # cannot tell more: it exists
    return True


def _slurm_restart() -> int:
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def _launch_key() -> str:
    return "|".join(os.environ.get(k, "") for k in _LAUNCH_ENV)


def _of_this_launch(rec) -> bool:
    """A lock or mark written by this launch (same launcher identity) after this process started."""
    return isinstance(rec, dict) and rec.get("launch") == _launch_key() and rec.get("start_epoch", 0) >= _STARTED - 2


def _inherited() -> dict:
    try:
        v = json.loads(os.environ.get(ENV, "{}"))
        return v if isinstance(v, dict) else {}
    except ValueError:
        return {}


def clear(directory) -> None:
    """Remove everything in ``directory`` except its lock file (``overwrite=true`` on a locked directory)."""
    d = Path(directory)
    if not d.is_dir():
        return
    for child in d.iterdir():
        if child.name == LOCK_NAME:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


CLEARED_NAME = ".nemo-minitron.cleared"  # written by rank 0 once overwrite=true has emptied the directory
CLEAR_WAIT_S = 600.0  # how long the other ranks wait for it (a large run directory takes a while to remove)


def clear_for_launch(directory, rank: int, world: int, wait_s: float = CLEAR_WAIT_S) -> None:
    """``overwrite=true`` at every rank of a launch whose process group is not up yet (``distill``, ``finetune``).

    Rank 0 empties the directory (:func:`clear`) and then writes :data:`CLEARED_NAME` holding this launch's
    identity; every other rank waits for that mark before it looks at anything inside (a completed student, a
    checkpoint to resume from, a data index), so no rank reads or reports what rank 0 is removing."""
    d = Path(directory)
    mark = d / CLEARED_NAME
    if rank == 0:
        clear(d)
        if world > 1:
            d.mkdir(parents=True, exist_ok=True)
            tmp = mark.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"launch": _launch_key(), "start_epoch": time.time()}))
            os.replace(tmp, mark)
        return
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if _of_this_launch(json.loads(mark.read_text())):
                return
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise UserError(f"overwrite=true: rank 0 did not finish emptying {d} within {wait_s:.0f}s")
        time.sleep(0.2)


class RunLock:
    """``with RunLock(directory, "distill"):`` -- the body runs only while this run holds ``directory``.

    ``lock_path``: the lock file (default ``directory/.nemo-minitron.lock``). Raises :class:`UserError`
    (one line naming the holder) when another run holds it."""

    def __init__(self, directory, command: str, lock_path=None, wait_s: float = WAIT_S):
        self.directory = Path(directory).absolute()
        self.path = Path(lock_path).absolute() if lock_path is not None else self.directory / LOCK_NAME
        self.command = command
        self.wait_s = wait_s
        self.held = False  # this process wrote the lock file and removes it on release
        self.record: dict = {}
        self._created: list[Path] = []

    # ---- context manager ----------------------------------------------------------------------------
    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # ---- acquire / release --------------------------------------------------------------------------
    def acquire(self) -> "RunLock":
        from nemo_minitron import parallel

        if self._is_inherited():
            return self
        try:
            import torch.distributed as dist

            initialized = dist.is_available() and dist.is_initialized()
        except ImportError:
            initialized = False
        if initialized and dist.get_world_size() > 1:
            err, exc = None, None
            if dist.get_rank() == 0:
                try:
                    self._take()
                except UserError as e:
                    err, exc = str(e), e
                except Exception as e:  # every rank must hear the outcome, or the others hang in broadcast
                    err, exc = f"cannot take the lock {self.path}: {e}", e
            flag = [err]
            dist.broadcast_object_list(flag, src=0)
            if exc is not None:
                raise exc
            if flag[0] is not None:
                raise UserError(flag[0])
        elif parallel.world_size_from_env() > 1 and not parallel.is_rank0():
            self._wait_for_rank0()
        else:
            self._take()
        return self

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            locks = _inherited()
            if locks.pop(str(self.path), None) is not None:
                if locks:
                    os.environ[ENV] = json.dumps(locks)
                else:
                    os.environ.pop(ENV, None)
            rec = self._read(retries=0)
            if isinstance(rec, dict) and all(rec.get(k) == self.record[k] for k in ("host", "pid", "start_epoch")):
                self.path.unlink()
        except OSError:
            pass
        self._remove_created()

    def _remove_created(self) -> None:
        """Remove the directories the lock made, if nothing else filled them."""
        try:
            for d in reversed(self._created):
                d.rmdir()
        except OSError:
            pass
        self._created = []

    # ---- internals ----------------------------------------------------------------------------------
    def _is_inherited(self) -> bool:
        mine = _inherited().get(str(self.path))
        if not mine:
            return False
        rec = self._read(retries=0)
        return isinstance(rec, dict) and [rec.get("host"), rec.get("pid")] == list(mine)

    def _take(self) -> None:
        if self.path.parent == self.directory and self.directory.exists() and not self.directory.is_dir():
            raise UserError(f"output {self.directory} is a file, not a directory")
        now = time.time()
        self.record = {"host": socket.gethostname(), "pid": os.getpid(),
                       "start_time": datetime.datetime.fromtimestamp(now).astimezone().isoformat(timespec="seconds"),
                       "start_epoch": now, "process_start": _process_start(), "command": self.command,
                       "directory": str(self.directory), "launch": _launch_key(),
                       "slurm_job": os.environ.get("SLURM_JOB_ID"), "slurm_restart": _slurm_restart()}
        try:
            try:
                self._mkdirs(self.path.parent)
            except OSError as e:
                raise UserError(f"cannot create {self.path.parent} for the run lock: {e.strerror or e}") from None
            self._take_file()
        except BaseException:
            self._remove_created()  # refused or failed: leave nothing behind
            raise

    def _take_file(self) -> None:
        taken_over = None
        for _ in range(10):
            if self._create():
                self.held = True
                locks = _inherited()
                locks[str(self.path)] = [self.record["host"], self.record["pid"]]
                os.environ[ENV] = json.dumps(locks)
                if taken_over is not None:
                    rec, why = taken_over
                    print(f"warning: taking over the lock {self.path} left by {rec.get('command', '?')} "
                          f"pid {rec.get('pid', '?')} ({why})", file=sys.stderr, flush=True)
                return
            rec = self._read()
            if rec is None:
                continue  # released meanwhile: try again
            if rec == "unreadable":
                raise UserError(f"{self.directory} holds a lock file that cannot be read ({self.path}); remove it "
                                "if no run is using the directory")
            why = self._stale(rec)
            if why:
                if self._remove_stale(rec):
                    taken_over = (rec, why)
                continue
            raise UserError(self.holder_message(rec))
        raise UserError(f"could not take the lock {self.path}: it kept changing hands")

    def _stale(self, rec: dict) -> str | None:
        """Why the holder cannot be running any more, or None (it may be)."""
        if rec.get("host") == self.record["host"] and isinstance(rec.get("pid"), int):
            return None if _alive(rec["pid"], rec.get("process_start")) else "no longer running"
        job = self.record.get("slurm_job")
        if job and rec.get("slurm_job") == job and (rec.get("slurm_restart") or 0) < self.record["slurm_restart"]:
            # another host, but an earlier run of this very SLURM job: SLURM runs a job once at a time
            return f"an earlier run of SLURM job {job}, since requeued"
        return None

    def holder_message(self, rec: dict) -> str:
        return (f"{self.directory} is in use by another run: {rec.get('command', '?')} pid {rec.get('pid', '?')} "
                f"on {rec.get('host', '?')}, started {rec.get('start_time', '?')} (wait for it, or remove "
                f"{self.path} if that run is gone)")

    def _mkdirs(self, d: Path) -> None:
        missing = []
        while not d.exists():
            missing.append(d)
            d = d.parent
        for m in reversed(missing):
            try:
                m.mkdir()
                self._created.append(m)
            except FileExistsError:
                pass

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise UserError(f"cannot write the run lock {self.path}: {e.strerror or e}") from None
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(self.record) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as e:  # e.g. a full disk: no half-written lock left behind
            self.path.unlink(missing_ok=True)
            raise UserError(f"cannot write the run lock {self.path}: {e.strerror or e}") from None
        return True

    def _read(self, retries: int = 10):
        """The lock's record; None when there is no lock file; "unreadable" when it stays unparseable (a
        holder may be between creating and writing it, hence the retries)."""
        for i in range(retries + 1):
            try:
                rec = json.loads(self.path.read_text())
                if isinstance(rec, dict):
                    return rec
            except FileNotFoundError:
                return None
            except (OSError, ValueError):
                pass
            if i < retries:
                time.sleep(0.1)
        return "unreadable"

    def _remove_stale(self, stale: dict) -> bool:
        """Remove the dead holder's lock; False when the file changed hands meanwhile (it is put back)."""
        private = self.path.with_name(f"{self.path.name}.stale-{self.record['host']}-{os.getpid()}")
        try:
            os.rename(self.path, private)
        except FileNotFoundError:
            return False
        try:
            same = json.loads(private.read_text()) == stale
        except (OSError, ValueError):
            same = False
        if not same:  # another run took the lock between our read and the rename: give it back
            try:
                os.link(private, self.path)
            except OSError:
                pass
        private.unlink(missing_ok=True)
        return same

    def _wait_for_rank0(self) -> None:
        deadline = time.monotonic() + self.wait_s
        while True:
            rec = self._read(retries=0)
            if rec is None:
                return  # no run holds the directory (rank 0 takes it, or took and already released it)
            if _of_this_launch(rec):
                return  # rank 0 of this launch holds it
            if time.monotonic() > deadline:  # another run's lock that rank 0 neither took over nor was refused by
                raise UserError(self.holder_message(rec) if isinstance(rec, dict) else
                                f"rank 0 did not take the lock {self.path} within {self.wait_s:.0f}s")
            time.sleep(0.2)
