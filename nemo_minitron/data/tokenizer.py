"""Loading the Hugging Face tokenizer of a NeMo checkpoint, an HF directory, or the embedded default."""

from __future__ import annotations

import json
import os
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


# --------------------------------------------------------------------------------------------------
# identity: which tokenizer produced a dataset, and do two models share one
# --------------------------------------------------------------------------------------------------
SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
_fingerprints: dict = {}


def fingerprint(tokenizer) -> dict:
    """What identifies a tokenizer: its vocabulary's size and content (sha256 of the sorted (token, id)
    pairs) and its special token ids. ``name_or_path`` is informational only, never compared."""
    import hashlib
    import json

    vocab = sorted(tokenizer.get_vocab().items())
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    return {"vocab_size": len(tokenizer), "vocab_sha256": digest.hexdigest(),
            "special_tokens": {k: getattr(tokenizer, k, None) for k in SPECIAL_TOKENS},
            "name_or_path": str(getattr(tokenizer, "name_or_path", "") or "")}


def _tokenizer_dir_of(source):
    """The tokenizer directory of a checkpoint, a run directory (its student/ or model/), an HF directory
    or ``smollm2-135m``; None when there is none."""
    from nemo_minitron.checkpoint import hf, nemo

    p = hf.resolve_source(str(source))
    for final in ("student", "model"):  # a distill / finetune run directory: its finished checkpoint
        if not (p / "context").exists() and (p / final / "context").is_dir():
            p = p / final
            break
    if nemo.is_checkpoint(p):
        return nemo.tokenizer_dir(p)
    if p.is_dir() and any((p / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return p
    return None


def _cache_file(tokenizer_dir):
    """Where the fingerprint of these exact tokenizer files is cached: keyed by the sha256 of the files'
    names and bytes (the same files are the same tokenizer), so a check costs a few ms instead of loading
    transformers and the tokenizer (~5 s) in every command. None when there are no tokenizer files."""
    import hashlib

    from nemo_minitron.checkpoint.embedded import cache_dir
    from nemo_minitron.checkpoint.nemo import TOKENIZER_FILES

    h = hashlib.sha256()
    found = False
    for name in TOKENIZER_FILES:
        f = Path(tokenizer_dir) / name
        if f.is_file():
            found = True
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    return cache_dir() / "tokenizer_fingerprints" / f"{h.hexdigest()}.json" if found else None


def _store(path, fp: dict) -> None:
    if path is None:
        return
    try:  # atomically; a cache that cannot be written is only slower
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
        tmp.write_text(json.dumps(fp))
        os.replace(tmp, path)
    except OSError:
        pass


def fingerprint_of(source) -> dict | None:
    """:func:`fingerprint` of the tokenizer of ``source`` (checkpoint, run directory, HF directory,
    ``smollm2-135m``), cached by path; None when ``source`` holds no tokenizer, or one that cannot be loaded
    here (said in one warning line: then only token id ranges are checked)."""
    d = _tokenizer_dir_of(source)
    if d is None:
        return None
    key = str(Path(d).resolve())
    if key not in _fingerprints:
        cached = _cache_file(d)
        if cached is not None and cached.is_file():
            try:
                # name_or_path is informational (never compared): this directory's, as a fresh load gives
                _fingerprints[key] = {**json.loads(cached.read_text()), "name_or_path": str(d)}
                return _fingerprints[key]
            except (OSError, ValueError):
                pass
        try:
            _fingerprints[key] = fingerprint(load(d))
            _store(cached, _fingerprints[key])
        except UserError as e:
            import sys

            from nemo_minitron import parallel

            _fingerprints[key] = None
            if parallel.is_rank0():
                print(f"warning: {e}; data and models are checked by token id range only", file=sys.stderr,
                      flush=True)
    return _fingerprints[key]


def compare(a: dict, b: dict, names: tuple[str, str] | None = None) -> str | None:
    """Why fingerprints ``a`` and ``b`` are different tokenizers (one short phrase), or None when they match.
    ``names``: what ``a`` and ``b`` are ("data", "model"), written after their values."""
    def pair(x, y) -> str:
        if names:
            return f"{x} ({names[0]}) vs {y} ({names[1]})"
        return f"{x} vs {y}"

    if a.get("vocab_size") != b.get("vocab_size"):
        return f"vocab size {pair(a.get('vocab_size'), b.get('vocab_size'))}"
    if a.get("vocab_sha256") != b.get("vocab_sha256"):
        ha, hb = (str(x.get("vocab_sha256"))[:12] + ".." for x in (a, b))
        return f"vocabulary content differs (sha256 {pair(ha, hb)})"
    sa, sb = a.get("special_tokens") or {}, b.get("special_tokens") or {}
    for k in SPECIAL_TOKENS:
        if k in sa and k in sb and sa[k] != sb[k]:
            return f"special token {k} {pair(sa[k], sb[k])}"
    return None
