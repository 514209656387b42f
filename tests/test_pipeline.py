"""The pipeline command end to end on a tiny Hugging Face model (a Qwen2) and real text: every stage, the report,
stage skipping (a re-run skips every completed stage), and a kill during distillation followed by a resume
(not a restart)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import CLI, REPO, cli, in_process
from hf_fixtures import make_hf_llama, make_hf_model


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    from nemo_minitron.data.corpus import shakespeare_files

    d = tmp_path_factory.mktemp("texts")
    out = {}
    for split, n in (("train", 60000), ("calibration", 20000), ("heldout", 20000)):
        f = d / f"{split}.txt"
        f.write_text("\n".join(p.read_text()[:n] for p in shakespeare_files(split)[:2]))
        out[split] = f
    return out


def _args(run_dir, teacher, texts):
    return [f"run_dir={run_dir}", f"teacher={teacher}", f"data.train={texts['train']}",
            f"data.calibration={texts['calibration']}", f"data.heldout={texts['heldout']}",
            "prune.hidden_size=48", "prune.ffn_hidden_size=96", "prune.calibration_samples=8", "prune.seq_length=32",
            "distill.max_steps=8", "distill.seq_length=32", "distill.micro_batch_size=2", "distill.global_batch_size=4",
            "distill.lr=3e-3", "distill.min_lr=3e-4", "distill.warmup_steps=1", "distill.val_check_interval=4",
            "distill.checkpoint_every=2", "evaluate.num_samples=8", "evaluate.seq_length=32",
            "evaluate.tasks=[piqa,arc_easy]", "evaluate.limit=4"]


def test_pipeline_end_to_end_with_kill_and_resume(texts, tmp_path):
    """Iterative compression too: round 1 prunes the teacher to hidden 56 / ffn 128 and distills it; the final
    round prunes round 1's student to hidden 48 / ffn 96 and distills it with that student as teacher. The teacher
    is a tiny Qwen2 from transformers (q/k/v biases: every stage, the export included, on a family beyond Llama;
    the stages' Llama paths are tested on their own and by the SmolLM2 tests)."""
    from nemo_minitron.checkpoint import nemo

    teacher = make_hf_model(tmp_path / "hf_teacher", "qwen2")
    run_dir = tmp_path / "run"
    args = _args(run_dir, teacher, texts) + [
        "rounds=[{prune: {hidden_size: 56, ffn_hidden_size: 128}, distill: {max_steps: 4}}]"]
    proc = subprocess.Popen([*CLI, "pipeline", *args], cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("[distill] step 5/8"):
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-30:])
    assert not (run_dir / "distill" / "student").exists() and not (run_dir / "report.json").exists()

    again = cli("pipeline", *args, timeout=900)
    out = again.stdout
    for stage in ("import", "preprocess_train", "preprocess_heldout", "round1_prune", "round1_distill", "prune"):
        assert f"[{stage}] complete, skipped" in out
    assert "[distill] resuming from" in out and "[distill] step 1/8" not in out
    ev_lines = [line for line in out.splitlines() if " -m nemo_minitron.cli evaluate " in line]
    assert len(ev_lines) == 1 and ev_lines[0].startswith("[evaluate] ")  # every model in one process
    assert out.strip().splitlines()[-1] == f"wrote report: {run_dir / 'report.md'}"
    # the killed pipeline and its killed distill stage left their run locks: taken over, then released
    lock = ".nemo-minitron.lock"
    assert (f"warning: taking over the lock {run_dir / lock} left by pipeline pid {proc.pid} (no longer running)"
            in again.stderr.splitlines())
    assert f"[distill] warning: taking over the lock {run_dir / 'distill' / lock} left by distill pid" in out
    assert not list(run_dir.rglob("*.lock"))

    rep = json.loads((run_dir / "report.json").read_text())
    for name in ("teacher", "pruned", "distilled"):
        assert rep[name]["heldout_loss"] > 0 and rep[name]["params"] > 0
    assert rep["pruned"]["params"] < rep["teacher"]["params"]
    assert rep["distilled"]["heldout_loss"] < rep["pruned"]["heldout_loss"]
    assert rep["exports"]["hf"] and rep["exports"]["nemo"].endswith(".nemo")
    exported = json.loads((Path(rep["exports"]["hf"]) / "config.json").read_text())
    assert exported["architectures"] == ["Qwen2ForCausalLM"] and exported["hidden_size"] == 48
    assert rep["exports"]["hf_transformers_heldout_loss"] == pytest.approx(rep["distilled"]["heldout_loss"], abs=1e-4)
    for png in rep["plots"]:
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert "training_curves.png" in rep["plots"] and any(p.startswith("pruning_") for p in rep["plots"])
    md = (run_dir / "report.md").read_text()
    assert "| distilled |" in md and "Wall time" in md
    # least-squares reconstruction (the default): the prune stage measured the refitted and the trimmed
    # student on the same held-out windows the evaluate stage reads
    rc = rep["reconstruction"]
    assert rc["pruned_least_squares_heldout_loss"] == pytest.approx(rep["pruned"]["heldout_loss"], abs=1e-4)
    assert rc["pruned_trimmed_heldout_loss"] > 0
    assert "Least-squares reconstruction (prune.reconstruction=least_squares" in md
    times = json.loads((run_dir / "stages.json").read_text())
    assert {"import", "prune", "distill", "evaluate", "export_hf", "export_nemo"} <= set(times)

    # iterative rounds: shapes, sources and teachers chain; the report lists every round
    r1 = run_dir / "round1"
    s1, s2 = nemo.read_spec(r1 / "pruned"), nemo.read_spec(run_dir / "pruned")
    assert (s1.hidden_size, s1.ffn_hidden_size) == (56, 128) and (s2.hidden_size, s2.ffn_hidden_size) == (48, 96)
    assert json.loads((run_dir / "pruned" / "pruning" / "report.json").read_text())["source"] == str(
        r1 / "distill" / "student")
    first = "".join(seen)
    distill_line = next(line for line in first.splitlines() if line.startswith("[distill] ") and " teacher=" in line)
    assert f"teacher={r1 / 'distill' / 'student'}" in distill_line
    assert "model.precision=null" in distill_line and "model.fp8=null" in distill_line  # precision keys reach distill
    assert "trainer.strategy.sequence_parallel=null" in distill_line and "optim.distributed_optimizer=true" in distill_line
    assert '"step": 4' in (r1 / "distill" / "metrics.jsonl").read_text()
    assert [k for k in rep if k in ("teacher", "round1_pruned", "round1_distilled", "pruned", "distilled")] == [
        "teacher", "round1_pruned", "round1_distilled", "pruned", "distilled"]
    assert rep["round1_distilled"]["heldout_loss"] < rep["round1_pruned"]["heldout_loss"]
    assert rep["teacher"]["params"] > rep["round1_distilled"]["params"] > rep["distilled"]["params"]
    assert "round1_distilled" in out and "| round1_pruned |" in md

    # downstream accuracy: every model on the same requests, a table with the teacher's share, a plot
    down = rep["downstream"]
    assert down["tasks"] == ["piqa", "arc_easy"] and "downstream.png" in rep["plots"]
    for name in ("teacher", "round1_pruned", "round1_distilled", "pruned", "distilled"):
        ev = json.loads((run_dir / "eval" / f"{name}.json").read_text())
        assert ev["tasks"]["piqa"]["n"] == 4 and ev["tasks"]["arc_easy"]["split"] == "validation"
        assert down["models"][name]["piqa"]["value"] == ev["tasks"]["piqa"]["metrics"]["acc_norm"][0]
        assert down["average"][name] == pytest.approx(
            (down["models"][name]["piqa"]["value"] + down["models"][name]["arc_easy"]["value"]) / 2)
    assert down["share_of_teacher"]["teacher"] == 1.0
    assert "## Downstream accuracy" in md and "| piqa | acc_norm | 4 | 0 | validation |" in md
    assert "downstream (piqa, arc_easy): average accuracy teacher" in out



