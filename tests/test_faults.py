"""Faults on long runs: non-finite steps are skipped and stop the run at the limit; the teacher is read for
real (every tensor, its loss logged); teacher correction changes the teacher the distillation then uses.

NaNs are injected through the test-only hook ``NEMO_MINITRON_NONFINITE`` (nemo_minitron/faults.py): the
named loss term of one micro-batch becomes NaN, so its gradients are NaN too, as with a real overflow.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from conftest import cli

FAULT = "NEMO_MINITRON_NONFINITE"


def _args(teacher, student, data, out, steps, *extra):
    return [f"teacher={teacher}", f"student={student}", f"output={out}", f"data.train={data}",
            f"data.validation={data}", "data.seq_length=32", "data.micro_batch_size=2", "data.global_batch_size=4",
            "data.num_val_samples=8", f"trainer.max_steps={steps}", "trainer.val_check_interval=4",
            "trainer.log_every_n_steps=1", "optim.lr=3e-3", "optim.warmup_steps=1", *extra]


def _metrics(run_dir):
    from nemo_minitron.distill.train import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")


def _weights(ckpt_dir, spec):
    """The student's weights in a trainer checkpoint (``RUN/checkpoints/step=N``) or a final checkpoint."""
    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.model import build

    m = build(spec, initialize=False)
    ck.load_weights(ckpt_dir, m, strict=False)
    return {k: v.clone() for k, v in m.state_dict().items() if torch.is_tensor(v) and not k.endswith("_extra_state")}


def _step_ckpt(run_dir, step):
    """The trainer checkpoint saved after ``step`` (NeMo names it by the 0-based step index)."""
    found = [p for p in (run_dir / "checkpoints").iterdir() if p.is_dir() and p.name.startswith(f"step={step - 1}")]
    assert found, sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    return found[0]


def _first_val_batch_loss(ckpt, data_prefix, steps) -> float:
    """The LM loss of ``ckpt`` on the distillation's first validation batch, rebuilt here the way the run
    builds it (NeMo's data module over megatron's GPT dataset, the same settings)."""
    from nemo_minitron import config
    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.data.blend import settings_from
    from nemo_minitron.data.module import GPTDataModule
    from nemo_minitron.model import build
    from nemo_minitron.model.forward import lm_loss

    cfg = config.load("distill", _args("t", "s", data_prefix, "o", steps))
    s = settings_from(cfg.data)
    dm = GPTDataModule(s, data_prefix.parent / f"index_val_{steps}")
    val_interval = min(cfg.trainer.val_check_interval, steps)
    dm.build(steps, val_interval, s.num_val_samples // s.global_batch_size, 0)
    samples = [dm._validation_ds[i] for i in range(s.global_batch_size)]
    windows = torch.stack([torch.cat([x["tokens"], x["labels"][-1:]]) for x in samples])
    model = build(ck.read_spec(ckpt), initialize=False)
    ck.load_weights(ckpt, model)
    model.eval()
    with torch.no_grad():
        total, count = lm_loss(model, windows, s.micro_batch_size)
    return total / count


def test_nonfinite_step_skipped_in_teacher_correction_and_distillation(tiny_ckpt, tiny_student, tiny_data,
                                                                          tmp_path, dist_single):
    """lm_loss NaN in the teacher correction's step 2 and kd_loss NaN in one micro-batch of distillation step
    3: both steps are skipped (weights, optimizer and lr schedule unchanged), logged, and both runs finish
    with finite weights. The corrected teacher differs from the original and is the one distillation uses."""
    from nemo_minitron.checkpoint import nemo as ck

    out = tmp_path / "run"
    p = cli("distill", *_args(tiny_ckpt, tiny_student, tiny_data, out, 4, "checkpoint.every_n_steps=1",
                              "checkpoint.keep=10", "distill.lm_weight=0", "distill.teacher_correction=true",
                              "finetune.max_steps=3", "finetune.lr=1e-2", "finetune.warmup_steps=1"),
            env={FAULT: "lm_loss@2;kd_loss@3:1"})
    assert "step 2: lm_loss is not finite: step skipped" in p.stdout  # teacher correction
    assert "step 3: kd_loss is not finite: step skipped" in p.stdout  # distillation
    corrected = out / "teacher_corrected" / "model"
    ft, kd = _metrics(out / "teacher_corrected"), _metrics(out)
    assert ft["train"][2]["skipped"] == "lm_loss" and math.isnan(ft["train"][2]["loss"])
    assert ft["train"][2]["lr"] == ft["train"][1]["lr"] != ft["train"][3]["lr"]  # no scheduler step at 2
    assert kd["train"][3]["skipped"] == "kd_loss" and math.isnan(kd["train"][3]["loss"])
    assert kd["train"][4]["skipped_steps"] == 1 and "skipped" not in kd["train"][4]
    assert kd["train"][3]["lr"] == kd["train"][2]["lr"] != kd["train"][4]["lr"]
    assert math.isfinite(kd["train"][4]["kd_loss"])
    spec = ck.read_spec(tiny_student)
    w2, w3, w4 = (_weights(_step_ckpt(out, s), spec) for s in (2, 3, 4))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)  # the skipped step changed nothing
    assert any(not torch.equal(w3[k], w4[k]) for k in w3)  # the next one trained
    final = _weights(out / "student", spec)
    assert all(torch.isfinite(v).all() for v in final.values())

    # teacher correction changed the teacher, and distillation read that teacher, every tensor of it
    orig, corr = _weights(tiny_ckpt, ck.read_spec(tiny_ckpt)), _weights(corrected, ck.read_spec(tiny_ckpt))
    assert any(not torch.equal(orig[k], corr[k]) for k in orig)
    assert f"teacher: all {len(orig)} tensors" in p.stdout and f"read from {corrected}" in p.stdout
    logged = kd["teacher"][0]
    assert logged == pytest.approx(_first_val_batch_loss(corrected, tiny_data, 4), abs=1e-5)
    assert logged < _first_val_batch_loss(tiny_ckpt, tiny_data, 4) - 1e-3  # corrected on this very data
    assert f"teacher LM loss on the first validation batch: {logged:.4f}" in p.stdout


