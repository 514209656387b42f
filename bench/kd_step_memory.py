"""Peak memory and time of one distillation step: output layer fused with the loss vs materialized logits.

    python bench/kd_step_memory.py [--vocab 128256] [--seq 2048] [--micro-batch-size 2] [--repeats 3] [--tied]

Both variants run ``distill_step`` (student forward + backward, teacher forward, vocab-parallel KL) on the
same small teacher/student (vocabulary 128,256, Llama-3's) and the same micro-batch of several thousand
tokens, each in its own child process of this run (so one variant's freed memory cannot hide the other's
peak): ``distill.fused_output=true`` (no full logits are ever held) and ``false`` (student logits, teacher
logits, the KL's gradient). Memory is the peak above what the process holds once models and data are built:
CUDA's ``max_memory_allocated`` on a GPU, the peak resident set (``ru_maxrss``) over the current one on the
CPU. Time is the median of ``--repeats`` steps after one warm-up step. The children alternate (unfused,
fused, unfused, fused) and each variant keeps its lower peak and faster median, so a burst of load from
another process does not decide the comparison.
Last two lines: ``kd_fused_time_ratio: R`` (fused / unfused; target <= 1.05) and
``kd_fused_memory_ratio: R`` (fused / unfused peak extra memory; target <= 0.35).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child(fused: bool, a) -> dict:
    from nemo_minitron import parallel
    from nemo_minitron.distill.pair import DistillationPair, DistillSettings, distill_step
    from nemo_minitron.model import build, count_params, tiny_spec

    parallel.initialize(1, 1)
    cuda = torch.cuda.is_available()
    common = dict(vocab_size=a.vocab, seq_length=a.seq, share_embeddings_and_output_weights=a.tied,
                  num_attention_heads=4, num_query_groups=2)
    t_spec = tiny_spec(num_layers=4, hidden_size=2 * a.hidden, ffn_hidden_size=6 * a.hidden,
                       kv_channels=2 * a.hidden // 4, **common)
    s_spec = tiny_spec(num_layers=2, hidden_size=a.hidden, ffn_hidden_size=3 * a.hidden, kv_channels=a.hidden // 4,
                       **common)
    torch.manual_seed(0)
    teacher, student = build(t_spec), build(s_spec)
    if cuda:
        teacher, student = teacher.cuda(), student.cuda()
    settings = DistillSettings(fused_output=fused, lm_weight=a.lm_weight, temperature=a.temperature)
    pair = DistillationPair(student, teacher, settings, a.vocab, s_spec.num_layers, t_spec.num_layers)
    windows = torch.randint(0, a.vocab, (a.micro_batch_size, a.seq + 1), generator=torch.Generator().manual_seed(1))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_now()
    times, loss = [], None
    for i in range(1 + a.repeats):
        student.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        res = distill_step(pair, windows, a.micro_batch_size)
        if cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
        loss = res["loss"]
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"peak_extra": peak, "time": statistics.median(times), "loss": loss,
            "teacher_params": count_params(t_spec), "student_params": count_params(s_spec)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=128256)  # Llama-3's vocabulary
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch-size", type=int, default=2)  # one micro-batch of mbs x seq tokens
    ap.add_argument("--hidden", type=int, default=64)  # student hidden; the teacher's is twice that
    ap.add_argument("--tied", action="store_true")
    ap.add_argument("--lm-weight", type=float, default=0.0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)  # unfused/fused child pairs, alternating
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(_child(a.child == "fused", a)))
        return
    runs = {"unfused": [], "fused": []}
    args = list(sys.argv[1:])
    for _ in range(a.rounds):
        for variant in ("unfused", "fused"):
            p = subprocess.run([sys.executable, __file__, *args, "--child", variant], capture_output=True, text=True,
                               env=dict(os.environ, PYTHONWARNINGS="ignore"))
            if p.returncode:
                sys.exit(f"{variant} child failed:\n{p.stderr[-3000:]}")
            runs[variant].append(json.loads(p.stdout.strip().splitlines()[-1]))
    r = {k: {"peak_extra": min(x["peak_extra"] for x in v), "time": min(x["time"] for x in v), "loss": v[0]["loss"],
             "all_peaks": [x["peak_extra"] for x in v], "all_times": [x["time"] for x in v]} for k, v in runs.items()}
    assert abs(r["fused"]["loss"] - r["unfused"]["loss"]) <= 1e-5 * abs(r["unfused"]["loss"]), r
    tokens = a.seq * a.micro_batch_size
    unit = tokens * a.vocab * 4
    x = runs["fused"][0]
    dev = "cuda" if torch.cuda.is_available() else f"cpu, {torch.get_num_threads()} threads"
    print(f"one distillation step: teacher {x['teacher_params'] / 1e6:.1f}M params, student "
          f"{x['student_params'] / 1e6:.1f}M ({'tied' if a.tied else 'untied'} embeddings), vocab {a.vocab}, "
          f"{a.micro_batch_size}x{a.seq} = {tokens} tokens per micro-batch ({dev}); "
          f"one fp32 copy of the logits = {unit / 2**20:.0f} MiB; best of {a.rounds} alternating runs each")
    for k in ("unfused", "fused"):
        peaks = ", ".join(f"{p / 2**20:.0f}" for p in r[k]["all_peaks"])
        times = ", ".join(f"{t:.2f}" for t in r[k]["all_times"])
        print(f"  {k:<8} peak extra memory {r[k]['peak_extra'] / 2**20:7.0f} MiB = {r[k]['peak_extra'] / unit:.2f} "
              f"logit copies (runs: {peaks})   step {r[k]['time']:.2f} s (runs: {times})   loss {r[k]['loss']:.5f}")
    print(f"kd_fused_time_ratio: {r['fused']['time'] / r['unfused']['time']:.3f}")
    print(f"kd_fused_memory_ratio: {r['fused']['peak_extra'] / r['unfused']['peak_extra']:.3f}")


if __name__ == "__main__":
    main()