def test_pipeline_refusals_before_any_work(texts, tmp_path, capsys, monkeypatch):
    teacher = make_hf_llama(tmp_path / "hf_teacher")
    # a round that cannot follow the previous one
    bad = in_process(capsys, "pipeline", f"run_dir={tmp_path / 'bad'}", f"teacher={teacher}", "prune.hidden_size=60",
                  "rounds=[{prune: {hidden_size: 48}}]")
    assert bad.returncode == 2 and "larger than the source" in bad.stderr and not (tmp_path / "bad").exists()
    bad = in_process(capsys, "pipeline", f"run_dir={tmp_path / 'bad'}", f"teacher={teacher}",
                  "rounds=[{prune: {hidden: 48}}]")
    assert bad.returncode == 2 and "unknown key" in bad.stderr and not (tmp_path / "bad").exists()
    # FP8 where it cannot run (no GPU / no Transformer Engine) is refused at start, nothing written; in-process,
    # with this CPU machine's platform forced (on a machine with CUDA and TE, FP8 would be accepted)
    from nemo_minitron.cli import main
    from nemo_minitron.model import precision

    monkeypatch.setattr(precision, "current", lambda: precision.Platform(cuda=False, te=False, capability=None))
    assert main(["pipeline", f"run_dir={tmp_path / 'fp8'}", f"teacher={teacher}", "model.fp8=hybrid"]) == 2
    assert "Transformer Engine" in capsys.readouterr().err and not (tmp_path / "fp8").exists()


