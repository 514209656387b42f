"""Width pruning on tiny models: exactness of trimming, TE naming, TP/PP consistency, scores reuse, errors,
and the WidthPruningCallback inside a real NeMo run (nl.Trainer + MegatronStrategy on CPU)."""

import json

import pytest
import torch

from conftest import cli, cli_here, in_process, torchrun

TARGETS = ["prune.hidden_size=48", "prune.ffn_hidden_size=96", "prune.num_attention_heads=2",
           "prune.num_query_groups=2"]
TRIM = "prune.reconstruction=none"  # kept weights trimmed, not refitted: exact across layouts (test_reconstruct.py)


def _full(model):
    from nemo_minitron.model.shards import gather_full

    return gather_full(model)


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens), None)


def _scores(spec, seed=0):
    from nemo_minitron.prune.plan import random_scores

    return random_scores(spec, seed)


@pytest.fixture(scope="module")
def tiny_model(tiny_ckpt, dist_single):
    from nemo_minitron.checkpoint.loader import load_model

    model, spec, _ = load_model(tiny_ckpt)
    return model, spec


def test_ffn_and_head_pruning_equal_masking(tiny_model, tiny_windows):
    """Removing neurons/heads gives exactly the unpruned model with those units' outputs zeroed."""
    from nemo_minitron.model.shards import load_full_state_dict
    from nemo_minitron.model import build
    from nemo_minitron.prune.plan import make_plan
    from nemo_minitron.prune.width import prune_model

    model, spec = tiny_model
    targets = {"ffn_hidden_size": 80, "num_attention_heads": 2}  # 2 groups x 1 head kept of 2 groups x 2
    plan = make_plan(_scores(spec), spec, targets)
    pruned, spec2 = prune_model(model, spec, plan)
    assert (spec2.ffn_hidden_size, spec2.num_attention_heads, spec2.num_query_groups, spec2.kv_channels) == (80, 2, 2, 16)

    masked = {k: v.clone() for k, v in _full(model).items()}
    d, per = spec.kv_channels, 2
    for l in range(spec.num_layers):
        fc2 = masked[f"decoder.layers.{l}.mlp.linear_fc2.weight"]
        drop = torch.ones(spec.ffn_hidden_size, dtype=torch.bool)
        drop[plan.ffn[l]] = False
        fc2[:, drop] = 0
        proj = masked[f"decoder.layers.{l}.self_attention.linear_proj.weight"]
        keep = {g * per + int(h) for g, hs in zip(plan.groups[l].tolist(), plan.heads[l]) for h in hs}
        for head in range(spec.num_attention_heads):
            if head not in keep:
                proj[:, head * d:(head + 1) * d] = 0
    ref = build(spec)
    load_full_state_dict(ref, masked)
    tokens = tiny_windows[0][:2, :-1]
    torch.testing.assert_close(_logits(pruned, tokens), _logits(ref, tokens), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(pruned, tokens), _logits(model, tokens), atol=1e-3)  # it did prune


def test_hidden_pruning_keeps_chosen_channels(tiny_model):
    from nemo_minitron.prune.plan import make_plan
    from nemo_minitron.prune.width import prune_model

    model, spec = tiny_model
    plan = make_plan(_scores(spec, 3), spec, {"hidden_size": 40})
    pruned, spec2 = prune_model(model, spec, plan)
    before, after = _full(model), _full(pruned)
    hk = plan.hidden
    assert torch.equal(after["embedding.word_embeddings.weight"], before["embedding.word_embeddings.weight"][:, hk])
    assert torch.equal(after["decoder.layers.2.pre_mlp_layernorm.weight"], before["decoder.layers.2.pre_mlp_layernorm.weight"][hk])
    assert torch.equal(after["decoder.layers.1.mlp.linear_fc2.weight"], before["decoder.layers.1.mlp.linear_fc2.weight"][hk])
    assert after["decoder.layers.0.self_attention.linear_qkv.weight"].shape == (8 * 16, 40)
    assert spec2.hidden_size == 40 and spec2.kv_channels == 16  # heads*head_dim (64) != hidden (40)


def test_te_names_prune_like_local(tiny_model):
    """A TE-spec state dict (fused norms, _extra_state) prunes to the same weights and the same HF export."""
    from nemo_minitron.checkpoint.hf import TE_NORM_NAMES, mcore_to_hf
    from nemo_minitron.prune.plan import make_plan
    from nemo_minitron.prune.trim import new_spec, trim

    model, spec = tiny_model
    local = _full(model)
    te = {}
    for k, v in local.items():
        for a, b in TE_NORM_NAMES.items():
            k = k.replace(a, b)
        te[k] = v
        if k.endswith(".weight") and "linear" in k:
            te[k.replace(".weight", "._extra_state")] = torch.tensor([1.0, 2.0])  # stale FP8 scaling state
    targets = {"hidden_size": 48, "ffn_hidden_size": 64, "num_query_groups": 1, "num_attention_heads": 2}
    plan = make_plan(_scores(spec, 5), spec, targets)
    a, b = trim(local, spec, plan), trim(te, spec, plan)
    assert not any(k.endswith("_extra_state") for k in b)
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in b
    ha, hb = mcore_to_hf(a, new_spec(spec, targets)), mcore_to_hf(b, new_spec(spec, targets))
    assert ha.keys() == hb.keys()
    for k in ha:
        assert torch.equal(ha[k], hb[k]), k


