"""Worker: the commands of the GPU path, one after another in this process (as a cluster job runs them):

    [torchrun --nproc-per-node 4] gpu_path.py TEACHER DATA OUT

With 4 processes: width pruning with least squares at TP=2 x DP=2, depth pruning (lm_loss) at PP=2 x DP=2,
re-pruning from the saved scores at TP=2 x DP=2, an evaluation of two models at DP=4, a search's rank phase
(statistics gathered once, candidates refitted from them) at TP=2 x DP=2. With 1 process: the same
commands at TP=PP=DP=1. (The distillation runs as its own launch: NeMo's trainer sets up its parallel state
itself and does not take over one that a command before it left.) Run with NEMO_MINITRON_EMULATE_GPU=1, every
tensor the commands put on "the GPU" lives on the emulated device, where CUDA's placement rules hold.
"""

import os
import sys


def main():
    teacher, data, out = sys.argv[1:4]
    from nemo_minitron import parallel
    from nemo_minitron.cli import main as cli

    # one process group for all the commands (each command re-initializes megatron's parallel state for its
    # layout; re-creating torch's process group under one torchrun rendezvous is not reliable)
    parallel.destroy = lambda: None

    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp2 = ["trainer.strategy.tensor_model_parallel_size=2"] if world == 4 else []
    pp2 = ["trainer.strategy.pipeline_model_parallel_size=2"] if world == 4 else []
    cal = [f"data.calibration={data}", "data.calibration_samples=8", "data.seq_length=32", "data.micro_batch_size=2",
           "prune.depth_samples=8"]
    steps = [
        ["prune", f"model={teacher}", f"output={out}/width", *cal, "prune.hidden_size=48", "prune.ffn_hidden_size=64",
         "prune.num_attention_heads=2", "prune.reconstruction=least_squares", f"data.validation={data}",
         "data.validation_samples=8", *tp2],
        ["prune", f"model={teacher}", f"output={out}/depth", *cal, "prune.num_layers=2", "prune.depth_method=lm_loss",
         *pp2],
        ["prune", f"model={teacher}", f"output={out}/rescored", *cal, f"prune.scores={out}/width",
         "prune.ffn_hidden_size=96", "prune.reconstruction=least_squares", *tp2],
        ["evaluate", f"model=[{out}/width,{out}/depth]", f"data={data}", "eval.num_samples=8", "eval.seq_length=32",
         "eval.micro_batch_size=2", f"output_json=[{out}/width.json,{out}/depth.json]"],
        ["search", f"model={teacher}", f"output={out}/search", f"data.calibration={data}", f"data.train={data}",
         f"data.validation={data}", "data.calibration_samples=8", "data.seq_length=32", "data.micro_batch_size=2",
         "search.params=0.6", "search.tolerance=0.1", "search.multiple=16", "search.max_candidates=4",
         "search.top_k=1", "search.depth_samples=8", "search.eval_samples=8", "search.rank_samples=8",
         "search.eval_seq_length=32", "search.phase=rank", *tp2],
    ]
    for args in steps:
        rc = cli(args)
        if rc != 0:
            raise SystemExit(f"{args[0]} failed with exit status {rc}")


if __name__ == "__main__":
    main()
