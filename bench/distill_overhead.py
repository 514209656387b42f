"""Distillation step overhead: one KD step vs (student training step + teacher forward), same run.

    python bench/distill_overhead.py [--vocab 32000] [--hidden 256] [--samples 8] [--seq 256] [--repeats 5]

A: ``distill_step`` (student forward + backward, teacher forward, vocab-parallel KL, one pipeline
schedule). B: the student's ordinary LM training step (forward + backward with megatron's cross-entropy)
followed by a separate teacher forward: the work distillation cannot avoid. Both alternate in this
process on the same windows; the median of ``--repeats`` timings of each is compared. Also prints the
KL loss's memory ratio (bench/kl_memory.py) at this vocabulary. Last line:
``distill_step_overhead: RATIO`` (A / B; target: under 1.10).
"""

import argparse
import statistics
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()

    from nemo_minitron import parallel
    from nemo_minitron.distill.pair import DistillationPair, DistillSettings, distill_step
    from nemo_minitron.model import build, count_params, tiny_spec
    from nemo_minitron.model.forward import lm_loss

    parallel.initialize(1, 1)
    shape = dict(hidden_size=a.hidden, ffn_hidden_size=3 * a.hidden, num_attention_heads=8, num_query_groups=4,
                 kv_channels=a.hidden // 8, vocab_size=a.vocab, seq_length=a.seq)
    t_spec, s_spec = tiny_spec(num_layers=8, **shape), tiny_spec(num_layers=4, **shape)
    torch.manual_seed(0)
    teacher, student = build(t_spec), build(s_spec)
    pair = DistillationPair(student, teacher, DistillSettings(), a.vocab, s_spec.num_layers, t_spec.num_layers)
    windows = torch.randint(0, a.vocab, (a.samples, a.seq + 1), generator=torch.Generator().manual_seed(1))
    mbs = a.micro_batch_size

    def kd():
        student.zero_grad(set_to_none=True)
        distill_step(pair, windows, mbs)

    def baseline():
        student.zero_grad(set_to_none=True)
        lm_loss(student, windows, mbs, forward_only=False)
        with torch.no_grad():
            lm_loss(teacher, windows, mbs, forward_only=True)

    for f in (kd, baseline):  # warm-up
        f()
    times = {"kd": [], "baseline": []}
    for _ in range(a.repeats):
        for name, f in (("kd", kd), ("baseline", baseline)):
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = a.samples * a.seq
    print(f"teacher {count_params(t_spec) / 1e6:.1f}M params, student {count_params(s_spec) / 1e6:.1f}M, vocab {a.vocab}, "
          f"{a.samples}x{a.seq} tokens/step, {torch.get_num_threads()} threads")
    print(f"  distillation step             {med['kd'] * 1e3:8.1f} ms  ({tokens / med['kd']:.0f} tokens/s)")
    print(f"  student step + teacher fwd    {med['baseline'] * 1e3:8.1f} ms  ({tokens / med['baseline']:.0f} tokens/s)")

    import subprocess
    import sys
    from pathlib import Path

    mem = subprocess.run([sys.executable, str(Path(__file__).with_name("kl_memory.py")), "--vocab", str(a.vocab),
                          "--tokens", str(tokens)], capture_output=True, text=True, check=True).stdout
    print(f"kl_memory_ratio: {mem.strip().splitlines()[-1].split(':')[-1].strip()}  (ours / naive F.kl_div peak, "
          f"{tokens} tokens x vocab {a.vocab})")
    print(f"distill_step_overhead: {med['kd'] / med['baseline']:.3f}")


if __name__ == "__main__":
    main()
