"""``nemo-minitron preprocess``: text / jsonl files -> Megatron indexed dataset."""

from __future__ import annotations

import glob
import signal
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
    from tqdm import tqdm

    files = expand_inputs(cfg.input)
    per_file = bool(cfg.preprocess.per_file)
    out = Path(cfg.output_prefix).expanduser()
    if per_file:  # output_prefix is a directory: one prefix per input file, named after it
        stems = [f.stem for f in files]
        dup = sorted({s for s in stems if stems.count(s) > 1})
        if dup:
            raise UserError(f"preprocess.per_file=true: several inputs are named {dup[0]!r}; their prefixes would clash")
        if out.exists() and not out.is_dir():
            raise UserError(f"output_prefix={out} is a file: with preprocess.per_file=true it is a directory")
        jobs = [([f], out / f.stem) for f in files]
    else:
        if out.is_dir():
            raise UserError(f"output_prefix={out} is a directory: a dataset PREFIX names the files PREFIX.bin and "
                            "PREFIX.idx (preprocess.per_file=true writes one prefix per input file into a directory)")
        jobs = [(files, out)]
    for _, prefix in jobs:
        if indexed.exists(prefix) and not cfg.overwrite:
            raise UserError(f"output {prefix}.bin/.idx exists (pass overwrite=true to replace it)")
    if cfg.preprocess.split not in ("file", "paragraph", "line"):
        raise UserError(f"preprocess.split={cfg.preprocess.split!r}: use file, paragraph or line")
    indexed.check_inputs(files, cfg.preprocess.text_key)
    tokenizer = tok.load(cfg.tokenizer)
    fingerprint = tok.fingerprint(tokenizer)  # the sidecar PREFIX.json: which tokenizer made the data
    if hasattr(signal, "SIGXFSZ"):  # a file size limit: a write error (EFBIG, one line), not a killed process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    total = sum(f.stat().st_size for f in files)
    docs = tokens = 0
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"tokenizing {len(files)} file(s)") as bar:
        for inputs, prefix in jobs:
            stream = indexed.iter_documents(inputs, cfg.preprocess.split, cfg.preprocess.text_key)
            stats = indexed.write(prefix, stream, tokenizer, append_eod=cfg.preprocess.append_eod, bar=bar,
                                  fingerprint=fingerprint)
            docs, tokens = docs + stats["documents"], tokens + stats["tokens"]
            if per_file:
                bar.write(f"{prefix}: {stats['documents']} documents, {stats['tokens']} tokens")
    print(f"{len(files)} file(s), {docs} documents, {tokens} tokens (vocab {len(tokenizer)})")
    if per_file:
        prefixes = [str(p.absolute()) for _, p in jobs]
        print(f"a blend of them: data.train=[{','.join(prefixes)}] (weights: [w1,PREFIX1,w2,PREFIX2,...])")
        print(f"wrote datasets: {len(prefixes)} prefixes in {out.absolute()}")
    else:
        print(f"wrote dataset: {out.absolute()}.bin {out.absolute()}.idx {out.absolute()}.json")
