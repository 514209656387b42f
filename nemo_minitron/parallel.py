"""Process group and megatron parallel state: the one place that initializes them.

Works under ``torchrun`` (reads RANK/WORLD_SIZE/MASTER_ADDR), under SLURM ``srun`` (maps SLURM_PROCID etc.
when torchrun's variables are absent) and in a plain single process (a private TCP store on a free port).
The backend is NCCL with CUDA and gloo without (see :mod:`nemo_minitron.platform`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from nemo_minitron import platform
from nemo_minitron.errors import UserError


def _env_from_slurm() -> None:
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
    os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))


def world_size_from_env() -> int:
    _env_from_slurm()
    return int(os.environ.get("WORLD_SIZE", "1"))


def validate_layout(world_size: int, tp: int, pp: int, ep: int = 1) -> None:
    if tp < 1 or pp < 1 or ep < 1:
        raise UserError(f"tensor/pipeline/expert parallel sizes must be >= 1 (got TP={tp}, PP={pp}, EP={ep})")
    if world_size % (tp * pp) != 0:
        raise UserError(f"world size {world_size} is not divisible by TP*PP = {tp}*{pp}")
    if world_size % (tp * pp * ep) != 0:  # expert-parallel ranks are carved from the data-parallel ones
        raise UserError(f"world size {world_size} is not divisible by TP*PP*EP = {tp}*{pp}*{ep} (the expert-parallel "
                        "ranks are data-parallel ranks of the dense layers)")


def expert_parallel_size(strategy) -> int:
    """EP from a command's ``trainer.strategy`` section (1 where the command or the config has no such key)."""
    ep = strategy.get("expert_model_parallel_size") if hasattr(strategy, "get") else None
    return int(ep or 1)


@dataclass(frozen=True)
class Layout:
    """One run's process layout: tensor x pipeline model parallelism, data parallelism over the rest of the
    world (DP = world / (TP x PP), as in Megatron-LM) and sequence parallelism (activations outside the
    tensor-parallel regions split along the sequence over the TP ranks)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    ep: int = 1  # expert parallelism (mixtures of experts): each EP rank holds 1/EP of every layer's experts

    @classmethod
    def resolve(cls, world: int, tp: int, pp: int, sequence_parallel: bool | None = None,
                sp_key: str = "trainer.strategy.sequence_parallel", ep: int = 1) -> "Layout":
        """Validate and derive the layout; ``sequence_parallel=None`` means on when TP > 1 (Megatron's advice)."""
        validate_layout(world, tp, pp, ep)
        sp = tp > 1 if sequence_parallel is None else bool(sequence_parallel)
        if sp and tp == 1:
            raise UserError(f"{sp_key}=true needs tensor parallelism (TP > 1; TP is 1 here): sequence "
                            "parallelism splits the activations over the tensor-parallel ranks")
        return cls(tp=tp, pp=pp, dp=world // (tp * pp), sequence_parallel=sp, ep=ep)

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    def __str__(self) -> str:
        return f"TP={self.tp} PP={self.pp} DP={self.dp}" + (f" EP={self.ep}" if self.ep > 1 else "") \
            + (" SP" if self.sequence_parallel else "")


def initialize(tp: int = 1, pp: int = 1, seed: int = 1234, ep: int = 1) -> None:
    """Initialize torch.distributed (if needed), megatron parallel state and the model-parallel RNG. ``ep``:
    expert parallelism (megatron carves it from the data-parallel ranks; experts keep TP as their own tensor
    parallelism)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    platform.activate()
    world = world_size_from_env()
    validate_layout(world, tp, pp, ep)
    if not dist.is_initialized():
        if platform.has_cuda():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend=platform.backend(), timeout=timedelta(minutes=30))
        else:
            # one process: an in-memory store, so no port to pick (and none another process can take)
            dist.init_process_group(backend=platform.backend(), store=dist.HashStore(), rank=0, world_size=1)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep
    )
    model_parallel_cuda_manual_seed(seed)


def data_parallel_size() -> int:
    """DP of the initialized megatron parallel state (1 before initialization)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_data_parallel_world_size()


def data_parallel_shard(rows: torch.Tensor) -> torch.Tensor:
    """This DP rank's contiguous share of ``rows`` (the first dimension must divide by DP)."""
    dp = data_parallel_size()
    if dp == 1:
        return rows
    from megatron.core import parallel_state

    if rows.shape[0] % dp:
        raise ValueError(f"{rows.shape[0]} rows do not split over {dp} data-parallel ranks")
    n = rows.shape[0] // dp
    r = parallel_state.get_data_parallel_rank()
    return rows[r * n:(r + 1) * n]


def data_parallel_all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    """In-place all-reduce of ``t`` over the data-parallel group (SUM unless ``op``); a no-op at DP=1."""
    if data_parallel_size() > 1:
        from megatron.core import parallel_state

        dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=parallel_state.get_data_parallel_group())
    return t


def to_host(obj):
    """``obj`` (tensors, or dicts/lists/tuples of them) with every tensor copied to the host: what goes into a
    file or an object collective."""
    from torch.utils._pytree import tree_map

    return tree_map(lambda x: x.detach().cpu() if isinstance(x, torch.Tensor) else x, obj)


def to_device(obj):
    """``obj`` with every tensor on this process's compute device (:func:`nemo_minitron.platform.device`)."""
    from torch.utils._pytree import tree_map

    dev = platform.device()
    return tree_map(lambda x: x.to(dev) if isinstance(x, torch.Tensor) else x, obj)


def all_gather_tensors(obj, group=None) -> list:
    """Every rank's ``obj`` (tensors, or containers of them) over ``group``, in rank order, on this rank's
    compute device. Sent as host copies: an object collective pickles its tensors, and with NCCL a pickled
    GPU tensor is rebuilt on the sender's GPU, not this rank's."""
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, to_host(obj), group=group)
    return [to_device(p) for p in parts]


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    """Global rank; before torch.distributed is initialized, the launcher's (torchrun RANK, srun SLURM_PROCID)."""
    if dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def is_rank0() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
