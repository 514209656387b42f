"""Training data settings, resolved once at a command's edge: blends of indexed datasets and their checks.

A blend is written the way Megatron-LM writes ``--data-path``, in YAML and on the command line alike:

    data.train=/data/web                                  one prefix
    data.train=[/data/web,/data/code]                     several, each in proportion to its size
    data.train=[0.3,/data/web,0.7,/data/code]             weights and prefixes (weights are normalized)

:class:`DataSettings` is what the layers below take (the data module, the dry run): typed values, never the
raw config. Everything that can be wrong with the data (an odd blend, a non-positive weight, a missing or
empty prefix, token ids the model cannot embed) is refused here, before any model or trainer is built.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nemo_minitron.data import indexed
from nemo_minitron.errors import UserError

# token-id range check: exact up to this many tokens per prefix, sampled in evenly spaced blocks above it
FULL_SCAN_TOKENS = 1 << 28
SAMPLE_BLOCK_TOKENS = 1 << 20
SAMPLE_BLOCKS = 64


@dataclass(frozen=True)
class Blend:
    """Dataset prefixes and their weights (``None``: Megatron's unweighted list, each in proportion to size)."""

    prefixes: tuple[str, ...]
    weights: tuple[float, ...] | None = None

    @classmethod
    def parse(cls, value, what: str) -> "Blend":
        if isinstance(value, (str, Path)):
            items = [str(value)]
        else:
            try:
                items = list(value)
            except TypeError:
                raise UserError(f"{what}={value!r}: a prefix, a list of prefixes or [weight, prefix, ...]") from None
        if not items:
            raise UserError(f"{what} is empty: give a prefix, a list of prefixes or [weight, prefix, ...]")
        numeric = [_is_number(x) for x in items]
        if not any(numeric):
            return cls(tuple(str(x) for x in items))
        if len(items) % 2:
            raise UserError(f"{what}: a weighted blend is [weight, prefix, weight, prefix, ...]; got {len(items)} "
                            f"entries (an odd number)")
        weights, prefixes = items[0::2], items[1::2]
        if not all(numeric[0::2]) or any(numeric[1::2]):
            raise UserError(f"{what}: a weighted blend alternates weights and prefixes: {items}")
        weights = [float(w) for w in weights]
        bad = [w for w in weights if not (w > 0 and math.isfinite(w))]
        if bad:
            raise UserError(f"{what}: blend weights must be positive (got {bad[0]})")
        return cls(tuple(str(p) for p in prefixes), tuple(weights))

    def shares(self, tokens: list[int]) -> list[float]:
        """Each component's share of the samples (weights normalized; unweighted: by tokens)."""
        w = self.weights if self.weights is not None else tokens
        total = float(sum(w))
        return [x / total for x in w]

    def megatron(self):
        """(prefixes, weights) as megatron-core's ``BlendedMegatronDatasetConfig.blend`` takes it."""
        return [list(self.prefixes), list(self.weights) if self.weights is not None and len(self.prefixes) > 1 else None]

    def arg(self) -> str:
        """The blend as one command-line value (``[0.3,/a,0.7,/b]``), for child commands."""
        if self.weights is None and len(self.prefixes) == 1:
            return self.prefixes[0]
        items = self.prefixes if self.weights is None else [x for pair in zip(self.weights, self.prefixes) for x in pair]
        return "[" + ",".join(str(x) for x in items) + "]"


def _is_number(x) -> bool:
    if isinstance(x, bool):
        return False
    if isinstance(x, (int, float)):
        return True
    try:
        float(str(x))
        return True
    except ValueError:
        return False


def blend_arg(value) -> str:
    """A ``data.*`` config value (prefix, list, weighted list) as one command-line value."""
    return Blend.parse(value, "data").arg()


@dataclass(frozen=True)
class DataSettings:
    """What a training run reads: the blends, the sample shape and batch sizes, the index cache."""

    train: Blend
    validation: Blend | None
    split: str | None             # Megatron's "99,1,0": validation drawn from the train blend
    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    num_val_samples: int          # validation samples per evaluation (0: no validation)
    seed: int
    index_cache_dir: str | None   # None: <run dir>/data_index
    num_workers: int

    @property
    def has_validation(self) -> bool:
        return self.num_val_samples > 0 and (self.validation is not None or self.split is not None)

    def check_batches(self, data_parallel_size: int) -> None:
        """Global batch = micro-batch x DP x micro-batches per step; validation in whole global batches."""
        if self.global_batch_size % (self.micro_batch_size * data_parallel_size):
            raise UserError(f"data.global_batch_size={self.global_batch_size} is not divisible by "
                            f"data.micro_batch_size={self.micro_batch_size} x data-parallel size {data_parallel_size}")
        if self.num_val_samples % self.global_batch_size:
            raise UserError(f"data.num_val_samples={self.num_val_samples} must be a positive multiple of "
                            f"data.global_batch_size={self.global_batch_size}")

    def cache_dir(self, run_dir: Path) -> Path:
        return Path(self.index_cache_dir).expanduser().absolute() if self.index_cache_dir else Path(run_dir) / "data_index"


def training_settings(train, seq_length: int, micro_batch_size: int, global_batch_size: int,
                      seed: int = 1234) -> DataSettings:
    """Settings of a run that only trains (what a dry run of the pipeline or the search reports)."""
    return DataSettings(train=Blend.parse(train, "data.train"), validation=None, split=None, seq_length=seq_length,
                        micro_batch_size=micro_batch_size, global_batch_size=global_batch_size, num_val_samples=0,
                        seed=seed, index_cache_dir=None, num_workers=0)


def settings_from(d, has_cuda: bool = False) -> DataSettings:
    """``cfg.data`` -> :class:`DataSettings` (shapes and blend syntax checked; files not touched)."""
    for key in ("seq_length", "micro_batch_size", "global_batch_size"):
        if d[key] < 1:
            raise UserError(f"data.{key} must be >= 1 (got {d[key]})")
    train = Blend.parse(d.train, "data.train")
    validation = Blend.parse(d.validation, "data.validation") if d.get("validation") else None
    split, split_val = d.get("split"), False
    if split is not None:
        split = str(split)
        parts = split.replace("/", ",").split(",")
        try:
            nums = [float(x) for x in parts]
        except ValueError:
            nums = []
        if len(nums) != 3 or any(x < 0 for x in nums) or nums[0] <= 0:
            raise UserError(f"data.split={split!r}: three comma-separated non-negative numbers, train first "
                            f"(Megatron's \"99,1,0\")")
        split_val = nums[1] > 0
        if validation is not None:
            raise UserError("data.split and data.validation both set: the split draws validation from data.train; "
                            "set one of them")
    num_val = int(d.num_val_samples) if (validation is not None or split_val) else 0
    workers = d.get("num_workers")
    return DataSettings(train=train, validation=validation, split=split, seq_length=int(d.seq_length),
                        micro_batch_size=int(d.micro_batch_size), global_batch_size=int(d.global_batch_size),
                        num_val_samples=num_val, seed=int(d.get("seed", 1234)),
                        index_cache_dir=str(d.index_cache_dir) if d.get("index_cache_dir") else None,
                        num_workers=int(workers) if workers is not None else (2 if has_cuda else 0))


# ------------------------------------------------------------------------------------------------
# checks that read the files (sizes from the .idx only; token ids from the .bin, bounded)
# ------------------------------------------------------------------------------------------------
def prefix_stats(prefix, what: str) -> dict:
    """{'tokens', 'documents', 'dtype'} of a prefix from its index alone; refuses a missing or empty one."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if not indexed.exists(prefix):
        raise UserError(f"{what}: dataset {prefix}: {prefix}.bin / {prefix}.idx not found "
                        f"(run nemo-minitron preprocess)")
    try:
        ds = IndexedDataset(str(prefix), mmap=True)
    except Exception as e:  # a truncated or foreign .idx
        raise UserError(f"{what}: dataset {prefix}: unreadable index ({type(e).__name__}: {e})") from None
    lengths = np.array(ds.sequence_lengths)  # a copy: the index's memory map closes with ``ds``
    tokens = int(lengths.sum(dtype=np.int64))
    if tokens == 0:
        raise UserError(f"{what}: dataset {prefix} is empty (0 tokens)")
    return {"tokens": tokens, "documents": int(len(lengths)), "dtype": np.dtype(ds.index.dtype), "lengths": lengths}


def split_tokens(lengths: np.ndarray, split: str) -> list[int | None]:
    """Tokens in each part (train, validation, test) of a dataset under Megatron's ``split`` (documents are
    divided as megatron-core divides them; None: the part is not drawn)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)

    n = len(lengths)
    out = []
    for part in convert_split_vector_to_split_matrix(parse_and_normalize_split(split)):
        if part is None:
            out.append(None)
            continue
        beg, end = int(round(part[0] * n)), int(round(part[1] * n))
        out.append(int(lengths[beg:end].sum(dtype=np.int64)))
    return out


