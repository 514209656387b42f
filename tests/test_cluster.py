"""The cluster's training path, run on CPU with gloo (2 and 4 processes): data parallelism, megatron's
distributed optimizer, bf16 mixed precision, sequence parallelism and their products against one process;
kill-and-resume and resharding of distributed-optimizer checkpoints; pruning and evaluation with DP > 1.

Every distillation here is the same 4-step run (global batch 8 x 32 tokens; KL + CE + an intermediate
cosine loss through a learned projection, so every loss term and the extra student parameter are in it),
launched once per layout and shared by the tests (``runs``)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO, cli, cli_here, commands, free_port, torchrun

pytestmark = pytest.mark.parallel
TRACE = "NEMO_MINITRON_TRACE_BATCHES"
TERMS = ("loss", "kd_loss", "lm_loss", "intermediate_loss")

# name: (processes, overrides). The reference materializes the logits (distill.fused_output=false); every
# other run fuses the output layers into the loss (the default), so the comparison covers that too.
LAYOUTS = {
    "single": (1, ["distill.fused_output=false"]),
    # DP=2 with Megatron's GPU performance settings, which change no number: gradient reduce-scatter overlapped
    # with the backward in small buckets (several per step), parameter all-gather overlapped with the next
    # forward, full activation recomputation of every layer
    "DP2": (2, ["optim.overlap_grad_reduce=true", "optim.overlap_param_gather=true", "optim.bucket_size=20000",
                "model.recompute_granularity=full", "model.recompute_method=uniform", "model.recompute_num_layers=1"]),
    "DP2_adam": (2, ["optim.distributed_optimizer=false"]),  # plain Adam, nothing overlapped or recomputed
    "TP2xDP2": (4, ["trainer.strategy.tensor_model_parallel_size=2"]),  # sequence parallelism: on by default at TP > 1
    "PP2xDP2": (4, ["trainer.strategy.pipeline_model_parallel_size=2"]),
    "TP2xPP2": (4, ["trainer.strategy.tensor_model_parallel_size=2", "trainer.strategy.pipeline_model_parallel_size=2"]),
    # bf16 against fp32 at a larger lr: with the tiny models' large weights (std 0.2, a bf16 step of 1e-3 to
    # 4e-3) updates below half a bf16 step would vanish in the 16-bit copy, which is bf16's nature, not a bug
    "fp32_lr1e-2": (1, ["optim.lr=1e-2"]),
    "bf16": (1, ["model.precision=bf16", "optim.lr=1e-2"]),
}
SHOWN = {"fp32_lr1e-2": "TP=1 PP=1 DP=1, fp32, distributed optimizer over DP=1",
         "single": "TP=1 PP=1 DP=1, fp32, distributed optimizer over DP=1",
         "DP2": "TP=1 PP=1 DP=2, fp32, distributed optimizer over DP=2, overlapped gradient reduce and "
                "parameter gather (buckets of 20,000)",
         "DP2_adam": "TP=1 PP=1 DP=2, fp32, Adam",
         "TP2xDP2": "TP=2 PP=1 DP=2 SP, fp32, distributed optimizer over DP=2",
         "PP2xDP2": "TP=1 PP=2 DP=2, fp32, distributed optimizer over DP=2",
         "TP2xPP2": "TP=2 PP=2 DP=1 SP, fp32, distributed optimizer over DP=1",
         "bf16": "TP=1 PP=1 DP=1, bf16, distributed optimizer over DP=1"}


def _args(t, s, data, out, *extra):
    return [f"teacher={t}", f"student={s}", f"output={out}", f"data.train={data}", f"data.validation={data}",
            "data.seq_length=32", "data.micro_batch_size=2", "data.global_batch_size=8", "data.num_val_samples=8",
            "trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.log_every_n_steps=1",
            "checkpoint.every_n_steps=2", "optim.lr=1e-3", "optim.warmup_steps=2", "distill.lm_weight=0.5",
            "distill.reverse_kl=true", "distill.intermediate_pairs=[[-1,-1]]", *extra]


def _launch(nproc, args, env=None):
    if nproc == 1:
        return cli("distill", *args, env=env)
    return torchrun(["-m", "nemo_minitron.cli", "distill", *args], nproc=nproc, env=env)


class Runs:
    """Each layout's distillation, run on first use (run directory, stdout, batch trace)."""

    def __init__(self, root, teacher, student, data):
        self.root, self.t, self.s, self.data = root, teacher, student, data
        self.out = {}

    def args(self, run_dir, *extra):
        return _args(self.t, self.s, self.data, run_dir, *extra)

    def get(self, name):
        """The run of layout ``name``; on first use, every layout with its number of processes runs, in one launch
        (``conftest.commands``: the processes pay NeMo's import once)."""
        if name not in self.out:
            nproc = LAYOUTS[name][0]
            group = [n for n, (np_, _) in LAYOUTS.items() if np_ == nproc and n not in self.out]
            outs = commands([{"name": n, "args": ["distill", *self.args(self.root / n, *LAYOUTS[n][1])],
                              "env": {TRACE: str(self.root / f"trace_{n}")}} for n in group], nproc=nproc)
            for n in group:
                d = self.root / n
                assert outs[n].strip().splitlines()[-1] == f"wrote checkpoint: {d / 'student'}", (n, outs[n][-3000:])
                self.out[n] = (d, outs[n])
        return self.out[name]

    def trace(self, name):
        return _global_batches(self.root / f"trace_{name}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_ckpt, tiny_student, tiny_data):
    return Runs(tmp_path_factory.mktemp("cluster"), tiny_ckpt, tiny_student, tiny_data)


def _metrics(run_dir):
    from nemo_minitron.distill.train import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")


def _global_batches(trace_dir) -> dict:
    """{(mode, step): sorted samples of the whole global batch} from every DP rank's trace (first PP stage,
    TP rank 0: the ranks that feed the model)."""
    out = {}
    for f in sorted(trace_dir.glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            if rec["tp_rank"] == 0 and rec["pp_rank"] == 0:
                out.setdefault((rec["mode"], rec["step"]), []).extend(rec["tokens"])
    return {k: sorted(v) for k, v in out.items()}


def _student_weights(run_dir):
    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.model import build

    m = build(ck.read_spec(run_dir / "student"), initialize=False)
    ck.load_weights(run_dir / "student", m)
    return {k: v.float() for k, v in m.state_dict().items() if torch.is_tensor(v)}


def _assert_same_curve(got, ref, steps, tol, what):
    for step in steps:
        for k in TERMS:
            assert got["train"][step][k] == pytest.approx(ref["train"][step][k], abs=tol, rel=tol), (what, step, k)
    for step, v in ref["val"].items():
        if step in got["val"]:
            assert got["val"][step] == pytest.approx(v, abs=tol, rel=tol), (what, "val", step)


def _assert_same_weights(a, b, tol, what):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=lambda m: f"{what} {k}: {m}")


# ------------------------------------------------------------------------------------------------
# every layout = one process with the same global batch
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["DP2", "TP2xDP2", "PP2xDP2", "TP2xPP2"])
def test_layout_matches_single_process(runs, dist_single, name):
    """Per-step loss terms and validation within 1e-5, final student weights within 1e-5, and each step read
    exactly the single process's global batch (split over the DP ranks)."""
    ref_dir, ref_out = runs.get("single")
    got_dir, out = runs.get(name)
    assert f"({SHOWN[name]})" in out and f"({SHOWN['single']})" in ref_out
    tp = 2 if "TP2" in name else 1
    assert f"model built: TP={tp} PP={2 if 'PP2' in name else 1} sequence_parallel={tp > 1} bf16=False" in out
    ref, got = _metrics(ref_dir), _metrics(got_dir)
    assert sorted(got["train"]) == [1, 2, 3, 4] and sorted(got["val"]) == [4]
    assert all(ref["train"][1][k] > 0 for k in TERMS)
    assert ref["train"][4]["kd_loss"] < ref["train"][1]["kd_loss"]  # it learns
    _assert_same_curve(got, ref, range(1, 5), 1e-5, name)
    _assert_same_weights(_student_weights(got_dir), _student_weights(ref_dir), 1e-5, name)
    want, batches = runs.trace("single"), runs.trace(name)
    assert {k for k in want if k[0] == "train"} == {("train", s) for s in range(1, 5)}
    for key, samples in want.items():
        assert batches[key] == samples, (name, key)
    assert len(want["train", 1]) == 8 and want["train", 1] != want["train", 2]


