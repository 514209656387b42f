"""Worker: least-squares reconstruction at several layouts in the same processes.

    torchrun --nproc-per-node 2 reconstruct.py CKPT WINDOWS.pt SCORES.pt TARGETS_JSON OUT.pt LAYOUTS   (e.g. "2x1,1x2")

For every layout (TP x PP, one after another), the model is loaded, pruned with the plan the given scores
make for the targets, and its pruned layers refitted on the windows. Rank 0 writes
``{layout: {"weights": full state dict, "layers": per-layer errors}}``.
"""

import json
import sys

import torch


def run(ckpt, windows, scores, targets, tp=1, pp=1, damping=0.01):
    from nemo_minitron.checkpoint.loader import load_model
    from nemo_minitron.model.shards import gather_full
    from nemo_minitron.prune.plan import make_plan
    from nemo_minitron.prune.reconstruct import reconstruct

    model, spec, _ = load_model(ckpt, tp, pp)
    pruned, _, info = reconstruct(model, spec, make_plan(scores, spec, targets), windows, 2, damping, tp, pp,
                                  progress=False)
    return {"weights": gather_full(pruned), "layers": info["layers"]}


def main():
    ckpt, windows, scores, targets, out, layouts = sys.argv[1:7]
    from nemo_minitron import parallel

    windows, scores, targets = torch.load(windows), torch.load(scores), json.loads(targets)
    results = {}
    for layout in layouts.split(","):
        tp, pp = (int(x) for x in layout.split("x"))
        parallel.initialize(tp, pp)
        results[layout] = run(ckpt, windows, scores, targets, tp, pp)
    if torch.distributed.get_rank() == 0:
        torch.save(results, out)
    parallel.destroy()


if __name__ == "__main__":
    main()
