"""Worker: under torchrun (2 processes) at expert parallelism 2 (each rank holds half of every layer's experts;
the two ranks are the dense layers' data-parallel ranks): the held-out loss of a NeMo checkpoint and of a Hugging
Face directory, and the full state dict gathered back from the shards; then ``nemo-minitron evaluate`` at EP=2
on both (the command's own wiring), held-out loss and a downstream task. Rank 0 saves what it measured.

    torchrun --nproc-per-node 2 moe_layouts.py NEMO_CKPT HF_DIR DATA_PREFIX OUT_DIR
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    import torch
    import torch.distributed as dist

    from nemo_minitron import cli, parallel
    from nemo_minitron.checkpoint.loader import load_model
    from nemo_minitron.data import indexed
    from nemo_minitron.evaluate import heldout_loss
    from nemo_minitron.model.shards import gather_full

    ckpt, hf, data, out = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
    parallel.initialize(1, 1, ep=2)
    windows = indexed.windows(data, 16, 32)
    res = {}
    for name, src in (("nemo", ckpt), ("hf", hf)):
        model, spec, _ = load_model(src)
        experts = len(model.decoder.layers[0].mlp.experts.local_experts)
        res[name] = {"loss": heldout_loss(model, windows, 4)["loss"], "local_experts": experts,
                     "device": next(model.parameters()).device.type}
        if name == "nemo":
            res["full"] = parallel.to_host(gather_full(model))
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, {k: v for k, v in res.items() if k != "full"})
    if dist.get_rank() == 0:
        torch.save({"ranks": every, "full": res["full"]}, out / "ep2.pt")
    # piqa, 4 documents = 5 scored sequences, one per forward: 3 on one DP rank, 2 on the other (the other
    # joins the third forward's all-to-alls with a pass of its own)
    rc = cli.main(["evaluate", f"model=[{ckpt},{hf}]", f"data={data}", "eval.num_samples=16", "eval.seq_length=32",
                   "eval.micro_batch_size=4", "trainer.strategy.expert_model_parallel_size=2", "eval.tasks=[piqa]",
                   "eval.limit=4", "eval.batch_size=1", f"output_json=[{out / 'nemo.json'},{out / 'hf.json'}]"])
    sys.exit(rc)