def test_distributed_optimizer_with_overlap_and_recompute_equals_adam_at_dp2(runs):
    """Megatron's distributed optimizer (Adam state sharded over DP=2, gradients reduce-scattered, parameters
    all-gathered), with optim.overlap_grad_reduce / overlap_param_gather / bucket_size and model.recompute_* (full,
    every layer), against plain Adam on the same DP=2 layout without any of them: the same per-step losses and
    validation (1e-6) and the same final student (1e-6: the last step's overlapped parameter all-gather is
    completed before the student is saved). One comparison for both claims (a launch fewer): a difference in
    either fails it."""
    dist_dir, out = runs.get("DP2")
    adam_dir, adam_out = runs.get("DP2_adam")
    assert f"({SHOWN['DP2_adam']})" in adam_out and f"({SHOWN['DP2']})" in out and "recompute=full uniform 1" in out
    ref, got = _metrics(adam_dir), _metrics(dist_dir)
    assert sorted(got["train"]) == [1, 2, 3, 4] and sorted(got["val"]) == [4]
    _assert_same_curve(got, ref, range(1, 5), 1e-6, "distributed optimizer + overlap + recompute vs Adam")
    _assert_same_weights(_student_weights(dist_dir), _student_weights(adam_dir), 1e-6,
                         "distributed optimizer + overlap + recompute vs Adam")
    from torch.distributed.checkpoint import FileSystemReader

    def optim_keys(run_dir):
        last = sorted((run_dir / "checkpoints").glob("*-last"))[-1]
        return {k for k in FileSystemReader(str(last / "weights")).read_metadata().state_dict_metadata
                if k.startswith("optimizer.")}
    assert any(k.startswith("optimizer.state.param.") for k in optim_keys(dist_dir))  # fp32 main params, resharded
    last = sorted((dist_dir / "checkpoints").glob("*-last"))[-1]
    meta = torch.load(last / "weights" / "common.pt", weights_only=False)["content_metadata"]
    assert meta["distrib_optim_sharding_type"] == "fully_reshardable"  # checkpoint.optim_fully_reshardable


