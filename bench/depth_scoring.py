"""Depth scoring cost: ``lm_loss`` layer scores with the unchanged prefix of every pass reused vs re-run.

    python bench/depth_scoring.py [--model llama8b-shape|smollm2-135m] [--samples 16] [--seq 256] [--method lm_loss]

Both variants run in this process, alternating (``--repeats`` times each, best time kept), on the same
token windows, and must give the same scores. Last line: ``depth_scoring_ratio: RATIO`` (reused / re-run;
target: at most 0.6). The line before gives the cost the pruning report states, in forward passes.

Reuse saves the layers before the skipped one, never the output layer, which every pass needs for its loss:
the saving depends on how many layers' worth of compute the output layer is. ``llama8b-shape`` (default)
is a random model with Llama-3.1-8B's proportions at 1/16 of its width (32 layers, hidden 256, ffn 896,
8 heads / 2 groups, vocabulary 8192: the output layer costs ~2.5 layers, as in the 8B);
``smollm2-135m`` is the real model, whose 49k x 576 output layer costs ~8 of its layers.
"""

import argparse
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama8b-shape")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--method", default="lm_loss", choices=("lm_loss", "contiguous"))
    ap.add_argument("--num-layers", type=int, default=None, help="layers kept (default: two thirds)")
    ap.add_argument("--repeats", type=int, default=1)
    a = ap.parse_args()

    from nemo_minitron import parallel
    from nemo_minitron.checkpoint.loader import load_model
    from nemo_minitron.model import build, tiny_spec
    from nemo_minitron.prune.depth import layer_scores

    parallel.initialize(1, 1)
    if a.model == "llama8b-shape":
        spec = tiny_spec(num_layers=32, hidden_size=256, ffn_hidden_size=896, num_attention_heads=8,
                         num_query_groups=2, kv_channels=32, vocab_size=8192, seq_length=a.seq)
        model = build(spec)
    else:
        model, spec, _ = load_model(a.model)
    model.eval()
    n = a.num_layers or (2 * spec.num_layers) // 3
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, spec.vocab_size, (a.samples, a.seq + 1), generator=g)

    times, infos = {True: [], False: []}, {}
    for _ in range(a.repeats):
        for reuse in (False, True):
            t = time.perf_counter()
            infos[reuse] = layer_scores(model, spec, windows, a.micro_batch_size, a.method, n, progress=False,
                                        reuse_prefix=reuse)
            times[reuse].append(time.perf_counter() - t)
    diff = float((infos[True]["scores"] - infos[False]["scores"]).abs().max())
    assert infos[True]["drop"] == infos[False]["drop"], "prefix reuse changed the layers dropped"
    t0, t1 = min(times[False]), min(times[True])
    print(f"model {a.model}: {spec.num_layers} -> {n} layers by {a.method}, {a.samples} windows x {a.seq} tokens")
    print(f"re-run prefix: {t0:.1f}s   reused prefix: {t1:.1f}s   largest score difference: {diff:.2e}")
    print(f"forward passes (report): re-run {infos[False]['forward_equivalents']}  "
          f"reused {infos[True]['forward_equivalents']}")
    print(f"depth_scoring_ratio: {t1 / t0:.3f}")
    parallel.destroy()


if __name__ == "__main__":
    main()
