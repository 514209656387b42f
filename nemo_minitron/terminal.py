"""What the terminal shows: a command's own lines, not NeMo's, megatron's or Lightning's chatter.

:class:`TerminalFilter` judges one line at a time; the pipeline uses it on its stages' output (which goes to
the stage logs whole), and :func:`filtered` applies it to a command run directly (``nemo-minitron <command>``):
for the command's duration ``sys.stdout`` / ``sys.stderr`` pass our own lines through and send the rest
(import warnings, OneLogger and telemetry notices, Lightning's accelerator summary, NeMo's records with their
continuation lines) to the run's log file, ``$NEMO_MINITRON_LOG_DIR/<time>-<command>-rank<R>-pid<P>.log``
(created only when something is held back; an internal error's traceback goes to the same file).
``NEMO_MINITRON_TERMINAL=raw`` turns the filtering off (the pipeline's stages: their logs keep everything).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
import time
from pathlib import Path

RAW_ENV = "NEMO_MINITRON_TERMINAL"
_TORCH_RANK = re.compile(r"\[rank\d+\]")  # torch.distributed's per-rank prefix ("[rank0]: Traceback ...")


class TerminalFilter:
    """Which lines the terminal shows. A NeMo log record's continuation lines (megatron's list of every
    parameter of every gradient bucket: one line per parameter) go with the record."""

    def __init__(self):
        self._record = False  # inside a multi-line record that is not shown

    def __call__(self, line: str) -> bool:
        if self._record and line[:1] in (" ", "\t") and line.strip():
            return False
        self._record = line.startswith("[NeMo")
        return worth_showing(line)


def worth_showing(line: str) -> bool:
    """Our own lines, not NeMo/Lightning chatter."""
    if line.startswith(("error: ", "note: ", "warning: ")):
        return True
    skip = ("[NeMo", "GPU available", "TPU available", "HPU available", "  warnings.warn", "warn(", "OneLogger",
            "No exporters", "WARNING", "LOCAL_RANK", "Loading", "  |", "---", "Epoch ", "`Trainer",
            "distributed_backend=", "All distributed processes registered", "Initializing distributed:",
            "You are using the default legacy behaviour")
    lightning_summary = line[:1].isdigit() and (" | " in line or "params" in line or "Modules in" in line)
    return (bool(line.strip()) and not line.startswith(skip) and not _TORCH_RANK.match(line) and not line.startswith((" \t", "\t"))
            and not lightning_summary and "Warning" not in line and "| Name" not in line
            and not line.startswith("  import "))


def relay(stream, log, prefix: str, out=None) -> list[str]:
    """Copy a child's output (``stream``: its binary stdout) to ``log`` whole, and to ``out`` (the terminal) the
    lines :class:`TerminalFilter` keeps, each after ``prefix``. A progress bar redrawn with ``\r`` is redrawn
    in place on a terminal and shows its last state only otherwise (a log file, a pipe). Returns the last 30
    complete lines (for a failure's one-line reason)."""
    out = out or sys.stdout
    tty = out.isatty()
    keep, tail, bar = TerminalFilter(), [], None  # bar: the latest redraw not yet shown (not a tty)
    reader = io.TextIOWrapper(stream, encoding="utf-8", errors="replace", newline="")  # "\r" ends a segment
    for seg in reader:
        log.write(seg)
        if seg.endswith("\r") and not seg.endswith("\r\n"):  # one state of a redrawn line
            text = seg[:-1]
            if text.strip() and worth_showing(text):
                if tty:
                    out.write(f"\r{prefix}{text}\x1b[K")
                    out.flush()
                bar = text
            continue
        line = seg.rstrip("\r\n")
        if not line.strip() and bar is not None:  # a bar's final newline: its last state is the line
            line = bar
        shown_bar, bar = bar, None
        tail = (tail + [line + "\n"])[-30:]
        if keep(line + "\n"):
            out.write(f"\r{prefix}{line}\x1b[K\n" if tty else f"{prefix}{line}\n")
        elif tty and shown_bar is not None:
            out.write("\n")  # leave the bar drawn
        out.flush()
    if bar is not None:
        out.write(f"{prefix}{bar}\n" if not tty else "\n")
    return tail


class RunLog:
    """The run's log file, opened on first use."""

    def __init__(self, command: str, argv=()):
        self.header = f"nemo-minitron {' '.join(map(str, argv))}\n\n" if argv else ""
        rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
        self.name = f"{time.strftime('%Y%m%d-%H%M%S')}-{command}-rank{rank}-pid{os.getpid()}.log"
        self.path: Path | None = None
        self._fh = None

    def _open(self):
        default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nemo-minitron" / "logs"
        for d in (Path(os.environ.get("NEMO_MINITRON_LOG_DIR") or default), Path(tempfile.gettempdir())):
            try:
                d.mkdir(parents=True, exist_ok=True)
                self._fh = open(d / self.name, "a", encoding="utf-8", errors="replace")
                self.path = d / self.name
                self._fh.write(self.header)
                return self._fh
            except OSError:
                continue
        return None

    def write(self, text: str) -> bool:
        fh = self._fh or self._open()
        if fh is None:
            return False
        fh.write(text)
        fh.flush()
        return True

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class _Filtered(io.TextIOBase):
    """A text stream that shows a line when the shared :class:`TerminalFilter` keeps it (decided on the
    line's first write, so progress bars redrawn with ``\\r`` pass at once) and logs it otherwise."""

    def __init__(self, stream, keep: TerminalFilter, log: RunLog):
        self._stream, self._keep, self._log = stream, keep, log
        self._show: bool | None = None  # the current line's verdict (None: at a line start)

    def write(self, text: str) -> int:
        for part in text.splitlines(keepends=True):
            if self._show is None:
                head = part.lstrip("\r")
                self._show = self._keep(head) if head.strip() else None
                if self._show is None:  # a blank line: shown as a line break only between shown lines
                    continue
            if self._show or not self._log.write(part):
                self._stream.write(part)
            if part.endswith("\n"):
                self._show = None
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self):
        return getattr(self._stream, "encoding", "utf-8")


@contextlib.contextmanager
def filtered(command: str, argv=()):
    """Yields the :class:`RunLog` (its first line: the command line); restores the streams afterwards."""
    log = RunLog(command, argv)
    if os.environ.get(RAW_ENV) == "raw":
        yield log
        log.close()
        return
    keep = TerminalFilter()
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Filtered(out, keep, log), _Filtered(err, keep, log)
    try:
        yield log
    finally:
        sys.stdout, sys.stderr = out, err
        log.close()
