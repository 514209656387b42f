"""HF -> NeMo import on tiny Llama variants: logits equal transformers', config preserved, errors early."""

import json

import pytest
import torch

from conftest import cli, cli_here, in_process
from hf_fixtures import TEXT, make_hf_llama

VARIANTS = {
    "gqa-untied": {},
    "tied": dict(tie_word_embeddings=True),
    "head_dim": dict(head_dim=24),  # heads * head_dim (96) != hidden (64), as in pruned Minitron models
    "llama31-rope": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mha": dict(num_key_value_heads=4),
}


def megatron_logits(model, tokens):
    with torch.no_grad():
        pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        return model(tokens, pos, None)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_import_matches_transformers(variant, tmp_path, dist_single):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nemo_minitron import cli as cli_mod
    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.checkpoint.loader import load_model

    src = make_hf_llama(tmp_path / "hf", **VARIANTS[variant])
    out = tmp_path / "nemo"
    assert cli_mod.main(["import", f"source={src}", f"output={out}"]) == 0
    assert ck.is_checkpoint(out) and not (tmp_path / "nemo.partial").exists()
    spec = ck.read_spec(out)
    hf_cfg = json.loads((src / "config.json").read_text())
    assert spec.get("rotary_base") == hf_cfg["rope_theta"]
    assert spec.kv_channels == hf_cfg.get("head_dim", 16)
    assert spec.tied == hf_cfg["tie_word_embeddings"]
    assert spec.config_class == ("Llama31Config" if "rope" in variant else "LlamaConfig")
    assert (out / "context" / "nemo_tokenizer" / "tokenizer.json").is_file()

    tok = AutoTokenizer.from_pretrained(str(src))
    ids = torch.tensor([tok(TEXT)["input_ids"][:96]] * 2)
    hf = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(ids).logits
    for source in (out, src):  # the NeMo checkpoint, and the HF directory read directly
        model, _, _ = load_model(source)
        got = megatron_logits(model, ids)
        diff = (got - ref).abs().max().item()
        print(f"{variant} {source.name}: max |logits - HF| = {diff:.2e}")
        assert diff < 1e-4, diff


def test_nemo_context_is_portable(tmp_path, dist_single):
    """The stored config is NeMo's own (production fusions, no CPU settings) and NeMo can parse it."""
    from nemo.lightning.io.api import load_context

    from nemo_minitron import cli as cli_mod

    src = make_hf_llama(tmp_path / "hf")
    assert cli_mod.main(["import", f"source={src}", f"output={tmp_path / 'n'}"]) == 0
    cfg = load_context(tmp_path / "n" / "context", subpath="model.config", build=False)
    assert cfg.hidden_size == 64 and cfg.num_query_groups == 2
    for field in ("apply_rope_fusion", "use_cpu_initialization", "tensor_model_parallel_size"):
        assert field not in cfg.__arguments__, field  # platform/runtime settings are not persisted
    tok = load_context(tmp_path / "n" / "context", subpath="model.tokenizer")
    assert tok.vocab_size == 320


# -------------------------------------------------------------------------------------------------
# bad input: one line naming the problem, exit 2, nothing written (real CLI processes)
# -------------------------------------------------------------------------------------------------
def _assert_refused(proc, needle, out):
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert lines and lines[-1].startswith("error:") and needle in lines[-1], proc.stderr
    assert len([l for l in lines if l.startswith("error:")]) == 1
    assert not out.exists() or not any(out.iterdir()) or out.name == "existing"


def test_refuses_non_causal_lm(tmp_path, capsys):
    src = tmp_path / "bert"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    out = tmp_path / "out"
    _assert_refused(in_process(capsys, "import", f"source={src}", f"output={out}"), "not a supported causal LM", out)
    assert not out.exists()


def test_refuses_missing_config(tmp_path, capsys):
    out = tmp_path / "out"
    _assert_refused(in_process(capsys, "import", f"source={tmp_path}", f"output={out}"), "config.json is missing", out)


def test_refuses_missing_tokenizer(tmp_path, capsys):
    src = make_hf_llama(tmp_path / "hf", tokenizer=False)
    out = tmp_path / "out"
    _assert_refused(in_process(capsys, "import", f"source={src}", f"output={out}"), "tokenizer is missing", out)
    assert not out.exists()


def test_refuses_existing_output_unless_overwrite(tmp_path, capsys, dist_single):
    src = make_hf_llama(tmp_path / "hf")
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    _assert_refused(in_process(capsys, "import", f"source={src}", f"output={out}"), "exists and is not empty", out)
    assert (out / "keep.txt").read_text() == "user data"
    ok = cli_here(capsys, "import", f"source={src}", f"output={out}", "overwrite=true")
    assert ok.stdout.strip().splitlines()[-1] == f"wrote checkpoint: {out}"
    assert not (out / "keep.txt").exists()


def test_refuses_unknown_config_key(tmp_path, capsys):
    out = tmp_path / "out"
    proc = in_process(capsys, "import", f"output={out}", "trainer.max_stepz=3")
    _assert_refused(proc, "unknown config key 'trainer.max_stepz'", out)


def test_refuses_corrupt_checkpoint_and_vocab_mismatch(tiny_ckpt, tmp_path, capsys):
    import shutil

    from nemo_minitron.data import indexed

    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    shard = sorted((bad / "weights").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])

    class Tok:
        eos_token_id = 999

        def __len__(self):
            return 1000

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [900] * 200}

    indexed.write(tmp_path / "d", ["x"], Tok(), progress=False)
    proc = in_process(capsys, "evaluate", f"model={bad}", f"data={tmp_path / 'd'}", "eval.num_samples=2",
                   "eval.seq_length=16", "eval.micro_batch_size=1")
    _assert_refused(proc, "truncated", tmp_path / "none")
    proc = in_process(capsys, "evaluate", f"model={tiny_ckpt}", f"data={tmp_path / 'd'}", "eval.num_samples=2",
                   "eval.seq_length=16", "eval.micro_batch_size=1")
    _assert_refused(proc, "different tokenizers", tmp_path / "none")
