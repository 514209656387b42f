"""Width pruning of the real SmolLM2-135M without retraining: importance beats random keeps of the same shape,
and least-squares reconstruction of the kept weights beats keeping them as they are.

Calibration: importance on 32 windows x 256 tokens of the calibration plays, the least-squares refit on the first
16 of them (measured: hidden+ffn 7.202 trimmed -> 5.630 refitted on 16 windows, 5.636 on 32, at half the cost);
held-out loss: 8 x 256 tokens of the held-out plays. Random baselines keep random units of the same shape (3 seeds, mean and min).
"""

import pytest

pytestmark = pytest.mark.slow

CASES = {
    "hidden 576->384, ffn 1536->1024": {"hidden_size": 384, "ffn_hidden_size": 1024},
    "ffn 1536->768": {"ffn_hidden_size": 768},
    "heads 9->6 (3 groups kept)": {"num_attention_heads": 6},
}
SEEDS = (0, 1, 2)
# held-out loss gained by prune.reconstruction=least_squares (measured here: see the issue 19 note)
REFIT_MARGIN = {"hidden 576->384, ffn 1536->1024": 0.3, "ffn 1536->768": 0.3}


def test_importance_beats_random(smol, dist_single):
    from nemo_minitron.checkpoint.loader import load_model
    from nemo_minitron.data import indexed
    from nemo_minitron.evaluate import heldout_loss
    from nemo_minitron.prune.plan import make_plan, random_scores
    from nemo_minitron.prune.width import calibrate, prune_model

    from nemo_minitron.prune.reconstruct import reconstruct

    model, spec, _ = load_model(smol / "ckpt")
    calib = indexed.windows(smol / "calibration", 32, 256)
    scores = calibrate(model, calib, 4, progress=False)
    heldout = indexed.windows(smol / "heldout", 8, 256)
    teacher = heldout_loss(model, heldout, 4)["loss"]

    def loss(sc, targets, merge=False):
        pruned, _ = prune_model(model, spec, make_plan(sc, spec, targets), merge_pruned_heads=merge)
        return heldout_loss(pruned, heldout, 4)["loss"]

    rows = [f"teacher (unpruned): held-out loss {teacher:.3f}",
            "| target | importance | random mean (3 seeds) | random min | importance + least squares |",
            "|---|---|---|---|---|"]
    for name, targets in CASES.items():
        ours = loss(scores, targets)
        rand = [loss(random_scores(spec, s), targets) for s in SEEDS]
        refit = ""
        if name in REFIT_MARGIN:
            fitted, _, _ = reconstruct(model, spec, make_plan(scores, spec, targets), calib[:16], 4, progress=False)
            refit = heldout_loss(fitted, heldout, 4)["loss"]
            del fitted
            assert refit < ours - REFIT_MARGIN[name], (name, ours, refit)
            refit = f"{refit:.3f}"
        rows.append(f"| {name} | {ours:.3f} | {sum(rand) / len(rand):.3f} | {min(rand):.3f} | {refit} |")
        assert ours < min(rand), (name, ours, rand)
        assert ours < sum(rand) / len(rand) - 0.25, (name, ours, rand)  # clearly lower, not a tie
        if "heads" in name:
            rows.append(f"| {name}, merge_pruned_heads | {loss(scores, targets, merge=True):.3f} | | |")
    print("\n" + "\n".join(rows))
