"""--dry-run: the resolved launch (nodes, GPUs, TP/PP/DP, memory per GPU) from configs alone, and the
layouts that cannot work refused, without building or launching anything."""

from __future__ import annotations

import pytest

from conftest import REPO

LLAMA8B = REPO / "conf" / "recipes" / "llama-3.1-8b"  # the published config.json of Llama-3.1-8B


def test_pipeline_recipe_dry_run(capsys):
    from nemo_minitron.cli import main

    base = ["pipeline", f"teacher={LLAMA8B}", "data.train=x", "data.calibration=x", "data.heldout=x", "--dry-run"]
    assert main([*base[:1], "recipe=llama31_8b_to_4b_width", *base[1:]]) == 0
    out = capsys.readouterr().out
    assert "32 node(s) x 8 GPUs = 256 ranks; TP=8 x PP=1 x DP=32" in out
    assert "student 4.51B params (32 layers, hidden 3072, ffn 9216, 32 heads / 8 groups" in out
    assert "total ~" in out and "nothing was launched" in out
    # the fused output layer + loss (default) holds chunks, not the logits: 0.6 GiB instead of 1.5 GiB
    assert "logits_and_kl 0.6\n" in out
    assert main([*base[:1], "recipe=llama31_8b_to_4b_width", *base[1:], "distill.fused_output=false"]) == 0
    assert "logits_and_kl 1.5\n" in capsys.readouterr().out
    assert main([*base[:1], "recipe=llama31_8b_to_4b_depth", *base[1:]]) == 0
    assert "student 4.54B params (16 layers, hidden 4096" in capsys.readouterr().out
    # iterative: each round's shape, then the last round's student as the final stage's teacher
    assert main([*base[:1], "recipe=llama31_8b_iterative", *base[1:]]) == 0
    out = capsys.readouterr().out
    assert "round 1: 8.03B -> 6.15B params (32 layers, hidden 3584, ffn 11776" in out
    assert "teacher 6.15B params" in out and "student 4.51B params (32 layers, hidden 3072, ffn 9216" in out


def test_dry_run_refuses_impossible_layouts(tiny_ckpt, tiny_student, capsys):
    from nemo_minitron.cli import main

    kd = ["distill", f"teacher={tiny_ckpt}", f"student={tiny_student}", "output=unused", "data.train=unused",
          "data.seq_length=32", "data.global_batch_size=8", "--dry-run"]
    assert main([*kd, "trainer.devices=2", "trainer.strategy.tensor_model_parallel_size=2"]) == 0
    assert "TP=2 x PP=1 x DP=1, sequence parallel; bf16, distributed optimizer over DP=1" in capsys.readouterr().out
    assert main([*kd, "trainer.devices=8", "trainer.strategy.tensor_model_parallel_size=2", "trainer.strategy.sequence_parallel=false",
                 "optim.distributed_optimizer=false", "model.precision=fp32"]) == 0
    out = capsys.readouterr().out
    assert "TP=2 x PP=1 x DP=4; fp32, Adam (not sharded)" in out and "optimizer_fp32 " in out
    for extra, msg in ((["trainer.devices=3", "trainer.strategy.tensor_model_parallel_size=2"], "not divisible by TP*PP"),
                       (["trainer.devices=3", "trainer.strategy.pipeline_model_parallel_size=3"], "layers"),
                       (["trainer.devices=8", "trainer.strategy.tensor_model_parallel_size=8"], "heads"),
                       (["trainer.devices=4", "data.global_batch_size=6"], "global batch 6"),
                       (["trainer.devices=2", "trainer.strategy.sequence_parallel=true"], "needs tensor parallelism")):
        assert main([*kd, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert msg in err, (msg, err)


def test_dry_run_counts_micro_batches_in_flight_and_recompute(capsys):
    """Activation memory: the first pipeline stage holds min(PP, micro-batches) micro-batches under 1F1B;
    selective recomputation keeps less than none (no attention scores), full recomputation least."""
    import re

    from nemo_minitron.cli import main

    base = ["pipeline", "recipe=llama31_8b_to_4b_width", f"teacher={LLAMA8B}", "data.train=x", "data.calibration=x",
            "data.heldout=x", "--dry-run"]

    def act(*extra):
        assert main([*base, *extra]) == 0
        out = capsys.readouterr().out
        return float(re.search(r"activations ([0-9.]+)", out).group(1)), out

    selective, out = act()  # the recipe's own setting
    assert "activations: selective recompute, 1 micro-batch(es) in flight" in out
    none, out = act("model.recompute_granularity=null")
    assert "no recompute" in out and none > 2 * selective
    full, out = act("model.recompute_granularity=full", "model.recompute_method=uniform", "model.recompute_num_layers=1")
    assert "full recompute, uniform x 1" in out and full < selective
    # PP=4: 4 micro-batches in flight, each with a quarter of the layers: the same as PP=1's one micro-batch
    pp4, out = act("trainer.strategy.pipeline_model_parallel_size=4", "launcher.nodes=128")
    assert "4 micro-batch(es) in flight on the first stage" in out and pp4 == pytest.approx(selective, rel=0.05)
    assert main([*base, "model.recompute_granularity=full"]) == 2
    assert "needs model.recompute_method" in capsys.readouterr().err
