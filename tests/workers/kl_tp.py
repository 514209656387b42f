"""Worker: vocab-parallel KL at TP=2 against the full-vocabulary reference (rank 0 writes OUT.pt)."""

import sys

import torch


def main():
    from nemo_minitron import parallel
    from nemo_minitron.distill.losses import kl_div, kl_div_reference

    parallel.initialize(tp=2, pp=1)
    rank = torch.distributed.get_rank()
    g = torch.Generator().manual_seed(0)
    s_full = torch.randn(10, 4, 300, generator=g)
    t_full = torch.randn(10, 4, 300, generator=g) * 3
    w = torch.rand(10, 4, generator=g)
    res = {}
    for rev in (False, True):
        s = s_full[..., rank * 150:(rank + 1) * 150].clone().requires_grad_(True)
        kl = kl_div(s, t_full[..., rank * 150:(rank + 1) * 150], 1.0, rev, vocab_size=290, chunk_tokens=7)
        (kl * w).sum().backward()
        grads = [torch.empty_like(s.grad) for _ in range(2)]
        torch.distributed.all_gather(grads, s.grad.contiguous())
        ref_s = s_full.clone().requires_grad_(True)
        ref = kl_div_reference(ref_s[..., :290], t_full[..., :290], 1.0, rev)
        (ref * w).sum().backward()
        res[rev] = {"kl": kl.detach(), "ref": ref.detach(), "grad": torch.cat(grads, -1),
                    "ref_grad": ref_s.grad}
    if rank == 0:
        torch.save(res, sys.argv[1])
    parallel.destroy()


if __name__ == "__main__":
    main()
