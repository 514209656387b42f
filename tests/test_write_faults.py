"""Kills and write errors during export and import (issue 18): real processes under a real file size limit
(``RLIMIT_FSIZE``: every write past it fails with EFBIG, as a full disk fails with ENOSPC) and a real SIGKILL.

Each failed write ends in one line ``error: cannot write OUTPUT: <OS error>`` (exit 2, no traceback), leaves
no output and no ``*.partial``, and leaves the source byte for byte as it was; a killed write leaves nothing
that looks complete, and the next run replaces its leftover."""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import CLI, REPO
from hf_fixtures import make_hf_llama

# below every weight file of the tiny models (bf16 safetensors ~360 KB, dist-checkpoint shards ~400 KB,
# .nemo ~800 KB), above anything Python and the libraries write while starting
FSIZE = 256 << 10


def _digest(path: Path) -> dict:
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file()}


def _limited_cli(*args) -> subprocess.CompletedProcess:
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE, FSIZE))

    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300, env=env,
                          cwd=REPO, preexec_fn=limit)


def _assert_write_refused(proc, out: Path):
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert lines[-1] == f"error: cannot write {out}: File too large", proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not os.path.lexists(out)
    assert not [p.name for p in out.parent.iterdir() if "partial" in p.name or "probe" in p.name]


@pytest.fixture
def source(tiny_ckpt, tmp_path):
    """A private copy of the tiny checkpoint (the session's must not be touched by a failing test)."""
    src = tmp_path / "src"
    shutil.copytree(tiny_ckpt, src)
    return src


@pytest.mark.parametrize("fmt", ["hf", "nemo"])
def test_export_write_error_is_one_line_and_leaves_nothing(fmt, source, tmp_path):
    before = _digest(source)
    out = tmp_path / "dest" / ("out.nemo" if fmt == "nemo" else "out")
    out.parent.mkdir()
    proc = _limited_cli("export", f"model={source}", f"format={fmt}", f"output={out}")
    _assert_write_refused(proc, out)
    assert _digest(source) == before


def test_import_write_error_is_one_line_and_leaves_nothing(tmp_path):
    src = make_hf_llama(tmp_path / "hf")
    before = _digest(src)
    out = tmp_path / "dest" / "ckpt"
    out.parent.mkdir()
    proc = _limited_cli("import", f"source={src}", f"output={out}")  # megatron dist-checkpointing's writers
    _assert_write_refused(proc, out)
    assert _digest(src) == before


def test_export_killed_mid_write_leaves_nothing_complete_and_reruns(source, tmp_path, dist_single):
    from transformers import AutoModelForCausalLM

    from nemo_minitron.checkpoint.export import export_hf

    before = _digest(source)
    out = tmp_path / "hf_out"
    log = tmp_path / "export.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", NEMO_MINITRON_PAUSE_AT="export_write",
               NEMO_MINITRON_PAUSE_SECONDS="300")
    with open(log, "w") as fh:
        proc = subprocess.Popen([*CLI, "export", f"model={source}", f"output={out}"], stdout=fh,
                                stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        deadline = time.time() + 240
        while "paused at export_write" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)  # the weights are written, the directory is not complete
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    partial = tmp_path / "hf_out.partial"
    assert not out.exists()  # nothing at OUTPUT: no loader can take it for an export
    assert (partial / "model.safetensors").is_file() and not (partial / "nemo_minitron_export.json").exists()
    assert _digest(source) == before

    # the next run replaces the leftover and completes
    export_hf(source, out, dtype="fp32")
    assert not partial.exists() and (out / "nemo_minitron_export.json").is_file()
    AutoModelForCausalLM.from_pretrained(str(out))


def test_unfinished_checkpoint_is_never_complete(tiny_ckpt, tiny_spec, tmp_path, dist_single):
    """A ``*.partial`` left by a killed save (here: a complete copy, the worst case) is not a checkpoint; the
    next save replaces it; publishing over an existing checkpoint leaves no half-removed one behind."""
    import torch

    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.checkpoint.loader import describe
    from nemo_minitron.errors import UserError
    from nemo_minitron.model import build

    partial = tmp_path / "ckpt.partial"
    shutil.copytree(tiny_ckpt, partial)
    assert ck.is_checkpoint(tiny_ckpt) and not ck.is_checkpoint(partial)
    for check in (ck.validate, describe):
        with pytest.raises(UserError, match="unfinished write"):
            check(partial)

    torch.manual_seed(0)
    out = ck.save(tmp_path / "ckpt", build(tiny_spec), tiny_spec)
    assert ck.is_checkpoint(out) and not partial.exists()
    ck.validate(out)
    new = tmp_path / "new.partial"
    shutil.copytree(tiny_ckpt, new)
    (new / "marker").write_text("new")
    ck.publish(new, out)
    assert (out / "marker").read_text() == "new" and ck.is_checkpoint(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_os_errors_wrapped_by_libraries_are_recognized(tmp_path):
    """The OS error behind a write failure, where safetensors / a worker process kept only its text."""
    import errno

    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.errors import UserError

    assert ck.os_error(RuntimeError("Error while serializing: I/O error: File too large (os error 27)")).errno == errno.EFBIG
    assert ck.os_error(RuntimeError("Worker failure: [Errno 28] No space left on device")).errno == errno.ENOSPC
    try:
        try:
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        except OSError as e:
            raise RuntimeError("wrapped") from e
    except RuntimeError as e:
        assert ck.os_error(e).errno == errno.EDQUOT
    assert ck.os_error(RuntimeError("unexpected pos 704 vs 598")) is None

    out, tmp = tmp_path / "out", tmp_path / "out.partial"
    with pytest.raises(UserError) as info:
        with ck.writing(out, tmp):
            tmp.mkdir()
            (tmp / "w").write_text("x")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "w"))
    assert str(info.value) == f"cannot write {out}: No space left on device"
    assert not tmp.exists()
    with pytest.raises(ValueError):  # not a write error: propagates unchanged, still cleaned up
        with ck.writing(out, tmp):
            tmp.mkdir()
            raise ValueError("a bug")
    assert not tmp.exists() and not out.exists()
