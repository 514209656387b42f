"""Least-squares reconstruction (prune.reconstruction=least_squares) on tiny models: exact where it must be,
the same at TP=2 and PP=2 as in one process, and the prune command's report of it."""

import json

import pytest
import torch

from conftest import WORKERS, cli_here, torchrun
from test_families import assert_logits_close

TARGETS = {"hidden_size": 48, "ffn_hidden_size": 96, "num_attention_heads": 2}


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens), None)


def test_refit_keeps_weights_when_nothing_is_pruned_and_recovers_linear_combinations():
    from nemo_minitron.prune.reconstruct import refit

    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 12, generator=g, dtype=torch.float64)
    a[:, 10] = 0.5 * a[:, 2] - 2.0 * a[:, 7]  # channel 10 is a linear combination of kept channels
    W = torch.randn(5, 12, generator=g, dtype=torch.float64)
    G = a.T @ a
    assert torch.equal(refit(W, G, torch.arange(12), 0.01), W)
    kept = torch.tensor([i for i in range(12) if i not in (10, 11)])
    WK = refit(W, G, kept, 1e-9)
    pruned_only_10 = torch.tensor([i for i in range(12) if i != 10])
    exact = refit(W, G, pruned_only_10, 1e-9)
    torch.testing.assert_close(a[:, pruned_only_10] @ exact.T, a @ W.T, rtol=0, atol=1e-6)
    # with channel 11 (independent) also pruned, the refit is the least-squares optimum: better than trimming
    err = lambda M: float(((a[:, kept] @ M.T - a @ W.T) ** 2).sum())  # noqa: E731
    assert err(WK) < 0.5 * err(W[:, kept])


@pytest.fixture(scope="module")
def duplicated(tiny_ckpt, dist_single):
    """The tiny teacher with, in every layer, MLP neuron F-1 a copy of neuron 0 and query head 1 (3) a copy of
    head 0 (2) in its group: pruning the copies loses nothing a refit cannot restore."""
    from nemo_minitron.checkpoint.loader import load_model

    model, spec, _ = load_model(tiny_ckpt)
    F, per, d = spec.ffn_hidden_size, spec.num_attention_heads // spec.num_query_groups, spec.kv_channels
    with torch.no_grad():
        for layer in model.decoder.layers:
            w = layer.mlp.linear_fc1.weight  # [gate; up]
            w[F - 1], w[2 * F - 1] = w[0], w[F]
            layer.self_attention.linear_qkv.weight.view(spec.num_query_groups, per + 2, d, -1)[:, 1] = \
                layer.self_attention.linear_qkv.weight.view(spec.num_query_groups, per + 2, d, -1)[:, 0]
    L = spec.num_layers
    scores = {"heads": torch.tensor([[1.0, 0.1] * spec.num_query_groups] * L), "ffn": torch.ones(L, F),
              "hidden": torch.ones(spec.hidden_size)}
    scores["ffn"][:, F - 1] = 0
    return model, spec, scores


def test_pruned_copies_are_restored_exactly(duplicated, tiny_windows):
    from nemo_minitron.prune.plan import make_plan
    from nemo_minitron.prune.reconstruct import reconstruct
    from nemo_minitron.prune.width import prune_model

    model, spec, scores = duplicated
    windows, _ = tiny_windows
    plan = make_plan(scores, spec, {"ffn_hidden_size": spec.ffn_hidden_size - 1, "num_attention_heads": 2})
    tokens = windows[:2, :-1]
    ref = _logits(model, tokens)
    plain, _ = prune_model(model, spec, plan)
    fitted, spec2, info = reconstruct(model, spec, plan, windows, 4, damping=1e-8, progress=False)
    assert (spec2.ffn_hidden_size, spec2.num_attention_heads) == (spec.ffn_hidden_size - 1, 2)
    assert (_logits(plain, tokens) - ref).abs().max() > 0.1  # trimming alone loses the copies' share
    torch.testing.assert_close(_logits(fitted, tokens), ref, rtol=0, atol=1e-4)
    for row in info["layers"]:
        for kind in ("heads", "ffn"):
            assert row[kind]["before"] > 1e-4 and row[kind]["after"] < 1e-10, row
    # nothing pruned (all neurons and heads kept): the original weights, exactly
    same, _, _ = reconstruct(model, spec, make_plan(scores, spec, {"ffn_hidden_size": spec.ffn_hidden_size,
                                                                   "num_attention_heads": 4}),
                             windows, 4, progress=False)
    a, b = model.state_dict(), same.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))


