"""--dry-run: the resolved launch (nodes, GPUs, TP/PP/DP, memory per GPU) from configs alone, and the
layouts that cannot work refused, without building or launching anything."""

from __future__ import annotations

import pytest

from conftest import REPO

LLAMA8B = REPO / "conf" / "recipes" / "llama-3.1-8b"  # the published config.json of Llama-3.1-8B
QWEN3_MOE = REPO / "conf" / "recipes" / "qwen3-30b-a3b"  # the published config.json of Qwen3-30B-A3B


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


def test_moe_recipe_dry_run_at_ep8(capsys):
    """Qwen3-30B-A3B (its published config.json: 128 experts, top-8) pruned to 96 experts, at EP=8 on 8 nodes: the
    launch plan with experts per rank, the token all-to-all volume and memory per GPU; EP that cannot split the
    experts or the data-parallel ranks is refused."""
    import re

    from nemo_minitron.cli import main

    base = ["pipeline", "recipe=qwen3_30b_a3b_to_96_experts", f"teacher={QWEN3_MOE}", "data.train=x",
            "data.calibration=x", "data.heldout=x", "--dry-run"]
    assert main(base) == 0
    out = capsys.readouterr().out
    assert "8 node(s) x 8 GPUs = 64 ranks; TP=1 x PP=1 x DP=64 (EP=8 within DP)" in out
    assert "teacher 30.53B params (48 layers, hidden 2048, 128 experts (top-8) of width 768" in out  # as published
    assert "student 23.28B params (48 layers, hidden 2048, 96 experts (top-8) of width 768" in out
    assert "experts per rank (EP=8): teacher 16, student 12; active parameters per token: teacher 3.35B, student 3.35B" in out
    # dense 1.54B over TP x PP, experts 29.0B over EP=8: 5.16B parameters per GPU in bf16
    assert "teacher_weights 9.6," in out and "total ~" in out
    # 8 copies x 4096 tokens x 2048 x 2 bytes, 4 times (dispatch + combine, forward + backward), 7/8 to other
    # ranks, 48 layers, 8 micro-batches
    a2a = float(re.search(r"token all-to-all: ([0-9.]+) GiB", out).group(1))
    assert a2a == pytest.approx(4 * 8 * 4096 * 2048 * 2 * 7 / 8 * 48 * 8 / 2 ** 30, rel=1e-3)
    dense = float(re.search(r"teacher_weights ([0-9.]+)", out).group(1))
    assert main([*base, "trainer.strategy.expert_model_parallel_size=16"]) == 0  # half the experts per rank
    out16 = capsys.readouterr().out
    assert "teacher 8, student 6" in out16 and float(re.search(r"teacher_weights ([0-9.]+)", out16).group(1)) < dense
    for extra, msg in ((["trainer.strategy.expert_model_parallel_size=64"],  # 128 experts split, 96 do not
                        "student: num_moe_experts=96 is not divisible by expert_model_parallel_size=64"),
                       (["trainer.strategy.expert_model_parallel_size=16", "launcher.nodes=1"],
                        "world size 8 is not divisible by TP*PP*EP = 1*1*16"),
                       (["prune.num_moe_experts=4"], "fewer than the 8 experts each token is routed to")):
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert msg in err, (msg, err)
    # a dense teacher has no experts to split
    assert main(["pipeline", "recipe=llama31_8b_to_4b_width", f"teacher={LLAMA8B}", "data.train=x", "data.calibration=x",
                 "data.heldout=x", "trainer.strategy.expert_model_parallel_size=2", "--dry-run"]) == 2
    assert "the model has no experts" in capsys.readouterr().err
    # ... and a run (not a dry run) neither ignores EP on a dense teacher nor starts a mixture of experts it
    # cannot distill yet: both refused before any work
    assert main(["pipeline", f"teacher={LLAMA8B}", "run_dir=unused", "trainer.strategy.expert_model_parallel_size=2"]) == 2
    assert "the model has no experts" in capsys.readouterr().err
    assert main(["pipeline", f"teacher={QWEN3_MOE}", "run_dir=unused", "prune.num_moe_experts=96"]) == 2
    assert "pipeline does not support mixture-of-experts models yet" in capsys.readouterr().err
