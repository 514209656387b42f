"""Megatron indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``): writing from text, reading windows."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from nemo_minitron.errors import UserError


def exists(prefix) -> bool:
    return Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()


_DTYPE_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 8, 8: 2}  # megatron's DType codes -> bytes per token


def check_prefix(prefix) -> None:
    """A readable Megatron indexed dataset: both files, a valid index, and a ``.bin`` as long as the index says."""
    if Path(prefix).is_dir() and not exists(prefix):
        raise UserError(f"dataset {prefix} is a directory: a dataset PREFIX names the files PREFIX.bin and PREFIX.idx")
    if not exists(prefix):
        missing = " and ".join(f"{prefix}{ext}" for ext in (".bin", ".idx") if not Path(f"{prefix}{ext}").is_file())
        raise UserError(f"dataset {prefix}: {missing} not found (run nemo-minitron preprocess)")
    idx, binf = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    try:
        with open(idx, "rb") as fh:
            head = fh.read(34)
            if len(head) < 34 or head[:9] != b"MMIDIDX\x00\x00":
                raise UserError(f"dataset {prefix}: {idx} is not a Megatron index file")
            code, n = head[17], int(np.frombuffer(head[18:26], dtype="<u8")[0])
            if code not in _DTYPE_SIZE or idx.stat().st_size < 34 + n * 12:
                raise UserError(f"dataset {prefix}: {idx} is truncated or corrupt")
            if n == 0:
                raise UserError(f"dataset {prefix} holds no documents")
            fh.seek(34 + (n - 1) * 4)
            last_len = int(np.frombuffer(fh.read(4), dtype="<i4")[0])
            fh.seek(34 + n * 4 + (n - 1) * 8)
            last_ptr = int(np.frombuffer(fh.read(8), dtype="<i8")[0])
    except OSError as e:
        raise UserError(f"dataset {prefix}: cannot read {idx} ({e.strerror or e})") from None
    need = last_ptr + last_len * _DTYPE_SIZE[code]
    if binf.stat().st_size < need:
        raise UserError(f"dataset {prefix}: {binf} is truncated ({binf.stat().st_size} bytes, its index needs {need}); "
                        "re-run nemo-minitron preprocess")


CHECK_LINES = 1000  # jsonl lines of each file checked before any tokenizing (a later bad line stops the run)


def check_inputs(files, text_key: str = "text") -> None:
    """Before any work: every input is text (no NUL bytes in its first MiB), a jsonl file's first
    :data:`CHECK_LINES` lines are JSON objects with the ``text_key`` field, and there is some text at all."""
    has_text = False
    for f in map(Path, files):
        with f.open("rb") as fh:
            head = fh.read(1 << 20)
        if b"\x00" in head:
            raise UserError(f"{f} is not text (it holds NUL bytes: a binary file?)")
        if f.suffix in (".jsonl", ".json", ".ndjson"):
            with f.open(encoding="utf-8", errors="replace") as fh:
                for n, line in enumerate(fh, 1):
                    if n > CHECK_LINES:
                        break
                    if line.strip():
                        _json_text(line, f, n, text_key)
                        has_text = True
        elif head.strip():
            has_text = True
    if not has_text:
        raise UserError(f"no text in the input ({', '.join(str(f) for f in files[:3])}{', ...' if len(files) > 3 else ''}"
                        " is empty): no documents")


def _json_text(line: str, f, n: int, text_key: str) -> str:
    try:
        doc = json.loads(line)[text_key]
    except (json.JSONDecodeError, KeyError, TypeError, IndexError):
        raise UserError(f"{f}:{n}: not a JSON object with a {text_key!r} field") from None
    if not isinstance(doc, str):
        raise UserError(f"{f}:{n}: its {text_key!r} field is not a string")
    return doc


def iter_documents(files, split: str = "file", text_key: str = "text"):
    """Yield documents from plain-text and jsonl files.

    Plain text: one document per file (``split=file``), per blank-line-separated paragraph
    (``split=paragraph``) or per line (``split=line``). jsonl/json-lines: one document per line, the
    ``text_key`` field.
    """
    for f in files:
        f = Path(f)
        if f.suffix in (".jsonl", ".json", ".ndjson"):
            with f.open(encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    yield _json_text(line, f, n, text_key)
            continue
        text = f.read_text(encoding="utf-8", errors="replace")
        if split == "file":
            yield text
        elif split == "paragraph":
            yield from (p for p in text.split("\n\n") if p.strip())
        elif split == "line":
            yield from (p for p in text.splitlines() if p.strip())
        else:
            raise UserError(f"unknown split {split!r} (file, paragraph, line)")


def sidecar_path(prefix) -> Path:
    return Path(f"{prefix}.json")


def read_sidecar(prefix) -> dict | None:
    """``PREFIX.json`` (written last by :func:`write`: {'tokenizer': fingerprint, 'documents', 'tokens'}), or
    None when the prefix has none (or an unreadable one)."""
    p = sidecar_path(prefix)
    if not p.is_file():
        return None
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _write_error(path, e: OSError) -> UserError:
    return UserError(f"cannot write {path}: {os.strerror(e.errno) if e.errno else e}")


def write(prefix, documents, tokenizer, append_eod: bool = True, total_bytes: int | None = None, progress=True,
          bar=None, fingerprint: dict | None = None):
    """Tokenize ``documents`` into ``prefix.bin/.idx`` and, given the tokenizer's ``fingerprint``
    (:func:`nemo_minitron.data.tokenizer.fingerprint`), the sidecar ``prefix.json`` ({'tokenizer': fingerprint,
    'documents', 'tokens'}) that lets every command check the data against its model's tokenizer. Returns
    {'documents', 'tokens'}.

    Everything is written to temporary names beside the output and renamed into place at the end (the
    ``.idx`` after the ``.bin``, the sidecar last, an older prefix's ``.json`` and ``.idx`` removed first), so a
    kill never leaves a half-written prefix that looks complete. A write error (disk full, file size limit)
    removes the temporaries and is refused with one line naming the path and the OS error.

    ``bar``: a tqdm progress bar (in bytes of text) shared by several calls, e.g. one per input file."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from tqdm import tqdm

    vocab = len(tokenizer)
    dtype = DType.optimal_dtype(vocab)
    eod = tokenizer.eos_token_id
    if append_eod and eod is None:
        raise UserError("tokenizer has no end-of-document token (eos); pass preprocess.append_eod=false")
    prefix = Path(prefix)
    final = {ext: Path(f"{prefix}.{ext}") for ext in ("bin", "idx", "json")}
    tmp = {ext: Path(f"{prefix}.{ext}.partial") for ext in final}
    target = final["bin"]
    builder = None
    own_bar = bar is None
    created = [d for d in (prefix.parent, *prefix.parent.parents) if not d.exists()]  # removed again on failure
    try:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        builder = IndexedDatasetBuilder(str(tmp["bin"]), dtype=dtype)
        n_docs = n_tok = 0
        start = time.time()
        if own_bar:
            bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress)
        for doc in documents:
            if not doc.strip():  # an empty document (or file) is no document, not a lone end-of-document token
                continue
            ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
            if append_eod:
                ids.append(eod)
            if not ids:
                continue
            builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
            n_docs += 1
            n_tok += len(ids)
            bar.update(len(doc.encode("utf-8")))
            bar.set_postfix(docs=n_docs, tokens=n_tok, tok_per_s=int(n_tok / max(time.time() - start, 1e-9)))
        if n_docs == 0:
            raise UserError("no documents found in the input")
        builder.data_file.close()  # the .bin's last buffered bytes: its write errors name the .bin
        target = final["idx"]
        builder.finalize(str(tmp["idx"]))
        builder = None
        written = ("bin", "idx")
        if fingerprint is not None:
            target = final["json"]
            tmp["json"].write_text(json.dumps({"tokenizer": fingerprint, "documents": n_docs, "tokens": n_tok},
                                              indent=2))
            written += ("json",)
        target = prefix
        for ext in ("json", "idx"):  # an older prefix stops looking complete before its files are replaced
            final[ext].unlink(missing_ok=True)
        for ext in written:
            target = final[ext]
            os.replace(tmp[ext], final[ext])
    except BaseException as e:
        if own_bar and bar is not None:
            bar.close()
        if builder is not None:
            try:
                builder.data_file.close()
            except OSError:
                pass
        for p in tmp.values():
            p.unlink(missing_ok=True)
        for d in created:
            try:
                d.rmdir()
            except OSError:
                break
        if isinstance(e, OSError):
            raise _write_error(target, e) from None
        raise
    if own_bar:
        bar.close()
    return {"documents": n_docs, "tokens": n_tok}


