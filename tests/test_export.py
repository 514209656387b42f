"""Export to Hugging Face: transformers (in a fresh process) reproduces the NeMo model's logits."""

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import cli_here, in_process, run

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


def _printed_and_written_params(stdout: str, out: Path) -> tuple[int, int]:
    """The parameter count export says it writes ("writing 0.2M parameters (215,104; ...") and the one in
    the safetensors files it wrote."""
    import re

    from safetensors import safe_open

    printed = int(re.search(r"^writing [\d.]+M parameters \(([\d,]+);", stdout, re.M).group(1).replace(",", ""))
    written = 0
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            written += sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())
    return printed, written


def test_export_tiny_untied_and_dtype(tiny_ckpt, tiny_windows, tmp_path, dist_single, capsys):
    """Also: the parameter count export prints is what its files hold, for untied and tied embeddings (a
    tied output layer is the embedding, written once, counted once)."""
    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.checkpoint.export import export_hf
    from nemo_minitron.model import build, count_params, tiny_spec

    tokens = tiny_windows[0][:2, :-1]
    out32, out16 = tmp_path / "fp32", tmp_path / "bf16"
    export_hf(tiny_ckpt, out32, dtype="fp32")
    printed, written = _printed_and_written_params(capsys.readouterr().out, out32)
    assert printed == written == count_params(ck.read_spec(tiny_ckpt)), (printed, written)
    tied_spec = tiny_spec(share_embeddings_and_output_weights=True)
    tied = ck.save(tmp_path / "tied_ckpt", build(tied_spec), tied_spec)
    export_hf(tied, tmp_path / "tied_hf", dtype="fp32")
    printed, written = _printed_and_written_params(capsys.readouterr().out, tmp_path / "tied_hf")
    assert printed == written == count_params(tied_spec), (printed, written)
    proc = cli_here(capsys, "export", f"model={tiny_ckpt}", f"output={out16}")  # default bf16
    assert proc.stdout.strip().splitlines()[-1] == f"wrote checkpoint: {out16}"
    assert _printed_and_written_params(proc.stdout, out16) == (count_params(ck.read_spec(tiny_ckpt)),) * 2
    cfg16 = json.loads((out16 / "config.json").read_text())
    assert cfg16.get("dtype", cfg16.get("torch_dtype")) == "bfloat16"
    hf = _hf_logits_fresh(tmp_path, tokens, [out32])
    diff = (hf[(str(out32), "torch.float32")] - _megatron_logits(tiny_ckpt, tokens)).abs().max().item()
    assert diff < 1e-4, diff


def test_export_refuses_corrupt_and_existing(tiny_ckpt, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    (bad / "weights" / "common.pt").unlink()
    shard = sorted((bad / "weights").glob("*.distcp"))[0]
    shard.unlink()
    out = tmp_path / "out"
    proc = in_process(capsys, "export", f"model={bad}", f"output={out}")
    assert proc.returncode == 2 and "missing" in proc.stderr.strip().splitlines()[-1]
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    out.mkdir()
    (out / "x").write_text("keep")
    proc = in_process(capsys, "export", f"model={tiny_ckpt}", f"output={out}")
    assert proc.returncode == 2 and "exists and is not empty" in proc.stderr
    assert (out / "x").read_text() == "keep"


def _save_with_fp8_state(model, spec, path):
    """Write ``model`` as NeMo on H100 with the Transformer Engine spec would: FP8 scaling state in every
    layer's ``_extra_state``. (The norm keys are TE's fused names for both specs: megatron's local spec maps
    input_layernorm / pre_mlp_layernorm to linear_qkv / linear_fc1 ``layer_norm_weight`` in checkpoints.)"""
    import io

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from nemo_minitron.checkpoint import nemo as ck

    sharded = model.sharded_state_dict(prefix="module.", metadata=ck.CONTENT_METADATA)
    n_extra = 0
    for name, v in sharded.items():
        if isinstance(v, ShardedObject) and name.endswith("_extra_state"):
            v.data = io.BytesIO(b"fp8-amax-history-and-scales")
            n_extra += 1
    assert n_extra >= 2 * spec.num_layers
    (path / "weights").mkdir(parents=True)
    dist_checkpointing.save({"state_dict": {}, "sharded_state_dict": sharded}, str(path / "weights"),
                            content_metadata=ck.CONTENT_METADATA)
    ck.write_context(path, spec)


def test_checkpoint_with_te_fp8_state_loads_and_exports_like_local(tiny_ckpt, tiny_windows, tmp_path, dist_single):
    from safetensors.torch import load_file

    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.checkpoint.export import export_hf
    from nemo_minitron.checkpoint.loader import load_model

    stored = ck.checkpoint_keys(tiny_ckpt)  # written by the local spec, yet TE's fused norm names
    assert any(k.endswith("linear_qkv.layer_norm_weight") for k in stored)
    assert any(k.endswith("linear_fc1.layer_norm_weight") for k in stored)
    assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in stored)
    model, spec, _ = load_model(tiny_ckpt)
    te = tmp_path / "te_ckpt"
    _save_with_fp8_state(model, spec, te)
    tokens = tiny_windows[0][:2, :-1]
    assert torch.equal(_megatron_logits(te, tokens), _megatron_logits(tiny_ckpt, tokens))
    a, b = export_hf(tiny_ckpt, tmp_path / "hf_local", "fp32"), export_hf(te, tmp_path / "hf_te", "fp32")
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_nemo_archive_round_trip(tiny_ckpt, tiny_windows, tmp_path, dist_single, capsys):
    """export format=nemo -> one tar file; NeMo unpacks and restores it (its own SaveRestoreConnector and
    load_context); import source=FILE.nemo reads it back; logits identical throughout."""
    import tarfile

    from nemo.core.connectors.save_restore_connector import SaveRestoreConnector
    from nemo.lightning.io import load_context

    from nemo_minitron import platform
    from nemo_minitron.checkpoint import nemo as ck

    tokens = tiny_windows[0][:2, :-1]
    ref = _megatron_logits(tiny_ckpt, tokens)
    archive = tmp_path / "tiny.nemo"
    p = cli_here(capsys, "export", f"model={tiny_ckpt}", "format=nemo", f"output={archive}")
    assert p.stdout.strip().splitlines()[-1] == f"wrote checkpoint: {archive}"
    assert archive.is_file() and tarfile.is_tarfile(archive)
    assert not list(tmp_path.glob("*.partial"))

    # NeMo restores it: its .nemo unpacker, its context loader (LlamaModel + config + tokenizer), weights
    unpacked = tmp_path / "unpacked"
    SaveRestoreConnector._unpack_nemo_file(str(archive), str(unpacked))
    import fiddle as fdl

    cfg = load_context(unpacked / "context", subpath="model", build=False)
    for k, v in platform.config_overrides().items():  # on GPU: nothing (NeMo's defaults need TE fusions)
        setattr(cfg.config, k, v)
    lm = fdl.build(cfg)
    assert type(lm).__name__ == "LlamaModel" and lm.config.num_layers == 4
    module = lm.config.configure_model(None)
    ck.load_weights(unpacked, module)
    module.eval()
    with torch.no_grad():
        nemo_logits = module(tokens, torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens), None)
    assert torch.equal(nemo_logits, ref)

    back = tmp_path / "back"
    p = cli_here(capsys, "import", f"source={archive}", f"output={back}")
    assert p.stdout.strip().splitlines()[-1] == f"wrote checkpoint: {back}"
    assert torch.equal(_megatron_logits(back, tokens), ref)

    # a truncated archive is refused with the reason, nothing written
    bad = tmp_path / "bad.nemo"
    bad.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    p = in_process(capsys, "import", f"source={bad}", f"output={tmp_path / 'never'}")
    assert p.returncode == 2 and ("incomplete" in p.stderr or "not a readable" in p.stderr), p.stderr[-300:]
    assert not (tmp_path / "never").exists() and not (tmp_path / "never.partial").exists()
    p = in_process(capsys, "export", f"model={tiny_ckpt}", "format=nemo", f"output={archive}")
    assert p.returncode == 2 and "exists" in p.stderr


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


