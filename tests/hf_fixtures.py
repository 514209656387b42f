"""Tiny Hugging Face checkpoints of every supported family (Llama, Qwen2, Qwen3): config.json + safetensors + a
trained byte-level BPE tokenizer, every weight (biases and q/k norms too) random, none at its init value."""

from __future__ import annotations

from pathlib import Path

import torch

TEXT = (
    "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles "
    "and by opposing end them. To die, to sleep; no more; and by a sleep to say we end "
    "the heart-ache and the thousand natural shocks that flesh is heir to. "
)


def make_tokenizer(out: Path, vocab_size: int = 320) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(str(out))


def make_hf_llama(out: Path, tokenizer: bool = True, seed: int = 0, **overrides) -> Path:
    return make_hf_model(out, "llama", tokenizer, seed, **overrides)


FAMILY_ARGS = {"llama": {}, "qwen2": dict(use_sliding_window=False), "qwen3": dict(head_dim=16), "mixtral": {},
               "qwen3_moe": dict(head_dim=16)}


def make_and_import(root: Path, models: dict, adjust=None) -> dict:
    """{name: (HF directory, imported NeMo checkpoint)} for ``models`` ({name: (model_type, config overrides)});
    ``adjust(hf_dir)`` may change a model's weights before it is imported."""
    from nemo_minitron.checkpoint.importer import import_hf

    out = {}
    for name, (model_type, overrides) in models.items():
        src = make_hf_model(Path(root) / f"{name}-hf", model_type, **overrides)
        if adjust is not None:
            adjust(src)
        out[name] = (src, import_hf(src, Path(root) / f"{name}-nemo"))
    return out


def make_hf_model(out: Path, model_type: str = "llama", tokenizer: bool = True, seed: int = 0, **overrides) -> Path:
    """A tiny random model of ``model_type`` (``llama``, ``qwen2``: q/k/v biases, ``qwen3``: q/k norms, ``mixtral``,
    ``qwen3_moe``: experts)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out)
    args = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rope_theta=50000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, **FAMILY_ARGS[model_type])
    args.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **args)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.15)
    model.save_pretrained(str(out))
    if tokenizer:
        make_tokenizer(out, args["vocab_size"])
    return out
