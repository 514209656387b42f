"""Loading the Hugging Face tokenizer of a NeMo checkpoint, an HF directory, or the embedded default."""

from __future__ import annotations

from pathlib import Path

from nemo_minitron.errors import UserError


def tokenizer_path(source) -> Path:
    """The directory holding tokenizer files for ``source`` (checkpoint, HF dir, or ``smollm2-135m``)."""
    from nemo_minitron.checkpoint import hf, nemo

    p = hf.resolve_source(str(source))
    if nemo.is_checkpoint(p):
        d = nemo.tokenizer_dir(p)
        if d is None:
            raise UserError(f"checkpoint {p} has no tokenizer in context/nemo_tokenizer")
        return d
    if not p.is_dir():
        raise UserError(f"tokenizer source {p} does not exist")
    hf.check_tokenizer(p)
    return p


def load(source):
    from transformers import AutoTokenizer

    path = tokenizer_path(source)
    try:
        return AutoTokenizer.from_pretrained(str(path), use_fast=True)
    except Exception as e:
        raise UserError(f"cannot load the tokenizer in {path}: {e.__class__.__name__}: {e}") from None
