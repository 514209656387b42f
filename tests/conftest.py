"""Shared fixtures: tiny megatron models (well under 1M parameters), their NeMo checkpoints, token
windows, and a torchrun launcher for 2-process CPU (gloo) runs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
WORKERS = Path(__file__).resolve().parent / "workers"
CLI = [sys.executable, "-m", "nemo_minitron.cli"]

os.environ.setdefault("PYTHONWARNINGS", "ignore")

# `make test` runs two files at a time (xdist --dist loadfile --no-loadscope-reorder): files start in this
# order, the longest first (measured on 2 cores, seconds), so the short ones fill the end instead of one
# long file running alone after everything else (xdist's own order is by number of tests: the one-test
# SmolLM2 files came last). Files not listed follow, in their usual order.
LONGEST_FIRST = ("test_slurm.py",        # ~1000
                 "test_cluster.py",      # ~850
                 "test_moe.py",          # ~700
                 "test_parallel.py",     # ~400
                 "test_search.py",       # ~350
                 "test_pipeline.py",     # ~300
                 "test_smollm2_prune.py",  # ~300
                 "test_distill.py",      # ~300
                 "test_faults.py",       # ~280
                 "test_downstream.py",   # ~260
                 "test_depth.py",        # ~250
                 "test_gpu_path.py",     # ~200
                 "test_export.py", "test_prune.py", "test_reconstruct.py", "test_data.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: order within a file kept


_PORT_SPAN = 5000
_next_port = [None]


def free_port() -> int:
    """A port for torchrun's rendezvous that nothing else can take before torchrun listens on it.

    ``bind(0)`` would hand out a port from the kernel's ephemeral range (32768-60999), where every gloo
    connection of every other test also gets its port: CI once lost one to EADDRINUSE between the check and
    torchrun's listen. Ports below that range are never assigned automatically, and each xdist worker
    walks its own slice (gw0 10000-14999, gw1 15000-19999, ...), so only our own explicit binds compete.
    (SLURM jobs use 20000 + job id, see slurm/common.sh.)
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    lo = 10000 + (_PORT_SPAN * (int(worker[2:]) if worker[2:].isdigit() else 0)) % 10000
    if _next_port[0] is None:
        _next_port[0] = os.getpid() % _PORT_SPAN
    for _ in range(_PORT_SPAN):
        port = lo + _next_port[0] % _PORT_SPAN
        _next_port[0] += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {lo}-{lo + _PORT_SPAN - 1}")