def test_one_shot_refit_from_statistics_gathered_once(duplicated, tiny_windows):
    """The search's ranking refit (prune.stats): each layer solved from the source model's Gram matrices, gathered
    in one calibration pass. The copies are restored exactly as by the sequential refit; where only MLP neurons are
    pruned, layer 1's refit (the only one whose input the sequential refit has not changed yet) is the sequential
    one, and the later layers are fitted to the source's activations instead of the refitted ones."""
    from nemo_minitron.prune import stats as calstats
    from nemo_minitron.prune.plan import make_plan, random_scores
    from nemo_minitron.prune.reconstruct import reconstruct

    model, spec, scores = duplicated
    windows, _ = tiny_windows
    tokens = windows[:2, :-1]
    measured, stats = calstats.collect(model, windows, 4, ("proj", "fc2"), {}, progress=False)
    assert set(stats.grams) == {(l, s) for l in range(spec.num_layers) for s in ("proj", "fc2")}
    F = spec.ffn_hidden_size
    assert stats.grams[(0, "fc2")].shape == (F, F) and measured["ffn"].shape == (spec.num_layers, F)
    plan = make_plan(scores, spec, {"ffn_hidden_size": F - 1, "num_attention_heads": 2})
    fitted, spec2 = calstats.one_shot(model, spec, plan, stats, damping=1e-8)
    assert (spec2.ffn_hidden_size, spec2.num_attention_heads) == (F - 1, 2)
    torch.testing.assert_close(_logits(fitted, tokens), _logits(model, tokens), rtol=0, atol=1e-4)

    plan = make_plan(random_scores(spec, 1), spec, {"ffn_hidden_size": F // 2})
    one, _ = calstats.one_shot(model, spec, plan, stats, damping=0.01)
    seq, _, _ = reconstruct(model, spec, plan, windows, 4, damping=0.01, progress=False)
    w = lambda m, l: m.decoder.layers[l].mlp.linear_fc2.weight  # noqa: E731
    torch.testing.assert_close(w(one, 0), w(seq, 0), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(w(one, 1), w(seq, 1), rtol=1e-6, atol=1e-7)  # layer 2: its input was refitted


@pytest.mark.parallel
def test_reconstruction_at_tp2_and_pp2_equals_one_process(tiny_ckpt, family_ckpts, tiny_windows, tmp_path, dist_single):
    """Hidden, heads and neurons pruned, then proj / fc2 refitted layer by layer: TP=2 assembles each Gram
    matrix from the TP-gathered inputs, PP=2 refits each stage's layers; the weights equal one process's
    (to 1e-5: TP splits the float32 matmuls, and the solve amplifies their rounding a little). In the same
    launch, the tiny Qwen2 (q/k/v biases, refitted as intercepts) and Qwen3 (q/k norms) from transformers: their
    logits at TP=2 and PP=2 equal transformers' (1e-5), and their pruned, refitted weights equal one process's."""
    from transformers import AutoModelForCausalLM

    from nemo_minitron.checkpoint.loader import load_model
    from nemo_minitron.prune.plan import random_scores

    import importlib.util

    spec_ = importlib.util.spec_from_file_location("reconstruct_worker", WORKERS / "reconstruct.py")
    worker = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(worker)
    windows, wpath = tiny_windows
    ckpts = [tiny_ckpt, family_ckpts["qwen2"][1], family_ckpts["qwen3"][1]]
    hf = {i: AutoModelForCausalLM.from_pretrained(str(family_ckpts[n][0]), dtype=torch.float64).eval()
          for i, n in ((1, "qwen2"), (2, "qwen3"))}  # float64: the reference without its own rounding
    refs, paths = [], []
    for i, ckpt in enumerate(ckpts):
        scores = random_scores(load_model(ckpt)[1], 0)
        paths.append(tmp_path / f"scores{i}.pt")
        torch.save(scores, paths[-1])
        refs.append(worker.run(ckpt, windows, scores, TARGETS))
    out = tmp_path / "out.pt"
    torchrun([WORKERS / "reconstruct.py", ",".join(map(str, ckpts)), wpath, ",".join(map(str, paths)),
              json.dumps(TARGETS), out, "2x1,1x2"])
    got = torch.load(out)
    assert len(got) == 2 * len(ckpts)
    for (layout, i), res in got.items():
        ref = refs[i]
        assert res["weights"].keys() == ref["weights"].keys()
        for k, v in ref["weights"].items():  # vocab rows: the real ones (TP=2 pads 320 to 384)
            torch.testing.assert_close(res["weights"][k][:len(v)], v, rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{layout} {i} {k}: {m}")
        assert [r["layer"] for r in res["layers"]] == [r["layer"] for r in ref["layers"]]
        for r, q in zip(res["layers"], ref["layers"]):
            assert r["ffn"]["after"] == pytest.approx(q["ffn"]["after"], rel=1e-4), layout
        if i in hf:  # a family beyond Llama: the logits at this layout against transformers
            with torch.no_grad():
                want = hf[i](windows[:, :-1]).logits
            assert_logits_close(res["logits"], want, f"{layout} model {i} vs transformers")
        # against one process: 1e-5 of the logits' scale (TP splits the float32 matmuls and the attention's heads)
        assert_logits_close(res["logits"], ref["logits"], f"{layout} model {i} vs one process")
    # and the refit did something: every layer's output error is lower than trimming's
    assert all(r[k]["after"] < r[k]["before"] for ref in refs for r in ref["layers"] for k in ("heads", "ffn"))
    assert any(k.endswith("linear_qkv.bias") for k in refs[1]["weights"])


def test_prune_command_reports_the_refit(tiny_ckpt, tiny_data, tmp_path, capsys, dist_single):
    """`nemo-minitron prune prune.reconstruction=least_squares data.validation=..`: the report has every layer's
    output error trimmed -> refitted and the validation loss of both; bad settings are refused in one line."""
    from nemo_minitron.cli import main

    out, refused = tmp_path / "pruned", tmp_path / "refused"
    args = ["prune", f"model={tiny_ckpt}", f"data.calibration={tiny_data}", "data.calibration_samples=16",
            "data.seq_length=32", "prune.hidden_size=48", "prune.ffn_hidden_size=96", "prune.num_attention_heads=2"]
    proc = cli_here(capsys, *args, f"output={out}", "prune.reconstruction=least_squares",
                    f"data.validation={tiny_data}", "data.validation_samples=8")
    rep = json.loads((out / "pruning" / "report.json").read_text())
    info = rep["reconstruction_info"]
    assert rep["reconstruction"] == "least_squares" and [r["layer"] for r in info["layers"]] == [1, 2, 3, 4]
    assert all(r[k]["after"] < r[k]["before"] for r in info["layers"] for k in ("heads", "ffn"))
    h = info["heldout"]
    assert h["least_squares"] < h["trimmed"] and h["windows"] == [8, 33]
    assert f"{h['trimmed']:.4f} (trimmed) -> {h['least_squares']:.4f} (refitted)" in proc.stdout
    md = (out / "pruning" / "report.md").read_text()
    assert "Least-squares reconstruction (damping 0.01)" in md and "| 4 | " in md
    for extra, msg in ((["prune.reconstruction=lsq"], "prune.reconstruction='lsq': one of none, least_squares"),
                       (["prune.reconstruction_damping=-1"], "prune.reconstruction_damping=-1 must be a number >= 0"),
                       (["prune.reconstruction=least_squares", "prune.merge_pruned_heads=true"], "are alternatives"),
                       (["prune.reconstruction=least_squares", "data.calibration=null", f"prune.scores={out}"],
                        "least-squares reconstruction refits on it")):
        assert main([*args, f"output={refused}", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and msg in err, (msg, err)
        assert not refused.exists()
