"""Memory of the training data path does not grow with the data.

Writes synthetic Megatron indexed datasets (uint16 token ids, documents of 256-4096 tokens) of 0.25B and
1B tokens in a temporary directory (removed at the end), then, in a fresh process per dataset, builds the
training data of the Llama-3.1-8B -> 4B recipe (``max_steps`` 10,000 x global batch 1,152 = 11.52M samples
of 8,192 + 1 tokens: ~94B tokens, i.e. ~94 and ~377 epochs) through the same data module every training
command uses (megatron-core's GPT datasets via NeMo's PreTrainingDataModule, NeMo's data sampler), reads
20 global batches, and prints the peak RSS growth over the process's start (the checks, the sample index
build and the reads): memory the process allocates (anonymous RSS, sampled every 2 ms), and apart from it
all resident pages, which also count the pages of the memory-mapped ``.bin`` that reads touched (with the
kernel's readahead ~2 MiB per random sample here): that is page cache mapped into the process, clean,
shared by the ranks of a node and reclaimed under pressure, and it grows with the data read, not with the
data's size. The GPU path builds no attention mask (Transformer Engine makes it), so neither does this.

    python bench/data_scale.py [--steps 10000] [--global-batch 1152] [--seq 8192] [--batches 20]

Last line ``data_rss_growth_ratio: R`` (1B / 0.25B; target <= 1.2) after both absolute figures (target:
each under 1 GiB). Before the change every rank materialized min(windows, steps x batch) windows in RAM:
~750 GB at this recipe.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GiB = 2 ** 30


def write_dataset(prefix: Path, tokens: int, seed: int = 0) -> None:
    from megatron.core.datasets.indexed_dataset import _IndexWriter

    rng = np.random.default_rng(seed)
    lengths = []
    total = 0
    while total < tokens:
        n = int(min(rng.integers(256, 4097), tokens - total))
        lengths.append(n)
        total += n
    lengths = np.asarray(lengths, dtype=np.int32)
    with open(f"{prefix}.bin", "wb") as fh:
        left = tokens
        while left:
            n = min(left, 1 << 26)
            rng.integers(0, 32000, size=n, dtype=np.uint16).tofile(fh)
            left -= n
    with _IndexWriter(f"{prefix}.idx", np.uint16) as w:
        w.write(lengths, None, np.arange(len(lengths) + 1, dtype=np.int64))


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


class PeakAnon:
    """Peak anonymous RSS (what the process allocates), sampled every 2 ms by a thread. File-backed resident
    pages (the memory-mapped .bin the reads touch, with the kernel's readahead) are the page cache mapped
    into the process: clean, shared by every rank on a node and reclaimed under pressure; reported apart."""

    def __init__(self):
        import threading

        self.peak, self._stop = _status("RssAnon"), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _status("RssAnon"))

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return max(self.peak, _status("RssAnon"))


def measure(prefix: str, cache: str, steps: int, gbs: int, seq: int, batches: int) -> dict:
    """In this (fresh) process: build the training data and read ``batches`` global batches."""
    from nemo_minitron import parallel

    parallel.initialize(1, 1)
    import torch

    from nemo_minitron.data.blend import check, training_settings
    from nemo_minitron.data.module import GPTDataModule

    base, base_anon = _status("VmRSS"), _status("RssAnon")
    peak = PeakAnon()
    settings = training_settings(prefix, seq, 1, gbs)
    check(settings, 32000)  # the command's checks (sizes, token-id range) are part of the cost
    after_check = _status("VmHWM") - base
    t0 = time.perf_counter()
    m = GPTDataModule(settings, Path(cache))
    m.create_attention_mask = False  # as on the GPU path (Transformer Engine)
    m.build(steps, steps, 0, 0)
    t_build = time.perf_counter() - t0
    after_build = _status("VmHWM") - base
    loader = m.data_sampler.transform_dataloader(m.train_dataloader())
    it = iter(loader)
    n_tokens = 0
    t0 = time.perf_counter()
    for _ in range(batches * gbs):  # micro-batch 1, DP 1: gbs micro-batches per global batch
        b = next(it)
        n_tokens += b["tokens"].numel()
        assert b["tokens"].shape == (1, seq) and int(b["tokens"].max()) < 32000
    t_read = time.perf_counter() - t0
    ds = m._train_ds
    anon = peak.stop() - base_anon
    return {"peak_anon_growth": anon, "peak_rss_growth": _status("VmHWM") - base, "after_check": after_check,
            "after_build": after_build, "file_rss": _status("RssFile"), "anon_rss": _status("RssAnon"), "samples": len(ds),
            "build_s": t_build, "read_s": t_read, "tokens_read": n_tokens, "torch": torch.__version__}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10000)
    ap.add_argument("--global-batch", type=int, default=1152)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--sizes", default="0.25e9,1e9")
    ap.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)  # internal: PREFIX CACHE in a fresh process
    a = ap.parse_args()
    if a.measure:
        print(json.dumps(measure(a.measure[0], a.measure[1], a.steps, a.global_batch, a.seq, a.batches)))
        return
    tmp = Path(tempfile.mkdtemp(prefix="data_scale_"))
    try:
        res = {}
        for size in [float(x) for x in a.sizes.split(",")]:
            prefix = tmp / f"synthetic_{size:.2g}"
            t0 = time.perf_counter()
            write_dataset(prefix, int(size))
            print(f"wrote {int(size):,} tokens ({Path(f'{prefix}.bin').stat().st_size / GiB:.2f} GiB) in "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
            cmd = [sys.executable, __file__, "--measure", str(prefix), str(tmp / f"cache_{size:.2g}"),
                   "--steps", str(a.steps), "--global-batch", str(a.global_batch), "--seq", str(a.seq),
                   "--batches", str(a.batches)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode:
                sys.exit(f"measurement failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            res[size] = r
            epochs = a.steps * a.global_batch * a.seq / size
            print(f"{size / 1e9:.2f}B tokens: {r['samples']:,} samples of {a.seq}+1 (~{epochs:.0f} epochs), index built "
                  f"in {r['build_s']:.1f}s, {a.batches} global batches ({r['tokens_read'] / 1e6:.0f}M tokens) read in "
                  f"{r['read_s']:.1f}s; peak RSS growth {r['peak_anon_growth'] / GiB:.3f} GiB allocated (anonymous); "
                  f"all resident incl. the mapped .bin pages {r['peak_rss_growth'] / GiB:.3f} GiB", flush=True)
            prefix.with_suffix(".bin").unlink(missing_ok=True)
            Path(f"{prefix}.bin").unlink(missing_ok=True)
        small, large = (res[k]["peak_anon_growth"] for k in sorted(res)[:2])
        print(f"peak RSS growth (allocated): {small / GiB:.3f} GiB (0.25B tokens), {large / GiB:.3f} GiB (1B tokens); "
              f"the recipe's in-RAM windows before: {a.steps * a.global_batch * (a.seq + 1) * 8 / GiB:,.0f} GiB")
        print(f"data_rss_growth_ratio: {large / small:.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