def run(cmd, timeout=600, check=True, env=None, cwd=None):
    """Run a command; on failure show its output. Returns the CompletedProcess (text)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                          env=full_env, cwd=cwd or REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n"
                             f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def torchrun(args, nproc=2, timeout=600, check=True, env=None):
    """``torchrun --nproc-per-node nproc`` on CPU: one gloo process per rank, 1 thread each."""
    for attempt in range(3):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               "--master-addr=127.0.0.1", f"--master-port={free_port()}", *args]
        proc = run(cmd, timeout=timeout, check=False, env=env)
        # the rendezvous store could not listen: nothing ran yet, so another port is a clean retry
        if not (proc.returncode != 0 and "EADDRINUSE" in proc.stderr and "TCPStore" in proc.stderr):
            break
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n"
                             f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def cli(*args, timeout=600, check=True, env=None):
    return run([*CLI, *args], timeout=timeout, check=check, env=env)


def commands(runs: list, nproc: int = 1, timeout: int = 900, env=None) -> dict:
    """Several CLI commands (``runs``: [{"name", "args", "env"}], each its own layout) in one launch of ``nproc``
    processes (``tests/workers/commands.py``): {name: that run's output (rank 0)}."""
    import json

    sys.path.insert(0, str(WORKERS))
    from commands import split

    args = [WORKERS / "commands.py", json.dumps([dict(r, args=[str(a) for a in r["args"]]) for r in runs])]
    p = run([sys.executable, *args], timeout=timeout, env=env) if nproc == 1 else \
        torchrun(args, nproc=nproc, timeout=timeout, env=env)
    return split(p.stdout)


def in_process(capsys, *args):
    """The CLI's entry point (``nemo_minitron.cli.main``) run in this process on ``args`` (a refusal, or a step as
    quick as preprocessing a small text): a CompletedProcess-like record (returncode, stdout, stderr). A fresh
    process would pay NeMo's ~15 s import first; the one-line-error contract of a real process is proven for every
    kind of bad input in tests/test_bad_input.py."""
    from types import SimpleNamespace

    from megatron.core import parallel_state

    from nemo_minitron import parallel
    from nemo_minitron.cli import main

    single = parallel_state.model_parallel_is_initialized()
    if capsys is not None:
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
    else:  # a module or session fixture, which cannot take capsys: the streams are redirected
        import contextlib
        import io

        o, e = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
            code = main([str(a) for a in args])
        out, err = o.getvalue(), e.getvalue()
    if single and not parallel_state.model_parallel_is_initialized():
        parallel.initialize(1, 1)  # a command ends with parallel.destroy(): the session's dist_single state again
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


def cli_here(capsys, *args):
    """:func:`in_process` for a command that must succeed (a failure shows its output): a single-process command
    (prune, evaluate, export, import, convert, a search's rank phase) without a fresh process's NeMo import."""
    p = in_process(capsys, *args)
    if p.returncode != 0:
        raise AssertionError(f"command failed ({p.returncode}): {' '.join(map(str, args))}\n"
                             f"--- stdout ---\n{p.stdout[-6000:]}\n--- stderr ---\n{p.stderr[-6000:]}")
    return p


@pytest.fixture(scope="session")
def dist_single():
    """Single-process parallel state (TP=1, PP=1) in the pytest process."""
    from nemo_minitron import parallel

    parallel.initialize(1, 1)
    yield
    # left initialized for the session; the process ends after the tests


@pytest.fixture(scope="session")
def tiny_spec():
    from nemo_minitron.model import tiny_spec

    return tiny_spec()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_spec, dist_single):
    """A NeMo 2 checkpoint of a randomly initialized tiny Llama, saved at TP=1/PP=1."""
    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.model import build

    torch.manual_seed(0)
    model = build(tiny_spec)
    with torch.no_grad():  # larger than megatron's init, so layers matter for the loss
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("tiny") / "ckpt"
    ck.save(path, model, tiny_spec)
    return path


# tiny random models of the families beyond Llama, from transformers: name -> (model_type, config overrides);
# 4 layers, so that PP=2 splits them
FAMILY_MODELS = {"qwen2": ("qwen2", dict(num_hidden_layers=4)),
                 "qwen2-tied": ("qwen2", dict(num_hidden_layers=4, tie_word_embeddings=True)),
                 "qwen3": ("qwen3", dict(num_hidden_layers=4))}


