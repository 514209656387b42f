"""Export to Hugging Face: transformers (in a fresh process) reproduces the NeMo model's logits."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import cli, run

WORKER = Path(__file__).resolve().parent / "hf_logits_worker.py"


def _megatron_logits(ckpt, tokens):
    from nemo_minitron.checkpoint.loader import load_model

    model, _, _ = load_model(ckpt)
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens), None)


def _hf_logits_fresh(tmp_path, tokens, dirs):
    torch.save(tokens, tmp_path / "tokens.pt")
    run([sys.executable, WORKER, tmp_path / "tokens.pt", tmp_path / "logits.pt", *dirs])
    return torch.load(tmp_path / "logits.pt")


def test_export_tiny_untied_and_dtype(tiny_ckpt, tiny_windows, tmp_path, dist_single):
    from nemo_minitron.checkpoint.export import export_hf

    tokens = tiny_windows[0][:2, :-1]
    out32, out16 = tmp_path / "fp32", tmp_path / "bf16"
    export_hf(tiny_ckpt, out32, dtype="fp32")
    proc = cli("export", f"model={tiny_ckpt}", f"output={out16}")  # default bf16
    assert proc.stdout.strip().splitlines()[-1] == f"wrote checkpoint: {out16}"
    cfg16 = json.loads((out16 / "config.json").read_text())
    assert cfg16.get("dtype", cfg16.get("torch_dtype")) == "bfloat16"
    hf = _hf_logits_fresh(tmp_path, tokens, [out32])
    diff = (hf[(str(out32), "torch.float32")] - _megatron_logits(tiny_ckpt, tokens)).abs().max().item()
    assert diff < 1e-4, diff


def test_export_refuses_corrupt_and_existing(tiny_ckpt, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    (bad / "weights" / "common.pt").unlink()
    shard = sorted((bad / "weights").glob("*.distcp"))[0]
    shard.unlink()
    out = tmp_path / "out"
    proc = cli("export", f"model={bad}", f"output={out}", check=False)
    assert proc.returncode == 2 and "missing" in proc.stderr.strip().splitlines()[-1]
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    out.mkdir()
    (out / "x").write_text("keep")
    proc = cli("export", f"model={tiny_ckpt}", f"output={out}", check=False)
    assert proc.returncode == 2 and "exists and is not empty" in proc.stderr
    assert (out / "x").read_text() == "keep"


@pytest.mark.slow
def test_export_smollm2_and_pruned_variants(smol, tmp_path, dist_single):
    """SmolLM2-135M, a width-pruned (hidden 384 / ffn 1024 / 6 heads) and a depth-pruned (20 layers) variant."""
    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.checkpoint.export import export_hf
    from nemo_minitron.checkpoint.loader import load_model
    from nemo_minitron.data import indexed
    from nemo_minitron.prune.stage import prune

    model, spec, _ = load_model(smol / "ckpt")
    calib = indexed.windows(smol / "calibration", 8, 128)
    variants = {"teacher": smol / "ckpt"}
    for name, kw in {"width": dict(targets={"hidden_size": 384, "ffn_hidden_size": 1024, "num_attention_heads": 6}),
                     "depth": dict(targets={}, num_layers=20, depth_method="block_influence")}.items():
        pruned, spec2, *_ = prune(model, spec, kw.pop("targets"), windows=calib, depth_windows=calib,
                                  progress=False, **kw)
        variants[name] = ck.save(tmp_path / f"{name}_ckpt", pruned, spec2, tokenizer_dir=ck.tokenizer_dir(smol / "ckpt"))
    tokens = indexed.windows(smol / "heldout", 2, 96, offset=3000)[:, :-1]
    exported = {}
    for name, ckpt in variants.items():
        exported[name] = export_hf(ckpt, tmp_path / f"{name}_hf", dtype="fp32")
    cfg = json.loads((exported["width"] / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["head_dim"]) == (384, 6, 64)  # 6*64 != 384
    assert json.loads((exported["depth"] / "config.json").read_text())["num_hidden_layers"] == 20
    hf = _hf_logits_fresh(tmp_path, tokens, list(exported.values()))
    for name, ckpt in variants.items():
        ours = _megatron_logits(ckpt, tokens)
        hf32, hf64 = hf[(str(exported[name]), "torch.float32")], hf[(str(exported[name]), "torch.float64")]
        diff = (hf32 - ours).abs().max().item()
        noise = (hf32.double() - hf64).abs().max().item()  # transformers' own fp32 rounding error
        ours_err = (ours.double() - hf64).abs().max().item()
        print(f"{name}: max |logits(transformers fp32, exported) - logits(NeMo fp32)| = {diff:.2e}; "
              f"vs fp64 reference: NeMo {ours_err:.2e}, transformers fp32 {noise:.2e}")
        # < 1e-3, unless fp32 itself cannot resolve it (pruned models with ~6500-magnitude residual
        # channels): then NeMo must be as close to the fp64 reference as transformers' own fp32 is
        assert diff < 1e-3 or ours_err <= 2 * noise + 1e-4, (name, diff, ours_err, noise)
