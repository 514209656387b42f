"""TP=2 and PP=2 (2 CPU processes, gloo) against TP=1: loss, gradients, and checkpoint layout changes."""

import pytest
import torch

from conftest import WORKERS, in_process, torchrun

pytestmark = pytest.mark.parallel


def _reference(ckpt, windows):
    """TP=1 forward+backward in this process."""
    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.model import build
    from nemo_minitron.model.forward import lm_loss
    from nemo_minitron.model.shards import gather_full

    spec = ck.read_spec(ckpt)
    model = build(spec)
    ck.load_weights(ckpt, model)
    loss_sum, n = lm_loss(model, windows, micro_batch_size=2, forward_only=False)
    return {"loss": loss_sum / n, "grads": gather_full(model, "grad"), "params": gather_full(model, "param")}


@pytest.fixture(scope="module")
def reference(tiny_ckpt, tiny_windows, dist_single):
    return _reference(tiny_ckpt, tiny_windows[0])


@pytest.fixture(scope="module")
def padded(tmp_path_factory, tiny_windows, dist_single):
    """A tiny model whose vocabulary (300) megatron pads to 384 rows at TP=1 and to 512 at TP=2, with random
    (not zero) padding rows: the loss must not count them. Its checkpoint and TP=1 reference."""
    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.model import build, tiny_spec

    spec = tiny_spec(vocab_size=300)
    torch.manual_seed(2)
    model = build(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    assert model.output_layer.weight.shape[0] == 384
    path = ck.save(tmp_path_factory.mktemp("padded") / "ckpt", model, spec)
    return path, _reference(path, tiny_windows[0])


def _check_padded(res, ref, out_ckpt, windows):
    """The padded-vocabulary model at another layout: real rows identical, padding rows not in the loss."""
    for k, v in ref["params"].items():
        r = res["params"][k]
        if k.endswith(("word_embeddings.weight", "output_layer.weight")):
            assert r.shape[0] in (384, 512) and torch.equal(r[:300], v[:300]), k
            torch.testing.assert_close(res["grads"][k][:300], ref["grads"][k][:300], rtol=1e-4, atol=1e-6, msg=k)
            assert not res["grads"][k][300:].any() and not ref["grads"][k][300:].any(), k  # padding: no gradient
        else:
            assert torch.equal(r, v), k
            torch.testing.assert_close(res["grads"][k], ref["grads"][k], rtol=1e-4, atol=1e-6, msg=k)
    assert res["loss"] == pytest.approx(ref["loss"], rel=1e-6, abs=1e-6)
    assert _eval_loss(out_ckpt, windows) == pytest.approx(ref["loss"], rel=1e-6)  # back at TP=1 (rows cut)


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


@pytest.fixture(scope="module")
def layouts(reference, padded, tiny_ckpt, tiny_windows, tmp_path_factory):
    """TP=2 and PP=2 one after the other in one 2-process launch: both checkpoints at each layout."""
    out = tmp_path_factory.mktemp("fwd_bwd")
    torchrun([WORKERS / "fwd_bwd.py", tiny_windows[1], out, "2x1,1x2", tiny_ckpt, padded[0]])
    return out


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["TP2", "PP2"])
def test_forward_backward_matches_tp1(tp, pp, layouts, reference, padded, tiny_windows, tmp_path):
    lay = f"{tp}x{pp}"
    out_ckpt, pad_ckpt = layouts / f"{lay}-0-ckpt", layouts / f"{lay}-1-ckpt"
    _check_padded(torch.load(layouts / f"{lay}-1.pt"), padded[1], pad_ckpt, tiny_windows[0])
    res = torch.load(layouts / f"{lay}-0.pt")
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


def test_evaluate_cli_dp2_equals_one_process(tiny_ckpt, tiny_student, tiny_data, tmp_path, dist_single, capsys):
    """The evaluate command itself under torchrun at DP=2 (each DP rank evaluates half of the windows)
    reports one process's loss over all of them (at TP=2 x DP=2: test_cluster.py's pruning test). Both runs
    evaluate a list of two models (in opposite orders): each model's result is its own. (The one-process run and
    the refusal: the CLI's entry point in this process, sparing two start-ups.)"""
    import json

    prefix = tiny_data
    args = ["evaluate", f"data={prefix}", "eval.num_samples=8", "eval.seq_length=32", "eval.micro_batch_size=2"]
    one = in_process(capsys, *args, f"model=[{tiny_ckpt},{tiny_student}]",
                     f"output_json=[{tmp_path / 'tp1.json'},{tmp_path / 's1.json'}]")
    assert one.returncode == 0 and one.stdout.strip().splitlines()[-1].endswith("s1.json")
    two = torchrun(["-m", "nemo_minitron.cli", *args, f"model=[{tiny_student},{tiny_ckpt}]",
                    f"output_json=[{tmp_path / 's2.json'},{tmp_path / 'tp2.json'}]"], nproc=2)
    assert "TP=1 PP=1 DP=2" in two.stdout
    r1, r2, s1, s2 = (json.loads((tmp_path / f).read_text()) for f in ("tp1.json", "tp2.json", "s1.json", "s2.json"))
    assert r1["tokens"] == r2["tokens"] == s1["tokens"] == 8 * 32
    assert r1["model"] == r2["model"] == str(tiny_ckpt) and s1["model"] == s2["model"] == str(tiny_student)
    assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-6)
    assert s2["loss"] == pytest.approx(s1["loss"], rel=1e-6) and abs(s1["loss"] - r1["loss"]) > 1e-3
    bad = in_process(capsys, *args, f"model=[{tiny_ckpt},{tiny_student}]", f"output_json={tmp_path / 'x.json'}")
    assert bad.returncode == 2 and "one per model" in bad.stderr