def max_token_id(prefix, stats: dict) -> tuple[int, bool]:
    """(largest token id, exact?) of a prefix: every token up to FULL_SCAN_TOKENS, else evenly spaced
    blocks of the .bin (a dataset tokenized for another model shows its large ids everywhere). Read in
    blocks with plain file reads, so the check leaves nothing resident in the process."""
    dtype, n = stats["dtype"], stats["tokens"]
    exact = n <= FULL_SCAN_TOKENS
    starts = range(0, n, SAMPLE_BLOCK_TOKENS) if exact else \
        np.linspace(0, n - SAMPLE_BLOCK_TOKENS, SAMPLE_BLOCKS).astype(np.int64)
    top = 0
    with open(f"{prefix}.bin", "rb") as fh:
        for s in starts:
            fh.seek(int(s) * dtype.itemsize)
            block = np.fromfile(fh, dtype=dtype, count=min(SAMPLE_BLOCK_TOKENS, n - int(s)))
            if block.size:
                top = max(top, int(block.max()))
    return top, exact


def check_blend(blend: Blend, what: str, vocab_size: int | None, min_tokens: int = 2) -> list[dict]:
    """Every component exists, is non-empty, holds at least ``min_tokens`` and only ids below
    ``vocab_size``. Returns each component's stats (tokens, documents, share)."""
    stats = []
    for prefix in blend.prefixes:
        s = prefix_stats(prefix, what)
        if s["tokens"] < min_tokens:
            raise UserError(f"{what}: dataset {prefix} holds {s['tokens']} tokens, fewer than one sample "
                            f"({min_tokens} tokens)")
        if vocab_size is not None and np.iinfo(s["dtype"]).max >= vocab_size:
            top, exact = max_token_id(prefix, s)
            if top >= vocab_size:
                raise UserError(f"{what}: dataset {prefix} holds token id {top} but the model's vocabulary has "
                                f"{vocab_size} entries: data and model use different tokenizers")
        stats.append({"prefix": str(prefix), **s})
    for s, share in zip(stats, blend.shares([s["tokens"] for s in stats])):
        s["share"] = share
    return stats


