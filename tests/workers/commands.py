"""Worker: several ``nemo-minitron`` commands, each with its own parallel layout, one after another in the same
processes (one launch instead of one per command: every process pays NeMo's ~15 s import once).

    [torchrun --nproc-per-node N] commands.py RUNS_JSON
    RUNS_JSON: [{"name": .., "args": [command, key=value, ..], "env": {VAR: value, ..}}, ..]

Each run's ``env`` is set for it and removed after it. Rank 0 prints ``=== run NAME ===`` before each run, so that a
test can split the output (:func:`split`). A run that fails stops the worker with its exit status.

NeMo's trainer sets up megatron's parallel state and its micro-batch calculator only when it also creates the
process group (``MegatronStrategy.setup_distributed`` returns early when one exists: a second trainer in one
process would train on the first one's layout). Here, after that early return, the strategy does the rest of its
own set-up (NeMo's ``init_model_parallel`` and its data sampler's ``setup``), as a fresh process would: the
command itself runs unchanged. The process group is kept (re-creating it under one torchrun rendezvous is not
reliable).
"""

import json
import os
import sys

MARK = "=== run "


def split(stdout: str) -> dict:
    """{name: that run's part of rank 0's output}."""
    out, name = {}, None
    for line in stdout.splitlines(keepends=True):
        if line.startswith(MARK):
            name = line[len(MARK):].rstrip().removesuffix(" ===")
            out[name] = ""
        elif name is not None:
            out[name] += line
    return out


def _nemo_setup_on_an_existing_group() -> None:
    import torch
    from nemo.lightning.pytorch.strategies import megatron_strategy as ms

    orig = ms.MegatronStrategy.setup_distributed

    def setup_distributed(self):
        existing = torch.distributed.is_initialized()
        orig(self)
        if existing:  # what NeMo's setup_distributed does after creating a group
            ms.init_model_parallel(self.model)
            if self.data_sampler:
                self.data_sampler.setup(self.cluster_environment.global_rank())

    ms.MegatronStrategy.setup_distributed = setup_distributed


def main():
    run_all(json.loads(sys.argv[1]))


def run_all(runs: list) -> None:
    from megatron.core import parallel_state
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator

    from nemo_minitron import parallel
    from nemo_minitron.cli import main as cli

    _nemo_setup_on_an_existing_group()
    parallel.destroy = lambda: parallel_state.destroy_model_parallel() if parallel_state.model_parallel_is_initialized() \
        else None  # a command's teardown keeps the process group for the next one
    for run in runs:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        destroy_num_microbatches_calculator()  # the next run's batch sizes and DP
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{MARK}{run['name']} ===", flush=True)
        env = run.get("env") or {}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update({k: str(v) for k, v in env.items()})
        try:
            rc = cli([str(a) for a in run["args"]])
        finally:
            for k, v in old.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        if rc:
            raise SystemExit(rc)


if __name__ == "__main__":
    main()
