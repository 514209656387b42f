"""Worker: every search candidate of a tiny model, pruned at this TP/PP layout, and its loss.

    torchrun --nproc-per-node 2 search_candidates.py CKPT WINDOWS.pt OUT.json LAYOUTS   (e.g. "2x1,1x2")

Enumerates the candidates for several budgets at TP/PP (``enumerate_candidates``), prunes each from fixed
(seeded random) importance scores and layer choices with ``prune_candidate``, and runs the LM loss on the
windows. For each layout (TP x PP, one after another in the same processes) rank 0 writes
{layout: {candidate name: loss}}. Also called in-process by the test (TP=1, PP=1).
"""

import json
import sys

import torch

BUDGETS = (0.5, 0.8)


def losses(ckpt, windows, tp: int, pp: int) -> dict:
    from nemo_minitron.checkpoint.loader import load_model
    from nemo_minitron.model import count_params
    from nemo_minitron.model.forward import lm_loss
    from nemo_minitron.prune.plan import random_scores
    from nemo_minitron.search.rank import prune_candidate
    from nemo_minitron.search.space import enumerate_candidates

    model, spec, _ = load_model(ckpt, tp, pp)
    scores = random_scores(spec, seed=0)
    layer_rank = torch.argsort(torch.rand(spec.num_layers, generator=torch.Generator().manual_seed(3)))
    drops = {n: sorted(layer_rank[: spec.num_layers - n].tolist()) for n in range(1, spec.num_layers)}
    out = {}
    for b in BUDGETS:
        cands, _ = enumerate_candidates(spec, int(b * count_params(spec)), 0.08, multiple=16, tp=tp, pp=pp,
                                        dims=("num_layers", "hidden_size", "ffn_hidden_size",
                                              "num_attention_heads", "num_query_groups"))
        for c in cands:
            if c["name"] in out:
                continue
            m, s = prune_candidate(model, spec, c, drops, scores, tp, pp)
            assert (s.num_layers, s.hidden_size, s.ffn_hidden_size, s.num_attention_heads, s.num_query_groups) == (
                c["num_layers"], c["hidden_size"], c["ffn_hidden_size"], c["num_attention_heads"],
                c["num_query_groups"]), c["name"]
            with torch.no_grad():
                loss_sum, n = lm_loss(m, windows, micro_batch_size=4, forward_only=True)
            out[c["name"]] = {"loss": loss_sum / n, "params": c["params"]}
    return out


def main():
    ckpt, windows_path, out_path, layouts = sys.argv[1:5]
    from nemo_minitron import parallel

    res = {}
    for layout in layouts.split(","):
        tp, pp = (int(x) for x in layout.split("x"))
        parallel.initialize(tp, pp)
        res[layout] = losses(ckpt, torch.load(windows_path), tp, pp)
    if parallel.is_rank0():
        with open(out_path, "w") as fh:
            json.dump(res, fh)
    parallel.destroy()


if __name__ == "__main__":
    main()