@pytest.fixture(scope="session")
def family_ckpts(tmp_path_factory, dist_single):
    """{name: (HF directory, imported NeMo checkpoint)} for every tiny model of :data:`FAMILY_MODELS`."""
    from hf_fixtures import make_and_import

    return make_and_import(tmp_path_factory.mktemp("families"), FAMILY_MODELS)


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory, dist_single):
    """A smaller tiny Llama (2 layers, hidden 48, ffn 96): a student that is not a slice of the teacher."""
    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.model import build, tiny_spec

    spec = tiny_spec(num_layers=2, hidden_size=48, ffn_hidden_size=96)
    torch.manual_seed(1)
    model = build(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("student") / "ckpt"
    ck.save(path, model, spec)
    return path


@pytest.fixture(scope="session")
def tiny_windows(tiny_spec, tmp_path_factory):
    """Fixed token windows [8, 33] for the tiny model, also saved to disk for workers."""
    g = torch.Generator().manual_seed(1)
    w = torch.randint(0, tiny_spec.vocab_size, (8, 33), generator=g)
    path = tmp_path_factory.mktemp("windows") / "windows.pt"
    torch.save(w, path)
    return w, path


class ByteTokenizer:
    """A byte-level tokenizer (vocab 256) for the tiny models' datasets."""

    eos_token_id = 255

    def __len__(self):
        return 256

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [b for b in text.encode("utf-8") if b != 255]}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A Megatron indexed dataset of real English text in byte tokens (for the tiny models)."""
    from nemo_minitron.data import indexed
    from nemo_minitron.data.corpus import shakespeare_files

    prefix = tmp_path_factory.mktemp("bytes") / "macbeth"
    text = [f.read_text()[:40000] for f in shakespeare_files("heldout")]
    indexed.write(prefix, text, ByteTokenizer(), progress=False)
    return prefix


@pytest.fixture(scope="session")
def second_data(tmp_path_factory):
    """Another byte-token dataset (other plays), the second component of blends."""
    from nemo_minitron.data import indexed
    from nemo_minitron.data.corpus import shakespeare_files

    prefix = tmp_path_factory.mktemp("bytes2") / "calibration"
    indexed.write(prefix, [f.read_text()[:20000] for f in shakespeare_files("calibration")], ByteTokenizer(),
                  progress=False)
    return prefix


@pytest.fixture(scope="session")
def smol(tmp_path_factory):
    """SmolLM2-135M imported, and the held-out and calibration plays preprocessed with its tokenizer; built once
    per test session and shared by the xdist workers (the first one builds it under a file lock)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's directory, above every worker's own
    d = root / "smol_shared"
    with FileLock(str(root / "smol_shared.lock")):
        if not (d / "done").is_file():
            import shutil

            shutil.rmtree(d, ignore_errors=True)
            _build_smol(d)
            (d / "done").write_text("ok")
    return d


def _build_smol(d):
    from nemo_minitron.data.corpus import shakespeare_files

    imp = cli_here(None, "import", "source=smollm2-135m", f"output={d / 'ckpt'}")
    assert imp.stdout.strip().splitlines()[-1] == f"wrote checkpoint: {d / 'ckpt'}"
    assert "rope base 100000.0" in imp.stdout  # SmolLM2's RoPE base survived (STACK.md's trap)
    files = ",".join(str(f) for f in shakespeare_files("heldout"))
    pre = cli_here(None, "preprocess", f"input={files}", f"tokenizer={d / 'ckpt'}", f"output_prefix={d / 'heldout'}")
    assert pre.stdout.strip().splitlines()[-1].startswith("wrote dataset:")
    assert "4 documents" in pre.stdout
    cal = ",".join(str(f) for f in shakespeare_files("calibration"))
    cli_here(None, "preprocess", f"input={cal}", f"tokenizer={d / 'ckpt'}", f"output_prefix={d / 'calibration'}")




def nemo_fit_with_callback(source_ckpt, callback, data_prefix, steps: int, lr: float = 0.0, extra_callbacks=()):
    """Run NeMo's trainer (nl.Trainer + MegatronStrategy, CPU, fp32) with ``callback`` for ``steps`` steps
    at ``lr``, on a LlamaModel configured like ``source_ckpt``. Returns the trained megatron module."""
    from megatron.core.optimizer import OptimizerConfig
    from nemo import lightning as nl
    from nemo.collections import llm

    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.data.blend import training_settings
    from nemo_minitron.data.module import GPTDataModule
    from nemo_minitron.model.build import instantiate

    model = llm.LlamaModel(instantiate(ck.read_spec(source_ckpt)), optim=nl.MegatronOptimizerModule(
        OptimizerConfig(optimizer="adam", lr=lr, min_lr=lr, use_distributed_optimizer=False, clip_grad=0.0)))
    trainer = nl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                         limit_val_batches=0, num_sanity_val_steps=0, callbacks=[callback, *extra_callbacks],
                         strategy=nl.MegatronStrategy(), plugins=nl.MegatronMixedPrecision(precision="32"))
    data = GPTDataModule(training_settings(str(data_prefix), 32, 2, 2), Path(data_prefix).parent / f"index_{steps}")
    trainer.fit(model, data)
    trained = model.module
    while hasattr(trained, "module"):
        trained = trained.module
    return model, trained