def test_merge_pruned_heads_folds_output_projection(tiny_model):
    from nemo_minitron.prune.plan import make_plan
    from nemo_minitron.prune.trim import trim

    model, spec = tiny_model
    full = _full(model)
    plan = make_plan(_scores(spec, 7), spec, {"num_attention_heads": 2})
    plain, merged = trim(full, spec, plan), trim(full, spec, plan, merge_pruned_heads=True)
    name = "decoder.layers.0.self_attention.linear_proj.weight"
    y = full[name].reshape(64, 2, 2, 16)
    g0 = plan.groups[0][0]
    kept, pruned = int(plan.heads[0][0][0]), int(plan.pruned_heads[0][0][0])
    torch.testing.assert_close(merged[name][:, :16], y[:, g0, kept] + y[:, g0, pruned])
    torch.testing.assert_close(plain[name][:, :16], y[:, g0, kept])
    qkv = "decoder.layers.0.self_attention.linear_qkv.weight"
    assert torch.equal(plain[qkv], merged[qkv])


@pytest.mark.parametrize("targets,tp,needle", [
    ({"hidden_size": 65}, 1, "larger than the source"),
    ({"num_attention_heads": 3}, 1, "not divisible by num_query_groups"),
    ({"num_attention_heads": 4, "num_query_groups": 1}, 1, "heads per group"),
    ({"ffn_hidden_size": 99}, 2, "not divisible by tensor_model_parallel_size=2"),
    ({"num_query_groups": 1, "num_attention_heads": 2}, 2, "not divisible by tensor_model_parallel_size=2"),
    ({"num_layers_x": 3}, 1, "unknown pruning dimension"),
    ({"hidden_size": 0}, 1, "positive integer"),
])
def test_bad_targets(tiny_spec, targets, tp, needle):
    from nemo_minitron.errors import UserError
    from nemo_minitron.prune.plan import validate_targets

    with pytest.raises(UserError, match=needle):
        validate_targets(tiny_spec, targets, tp)