def token_stream(prefix) -> np.ndarray:
    """All tokens of the dataset, documents concatenated in order (a memory map)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    check_prefix(prefix)
    ds = IndexedDataset(str(prefix), mmap=True)  # validates the .idx header and reads its dtype
    return np.memmap(f"{prefix}.bin", dtype=ds.index.dtype, mode="r")


def num_tokens(prefix) -> int:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    check_prefix(prefix)
    ds = IndexedDataset(str(prefix), mmap=True)  # held while its memory-mapped lengths are read
    return int(ds.sequence_lengths.sum(dtype=np.int64))


def windows(prefix, num_samples: int, seq_length: int, offset: int = 0) -> torch.Tensor:
    """``num_samples`` consecutive, non-overlapping windows of ``seq_length + 1`` tokens.

    Window ``i`` is tokens ``[offset + i*seq_length, offset + (i+1)*seq_length + 1)`` of the concatenated
    stream (inputs are its first ``seq_length`` tokens, labels its last). Deterministic, so the same
    tokens are measured by every evaluator. Refuses a request larger than the data.
    """
    stream = token_stream(prefix)
    need = offset + num_samples * seq_length + 1
    if num_samples < 1 or seq_length < 1:
        raise UserError("num_samples and seq_length must be >= 1")
    if need > len(stream):
        avail = (len(stream) - 1 - offset) // seq_length
        raise UserError(
            f"dataset {prefix} has {len(stream)} tokens: {num_samples} samples of {seq_length} need {need} "
            f"(at most {max(avail, 0)} samples fit)"
        )
    idx = offset + np.arange(num_samples)[:, None] * seq_length + np.arange(seq_length + 1)[None, :]
    return torch.from_numpy(stream[idx].astype(np.int64))
