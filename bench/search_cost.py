"""Cost of ranking one architecture-search candidate, in evaluations of the source model.

    python bench/search_cost.py [--model smollm2-shape|smollm2-135m|CKPT] [--rank-samples 16] [--seq 256]
                                [--candidates 6] [--sequential]

The search's rank phase gathers its calibration statistics once (importance scores and the source model's
Gram matrices, ``prune/stats.py``); each candidate is then trimmed, refitted in closed form from them and
evaluated on the ranking windows. Here, in one process and on the same windows: for each of the first
``--candidates`` candidates within half the source's parameters (the search's default budget), one
evaluation of the source model, then the candidate's ranking (prune + refit + evaluation), alternating so
that both see the same machine load. Last line: ``search_cost_ratio: RATIO`` = median over candidates of
(candidate's ranking time / the source evaluation just before it); target: at most 1.5. ``--sequential``
also times each candidate with the sequential refit (a calibration forward pass per layer, what every
candidate cost before the statistics), and prints that ratio on the line before.

``smollm2-shape`` (default) is a random model of SmolLM2-135M's shape (30 layers, hidden 576, ffn 1536,
9 heads / 3 groups, tied 49,152-token vocabulary); ``smollm2-135m`` is the real model (imported on first use).
The statistics' gathering (one calibration pass) is timed too and printed, not counted per candidate.
"""

import argparse
import statistics
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-shape")
    ap.add_argument("--rank-samples", type=int, default=16)
    ap.add_argument("--calibration-samples", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--candidates", type=int, default=6)
    ap.add_argument("--sequential", action="store_true")
    a = ap.parse_args()

    from nemo_minitron import parallel
    from nemo_minitron.checkpoint.loader import load_model
    from nemo_minitron.evaluate import heldout_loss
    from nemo_minitron.model import build, count_params, tiny_spec
    from nemo_minitron.prune import stats as calstats
    from nemo_minitron.prune.plan import WIDTH_DIMS
    from nemo_minitron.search.rank import prune_candidate
    from nemo_minitron.search.space import DIMS, enumerate_candidates

    parallel.initialize(1, 1)
    if a.model == "smollm2-shape":
        spec = tiny_spec(num_layers=30, hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9,
                         num_query_groups=3, kv_channels=64, vocab_size=49152, seq_length=a.seq,
                         share_embeddings_and_output_weights=True)
        torch.manual_seed(0)
        model = build(spec)
    else:
        model, spec, _ = load_model(a.model)
    model.eval()
    g = torch.Generator().manual_seed(0)
    rank_w = torch.randint(0, spec.vocab_size, (a.rank_samples, a.seq + 1), generator=g)
    cal_w = torch.randint(0, spec.vocab_size, (a.calibration_samples, a.seq + 1), generator=g)
    cands, _ = enumerate_candidates(spec, count_params(spec) // 2, 0.05, dims=list(DIMS), multiple=64,
                                    max_candidates=a.candidates)
    sites = calstats.sites_for([k for k in WIDTH_DIMS if any(c[k] != getattr(spec, k) for c in cands)])
    t = time.perf_counter()
    scores, stats = calstats.collect(model, cal_w, a.micro_batch_size, sites, {}, progress=False)
    t_stats = time.perf_counter() - t
    order = torch.argsort(torch.rand(spec.num_layers, generator=g))  # layer choices for depth (not timed)
    drops = {n: sorted(order[: spec.num_layers - n].tolist()) for n in range(1, spec.num_layers)}
    one_shot = {"stats": stats, "damping": 0.01}
    sequential = {"windows": cal_w, "micro_batch_size": a.micro_batch_size, "damping": 0.01}

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        return time.perf_counter() - t, out

    def rank(c, refit):
        m, _ = prune_candidate(model, spec, c, drops, scores, refit=refit)
        return heldout_loss(m, rank_w, a.micro_batch_size)["loss"]

    heldout_loss(model, rank_w, a.micro_batch_size)  # warm-up
    ratios, seq_ratios = [], []
    print(f"model {a.model}: {count_params(spec) / 1e6:.1f}M params; {len(cands)} candidates at 50%; ranking windows "
          f"{a.rank_samples} x {a.seq}; statistics of {', '.join(sites)} gathered in {t_stats:.1f}s "
          f"({calstats.bytes_per_rank(spec, sites) / 2 ** 20:.0f} MiB)")
    for c in cands:
        t_src, _ = timed(lambda: heldout_loss(model, rank_w, a.micro_batch_size))
        t_one, loss = timed(lambda: rank(c, one_shot))
        ratios.append(t_one / t_src)
        line = f"  {c['name']:<28} source eval {t_src:6.1f}s  one-shot {t_one:6.1f}s (loss {loss:.4f})"
        if a.sequential:
            t_src2, _ = timed(lambda: heldout_loss(model, rank_w, a.micro_batch_size))
            t_seq, loss_seq = timed(lambda: rank(c, sequential))
            seq_ratios.append(t_seq / t_src2)
            line += f"  sequential {t_seq:6.1f}s (loss {loss_seq:.4f})"
        print(line, flush=True)
    if seq_ratios:
        print(f"search_cost_ratio_sequential: {statistics.median(seq_ratios):.2f}")
    print(f"search_cost_ratio: {statistics.median(ratios):.2f}")
    parallel.destroy()


if __name__ == "__main__":
    main()