def test_convert_between_layer_specs(tiny_ckpt, tiny_windows, tmp_path, dist_single, capsys):
    """convert transformer_impl=local drops TE's FP8 state of a cluster checkpoint; =transformer_engine gives
    the same tensors back under the same keys; both load and compute exactly like the source."""
    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.checkpoint.convert import read_weights
    from nemo_minitron.checkpoint.loader import load_model
    from nemo_minitron.model import build

    model, spec, _ = load_model(tiny_ckpt)
    te = tmp_path / "te_ckpt"
    _save_with_fp8_state(model, spec, te)
    src, fp8 = read_weights(te, build(spec, initialize=False))
    assert fp8 >= 2 * spec.num_layers  # the cluster checkpoint carries FP8 scaling state

    local = tmp_path / "local"
    p = cli_here(capsys, "convert", f"model={te}", f"output={local}", "transformer_impl=local")
    assert p.stdout.strip().splitlines()[-1] == f"wrote checkpoint: {local}"
    record = json.loads((local / "convert.json").read_text())
    assert record["fp8_state"] == "dropped" and record["fp8_state_objects_in_source"] == fp8
    back = tmp_path / "back"
    cli_here(capsys, "convert", f"model={local}", f"output={back}", "transformer_impl=transformer_engine")
    assert json.loads((back / "convert.json").read_text())["transformer_impl"] == "transformer_engine"
    tokens = tiny_windows[0][:2, :-1]
    ref = _megatron_logits(te, tokens)
    for out in (local, back):
        assert ck.checkpoint_keys(out) == ck.checkpoint_keys(te)
        got, left = read_weights(out, build(spec, initialize=False))
        assert left == 0 and got.keys() == src.keys()
        assert all(torch.equal(got[k], src[k]) for k in src)
        assert torch.equal(_megatron_logits(out, tokens), ref)
        assert not list(tmp_path.glob("*.partial"))

    # refused before anything is written
    for args, msg in [((f"model={te}", "transformer_impl=local", "fp8_state=keep"), "no FP8 state to keep"),
                      ((f"model={te}", "transformer_impl=transformer_engine", "fp8_state=keep"), "Transformer Engine"),
                      ((f"model={te}", "transformer_impl=te"), "one of transformer_engine, local"),
                      ((f"model={tmp_path / 'nope'}", "transformer_impl=local"), "does not exist"),
                      ((f"model={te}", "transformer_impl=local", f"output={local}"), "exists and is not empty")]:
        if not any(a.startswith("output=") for a in args):
            args = (*args, f"output={tmp_path / 'refused'}")
        p = in_process(capsys, "convert", *args)
        assert p.returncode == 2 and msg in p.stderr, (args, p.stderr)
    assert not (tmp_path / "refused").exists()
