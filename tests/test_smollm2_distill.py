"""Distillation on the real SmolLM2-135M (dequantized Q4_1) and Shakespeare: a depth-pruned student
(20 of 30 layers) recovers more held-out quality from the teacher's logits than from plain
cross-entropy training with the same steps, tokens, schedule and learning rate."""

from __future__ import annotations

import pytest

from conftest import cli

pytestmark = pytest.mark.slow

STEPS = 6


def test_kd_beats_cross_entropy_at_equal_budget(smol, tmp_path, dist_single):
    teacher = smol / "ckpt"
    student = tmp_path / "depth20"
    cli("prune", f"model={teacher}", f"output={student}", "prune.drop_layers=[17,18,19,20,21,22,23,24,25,26]")
    common = [f"data.train={smol / 'calibration'}", "data.seq_length=128", "data.micro_batch_size=4",
              "data.global_batch_size=8", f"trainer.max_steps={STEPS}", "trainer.val_check_interval=100",
              "checkpoint.every_n_steps=100", "trainer.log_every_n_steps=4", "optim.lr=1e-4", "optim.min_lr=1e-5",
              "optim.warmup_steps=2"]
    cli("distill", f"teacher={teacher}", f"student={student}", f"output={tmp_path / 'kd'}", *common, timeout=900)
    cli("finetune", f"model={student}", f"output={tmp_path / 'ce'}", *common, timeout=900)
    # held-out loss in this process (what `evaluate` computes: test_smollm2.py checks the command against
    # transformers), not three more processes that each import NeMo and load the model
    from nemo_minitron.checkpoint.loader import load_model
    from nemo_minitron.data import indexed
    from nemo_minitron.evaluate import heldout_loss

    heldout = indexed.windows(smol / "heldout", 16, 256)
    loss = {}
    for name, path in (("pruned", student), ("kd", tmp_path / "kd" / "student"), ("ce", tmp_path / "ce" / "model")):
        model = load_model(path)[0]
        loss[name] = heldout_loss(model, heldout, 4)["loss"]
        del model
    print("held-out loss:", loss)
    assert loss["kd"] < loss["ce"] < loss["pruned"]
