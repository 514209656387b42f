"""One run per directory (nemo_minitron.runlock): a second run on a directory in use is refused with one line
naming the holder, while the first runs (real processes); a lock left by a dead process is taken over with
a warning; the lock itself (atomic creation, release, pid reuse, other hosts, inheritance by child stages,
the wait of non-zero ranks)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import CLI, REPO, cli, in_process

HOST = socket.gethostname()


@pytest.fixture
def sleeper():
    """A live process on this host (a lock holder that is still running)."""
    proc = subprocess.Popen(["sleep", "120"])
    yield proc
    proc.kill()
    proc.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()  # reaped: the pid names no process now
    return proc.pid


def _write_lock(path, pid, host=HOST, command="distill", process_start=None):
    rec = {"host": host, "pid": pid, "start_time": "2025-01-02T03:04:05+00:00", "start_epoch": 0.0,
           "process_start": process_start, "command": command, "directory": str(path.parent), "launch": ""}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))
    return rec


# ------------------------------------------------------------------------------------------------
# the lock itself
# ------------------------------------------------------------------------------------------------
def test_lock_is_taken_released_and_leaves_nothing(tmp_path, monkeypatch):
    from nemo_minitron.runlock import ENV, LOCK_NAME, RunLock

    monkeypatch.delenv(ENV, raising=False)
    run_dir = tmp_path / "a" / "run"
    with RunLock(run_dir, "distill") as lock:
        rec = json.loads((run_dir / LOCK_NAME).read_text())
        assert (rec["host"], rec["pid"], rec["command"]) == (HOST, os.getpid(), "distill")
        assert rec["start_time"][:4].isdigit() and "T" in rec["start_time"]
        assert str(lock.path) in json.loads(os.environ[ENV])  # what child stages inherit
        # a nested lock of the same directory (a stage of this run) goes on without taking it again
        with RunLock(run_dir, "search"):
            pass
        assert (run_dir / LOCK_NAME).is_file()
    assert not (tmp_path / "a").exists()  # the lock made them, nothing else filled them: removed
    assert ENV not in os.environ
    # a directory that was written to stays, without the lock
    with RunLock(run_dir, "distill"):
        (run_dir / "metrics.jsonl").write_text("{}\n")
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl"]
    # prune's lock beside its output (the checkpoint directory is replaced as a whole)
    out = tmp_path / "pruned"
    with RunLock(out, "prune", lock_path=tmp_path / "pruned.lock"):
        assert (tmp_path / "pruned.lock").is_file() and not out.exists()
    assert not (tmp_path / "pruned.lock").exists()


def test_lock_held_by_a_live_process_is_refused(tmp_path, sleeper, monkeypatch):
    from nemo_minitron.errors import UserError
    from nemo_minitron.runlock import ENV, LOCK_NAME, RunLock

    monkeypatch.delenv(ENV, raising=False)
    path = tmp_path / "run" / LOCK_NAME
    _write_lock(path, sleeper.pid)
    before = path.read_text()
    with pytest.raises(UserError) as e:
        with RunLock(tmp_path / "run", "distill"):
            pytest.fail("ran although the directory is in use")
    msg = str(e.value)
    assert "\n" not in msg and f"{tmp_path / 'run'} is in use by another run: distill pid {sleeper.pid} on {HOST}" in msg
    assert "started 2025-01-02T03:04:05+00:00" in msg and str(path) in msg
    assert path.read_text() == before  # untouched
    # another host's lock: its process cannot be checked from here, so it is refused even with a dead pid
    _write_lock(path, _dead_pid(), host="elsewhere-node-7")
    with pytest.raises(UserError, match=f"on elsewhere-node-7.*remove {path}"):
        RunLock(tmp_path / "run", "prune").acquire()


def test_stale_lock_is_taken_over_with_a_warning(tmp_path, capsys, sleeper, monkeypatch):
    from nemo_minitron.runlock import ENV, LOCK_NAME, RunLock, clear

    monkeypatch.delenv(ENV, raising=False)
    run_dir = tmp_path / "run"
    path = run_dir / LOCK_NAME
    dead = _dead_pid()
    _write_lock(path, dead, command="finetune")
    (run_dir / "old.txt").write_text("x")
    with RunLock(run_dir, "distill"):
        assert json.loads(path.read_text())["pid"] == os.getpid()
        err = capsys.readouterr().err
        assert err == f"warning: taking over the lock {path} left by finetune pid {dead} (no longer running)\n"
        clear(run_dir)  # overwrite=true: everything but the lock
        assert [p.name for p in run_dir.iterdir()] == [LOCK_NAME]
        # only our own lock is removed on exit: one that changed hands is left to its holder
        _write_lock(path, sleeper.pid)
    assert json.loads(path.read_text())["pid"] == sleeper.pid
    # a reused pid (a live process that started after the lock's holder) does not keep a dead run's lock
    _write_lock(path, sleeper.pid, process_start=12345.0)
    with RunLock(run_dir, "distill"):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"left by distill pid {sleeper.pid}" in capsys.readouterr().err and not path.exists()
    # another host's lock left by an earlier run of this SLURM job (requeued after a node failure): taken over
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    rec = _write_lock(path, 77, host="node-that-failed")
    path.write_text(json.dumps({**rec, "slurm_job": "4242", "slurm_restart": 0}))
    with RunLock(run_dir, "distill"):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert ("left by distill pid 77 (an earlier run of SLURM job 4242, since requeued)"
            in capsys.readouterr().err)
    path.write_text(json.dumps({**rec, "slurm_job": "4243", "slurm_restart": 0}))  # another job: refused
    from nemo_minitron.errors import UserError

    with pytest.raises(UserError, match="in use by another run: distill pid 77 on node-that-failed"):
        RunLock(run_dir, "distill").acquire()


def test_other_ranks_wait_for_rank0s_lock(tmp_path, sleeper, monkeypatch):
    """Before torch.distributed exists (distill/finetune), ranks > 0 go on once rank 0 of their launch holds
    the lock (or when no run holds it), and refuse when another run keeps holding it."""
    from nemo_minitron import runlock
    from nemo_minitron.errors import UserError

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    path = tmp_path / "run" / runlock.LOCK_NAME
    rec = _write_lock(path, sleeper.pid)
    rec.update(launch=runlock._launch_key(), start_epoch=time.time())
    path.write_text(json.dumps(rec))
    t0 = time.monotonic()
    runlock.RunLock(tmp_path / "run", "distill", wait_s=5)._wait_for_rank0()  # rank 0 of this launch: at once
    assert time.monotonic() - t0 < 2
    rec.update(launch="10.0.0.1|29500|||")  # another launch's run
    path.write_text(json.dumps(rec))
    with pytest.raises(UserError, match=f"in use by another run: distill pid {sleeper.pid}"):
        runlock.RunLock(tmp_path / "run", "distill", wait_s=0.5)._wait_for_rank0()
    path.unlink()  # no lock at all: nobody holds the directory (or rank 0 was quicker and already released it)
    t0 = time.monotonic()
    runlock.RunLock(tmp_path / "run", "distill", wait_s=5)._wait_for_rank0()
    assert time.monotonic() - t0 < 2


# ------------------------------------------------------------------------------------------------
# the commands
# ------------------------------------------------------------------------------------------------
def _distill_args(teacher, student, data, out, steps, ckpt_every=None):
    return [f"teacher={teacher}", f"student={student}", f"output={out}", f"data.train={data}",
            "data.seq_length=32", "data.micro_batch_size=2", "data.global_batch_size=4", f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={steps}", "trainer.log_every_n_steps=1",
            f"checkpoint.every_n_steps={ckpt_every or steps}", "optim.lr=1e-3", "optim.warmup_steps=1"]


def test_second_distill_is_refused_while_the_first_runs_then_a_stale_lock_is_taken_over(
        tiny_ckpt, tiny_student, tiny_data, tmp_path, capsys):
    from nemo_minitron.runlock import LOCK_NAME

    out = tmp_path / "kd"
    lock = out / LOCK_NAME
    log = tmp_path / "first.log"
    # the first run saves a checkpoint every 3 steps (NeMo moves a run directory's top-level files into run_N/
    # when it first saves: the lock must stay where it is)
    with open(log, "w") as fh:
        first = subprocess.Popen([*CLI, "distill", *_distill_args(tiny_ckpt, tiny_student, tiny_data, out, 100000, 3)],
                                 cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"),
                                 stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not lock.is_file():
            assert first.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        holder = json.loads(lock.read_text())
        assert (holder["pid"], holder["host"], holder["command"]) == (first.pid, HOST, "distill")
        present = {p.relative_to(out) for p in out.rglob("*")}
        # the second one even asks to start over: the lock is checked before anything is removed or written
        second = in_process(capsys, "distill", *_distill_args(tiny_ckpt, tiny_student, tiny_data, out, 2),
                         "overwrite=true")  # in this process (a refusal): sooner than a fresh process's start-up
        assert first.poll() is None, "the first run ended before the second was refused:\n" + log.read_text()[-3000:]
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        lines = second.stderr.strip().splitlines()
        errors = [line for line in lines if line.startswith("error:")]
        assert len(errors) == 1 and lines[-1] == errors[0], lines
        assert errors[0].startswith(f"error: {out} is in use by another run: distill pid {first.pid} on {HOST}, "
                                    f"started {holder['start_time']} (wait for it, or remove {lock}"), errors
        assert "distilling" not in second.stdout
        assert json.loads(lock.read_text()) == holder  # still the first run's, in its place
        assert present <= {p.relative_to(out) for p in out.rglob("*")}  # nothing of the first run was removed
        while not [c for c in (out / "checkpoints").glob("*") if "unfinished" not in c.name]:  # a save, holding it
            assert first.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        assert json.loads(lock.read_text()) == holder and not list(out.glob(f"run_*/{LOCK_NAME}"))
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # dies holding the lock
        first.wait(timeout=60)
    assert json.loads(lock.read_text())["pid"] == first.pid

    # its lock is stale now: the next run takes it over with a warning, starts over, completes, releases it
    third = cli("distill", *_distill_args(tiny_ckpt, tiny_student, tiny_data, out, 1), "overwrite=true")
    assert (f"warning: taking over the lock {lock} left by distill pid {first.pid} (no longer running)"
            in third.stderr.splitlines())
    assert third.stdout.strip().splitlines()[-1] == f"wrote checkpoint: {out / 'student'}"
    assert not lock.exists() and (out / "student" / "context" / "io.json").is_file()


def test_prune_search_and_pipeline_refuse_a_directory_in_use(tiny_ckpt, tiny_data, tmp_path, sleeper, monkeypatch):
    """In-process (the code the CLI runs): each refusal comes after the input checks and writes nothing."""
    from nemo_minitron import config
    from nemo_minitron.errors import UserError
    from nemo_minitron.runlock import ENV, LOCK_NAME

    monkeypatch.delenv(ENV, raising=False)
    # prune: its lock is OUTPUT.lock beside the output checkpoint
    out = tmp_path / "pruned"
    _write_lock(tmp_path / "pruned.lock", sleeper.pid, command="prune")
    from nemo_minitron.prune import command as prune_command

    with pytest.raises(UserError, match=f"{out} is in use by another run: prune pid {sleeper.pid}"):
        prune_command.run(config.load("prune", [f"model={tiny_ckpt}", f"output={out}",
                                                f"data.calibration={tiny_data}", "data.calibration_samples=4",
                                                "data.seq_length=32", "prune.ffn_hidden_size=96"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned.lock"]
    # search
    s_out = tmp_path / "search"
    _write_lock(s_out / LOCK_NAME, sleeper.pid, command="search")
    from nemo_minitron.search import command as search_command

    with pytest.raises(UserError, match=f"{s_out} is in use by another run: search pid {sleeper.pid}"):
        search_command.run(config.load("search", [f"model={tiny_ckpt}", f"output={s_out}", "search.phase=report"]))
    assert [p.name for p in s_out.iterdir()] == [LOCK_NAME]
    # pipeline: its run directory (its stages lock their own outputs inside it)
    run_dir = tmp_path / "run"
    _write_lock(run_dir / LOCK_NAME, sleeper.pid, command="pipeline")
    from nemo_minitron import pipeline

    with pytest.raises(UserError, match=f"{run_dir} is in use by another run: pipeline pid {sleeper.pid}"):
        pipeline.run(config.load("pipeline", [f"run_dir={run_dir}", f"teacher={tiny_ckpt}", "overwrite=true",
                                              "prune.hidden_size=48", "prune.ffn_hidden_size=96",
                                              "evaluate.tasks=[]"]))
    assert [p.name for p in run_dir.iterdir()] == [LOCK_NAME]


_OVERWRITE_RANK = r"""
import os, sys, time
from pathlib import Path
from nemo_minitron import runlock
from nemo_minitron.distill import command
from nemo_minitron.checkpoint import nemo as ck