def test_cli_refuses_before_calibration(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    proc = in_process(capsys, "prune", f"model={tiny_ckpt}", f"output={out}", "data.calibration=/nonexistent/data",
                   "prune.ffn_hidden_size=999")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: prune.ffn_hidden_size=999")
    proc = in_process(capsys, "prune", f"model={tiny_ckpt}", f"output={out}", "prune.heads=3")
    assert proc.returncode == 2 and "unknown config key 'prune.heads'" in proc.stderr
    assert "calibration" not in proc.stdout and not out.exists()


@pytest.fixture(scope="module")
def pruned_tp1(tiny_ckpt, tiny_data, tmp_path_factory, dist_single):
    from nemo_minitron.checkpoint import nemo as ck

    out = tmp_path_factory.mktemp("pruned") / "tp1"
    cli_here(None, "prune", f"model={tiny_ckpt}", f"output={out}", f"data.calibration={tiny_data}",
             "data.calibration_samples=16", "data.seq_length=32", *TARGETS, TRIM)
    ck.validate(out)
    return out


def test_report_scores_and_reuse(pruned_tp1, tiny_ckpt, tmp_path, dist_single, capsys):
    rep = json.loads((pruned_tp1 / "pruning" / "report.json").read_text())
    assert rep["shapes"]["hidden_size"] == {"source": 64, "pruned": 48}
    assert rep["params"]["pruned"] < rep["params"]["source"]
    for png in rep["plots"].values():
        assert (pruned_tp1 / "pruning" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # re-prune from the saved scores: no calibration, identical result
    again = tmp_path / "again"
    proc = cli_here(capsys, "prune", f"model={tiny_ckpt}", f"output={again}", f"prune.scores={pruned_tp1}", *TARGETS, TRIM)
    assert "calibration:" not in proc.stderr  # no calibration progress bar: scores were reused
    from nemo_minitron.checkpoint.loader import load_model

    a, b = _full(load_model(pruned_tp1)[0]), _full(load_model(again)[0])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((again / "pruning" / "report.json").read_text())["scores_from"] == str(pruned_tp1)


def test_pruned_checkpoint_evaluates_in_fresh_process(pruned_tp1, tiny_ckpt, tiny_data, dist_single):
    """The pruned checkpoint, loaded by a fresh process, gives the loss of the pruned model held here (the
    trimmed weights survived the save), and that loss is not the source model's."""
    import re

    from nemo_minitron.checkpoint.loader import load_model
    from nemo_minitron.data import indexed
    from nemo_minitron.evaluate import heldout_loss

    proc = cli("evaluate", f"model={pruned_tp1}", f"data={tiny_data}", "eval.num_samples=4", "eval.seq_length=32")
    shown = float(re.search(r"model .*: loss ([0-9.]+)", proc.stdout).group(1))
    windows = indexed.windows(str(tiny_data), 4, 32)
    here = heldout_loss(load_model(pruned_tp1)[0], windows, 4)["loss"]
    source = heldout_loss(load_model(tiny_ckpt)[0], windows, 4)["loss"]
    assert abs(shown - here) < 1e-4 and abs(here - source) > 1e-3, (shown, here, source)
    assert "TP=1" in proc.stdout


@pytest.mark.parallel
@pytest.mark.parametrize("tp,pp", [(1, 2)], ids=["PP2"])
def test_pruning_identical_across_layouts(tp, pp, pruned_tp1, tiny_ckpt, tiny_data, tmp_path, dist_single):
    """Trimmed weights identical at PP=2. TP=2 (with DP=2: every pruned weight and score within 1e-5, the same
    slices): test_cluster.py's pruning test."""
    out = tmp_path / "pruned"
    torchrun(["-m", "nemo_minitron.cli", "prune", f"model={tiny_ckpt}", f"output={out}",
              f"data.calibration={tiny_data}", "data.calibration_samples=16", "data.seq_length=32", *TARGETS, TRIM,
              f"trainer.strategy.tensor_model_parallel_size={tp}", f"trainer.strategy.pipeline_model_parallel_size={pp}"])
    r1 = json.loads((pruned_tp1 / "pruning" / "report.json").read_text())
    r2 = json.loads((out / "pruning" / "report.json").read_text())
    assert r1["plan"] == r2["plan"]  # the same units kept
    s1, s2 = (torch.load(p / "pruning" / "scores.pt") for p in (pruned_tp1, out))
    for k in ("heads", "ffn", "hidden"):
        torch.testing.assert_close(s1[k], s2[k], rtol=1e-5, atol=1e-8)
    from nemo_minitron.checkpoint.loader import load_model

    a, b = _full(load_model(pruned_tp1)[0]), _full(load_model(out)[0])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_callback_prunes_then_nemo_trains(pruned_tp1, tiny_ckpt, tiny_data, dist_single):
    """The width-pruning callback (least-squares reconstruction, its default) prunes before NeMo's first step;
    the optimizer then trains the pruned parameters: every one of them changes at lr=1e-3."""
    import lightning.pytorch as pl

    from conftest import nemo_fit_with_callback
    from nemo_minitron.checkpoint.loader import load_model
    from nemo_minitron.prune.callbacks import WidthPruningCallback

    class FirstStepWeights(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not hasattr(self, "weights"):
                m = pl_module.module
                while hasattr(m, "module"):
                    m = m.module
                self.weights = {k: v.detach().clone() for k, v in _full(m).items()}

    targets = {t.split("=")[0].split(".")[1]: int(t.split("=")[1]) for t in TARGETS}
    cb = WidthPruningCallback(source=tiny_ckpt, targets=targets, calibration=str(tiny_data),
                              calibration_samples=16, seq_length=32, micro_batch_size=4)
    first = FirstStepWeights()
    model, trained = nemo_fit_with_callback(tiny_ckpt, cb, tiny_data, steps=2, lr=1e-3, extra_callbacks=[first])

    assert cb.pruned_spec.hidden_size == 48 and model.config.ffn_hidden_size == 96
    assert trained.decoder.layers[0].mlp.linear_fc2.weight.shape == (48, 96)
    assert cb.reconstruction and cb.reconstruction["layers"]  # refitted layer by layer
    # what NeMo started from: the same units as `nemo-minitron prune` keeps (its trimmed weights), with the
    # consuming layers refitted: norms and embeddings identical, refitted projections not
    trimmed = _full(load_model(pruned_tp1)[0])
    start = first.weights
    assert start.keys() == trimmed.keys()
    for k, v in trimmed.items():
        if k.endswith(("layernorm.weight", "layer_norm_weight", "word_embeddings.weight")):
            assert torch.equal(start[k], v), k
        elif k.endswith(("linear_fc2.weight", "linear_proj.weight")):
            assert not torch.equal(start[k], v), k
    # and the optimizer updated every pruned parameter
    got = _full(trained)
    for k, v in start.items():
        assert got[k].shape == v.shape and not torch.equal(got[k], v), k