def test_terminal_filter_keeps_megatrons_bucket_listing_in_the_log():
    """The stage output the pipeline's terminal shows: a NeMo log record and its continuation lines (megatron's
    per-parameter bucket listing) are not, our own lines are, indented or not."""
    from nemo_minitron.terminal import TerminalFilter

    lines = ["[NeMo I 2026-12-03 13:23:48 utils:707] Number of buckets for gradient all-reduce / reduce-scatter: 1\n",
             "    Params for bucket 1 (70896 elements, 71040 padded size):\n",
             *[f"    \tdecoder.layers.{i}.mlp.linear_fc1.weight\n" for i in range(30)],
             "step 1/80  loss 2.3147  kd 2.3147  lr 1.82e-05  397 tok/s  eta 0s\n",
             "  teacher 8.03B params (32 layers)\n",
             "[NeMo W 2026-12-03 13:23:48 nemo_logging:405] a warning\n",
             "validation at step 20: student LM loss 5.2230\n"]
    show = TerminalFilter()
    assert [line for line in lines if show(line)] == [lines[32], lines[33], lines[35]]


def test_stage_output_relay_draws_progress_bars_once_and_logs_everything():
    """A stage's tqdm bar (redrawn with \\r: 100 states) is one line on a non-terminal, its last state;
    Lightning's distributed banner stays in the log; the log keeps every byte."""
    import io

    from nemo_minitron.terminal import relay

    bar = "".join(f"\rcalibration: {i:3d}%|{'#' * (i // 10):<10}| {i}/100" for i in range(101)) + "\n"
    raw = ("importing ...\n" + bar + "Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/2\n"
           "distributed_backend=gloo\nAll distributed processes registered. Starting with 2 processes\n"
           "[NeMo I 2026-12-03 13:23:48 utils:707] Number of buckets: 1\n    \tdecoder.layers.0.mlp.linear_fc1.weight\n"
           "step 1/80  loss 2.3147\r\n" + bar.replace("calibration", "scoring")[:-1])  # the last bar ends unfinished
    log, out = io.StringIO(newline=""), io.StringIO()
    tail = relay(io.BytesIO(raw.encode()), log, "[prune] ", out)
    assert log.getvalue() == raw
    assert out.getvalue().splitlines() == ["[prune] importing ...", "[prune] calibration: 100%|##########| 100/100",
                                           "[prune] step 1/80  loss 2.3147", "[prune] scoring: 100%|##########| 100/100"]
    assert "step 1/80  loss 2.3147\n" in tail and not any("distributed" in x for x in out.getvalue().splitlines())
