"""The GPU production path, checked without a GPU.

An emulated GPU (``NEMO_MINITRON_EMULATE_GPU=1``, ``nemo_minitron/platform/emulated_gpu.py``) is a compute
device that is not the host: tensors on it hold CPU data, and every operation checks CUDA's placement rules
(no host tensor in an operation with device tensors, no host tensor in a collective of this package, no
``.numpy()`` of a device tensor, no device tensor in a file or an object collective, no load without
``map_location``). On it, the commands of the GPU path run at TP, PP and DP > 1 and give the CPU's numbers;
on the code before the GPU-path fixes they failed (a host tensor in the TP all-gather of pruning, a host mask
and identity in the least-squares refit, a host count in the DP all-reduce of calibration, ...).
Also here: activation recomputation re-runs what it says and changes no gradient.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import WORKERS, run, torchrun

EMULATED = {"NEMO_MINITRON_EMULATE_GPU": "1"}


def test_emulated_gpu_holds_cudas_placement_rules():
    """Each rule on its own (a mistake of each kind fails, CUDA's exceptions pass), and the non-finite guard's
    one read back per step (it used to synchronise once per parameter)."""
    out = run([sys.executable, WORKERS / "emulated_rules.py"], env=EMULATED).stdout
    assert "all 8 rules hold" in out, out[-3000:]


def _weights(ckpt):
    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.model import build

    m = build(ck.read_spec(ckpt), initialize=False)
    ck.load_weights(ckpt, m)
    return {k: v.float() for k, v in m.state_dict().items() if torch.is_tensor(v)}


def test_gpu_path_on_an_emulated_gpu_at_tp_pp_dp_equals_the_cpu(tiny_ckpt, tiny_data, tmp_path, dist_single):
    """On the emulated GPU: width pruning with least squares at TP=2 x DP=2, depth pruning by lm_loss at
    PP=2 x DP=2, re-pruning from the saved scores.pt, evaluation at DP=4, a search's ranking from calibration
    statistics at TP=2 x DP=2, and distillation (KL + CE + a hidden-state
    loss through a learned projection) of the width-pruned student at TP=2 x PP=2;
    the same scores, kept layers, weights, losses as one CPU process (1e-5)."""
    from nemo_minitron.distill.train import read_metrics

    gpu, host = tmp_path / "gpu", tmp_path / "cpu"
    kd = torchrun([WORKERS / "gpu_path.py", tiny_ckpt, tiny_data, gpu], nproc=4, env=EMULATED).stdout
    assert "(TP=2 PP=2 DP=1 SP, fp32" in kd and f"wrote checkpoint: {gpu / 'kd' / 'student'}" in kd
    run([sys.executable, WORKERS / "gpu_path.py", tiny_ckpt, tiny_data, host])

    for name in ("width", "rescored"):  # importance scores, then the pruned (and refitted) weights
        a = torch.load(gpu / name / "pruning" / "scores.pt", map_location="cpu", weights_only=True)
        b = torch.load(host / name / "pruning" / "scores.pt", map_location="cpu", weights_only=True)
        for k in ("heads", "ffn", "hidden"):
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-8, msg=lambda m: f"{name} {k}: {m}")
    for name in ("width", "depth", "rescored"):
        wa, wb = _weights(gpu / name), _weights(host / name)
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-5, msg=lambda m: f"{name} {k}: {m}")
    depth = [json.loads((d / "depth" / "pruning" / "report.json").read_text())["depth"] for d in (gpu, host)]
    assert depth[0]["dropped_layers"] == depth[1]["dropped_layers"] and len(depth[0]["dropped_layers"]) == 2
    assert depth[0]["scores"] == pytest.approx(depth[1]["scores"], abs=1e-5)
    for name in ("width", "depth"):
        assert json.loads((gpu / f"{name}.json").read_text())["loss"] == pytest.approx(
            json.loads((host / f"{name}.json").read_text())["loss"], abs=1e-5)
    ranked = [{c["name"]: c["pruned_loss"] for c in json.loads((d / "search" / "candidates.json").read_text())[
        "candidates"]} for d in (gpu, host)]
    common = set(ranked[0]) & set(ranked[1])  # (TP=2 takes fewer shapes)
    assert len(common) >= 2 and all(ranked[0][n] == pytest.approx(ranked[1][n], abs=1e-5) for n in common), ranked
    got, ref = read_metrics(gpu / "kd" / "metrics.jsonl"), read_metrics(host / "kd" / "metrics.jsonl")
    assert sorted(got["train"]) == [1, 2]
    for step in (1, 2):
        for term in ("loss", "kd_loss", "lm_loss", "intermediate_loss"):
            assert got["train"][step][term] == pytest.approx(ref["train"][step][term], abs=1e-5), (step, term)
    assert got["val"][2] == pytest.approx(ref["val"][2], abs=1e-5)


RECOMPUTE = {"selective": {"recompute_granularity": "selective"},
             "full_uniform": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
             "full_block": {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 2}}


@pytest.mark.parametrize("name", list(RECOMPUTE))
def test_recompute_reruns_the_forward_and_changes_no_gradient(dist_single, tiny_spec, name):
    """model.recompute_*: the recomputed modules run again in the backward (selective: the core attention of
    every layer; full uniform x1: every layer; full block of 2: the first two of four), and the loss and every
    gradient equal those without recomputation."""
    from nemo_minitron.model import build
    from nemo_minitron.model.forward import lm_loss

    windows = torch.randint(0, tiny_spec.vocab_size, (4, 33), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    ref = build(tiny_spec)
    got = build(tiny_spec, initialize=False, **RECOMPUTE[name])
    got.load_state_dict(ref.state_dict())
    assert got.config.recompute_granularity == RECOMPUTE[name]["recompute_granularity"]

    def fwd_bwd(m):
        calls = {}
        for i, layer in enumerate(m.decoder.layers):
            for part, mod in (("attn", layer.self_attention.core_attention), ("mlp", layer.mlp)):
                mod.register_forward_pre_hook(lambda *a, key=(part, i): calls.__setitem__(key, calls.get(key, 0) + 1))
        m.train()
        loss, _ = lm_loss(m, windows, 2, forward_only=False)
        return loss, {k: p.grad for k, p in m.named_parameters()}, calls

    l0, g0, c0 = fwd_bwd(ref)
    l1, g1, c1 = fwd_bwd(got)
    assert set(c0.values()) == {2}  # 2 micro-batches, each module once
    again = {"selective": {("attn", i) for i in range(4)},
             "full_uniform": {(p, i) for p in ("attn", "mlp") for i in range(4)},
             "full_block": {(p, i) for p in ("attn", "mlp") for i in range(2)}}[name]
    assert {k for k, v in c1.items() if v == 4} == again and {k for k, v in c1.items() if v == 2} == set(c0) - again
    assert l1 == l0
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-6, atol=1e-8, msg=lambda m: f"{k}: {m}")