def test_bf16_mixed_precision_close_to_fp32_with_fp32_main_params(runs):
    """model.precision=bf16 on CPU: the per-step losses within 2e-2 of fp32; the model (and the checkpoint's
    weights) are bf16 while the optimizer keeps fp32 main parameters and Adam moments."""
    from torch.distributed.checkpoint import FileSystemReader

    bf_dir, out = runs.get("bf16")
    assert f"({SHOWN['bf16']})" in out and "model built: TP=1 PP=1 sequence_parallel=False bf16=True" in out
    ref, got = _metrics(runs.get("fp32_lr1e-2")[0]), _metrics(bf_dir)
    assert ref["train"][4]["loss"] < ref["train"][1]["loss"] - 0.5 and got["train"][4]["loss"] < got["train"][1]["loss"] - 0.5
    for step in range(1, 5):
        for k in TERMS:
            assert got["train"][step][k] == pytest.approx(ref["train"][step][k], abs=2e-2), (step, k)
    assert any(got["train"][s]["loss"] != ref["train"][s]["loss"] for s in range(1, 5))  # really another precision
    last = sorted((bf_dir / "checkpoints").glob("*-last"))[-1]
    meta = FileSystemReader(str(last / "weights")).read_metadata().state_dict_metadata
    dtypes = {k: v.properties.dtype for k, v in meta.items() if getattr(v, "properties", None) is not None}
    weights = {k: d for k, d in dtypes.items() if k.startswith("module.")}
    main = {k: d for k, d in dtypes.items() if k.startswith("optimizer.state.param.")}
    moments = {k: d for k, d in dtypes.items() if k.startswith("optimizer.state.exp_avg")}
    assert weights and set(weights.values()) == {torch.bfloat16}
    assert len(main) == len(weights) and set(main.values()) == {torch.float32}
    assert moments and set(moments.values()) == {torch.float32}