slow = float(sys.argv[2])
clear = runlock.clear
runlock.clear = lambda d: (time.sleep(slow), clear(d))  # rank 0 is slow to empty the directory
complete = command._prepare_run_dir(Path(sys.argv[1]), True, "student")
print("redo" if complete else "complete", ck.is_checkpoint(Path(sys.argv[1]) / "student"), flush=True)
"""


def test_overwrite_is_safe_across_ranks(tiny_ckpt, tmp_path):
    """distill overwrite=true before the process group is up: rank 1 waits until rank 0 has emptied the run
    directory, so it neither reports the old student complete nor reads anything rank 0 is removing."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_ckpt, run / "student")  # a complete student from an earlier run
    (run / "checkpoints").mkdir()
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29911",
           "TORCHELASTIC_RUN_ID": f"overwrite-{time.time()}"}
    env.pop("SLURM_PROCID", None)
    script = tmp_path / "rank.py"
    script.write_text(_OVERWRITE_RANK)
    procs = {r: subprocess.Popen([sys.executable, script, run, "3" if r == 0 else "0"],
                                 env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (1, 0)}
    out = {r: p.communicate(timeout=120) for r, p in procs.items()}
    for r in (0, 1):
        assert procs[r].returncode == 0, out[r][1][-2000:]
        assert out[r][0].split() == ["redo", "False"], (r, out[r])
    assert sorted(p.name for p in run.iterdir()) == [runlock_mark()]


def runlock_mark():
    from nemo_minitron import runlock

    return runlock.CLEARED_NAME