_warned: set = set()


def _prefixes_of(data) -> list[str]:
    """The prefixes of a :class:`Blend` or a ``data.*`` value (a prefix, a list of prefixes, a weighted
    blend); None or '' -> none."""
    if data is None or (isinstance(data, (str, Path)) and not str(data)):
        return []
    if isinstance(data, Blend):
        return list(data.prefixes)
    return list(Blend.parse(data, "data").prefixes)


def check_tokenizer(data, expected: dict | None, what: str, model=None) -> None:
    """Each prefix of ``data`` was tokenized by the tokenizer whose fingerprint is ``expected`` (the model's;
    :func:`nemo_minitron.data.tokenizer.fingerprint`), by its sidecar ``PREFIX.json``. A prefix without a
    sidecar gets one warning line (its token ids are range-checked by the caller's usual checks); a missing
    prefix is left to those checks. ``expected`` None (a model without a tokenizer): nothing to compare."""
    from nemo_minitron.data.tokenizer import compare

    if expected is None:
        return
    for prefix in dict.fromkeys(_prefixes_of(data)):
        if not indexed.exists(prefix):
            continue  # refused by the existence checks, with their own message
        side = indexed.read_sidecar(prefix)
        fp = (side or {}).get("tokenizer")
        if not isinstance(fp, dict):
            if prefix not in _warned:
                _warned.add(prefix)
                from nemo_minitron import parallel

                if parallel.is_rank0():
                    print(f"warning: {prefix} has no tokenizer sidecar ({prefix}.json); only the token id range "
                          f"is checked", file=sys.stderr, flush=True)
            continue
        reason = compare(fp, expected, ("data", "model"))
        if reason:
            raise UserError(f"{what} {prefix} was tokenized by another tokenizer than the model's: {reason} "
                            f"(re-run preprocess with tokenizer={model or 'MODEL'})")