# ------------------------------------------------------------------------------------------------
# kill and resume; resharding a checkpoint to another layout
# ------------------------------------------------------------------------------------------------
def test_kill_and_resume_at_tp2_dp2_with_distributed_optimizer(runs, dist_single, tmp_path):
    """SIGKILL in the middle of the step-4 checkpoint save (its files written, NeMo's unfinished marker not yet
    removed; the save is held there by a test hook), re-run: it resumes from the complete step-2 checkpoint
    with the uninterrupted run's loss curve, samples from the resumed step on, and final weights, exactly;
    TensorBoard, lr schedule and a finished run."""
    full_dir, _ = runs.get("TP2xDP2")
    run = tmp_path / "killed"
    args = runs.args(run, *LAYOUTS["TP2xDP2"][1])
    env = dict(os.environ, PYTHONUNBUFFERED="1", NEMO_MINITRON_PAUSE_AT="checkpoint_save@4",
               **{TRACE: str(tmp_path / "trace_killed")})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=4", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "nemo_minitron.cli", "distill", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "paused at checkpoint_save@4" in line:
            import psutil  # torchrun starts its workers in their own sessions: kill the launcher and each rank

            for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
                p.send_signal(signal.SIGKILL)  # no clean-up, a real crash
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-30:])
    assert not (run / "student").exists()
    assert list((run / "checkpoints").glob("*-unfinished")), "killed after the save completed"
    again = _launch(4, args, env={TRACE: str(tmp_path / "trace_again")})
    assert "resuming from" in again.stdout and "step 1/4" not in again.stdout and "step 3/4" in again.stdout
    assert "step=1" in again.stdout.split("resuming from")[1].splitlines()[0]  # the step-2 checkpoint
    ref, got = _metrics(full_dir), _metrics(run)
    for step in range(1, 5):
        for k in TERMS:
            assert got["train"][step][k] == ref["train"][step][k], (step, k)  # exact on CPU
    assert got["val"] == ref["val"]
    assert ref["train"][4]["lr"] == pytest.approx(1e-5)  # cosine decay reached min_lr
    want, after = runs.trace("TP2xDP2"), _global_batches(tmp_path / "trace_again")
    assert min(s for m, s in after if m == "train") == 3
    for key in after:
        assert after[key] == want[key], key
    a, b = _student_weights(full_dir), _student_weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in (run / "tb").glob("events.out.tfevents.*"):  # the killed run's and the resumed run's
        ea = EventAccumulator(str(events))
        ea.Reload()
        tags |= set(ea.Tags()["scalars"])
    assert {"train/kd_loss", "train/lr", "train/tokens_per_s", "val_loss"} <= tags
    assert not list((run / "checkpoints").glob("*teacher*"))


def _resume_copy(src_dir, dst_dir):
    """A copy of a finished run cut back to its step-2 checkpoint (as if it had stopped there)."""
    shutil.copytree(src_dir, dst_dir)
    ckpts = dst_dir / "checkpoints"
    for p in ckpts.iterdir():
        if p.name != "step=1":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    (ckpts / "step=1").rename(ckpts / "step=1-last")  # NeMo resumes from the newest "-last"
    shutil.rmtree(dst_dir / "student")
    (dst_dir / "metrics.jsonl").unlink()


@pytest.mark.parametrize("src,dst", [("TP2xDP2", "single"), ("single", "TP2xDP2")],
                         ids=["TP2xDP2-to-TP1xDP1", "TP1xDP1-to-TP2xDP2"])
def test_checkpoint_resumes_at_another_layout(runs, src, dst, tmp_path):
    """A distributed-optimizer checkpoint written at one layout resumes at the other (megatron's fully
    reshardable optimizer format): the remaining steps read the same samples and give the uninterrupted
    run's losses within 1e-5."""
    src_dir, _ = runs.get(src)
    run = tmp_path / "resumed"
    _resume_copy(src_dir, run)
    nproc, extra = LAYOUTS[dst]
    p = _launch(nproc, runs.args(run, *extra), env={TRACE: str(tmp_path / "trace")})
    assert "resuming from" in p.stdout and "step 1/4" not in p.stdout
    got = _metrics(run)
    assert sorted(got["train"]) == [3, 4]
    _assert_same_curve(got, _metrics(src_dir), [3, 4], 1e-5, f"{src} -> {dst}")
    after, want = _global_batches(tmp_path / "trace"), runs.trace(src)
    assert sorted(k for k in after if k[0] == "train") == [("train", 3), ("train", 4)]  # consumed samples kept
    for key in after:
        assert after[key] == want[key], key
    if nproc == 1:  # a finished run is not redone
        assert "already complete" in _launch(nproc, runs.args(run, *extra)).stdout


# ------------------------------------------------------------------------------------------------
# pruning and evaluation with data parallelism
# ------------------------------------------------------------------------------------------------
def _prune_args(tiny_ckpt, tiny_data, out):
    return ["prune", f"model={tiny_ckpt}", f"output={out}", f"data.calibration={tiny_data}",
            "data.calibration_samples=16", "data.seq_length=32", "data.micro_batch_size=2", "prune.depth_samples=8",
            "prune.num_layers=3", "prune.hidden_size=48", "prune.ffn_hidden_size=96", "prune.num_attention_heads=2"]