def test_consecutive_nonfinite_steps_stop_and_the_last_good_checkpoint_resumes(tiny_ckpt, tiny_student, tiny_data,
                                                                               tmp_path):
    """NaN at steps 3, 4, 5 with trainer.max_nonfinite_steps=3: one error line naming step 5 and the term,
    exit 4, no checkpoint after step 4 and no final student; re-run without the fault resumes and finishes."""
    out = tmp_path / "run"
    args = _args(tiny_ckpt, tiny_student, tiny_data, out, 6, "checkpoint.every_n_steps=2", "distill.lm_weight=0.5",
                 "trainer.max_nonfinite_steps=3")
    p = cli("distill", *args, env={FAULT: "kd_loss@3,4,5"}, check=False)
    assert p.returncode == 4, p.stderr[-3000:]
    err = [ln for ln in p.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert err[0].startswith("error: stopped at step 5: kd_loss was not finite for 3 consecutive steps "
                             "(trainer.max_nonfinite_steps=3)"), err
    assert "step=3" in err[0]  # the last good checkpoint (after step 4; NeMo counts from 0) is named
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert not any(n.startswith(("step=4", "step=5")) for n in names), names
    assert not (out / "student").exists()
    again = cli("distill", *args)
    assert "resuming from" in again.stdout and "step=3" in again.stdout.split("resuming from")[1].splitlines()[0]
    m = _metrics(out)
    assert all(math.isfinite(m["train"][s]["kd_loss"]) for s in (5, 6))
    assert again.stdout.strip().splitlines()[-1] == f"wrote checkpoint: {out / 'student'}"


def test_teacher_lacking_tensors_is_refused_before_work(tiny_ckpt, tiny_student, tiny_data, tmp_path, capsys,
                                                        dist_single):
    """A teacher checkpoint that lacks a tensor (its config says untied output layer, the weights have none) or
    holds fewer layers than its config says is refused in one line, before any model is built."""
    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.cli import main
    from nemo_minitron.model import build, tiny_spec

    tied = tmp_path / "tied"
    ck.save(tied, build(tiny_spec(share_embeddings_and_output_weights=True)),
            tiny_spec(share_embeddings_and_output_weights=True))
    ck.write_context(tied, tiny_spec())  # the config now wants an output layer the weights lack
    deeper = tmp_path / "deeper"
    shutil.copytree(tiny_ckpt, deeper)
    ck.write_context(deeper, tiny_spec(num_layers=5))
    out = tmp_path / "out"
    for teacher, msg in ((tied, "lacks 1 of the model's tensors (output_layer.weight)"),
                         (deeper, "holds 4 layers of decoder.layers.")):
        assert main(["distill", *map(str, _args(teacher, tiny_student, tiny_data, out, 2))]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and err.count("\n") == 1, err
    assert not out.exists()
