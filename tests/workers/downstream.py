"""Worker: lm-eval tasks scored through the megatron forward at several layouts in the same processes.

    torchrun --nproc-per-node 2 downstream.py CKPT OUT.json LAYOUTS

``LAYOUTS`` e.g. "1x1,2x1,1x2" (TP x PP; with 2 processes, 1x1 is DP=2). The tasks of
:data:`tests.test_downstream.TASKS` are built once; for every layout the checkpoint is loaded and every request's
(log-likelihood, greedy) and every task's metrics are recorded. Rank 0 writes ``{layout: {"lls", "tasks"}}``;
every other rank writes its own results to ``OUT.rank<r>`` (all ranks must hold the same answers).
"""

import json
import sys


def main():
    from nemo_minitron import downstream, parallel
    from nemo_minitron.checkpoint.loader import load_model
    from nemo_minitron.data import tokenizer as tok
    from nemo_minitron.downstream.lm import MegatronLM

    ckpt, out, layouts = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    tasks, limit, shots = json.loads(sys.argv[4])
    prep = downstream.prepare(tasks, num_fewshot=shots, limit=limit)
    res = {}
    for lay in layouts:
        tp, pp = map(int, lay.split("x"))
        parallel.initialize(tp, pp)
        model, spec, _ = load_model(ckpt, tp, pp)
        lm = MegatronLM(model, tok.load(ckpt), max_length=1024, batch_size=3, log=lambda *_: None)
        lls = []
        inner = lm.loglikelihood

        def record(reqs, *a, **k):
            got = inner(reqs, *a, **k)
            lls.extend([list(r.args), lp, bool(g)] for r, (lp, g) in zip(reqs, got))
            return got

        lm.loglikelihood = record
        res[lay] = {"lls": lls, "tasks": downstream.score(prep, lm),
                    "dp": parallel.data_parallel_size()}
        del model
    r = parallel.rank()
    with open(out if r == 0 else f"{out}.rank{r}", "w") as f:
        json.dump(res, f)
    parallel.destroy()


if __name__ == "__main__":
    main()