def test_pruning_with_data_parallelism_equals_one_process(tiny_ckpt, tiny_data, dist_single, tmp_path, capsys):
    """Depth (lm_loss, prefix reused) and width pruning with least-squares reconstruction at DP=2 and at
    TP=2 x DP=2: each DP rank calibrates on its share of the windows and the statistics (importance, Gram
    matrices) are reduced over DP; importance scores, layer scores, calibration loss and the pruned, refitted
    weights equal the single process's."""
    single = tmp_path / "single"
    cli_here(capsys, *_prune_args(tiny_ckpt, tiny_data, single))
    ref = torch.load(single / "pruning" / "scores.pt", weights_only=False)
    ref_rep = json.loads((single / "pruning" / "report.json").read_text())
    ref_w = _student_weights_of(single)
    for nproc, extra, shown in ((2, [], "TP=1 PP=1 DP=2"), (4, ["trainer.strategy.tensor_model_parallel_size=2"],
                                                            "TP=2 PP=1 DP=2")):
        out = tmp_path / f"np{nproc}"
        p = torchrun(["-m", "nemo_minitron.cli", *_prune_args(tiny_ckpt, tiny_data, out), *extra], nproc=nproc)
        assert f"calibration over {shown}: 8 windows per DP rank" in p.stdout
        # DP alone: the same float32 forward on each window, float64 sums merged in another order (1e-12);
        # TP=2 also splits the matmuls' float32 reductions over two ranks (1e-5, as every TP comparison)
        tol = 1e-12 if nproc == 2 else 1e-5
        got = torch.load(out / "pruning" / "scores.pt", weights_only=False)
        for k in ("heads", "ffn", "hidden"):
            torch.testing.assert_close(got[k], ref[k], rtol=tol, atol=0, msg=lambda m: f"{shown} {k}: {m}")
        rep = json.loads((out / "pruning" / "report.json").read_text())
        assert rep["plan"] == ref_rep["plan"] and rep["depth"]["dropped_layers"] == ref_rep["depth"]["dropped_layers"]
        for key in ("base_loss", "scores"):
            assert rep["depth"][key] == pytest.approx(ref_rep["depth"][key], rel=max(tol, 1e-6)), (shown, key)
        assert rep["calibration_loss"] == pytest.approx(ref_rep["calibration_loss"], rel=max(tol, 1e-9))
        w = _student_weights_of(out)
        assert w.keys() == ref_w.keys(), shown
        for k in w:  # least-squares refit (the default): Gram matrices summed in another order, TP-split matmuls
            torch.testing.assert_close(w[k], ref_w[k], rtol=1e-5, atol=1e-5, msg=lambda m: f"{shown} {k}: {m}")
        assert rep["reconstruction"] == "least_squares" and len(rep["reconstruction_info"]["layers"]) == 3


def _student_weights_of(ckpt):
    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.model import build

    m = build(ck.read_spec(ckpt), initialize=False)
    ck.load_weights(ckpt, m)
    return {k: v for k, v in m.state_dict().items() if torch.is_tensor(v)}


# ------------------------------------------------------------------------------------------------
# what cannot run is refused at start, in one line
# ------------------------------------------------------------------------------------------------
def test_impossible_layouts_refused(tiny_ckpt, tiny_student, tiny_data, tmp_path, capsys, monkeypatch):
    from nemo_minitron.cli import main

    out = tmp_path / "out"
    base = _args(tiny_ckpt, tiny_student, tiny_data, out)
    cases = [
        (["trainer.strategy.sequence_parallel=true"], "1", "sequence_parallel=true needs tensor parallelism"),
        (["trainer.strategy.tensor_model_parallel_size=2"], "3", "world size 3 is not divisible by TP*PP"),
        (["trainer.strategy.tensor_model_parallel_size=2", "data.seq_length=33"], "2", "not divisible by TP=2"),
        (["model.precision=fp8"], "1", "model.precision='fp8'"),
        (["data.global_batch_size=6"], "4", "not divisible"),
    ]
    for extra, world, msg in cases:
        monkeypatch.setenv("WORLD_SIZE", world)
        assert main(["distill", *base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and msg in err, (msg, err)
    monkeypatch.setenv("WORLD_SIZE", "4")  # DP=4: 16 calibration windows do not split into 4 x micro-batch 8
    assert main([*_prune_args(tiny_ckpt, tiny_data, out), "data.micro_batch_size=8"]) == 2
    assert "data-parallel size 4" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["finetune", f"model={tiny_ckpt}", f"output={out}", f"data.train={tiny_data}",
                 "trainer.strategy.sequence_parallel=true"]) == 2
    assert "trainer.strategy.sequence_parallel=true needs tensor parallelism" in capsys.readouterr().err
    assert not out.exists()
