"""Worker: the commands of the GPU path, one after another in this process (as a cluster job runs them):

    [torchrun --nproc-per-node 4] gpu_path.py TEACHER DATA OUT

With 4 processes: width pruning with least squares at TP=2 x DP=2, depth pruning (lm_loss) at PP=2 x DP=2,
re-pruning from the saved scores at TP=2 x DP=2, an evaluation of two models at DP=4, a search's rank phase
(statistics gathered once, candidates refitted from them) at TP=2 x DP=2. With 1 process: the same
commands at TP=PP=DP=1. Last, the distillation (KL + CE + a hidden-state loss through a learned projection) of the
width-pruned student, at TP=2 x PP=2 (``commands.run_all`` lets NeMo's trainer set itself up after the commands
before it). Run with NEMO_MINITRON_EMULATE_GPU=1, every
tensor the commands put on "the GPU" lives on the emulated device, where CUDA's placement rules hold.
"""

import os
import sys


def main():
    teacher, data, out = sys.argv[1:4]
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from commands import run_all

    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp2 = ["trainer.strategy.tensor_model_parallel_size=2"] if world == 4 else []
    pp2 = ["trainer.strategy.pipeline_model_parallel_size=2"] if world == 4 else []
    cal = [f"data.calibration={data}", "data.calibration_samples=8", "data.seq_length=32", "data.micro_batch_size=2",
           "prune.depth_samples=8"]
    # a small lr for the distillation: Adam's first steps are close to lr x sign(gradient), so float-rounding
    # differences of the gradients (1e-7 relative at TP=2 with sequence parallelism, emulated or not: the order of
    # summation) would flip the update of near-zero gradient entries; the comparison is of the device handling
    kd = [f"teacher={teacher}", f"student={out}/width", f"output={out}/kd", f"data.train={data}",
          f"data.validation={data}", "data.seq_length=32", "data.micro_batch_size=2", "data.global_batch_size=4",
          "data.num_val_samples=4", "trainer.max_steps=2", "trainer.val_check_interval=2",
          "trainer.log_every_n_steps=1", "optim.lr=1e-5", "optim.min_lr=1e-6", "optim.warmup_steps=1",
          "distill.lm_weight=0.5", "distill.intermediate_pairs=[[-1,-1]]"]  # every loss term, a projection
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
        ["distill", *kd, *tp2, *pp2],
    ]
    run_all([{"name": f"{i}-{args[0]}", "args": args} for i, args in enumerate(steps)])


if __name__ == "__main__":
    main()
