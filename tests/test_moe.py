"""Mixture-of-experts families on tiny random models from ``transformers``: Mixtral (top-k probabilities always
renormalized) and Qwen3-MoE (q/k norms; ``norm_topk_prob=False``, the full softmax's probabilities). Import, the
Hugging Face directory read directly and the HF export are compared with ``transformers`` itself (logits, fp32,
1e-5 of their scale); the commands that do not handle experts yet refuse in one line."""

import json

import pytest
import torch

from hf_fixtures import TEXT

MOE_MODELS = {  # name -> (model_type, config overrides)
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=96)),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=48,
                                    intermediate_size=160, head_dim=16, norm_topk_prob=False)),
}


@pytest.fixture(scope="module")
def moe_ckpts(tmp_path_factory, dist_single):
    from hf_fixtures import make_hf_model

    from nemo_minitron.checkpoint.importer import import_hf

    root = tmp_path_factory.mktemp("moe")
    out = {}
    for name, (model_type, overrides) in MOE_MODELS.items():
        src = make_hf_model(root / f"{name}-hf", model_type, **overrides)
        out[name] = (src, import_hf(src, root / f"{name}-nemo"))
    return out


def _ids(src):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src))
    return torch.tensor([tok(TEXT)["input_ids"][:96]] * 2)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids), None)[..., :320]


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _close(got, ref, what):
    diff, scale = (got.double() - ref.double()).abs().max().item(), max(1.0, ref.abs().max().item())
    print(f"{what}: max |diff| = {diff:.2e} (max |logit| {scale:.1f})")
    assert diff <= 1e-5 * scale, (what, diff, scale)


@pytest.mark.parametrize("name", list(MOE_MODELS))
def test_moe_import_and_export_match_transformers(name, moe_ckpts, tmp_path):
    from nemo_minitron import cli as cli_mod
    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.checkpoint.loader import load_model
    from nemo_minitron.model import count_params

    src, ckpt = moe_ckpts[name]
    hf_cfg = json.loads((src / "config.json").read_text())
    spec = ck.read_spec(ckpt)
    experts = hf_cfg.get("num_local_experts") or hf_cfg.get("num_experts")
    width = hf_cfg.get("moe_intermediate_size") or hf_cfg["intermediate_size"]
    assert spec.config_class == {"mixtral": "MixtralConfig", "qwen3_moe": "Qwen3MoEConfig"}[name]
    assert (spec.num_moe_experts, spec.moe_router_topk, spec.moe_ffn_hidden_size) == \
        (experts, hf_cfg["num_experts_per_tok"], width)
    # Mixtral renormalizes the top-k probabilities (megatron: softmax over the top-k logits); Qwen3-MoE without
    # norm_topk_prob keeps the full softmax's (megatron: pre-softmax)
    assert spec.get("moe_router_pre_softmax") is (name == "qwen3_moe")
    hf_model = _hf(src)
    assert count_params(spec) == sum(p.numel() for p in hf_model.parameters())
    per_expert = 3 * spec.hidden_size * width * spec.num_layers
    assert count_params(spec) - count_params(spec, active=True) == (experts - spec.moe_router_topk) * per_expert

    ids = _ids(src)
    with torch.no_grad():
        ref = hf_model.double()(ids).logits.float()
    for source in (ckpt, src):
        model, _, _ = load_model(source)
        _close(_logits(model, ids), ref, f"{name} {source.name} vs transformers")

    out = tmp_path / "hf"
    assert cli_mod.main(["export", f"model={ckpt}", "format=hf", f"output={out}", "export.dtype=fp32"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == hf_cfg["architectures"]
    for key in ("num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                "intermediate_size", "norm_topk_prob"):
        assert cfg.get(key) == hf_cfg.get(key), key
    with torch.no_grad():
        _close(_hf(out).double()(ids).logits.float(), ref, f"{name} HF export")


def test_moe_refusals(moe_ckpts, tmp_path, capsys):
    """What the converter cannot represent is named before any weight is read; commands that do not handle experts
    yet refuse in one line (no traceback)."""
    from nemo_minitron import cli as cli_mod
    from nemo_minitron.errors import UserError
    from nemo_minitron.model.spec import from_hf_config

    src, ckpt = moe_ckpts["qwen3_moe"]
    base = json.loads((src / "config.json").read_text())
    for change, words in ((dict(num_experts_per_tok=7), "more than the 6 experts"),
                          (dict(decoder_sparse_step=2), "decoder_sparse_step=2"),
                          (dict(mlp_only_layers=[1]), "mlp_only_layers"),
                          (dict(num_experts=0), "num_experts=0")):
        with pytest.raises(UserError, match=words):
            from_hf_config({**base, **change})
    mixtral = json.loads((moe_ckpts["mixtral"][0] / "config.json").read_text())
    with pytest.raises(UserError, match="router_jitter_noise"):
        from_hf_config({**mixtral, "router_jitter_noise": 0.1})

    capsys.readouterr()
    assert cli_mod.main(["prune", f"model={ckpt}", f"output={tmp_path / 'p'}", "prune.hidden_size=32",
                         f"data.calibration={tmp_path / 'none'}"]) == 2
    assert cli_mod.main(["distill", f"teacher={ckpt}", f"student={ckpt}", f"output={tmp_path / 'd'}",
                         f"data.train={tmp_path / 'none'}", f"data.validation={tmp_path / 'none'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("mixture-of-experts" in e for e in err), err
    assert not (tmp_path / "p").exists() and not (tmp_path / "d").exists()
