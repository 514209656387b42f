"""Worker for parallel tests: load a NeMo checkpoint at TP/PP, run forward+backward, save at this layout.

    torchrun --nproc-per-node 2 fwd_bwd.py CKPT WINDOWS.pt OUT.pt OUT_CKPT TP PP

Rank 0 writes {'loss', 'grads', 'params'} (full tensors, global names) to OUT.pt.
"""

import sys

import torch


def main():
    ckpt, windows_path, out, out_ckpt, tp, pp = sys.argv[1:7]
    tp, pp = int(tp), int(pp)
    from nemo_minitron import parallel
    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.model import build
    from nemo_minitron.model.forward import lm_loss
    from nemo_minitron.model.shards import gather_full

    parallel.initialize(tp, pp)
    spec = ck.read_spec(ckpt)
    model = build(spec, tp, pp)
    ck.load_weights(ckpt, model)
    windows = torch.load(windows_path)
    loss_sum, n = lm_loss(model, windows, micro_batch_size=2, forward_only=False)
    grads = gather_full(model, "grad")
    params = gather_full(model, "param")
    ck.save(out_ckpt, model, spec)
    if parallel.is_rank0():
        torch.save({"loss": loss_sum / n, "grads": grads, "params": params}, out)
    parallel.destroy()


if __name__ == "__main__":
    main()
