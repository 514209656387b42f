"""Worker: the search's calibration statistics and every candidate's one-shot ranking loss at a layout.

    torchrun --nproc-per-node 4 search_stats.py CKPT WINDOWS.pt OUT.pt TP PP

Gathers the importance scores and the Gram matrices of every site in one calibration pass
(``prune.stats.collect``), then prunes each candidate of a tiny model (budgets 50% and 80%, fixed seeded
layer choices for depth) with its width-pruned layers refitted from those statistics, and runs the LM loss.
Rank 0 writes {'grams': {'LAYER.SITE': full matrix}, 'scores', 'losses': {candidate: loss}}. Also called
in-process by the test (TP=1, PP=1, one process).
"""

import sys

import torch

BUDGETS = (0.5, 0.8)


def run(ckpt, windows, tp: int, pp: int) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from nemo_minitron import parallel
    from nemo_minitron.checkpoint.loader import load_model
    from nemo_minitron.evaluate import heldout_loss
    from nemo_minitron.model import count_params
    from nemo_minitron.prune import stats as calstats
    from nemo_minitron.search.rank import prune_candidate
    from nemo_minitron.search.space import DIMS, enumerate_candidates

    model, spec, _ = load_model(ckpt, tp, pp)
    sites = tuple(calstats.SITES)
    scores, stats = calstats.collect(model, windows, 2, sites, {}, progress=False)
    grams = {}
    for (layer, site), own in sorted(stats.grams.items()):  # this TP rank's rows -> the whole matrix
        parts = [torch.empty_like(own) for _ in range(ps.get_tensor_model_parallel_world_size())]
        dist.all_gather(parts, own.contiguous(), group=ps.get_tensor_model_parallel_group())
        grams[f"{layer}.{site}"] = torch.cat(parts, dim=0)
    if pp > 1:
        merged = {}
        for part in parallel.all_gather_tensors(grams, ps.get_pipeline_model_parallel_group()):
            merged.update(part)
        grams = merged
    layer_rank = torch.argsort(torch.rand(spec.num_layers, generator=torch.Generator().manual_seed(3)))
    drops = {n: sorted(layer_rank[: spec.num_layers - n].tolist()) for n in range(1, spec.num_layers)}
    losses = {}
    for b in BUDGETS:
        cands, _ = enumerate_candidates(spec, int(b * count_params(spec)), 0.08, multiple=16, tp=tp, pp=pp, dims=DIMS)
        for c in cands:
            if c["name"] not in losses:
                m, _ = prune_candidate(model, spec, c, drops, scores, tp, pp, {"stats": stats, "damping": 0.01})
                losses[c["name"]] = heldout_loss(m, windows, 2)["loss"]
    return {"grams": parallel.to_host(grams), "losses": losses,
            "scores": parallel.to_host({k: scores[k] for k in ("heads", "ffn", "hidden")})}


def main():
    ckpt, windows_path, out, tp, pp = sys.argv[1:6]
    from nemo_minitron import parallel

    parallel.initialize(int(tp), int(pp))
    res = run(ckpt, torch.load(windows_path), int(tp), int(pp))
    if parallel.is_rank0():
        torch.save(res, out)
    parallel.destroy()


if __name__ == "__main__":
    main()
