"""TP=2 and PP=2 (2 CPU processes, gloo) against TP=1: loss, gradients, and checkpoint layout changes."""

import pytest
import torch

from conftest import WORKERS, cli, torchrun

pytestmark = pytest.mark.parallel


@pytest.fixture(scope="module")
def reference(tiny_ckpt, tiny_windows, dist_single):
    """TP=1 forward+backward in this process."""
    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.model import build
    from nemo_minitron.model.forward import lm_loss
    from nemo_minitron.model.shards import gather_full

    spec = ck.read_spec(tiny_ckpt)
    model = build(spec)
    ck.load_weights(tiny_ckpt, model)
    loss_sum, n = lm_loss(model, tiny_windows[0], micro_batch_size=2, forward_only=False)
    return {"loss": loss_sum / n, "grads": gather_full(model, "grad"), "params": gather_full(model, "param")}


def _eval_loss(ckpt, windows):
    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.model import build
    from nemo_minitron.model.forward import lm_loss

    spec = ck.read_spec(ckpt)
    model = build(spec)
    ck.load_weights(ckpt, model)
    with torch.no_grad():
        s, n = lm_loss(model, windows, micro_batch_size=4)
    return s / n


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["TP2", "PP2"])
def test_forward_backward_matches_tp1(tp, pp, reference, tiny_ckpt, tiny_windows, tmp_path):
    out, out_ckpt = tmp_path / "res.pt", tmp_path / f"ckpt_tp{tp}_pp{pp}"
    torchrun([WORKERS / "fwd_bwd.py", tiny_ckpt, tiny_windows[1], out, out_ckpt, tp, pp])
    res = torch.load(out)
    # the checkpoint saved at TP=1 loaded at this layout: identical weights, same loss and gradients
    assert res["params"].keys() == reference["params"].keys()
    for k, v in reference["params"].items():
        assert torch.equal(res["params"][k], v), k
    assert res["loss"] == pytest.approx(reference["loss"], rel=1e-6, abs=1e-6)
    assert res["grads"].keys() == reference["grads"].keys()
    for k, g in reference["grads"].items():
        torch.testing.assert_close(res["grads"][k], g, rtol=1e-4, atol=1e-6, msg=k)
    assert reference["loss"] > 1.0  # a real loss, not a degenerate zero
    # and back: the checkpoint written at TP=2 / PP=2 loads at TP=1 with the identical loss
    assert _eval_loss(out_ckpt, tiny_windows[0]) == pytest.approx(reference["loss"], rel=1e-6)
    # and it exports to Hugging Face: transformers gives the same loss as the TP=1 reference
    from transformers import AutoModelForCausalLM

    from nemo_minitron.checkpoint.export import export_hf

    hf_dir = export_hf(out_ckpt, tmp_path / "hf", dtype="fp32")
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    w = tiny_windows[0]
    with torch.no_grad():
        logits = hf(w[:, :-1]).logits
    hf_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1)).item()
    assert hf_loss == pytest.approx(reference["loss"], rel=1e-5)


def test_evaluate_cli_dp2_equals_one_process(tiny_ckpt, tiny_student, tiny_data, tmp_path):
    """The evaluate command itself under torchrun at DP=2 (each DP rank evaluates half of the windows)
    reports one process's loss over all of them (at TP=2 x DP=2: test_cluster.py's pruning test). Both runs
    evaluate a list of two models (in opposite orders): each model's result is its own."""
    import json

    prefix = tiny_data
    args = ["evaluate", f"data={prefix}", "eval.num_samples=8", "eval.seq_length=32", "eval.micro_batch_size=2"]
    one = cli(*args, f"model=[{tiny_ckpt},{tiny_student}]", f"output_json=[{tmp_path / 'tp1.json'},{tmp_path / 's1.json'}]")
    assert one.stdout.strip().splitlines()[-1].endswith("s1.json")
    two = torchrun(["-m", "nemo_minitron.cli", *args, f"model=[{tiny_student},{tiny_ckpt}]",
                    f"output_json=[{tmp_path / 's2.json'},{tmp_path / 'tp2.json'}]"], nproc=2)
    assert "TP=1 PP=1 DP=2" in two.stdout
    r1, r2, s1, s2 = (json.loads((tmp_path / f).read_text()) for f in ("tp1.json", "tp2.json", "s1.json", "s2.json"))
    assert r1["tokens"] == r2["tokens"] == s1["tokens"] == 8 * 32
    assert r1["model"] == r2["model"] == str(tiny_ckpt) and s1["model"] == s2["model"] == str(tiny_student)
    assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-6)
    assert s2["loss"] == pytest.approx(s1["loss"], rel=1e-6) and abs(s1["loss"] - r1["loss"]) > 1e-3
    bad = cli(*args, f"model=[{tiny_ckpt},{tiny_student}]", f"output_json={tmp_path / 'x.json'}", check=False)
    assert bad.returncode == 2 and "one per model" in bad.stderr
