"""Worker for parallel tests: load a NeMo checkpoint at TP/PP, run forward+backward, save at this layout.

    torchrun --nproc-per-node 2 fwd_bwd.py CKPT WINDOWS.pt OUT.pt OUT_CKPT TP PP [CKPT2 OUT2.pt OUT_CKPT2 ...]

Rank 0 writes {'loss', 'grads', 'params'} (full tensors, global names) to OUT.pt; further checkpoints (e.g. one
whose vocabulary this layout pads differently) are run in the same launch.
"""

import sys

import torch


def main():
    ckpt, windows_path, out, out_ckpt, tp, pp = sys.argv[1:7]
    tp, pp = int(tp), int(pp)
    more = sys.argv[7:]
    jobs = [(ckpt, out, out_ckpt)] + [tuple(more[i:i + 3]) for i in range(0, len(more), 3)]
    from nemo_minitron import parallel
    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.model import build
    from nemo_minitron.model.forward import lm_loss
    from nemo_minitron.model.shards import gather_full

    parallel.initialize(tp, pp)
    windows = torch.load(windows_path)
    for ckpt, out, out_ckpt in jobs:
        spec = ck.read_spec(ckpt)
        model = build(spec, tp, pp)
        ck.load_weights(ckpt, model)
        loss_sum, n = lm_loss(model, windows, micro_batch_size=2, forward_only=False)
        grads = gather_full(model, "grad")
        params = gather_full(model, "param")
        ck.save(out_ckpt, model, spec)
        if parallel.is_rank0():
            torch.save({"loss": loss_sum / n, "grads": grads, "params": params}, out)
    parallel.destroy()


if __name__ == "__main__":
    main()