def check(settings: DataSettings, vocab_size: int | None) -> dict:
    """All data checks of a training run (before any work). Returns {'train': stats, 'validation': stats}."""
    need = settings.seq_length + 1
    out = {"train": check_blend(settings.train, "data.train", vocab_size, need)}
    if settings.split:  # megatron-core builds each part from whole documents; an empty part never ends
        for s in out["train"]:
            for name, tokens in zip(("training", "validation"), split_tokens(s["lengths"], settings.split)):
                if tokens is not None and tokens < need:
                    raise UserError(f"data.split={settings.split}: the {name} part of {s['prefix']} ({s['documents']} "
                                    f"documents) holds {tokens} tokens, fewer than one sample of {need}; change "
                                    f"the split or give data.validation")
    if settings.validation is not None:
        out["validation"] = check_blend(settings.validation, "data.validation", vocab_size, need)
        have = sum(s["tokens"] - 1 for s in out["validation"]) // settings.seq_length
        if settings.num_val_samples > have:
            raise UserError(f"data.validation holds {have} samples of {settings.seq_length}+1 tokens; "
                            f"data.num_val_samples={settings.num_val_samples} would repeat them")
    return out


# ------------------------------------------------------------------------------------------------
# what a run will read (for --dry-run)
# ------------------------------------------------------------------------------------------------
def plan(settings: DataSettings, max_steps: int) -> dict:
    """Tokens per component, the epochs ``max_steps x global_batch_size x seq_length`` implies for each,
    and the size of the sample index megatron-core builds (document, sample, shuffle and blend indices)."""
    samples = max_steps * settings.global_batch_size
    comps = []
    train_frac = 1.0
    if settings.split:
        nums = [float(x) for x in settings.split.replace("/", ",").split(",")]
        train_frac = nums[0] / sum(nums)
    stats = check_blend(settings.train, "data.train", None, settings.seq_length + 1)
    index_bytes = 0
    for s in stats:
        n_s = math.ceil(samples * s["share"] * (1.005 if len(stats) > 1 else 1.0))  # megatron's 0.5% surplus
        tokens = s["tokens"] * train_frac
        epochs = n_s * settings.seq_length / max(tokens - 1, 1)
        n_epochs = max(1, math.ceil(epochs))
        docs = s["documents"] * train_frac
        sample_idx = (n_s + 1) * 2 * (4 if tokens * n_epochs < 2 ** 31 else 8)
        shuffle = n_s * (4 if n_s < 2 ** 32 - 1 else 8)
        index_bytes += int(n_epochs * docs * 4 + sample_idx + shuffle)
        comps.append({**s, "samples": n_s, "epochs": epochs})
    if len(stats) > 1:
        index_bytes += samples * (2 + 8)  # blend: dataset id (int16) + sample id (int64) per sample
    return {"samples": samples, "seq_length": settings.seq_length, "tokens": samples * settings.seq_length,
            "components": comps, "index_bytes": index_bytes}


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def show_plan(p: dict, where: str) -> str:
    lines = [f"  data: {p['samples']:,} samples x {p['seq_length'] + 1} tokens "
             f"({p['tokens'] / 1e9:.2f}B training tokens), shuffled by document, seed-deterministic"]
    for c in p["components"]:
        lines.append(f"    {c['share']:6.1%}  {c['prefix']}: {_count(c['tokens'])} tokens in {c['documents']:,} "
                     f"documents -> {c['samples']:,} samples = {c['epochs']:.2f} epoch(s)")
    lines.append(f"  sample index: ~{p['index_bytes'] / 2 ** 20:,.1f} MiB on disk (memory-mapped), built once in {where}")
    return "\n".join(lines)


def plan_or_note(settings: DataSettings, max_steps: int, where: str) -> str:
    """The dry run's data lines, or one line saying why the data could not be read here."""
    try:
        return show_plan(plan(settings, max_steps), where)
    except UserError as e:
        return f"  data: not readable here, not reported ({e})"
