"""Worker: least-squares reconstruction at several layouts in the same processes.

    torchrun --nproc-per-node 2 reconstruct.py CKPTS WINDOWS.pt SCORES TARGETS_JSON OUT.pt LAYOUTS

``CKPTS`` and ``SCORES`` are comma-separated lists of the same length (one scores file per checkpoint, e.g. a tiny
Llama, Qwen2 and Qwen3); ``LAYOUTS`` e.g. "2x1,1x2". For every layout (TP x PP, one after another) and checkpoint,
the model is loaded, its logits on the windows computed (gathered over TP, from the last stage), and it is pruned
with the plan the scores make for the targets, its pruned layers refitted on the windows. Rank 0 writes
``{(layout, i): {"weights": full state dict, "layers": per-layer errors, "logits": [n, L, vocab]}}``.
"""

import json
import sys

import torch


def logits(model, windows, vocab):
    """Logits of ``windows[:, :-1]`` at any TP/PP layout (megatron's schedule; every rank returns them)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_minitron import platform

    inputs = windows[:, :-1].to(platform.device())
    got = []

    def step(data, m):
        x = next(data)
        out = m(x, torch.arange(x.shape[1], device=x.device).unsqueeze(0).expand_as(x), None)

        def loss_func(o):
            got.append(o.detach().float())
            return o.sum() * 0, {}
        return out, loss_func

    get_forward_backward_func()(forward_step_func=step, data_iterator=iter([inputs]), model=[model],
                                num_microbatches=1, seq_length=inputs.shape[1], micro_batch_size=inputs.shape[0],
                                forward_only=True)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return got[0][..., :vocab]
    tp = ps.get_tensor_model_parallel_world_size()
    rows = model.output_layer.weight.shape[0] if hasattr(model, "output_layer") and model.output_layer.weight is not None \
        else model.embedding.word_embeddings.weight.shape[0]
    full = torch.zeros(*inputs.shape, rows * tp, device=inputs.device)
    if ps.is_pipeline_last_stage():
        parts = [torch.empty_like(got[0]) for _ in range(tp)]
        dist.all_gather(parts, got[0].contiguous(), group=ps.get_tensor_model_parallel_group())
        full = torch.cat(parts, dim=-1)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(full, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
    return full[..., :vocab]


def run(ckpt, windows, scores, targets, tp=1, pp=1, damping=0.01):
    from nemo_minitron.checkpoint.loader import load_model
    from nemo_minitron.model.shards import gather_full
    from nemo_minitron.prune.plan import make_plan
    from nemo_minitron.prune.reconstruct import reconstruct

    model, spec, _ = load_model(ckpt, tp, pp)
    source_logits = logits(model, windows, spec.vocab_size)
    pruned, _, info = reconstruct(model, spec, make_plan(scores, spec, targets), windows, 2, damping, tp, pp,
                                  progress=False)
    return {"weights": gather_full(pruned), "layers": info["layers"], "logits": source_logits}


def main():
    ckpts, windows, scores, targets, out, layouts = sys.argv[1:7]
    from nemo_minitron import parallel

    ckpts, scores = ckpts.split(","), [torch.load(s) for s in scores.split(",")]
    windows, targets = torch.load(windows), json.loads(targets)
    results = {}
    for layout in layouts.split(","):
        tp, pp = (int(x) for x in layout.split("x"))
        parallel.initialize(tp, pp)
        for i, ckpt in enumerate(ckpts):
            results[(layout, i)] = run(ckpt, windows, scores[i], targets, tp, pp)
    if torch.distributed.get_rank() == 0:
        torch.save(parallel.to_host(results), out)
    parallel.destroy()


if __name__ == "__main__":
    main()
