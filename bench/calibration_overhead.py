"""Calibration overhead: forward passes with the importance hooks vs the same passes without them.

    python bench/calibration_overhead.py [--model smollm2-135m|tiny] [--samples 16] [--seq 256] [--repeats 3]

Both variants run in this process, alternating, on the same token windows; the best of ``--repeats``
timings of each is compared. Last line: ``calibration_overhead: RATIO`` (target: under 1.10).
"""

import argparse
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--head-importance", default="contribution")
    a = ap.parse_args()

    from nemo_minitron import parallel
    from nemo_minitron.checkpoint.loader import load_model
    from nemo_minitron.model import build, tiny_spec
    from nemo_minitron.model.forward import lm_loss
    from nemo_minitron.prune.importance import ImportanceRecorder

    parallel.initialize(1, 1)
    if a.model == "tiny":
        spec = tiny_spec(hidden_size=256, ffn_hidden_size=1024, num_attention_heads=8, num_query_groups=4,
                         kv_channels=32, vocab_size=4096, seq_length=a.seq)
        model = build(spec)
    else:
        model, spec, _ = load_model(a.model)
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, spec.vocab_size, (a.samples, a.seq + 1), generator=g)

    def plain():
        with torch.no_grad():
            lm_loss(model, windows, a.micro_batch_size)

    def hooked():
        with torch.no_grad(), ImportanceRecorder(model, head_importance=a.head_importance) as rec:
            lm_loss(model, windows, a.micro_batch_size)
            rec.local_scores()

    plain()  # warm-up
    times = {"plain": [], "hooked": []}
    for _ in range(a.repeats):
        for name, fn in (("plain", plain), ("hooked", hooked)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    tp, th = min(times["plain"]), min(times["hooked"])
    tokens = a.samples * a.seq
    print(f"model {a.model}: {a.samples} samples x {a.seq} tokens, head_importance={a.head_importance}")
    print(f"without hooks: {tp:.3f}s ({tokens / tp:.0f} tokens/s)   with hooks: {th:.3f}s ({tokens / th:.0f} tokens/s)")
    print(f"calibration_overhead: {th / tp:.3f}")
    parallel.destroy()


if __name__ == "__main__":
    main()
