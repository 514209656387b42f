"""Downstream scoring speed: the project's megatron forward (``nemo_minitron`` lm-eval model) vs lm-eval's own
``hf`` model, on the same model, the same requests and the same threads.

    python bench/downstream_speed.py [--model smollm2-135m] [--limit 16] [--rounds 2] [--batch-size 4]

The tasks (piqa, arc_easy, hellaswag, 0-shot; 5-shot mmlu with one document per subject) are built once; each
round scores them with ours, then with ``hf`` (float32 both, batch size 4 both, CPU or one GPU), alternating so
that a shared machine's noise falls on both. Requests/s is of the fastest round of each. Also printed: how many
sequences ours ran (each context once: a question's choices are branches of one sequence) and the largest
log-likelihood difference.
Last line: ``downstream_speed_ratio: RATIO`` (our requests/s over hf's; target >= 1.0).
"""

import argparse
import os
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)  # hf holds [batch, tokens, vocab] log-softmax: 5-shot MMLU prompts reach ~3,000 tokens
    a = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from lm_eval.models.huggingface import HFLM

    from nemo_minitron import downstream, parallel
    from nemo_minitron.checkpoint import hf
    from nemo_minitron.checkpoint.loader import describe, load_model
    from nemo_minitron.data import tokenizer as tok
    from nemo_minitron.downstream.lm import MegatronLM

    kind, path, spec = describe(a.model)
    if kind != "hf":
        raise SystemExit("--model must be a Hugging Face directory or an embedded name (lm-eval's hf model reads it)")
    preps = [downstream.prepare(["piqa", "arc_easy", "hellaswag"], limit=a.limit),
             downstream.prepare(["mmlu"], num_fewshot=5, limit=1)]
    parallel.initialize(1, 1)
    model, spec, _ = load_model(path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ours = MegatronLM(model, tok.load(path), max_length=spec.get("seq_length"), batch_size=a.batch_size,
                      log=lambda *_: None)
    theirs = HFLM(pretrained=str(path), dtype="float32", batch_size=a.batch_size, device=device)
    print(f"model {path} ({hf.read_config(path).get('architectures')}), {device}, {torch.get_num_threads()} threads, "
          f"batch size {a.batch_size}")

    def timed(lm):
        got = []
        inner = lm.loglikelihood

        def record(reqs, *x, **k):
            out = inner(reqs, *x, **k)
            got.extend(out)
            return out

        lm.loglikelihood = record
        t0 = time.time()
        for p in preps:
            downstream.score(p, lm)
        dt = time.time() - t0
        lm.loglikelihood = inner
        return dt, got

    best = {"ours": float("inf"), "hf": float("inf")}
    answers = {}
    for r in range(a.rounds):
        for name, lm in (("ours", ours), ("hf", theirs)):
            dt, got = timed(lm)
            best[name] = min(best[name], dt)
            answers[name] = got
            print(f"round {r + 1} {name}: {len(got)} requests in {dt:.1f}s ({len(got) / dt:.2f}/s)", flush=True)
    mine, ref = answers["ours"], answers["hf"]
    n = len(mine)
    diff = max(abs(x[0] - y[0]) for x, y in zip(mine, ref))
    st = ours.stats
    print(f"ours ran {st['sequences'] // a.rounds} sequences for {st['requests'] // a.rounds} requests "
          f"({st['tokens'] // a.rounds} tokens); max |log-likelihood diff| vs hf {diff:.2e} (float32)")
    print(f"requests/s: ours {n / best['ours']:.2f}, hf {n / best['hf']:.2f}")
    print(f"downstream_speed_ratio: {best['hf'] / best['ours']:.3f}")


if __name__ == "__main__":
    main()
