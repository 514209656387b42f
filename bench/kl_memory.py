"""Peak memory of the distillation KL loss (forward + backward): ours vs naive ``F.kl_div``.

    python bench/kl_memory.py [--vocab 128256] [--tokens 1024] [--dtype fp32|bf16]

Each variant runs in its own child process (so one variant's freed memory cannot hide the other's
peak) on the same random logits. Memory is the peak above what the inputs already hold: CUDA's
``max_memory_allocated`` on a GPU, the process's peak resident set (``ru_maxrss``) on the CPU.
Naive = ``F.kl_div(F.log_softmax(student), F.softmax(teacher))`` with autograd, as most KD code does.
Last line: ``kl_memory_ratio: RATIO`` (ours / naive; lower is better). The line before it reports ours
in units of one fp32 copy of the logits (the target: about 1).
"""

import argparse
import json
import os
import resource
import subprocess
import sys

import torch


def _child(variant: str, vocab: int, tokens: int, dtype: str, chunk: int) -> dict:
    import torch.nn.functional as F

    from nemo_minitron.distill.losses import kl_div

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    g = torch.Generator(device=dev).manual_seed(0)
    s = torch.randn(tokens, vocab, device=dev, dtype=dt, generator=g).requires_grad_(True)
    t = torch.randn(tokens, vocab, device=dev, dtype=dt, generator=g)
    # warm-up on a tiny problem so library/allocator set-up is not counted
    w = torch.randn(4, 64, device=dev, requires_grad=True)
    kl_div(w, torch.randn(4, 64, device=dev)).sum().backward()
    F.kl_div(F.log_softmax(w, -1), F.softmax(w.detach(), -1), reduction="sum").backward()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if variant == "ours":
        loss = kl_div(s, t, chunk_tokens=chunk).sum()
    else:
        loss = F.kl_div(F.log_softmax(s.float(), -1), F.softmax(t.float(), -1), reduction="none").sum()
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"peak_extra": peak, "loss": float(loss), "logits_fp32_bytes": tokens * vocab * 4}


def measure(vocab: int, tokens: int, dtype: str = "fp32", chunk: int = 0) -> dict:
    out = {}
    for variant in ("ours", "naive"):
        p = subprocess.run([sys.executable, __file__, "--child", variant, "--vocab", str(vocab), "--tokens",
                            str(tokens), "--dtype", dtype, "--chunk", str(chunk)],
                           capture_output=True, text=True, check=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        out[variant] = json.loads(p.stdout.strip().splitlines()[-1])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=128256)  # Llama-3.1's vocabulary
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--chunk", type=int, default=0)  # 0: the loss's automatic chunking
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(_child(a.child, a.vocab, a.tokens, a.dtype, a.chunk)))
        return
    r = measure(a.vocab, a.tokens, a.dtype, a.chunk)
    unit = r["ours"]["logits_fp32_bytes"]
    assert abs(r["ours"]["loss"] - r["naive"]["loss"]) <= 1e-3 * abs(r["naive"]["loss"]), r
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"KL loss fwd+bwd, {a.tokens} tokens x vocab {a.vocab} ({a.dtype} logits, {dev}); "
          f"one fp32 copy of the logits = {unit / 2**20:.0f} MiB")
    for k in ("ours", "naive"):
        print(f"  {k:<6} peak extra memory {r[k]['peak_extra'] / 2**20:8.0f} MiB = "
              f"{r[k]['peak_extra'] / unit:.2f} fp32 logit copies   (loss {r[k]['loss']:.2f})")
    print(f"kl_memory_ours_in_logit_copies: {r['ours']['peak_extra'] / unit:.2f}")
    print(f"kl_memory_ratio: {r['ours']['peak_extra'] / r['naive']['peak_extra']:.3f}")


if __name__ == "__main__":
    main()
