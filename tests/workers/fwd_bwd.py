"""Worker for parallel tests: load NeMo checkpoints at each TP/PP layout, run forward+backward, save at that layout.

    torchrun --nproc-per-node 2 fwd_bwd.py WINDOWS.pt OUT_DIR LAYOUTS CKPT [CKPT ...]

LAYOUTS: comma-separated ``TPxPP`` (e.g. ``2x1,1x2``), run one after the other in this launch. For checkpoint
number i at layout L, rank 0 writes {'loss', 'grads', 'params'} (full tensors, global names) to
``OUT_DIR/L-i.pt`` and every rank saves the model at that layout to ``OUT_DIR/L-i-ckpt``.
"""

import sys
from pathlib import Path

import torch


def main():
    windows_path, out_dir, layouts, *ckpts = sys.argv[1:]
    from nemo_minitron import parallel
    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.model import build
    from nemo_minitron.model.forward import lm_loss
    from nemo_minitron.model.shards import gather_full

    windows = torch.load(windows_path)
    for layout in layouts.split(","):
        tp, pp = map(int, layout.split("x"))
        parallel.initialize(tp, pp)
        for i, ckpt in enumerate(ckpts):
            spec = ck.read_spec(ckpt)
            model = build(spec, tp, pp)
            ck.load_weights(ckpt, model)
            loss_sum, n = lm_loss(model, windows, micro_batch_size=2, forward_only=False)
            grads = gather_full(model, "grad")
            params = gather_full(model, "param")
            ck.save(Path(out_dir) / f"{layout}-{i}-ckpt", model, spec)
            if parallel.is_rank0():
                torch.save({"loss": loss_sum / n, "grads": grads, "params": params}, Path(out_dir) / f"{layout}-{i}.pt")
    parallel.destroy()


if __name__ == "__main__":
    main()
