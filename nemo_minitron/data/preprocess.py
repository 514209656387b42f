"""``nemo-minitron preprocess``: text / jsonl files -> Megatron indexed dataset."""

from __future__ import annotations

import glob
from pathlib import Path

from nemo_minitron.data import indexed, tokenizer as tok
from nemo_minitron.errors import UserError


def expand_inputs(spec) -> list[Path]:
    items = list(spec) if not isinstance(spec, str) else [s for s in spec.split(",") if s]
    files = []
    for item in items:
        matches = sorted(glob.glob(str(Path(item).expanduser()))) if any(c in str(item) for c in "*?[") else [item]
        if not matches:
            raise UserError(f"input pattern {item!r} matches no files")
        for m in matches:
            p = Path(m).expanduser()
            if p.is_dir():
                files += sorted(f for f in p.iterdir() if f.is_file())
            elif p.is_file():
                files.append(p)
            else:
                raise UserError(f"input file {p} does not exist")
    if not files:
        raise UserError("no input files")
    return files


def run(cfg) -> None:
    files = expand_inputs(cfg.input)
    prefix = Path(cfg.output_prefix).expanduser()
    if indexed.exists(prefix) and not cfg.overwrite:
        raise UserError(f"output {prefix}.bin/.idx exists (pass overwrite=true to replace it)")
    if cfg.preprocess.split not in ("file", "paragraph", "line"):
        raise UserError(f"preprocess.split={cfg.preprocess.split!r}: use file, paragraph or line")
    tokenizer = tok.load(cfg.tokenizer)
    total = sum(f.stat().st_size for f in files)
    docs = indexed.iter_documents(files, cfg.preprocess.split, cfg.preprocess.text_key)
    stats = indexed.write(prefix, docs, tokenizer, append_eod=cfg.preprocess.append_eod, total_bytes=total)
    print(f"{len(files)} file(s), {stats['documents']} documents, {stats['tokens']} tokens "
          f"(vocab {len(tokenizer)})")
    print(f"wrote dataset: {prefix.absolute()}.bin {prefix.absolute()}.idx")
