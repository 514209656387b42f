"""NeMo's trainer for distillation and fine-tuning: strategy, optimizer + schedule, data, logging, resume.

One run directory holds everything a run writes:

    RUN/checkpoints/   NeMo trainer checkpoints (student weights + optimizer + schedule + data position),
                       the resume points; the teacher is never saved
    RUN/tb/            TensorBoard events (loss terms, lr, validation loss, throughput)
    RUN/metrics.jsonl  the same numbers, one JSON line per logged step (re-runs append; last one wins)

Re-running the same command resumes from the newest complete checkpoint (NeMo's ``AutoResume``; a
checkpoint still being written when a run died is marked unfinished and skipped).
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from nemo_minitron import parallel, platform


class MetricsLog(pl.Callback):
    """Per-step loss terms, lr, tokens/s to metrics.jsonl, TensorBoard and a one-line progress print."""

    def __init__(self, path: Path, tokens_per_step: int, max_steps: int, every: int = 1):
        self.path, self.tokens_per_step, self.max_steps, self.every = Path(path), tokens_per_step, max_steps, every
        self._t = None
        self._t0 = None

    def _write(self, rec: dict) -> None:
        if parallel.is_rank0():
            with open(self.path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.perf_counter()
        if self._t0 is None:
            self._t0 = self._t

    def _last_stage_values(self, pl_module, outputs) -> list:
        """[loss, kd, lm, intermediate] from the last pipeline stage, on every rank."""
        import torch.distributed as dist
        from megatron.core import parallel_state

        terms = getattr(pl_module, "last_terms", {}) or {}
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        vals = torch.tensor([float(loss) if loss is not None else float("nan"),
                             *[terms.get(k, float("nan")) for k in ("kd_loss", "lm_loss", "intermediate_loss")]],
                            dtype=torch.float64)
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            vals = vals.to(platform.device())
            dist.broadcast(vals, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                           group=parallel_state.get_pipeline_model_parallel_group())
        return vals.cpu().tolist()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        dt = time.perf_counter() - self._t
        loss, kd, lm, inter = self._last_stage_values(pl_module, outputs)
        aux = moe_aux_loss(getattr(pl_module, "config", None))  # every rank: a collective
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        rec = {"step": step, "loss": loss, "lr": lr, "tokens_per_s": self.tokens_per_step / dt,
               "consumed_tokens": step * self.tokens_per_step}
        for k, v in (("kd_loss", kd), ("lm_loss", lm), ("intermediate_loss", inter), ("moe_aux_loss", aux)):
            if v is not None and not math.isnan(v):
                rec[k] = v
        guard = getattr(pl_module, "nonfinite_guard", None)
        if guard is not None:
            rec["skipped_steps"] = guard.skipped
            if guard.last is not None and guard.last[0] == step:
                rec["skipped"] = guard.last[1]  # the term that was not finite
        self._write(rec)
        for k, v in rec.items():
            if k not in ("step", "skipped"):
                pl_module.log(f"train/{k}", float(v), on_step=True, rank_zero_only=True, batch_size=1)
        if parallel.is_rank0() and (step % self.every == 0 or step == self.max_steps):
            eta = (time.perf_counter() - self._t0) / max(1, step - self._first_step(step)) * (self.max_steps - step)
            extra = "".join(f"  {k.replace('_loss', '')} {rec[k]:.4f}"
                            for k in ("kd_loss", "lm_loss", "intermediate_loss", "moe_aux_loss") if k in rec)
            print(f"step {step}/{self.max_steps}  loss {loss:.4f}{extra}  lr {lr:.2e}  "
                  f"{rec['tokens_per_s']:.0f} tok/s  eta {eta:.0f}s", flush=True)

    def _first_step(self, step):
        if not hasattr(self, "_start_step"):
            self._start_step = step - 1
        return self._start_step

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        val = trainer.callback_metrics.get("val_loss")
        if val is None:
            return
        rec = {"step": trainer.global_step, "val_loss": float(val)}
        self._write(rec)
        if parallel.is_rank0():
            print(f"validation at step {trainer.global_step}: student LM loss {float(val):.4f}", flush=True)


def moe_aux_loss(config) -> float | None:
    """The load-balancing loss the student's routers added to the step just run (``moe_aux_loss_coeff`` x the sum over
    MoE layers of each layer's loss, averaged over the micro-batches and the data-parallel ranks), from megatron's
    aux-loss tracker, which is then cleared (as megatron's ``track_moe_metrics``). None for a dense student or
    ``moe_aux_loss_coeff=0``. A collective over the pipeline and data-parallel groups: call it on every rank."""
    coeff = getattr(config, "moe_aux_loss_coeff", 0) or 0
    if not getattr(config, "num_moe_experts", None) or not coeff:
        return None
    from megatron.core.num_microbatches_calculator import get_num_microbatches
    from megatron.core.transformer.moe import moe_utils

    name = "load_balancing_loss"
    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    if name not in tracker:  # a stage that routed nothing this step still joins the reduction
        tracker[name] = {"values": torch.zeros(config.num_layers, device=platform.device()), "reduce_group": None,
                         "avg_group": None}
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    # megatron's reduce_aux_losses_tracker_across_ranks, with its DP mean as a sum (gloo has no ReduceOp.AVG)
    values = tracker[name]["values"]
    dist.all_reduce(values, group=ps.get_pipeline_model_parallel_group())  # each stage holds its own layers
    if tracker[name].get("reduce_group") is not None:  # the TP ranks' shares of the sequence (SP)
        dist.all_reduce(values, group=tracker[name]["reduce_group"])
    dp = ps.get_data_parallel_group(with_context_parallel=True)
    dist.all_reduce(values, group=dp)
    value = float(values.sum()) * coeff / (get_num_microbatches() * dist.get_world_size(dp))
    moe_utils.clear_aux_losses_tracker()
    return value


class NonFiniteStop(Exception):
    """``trainer.max_nonfinite_steps`` consecutive steps had a non-finite loss term or gradient."""

    def __init__(self, step: int, term: str, count: int, limit: int):
        super().__init__(f"stopped at step {step}: {term} was not finite for {count} consecutive steps "
                         f"(trainer.max_nonfinite_steps={limit})")
        self.step, self.term = step, term


class NonFiniteGuard:
    """Skips a training step whose loss, a loss term or a gradient is not finite, and stops after ``limit``
    such steps in a row.

    Called by the model between backward (gradients reduced over DP) and the optimizer step: every rank
    contributes its local view (loss terms on the last pipeline stage, its own gradient buffers; with the
    distributed optimizer a NaN in any rank's unreduced gradient reaches the reduced shard too) and one
    all-reduce (MAX) makes the decision the same on every rank. A skipped step makes no optimizer update
    and no scheduler step; the step counter and the data position still advance (as Megatron-LM's skipped
    iterations). Megatron's own check only exists for fp16 loss scaling; with bf16 or fp32 a NaN gradient
    would otherwise reach the weights through the clipping coefficient.
    """

    TERMS = ("kd_loss", "lm_loss", "intermediate_loss", "loss", "gradient")

    def __init__(self, limit: int = 3):
        self.limit = int(limit)
        self.consecutive = 0
        self.skipped = 0  # this process's run (a resumed run starts again at 0)
        self.skip_scheduler = False
        self.last = None  # (step, term) of the newest skipped step

    @staticmethod
    def _local_flags(module, loss, terms: dict) -> torch.Tensor:
        """[kd, lm, intermediate, loss, gradient] (1.0 = not finite) on the compute device, without reading
        anything back to the host: each gradient buffer contributes one fused ``isfinite().all()``."""
        dev = platform.device()

        def bad(x):
            if x is None:
                return torch.zeros((), device=dev)
            x = torch.as_tensor(x, dtype=torch.float64).to(dev)  # a float (host) or a loss tensor (device)
            return (~torch.isfinite(x)).any().to(torch.float64)

        grads = [g for g in (getattr(p, "main_grad", None) if getattr(p, "main_grad", None) is not None else p.grad
                             for p in module.parameters()) if g is not None]
        grads_bad = (torch.stack([(~torch.isfinite(g)).any() for g in grads]).any().to(torch.float64) if grads
                     else torch.zeros((), dtype=torch.float64, device=dev))
        return torch.stack([bad(terms.get("kd_loss")), bad(terms.get("lm_loss")), bad(terms.get("intermediate_loss")),
                            bad(loss), grads_bad.to(dev)])

    def check(self, module, loss, terms: dict, step: int, loss_name: str = "loss") -> bool:
        """True when this step must be skipped (raises :class:`NonFiniteStop` at the limit). ``loss_name``:
        what a non-finite total loss is called in the messages."""
        import torch.distributed as dist

        flags = self._local_flags(module, loss, terms)
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        flags = flags.tolist()  # the step's one read back to the host
        if not any(flags):
            self.consecutive = 0
            return False
        term = next(t for t, f in zip(self.TERMS, flags) if f)
        term = {"loss": loss_name, "gradient": "gradient norm"}.get(term, term)
        self.consecutive += 1
        self.skipped += 1
        self.last = (step, term)
        self.skip_scheduler = True
        if self.consecutive >= self.limit:
            raise NonFiniteStop(step, term, self.consecutive, self.limit)
        if parallel.is_rank0():
            print(f"step {step}: {term} is not finite: step skipped (no optimizer or scheduler step; "
                  f"{self.consecutive} in a row, the run stops at trainer.max_nonfinite_steps={self.limit})",
                  flush=True)
        return True


_STEP = re.compile(r"step=(\d+)")


def last_complete_checkpoint(ckpt_dir: Path):
    """The newest trainer checkpoint under ``ckpt_dir`` without NeMo's unfinished marker (None if there is none):
    the highest step, then the newest; not the newest by time alone (a save held up can finish after a later
    one, e.g. the preemption checkpoint written while a periodic save was still being finalized)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    done = [p for p in ckpt_dir.iterdir() if p.is_dir() and not Path(f"{p}-unfinished").exists()]

    def key(p):
        m = _STEP.search(p.name)
        return (int(m.group(1)) if m else -1, p.stat().st_mtime)

    return max(done, key=key, default=None)


_SIGNALLED = [False]


def install_signal_handlers(signals=("SIGUSR1", "SIGTERM")) -> None:
    """Remember a preemption warning from now on (called as early as the command starts)."""
    import signal

    def handler(signum, frame):
        _SIGNALLED[0] = True

    for name in signals:
        signal.signal(getattr(signal, name), handler)


class Preemption(pl.Callback):
    """A warning signal (SLURM's ``--signal=USR1@T`` before the time limit; SIGTERM on preemption) saves a
    checkpoint at the next step boundary and stops training cleanly, so a requeued job resumes there.

    Every rank agrees (all-reduce of the flag); the checkpoint is written with NeMo's unfinished marker
    around it, so a kill during this save cannot leave a checkpoint that looks complete.
    """

    PREEMPTED = "PREEMPTED"

    def __init__(self, run_dir: Path):
        install_signal_handlers()
        self.run_dir, self.saved_step = Path(run_dir), None
        (self.run_dir / self.PREEMPTED).unlink(missing_ok=True)

    @property
    def requested(self) -> bool:
        return _SIGNALLED[0]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import torch.distributed as dist
        from nemo.lightning.pytorch.callbacks import ModelCheckpoint

        flag = torch.tensor([1.0 if self.requested else 0.0], device=platform.device())
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() == 0 or trainer.global_step >= trainer.max_steps:
            return
        path = self.run_dir / "checkpoints" / f"step={trainer.global_step}-preempted-last"
        ModelCheckpoint.set_checkpoint_unfinished_marker(path, barrier_after=True)
        trainer.save_checkpoint(str(path))
        ModelCheckpoint.remove_checkpoint_unfinished_marker(path, barrier_before=True)
        self.saved_step = trainer.global_step
        if parallel.rank() == 0:
            (self.run_dir / self.PREEMPTED).write_text(json.dumps({"step": trainer.global_step}))
            print(f"preempted: checkpoint at step {trainer.global_step} saved to {path}; requeue to resume",
                  flush=True)
        trainer.should_stop = True


def drop_unfinished_checkpoints(ckpt_dir: Path) -> None:
    """Remove checkpoints a killed run left half-written (NeMo's ``-unfinished`` marker is beside them), so
    resuming picks the newest complete one; idempotent, so every rank may call it."""
    import shutil

    for marker in Path(ckpt_dir).glob("*-unfinished"):
        shutil.rmtree(Path(str(marker)[: -len("-unfinished")]), ignore_errors=True)
        marker.unlink(missing_ok=True)


def read_metrics(path: Path) -> dict:
    """metrics.jsonl -> {'train': {step: rec}, 'val': {step: val_loss}, 'teacher': {step: loss}} (a re-logged
    step keeps its last value; 'teacher' is the teacher's loss on the first batch, logged when a run starts)."""
    train, val, teacher = {}, {}, {}
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            rec = json.loads(line)
            if "val_loss" in rec:
                val[rec["step"]] = rec["val_loss"]
            elif "teacher_loss" in rec:
                teacher[rec["step"]] = rec["teacher_loss"]
            else:
                train[rec["step"]] = rec
    return {"train": train, "val": val, "teacher": teacher}


PLUGIN_PRECISION = {"bf16": "bf16-mixed", "fp16": "16-mixed", "fp32": "32"}


def build_trainer(run_dir: Path, layout: parallel.Layout, precision: str, max_steps: int, val_check_interval: int,
                  limit_val_batches: int, ckpt_every: int, keep: int, callbacks: list, num_nodes: int = 1,
                  optim_fully_reshardable: bool = True, fp8=None, overlap_grad_reduce: bool = False,
                  overlap_param_gather: bool = False, bucket_size: int | None = None):
    """nl.Trainer + MegatronStrategy for this layout and precision, with checkpointing and resume under ``run_dir``.

    ``precision`` is megatron's mixed precision (NeMo's ``MegatronMixedPrecision``): bf16/fp16 parameters and
    activations, fp32 main parameters and gradients in the optimizer; it runs on CPU as on GPU. Optimizer
    state is checkpointed in megatron's fully reshardable format (``optim_fully_reshardable``, the default),
    so a run may resume at another TP/PP/DP; else in its DP-reshardable one (same TP/PP only). ``fp8``
    (:class:`~nemo_minitron.model.precision.FP8`) goes to the precision plugin, which NeMo's strategy copies
    over the model's config when it connects the model: without it the student would train with fp8=None.
    ``overlap_grad_reduce`` / ``overlap_param_gather`` / ``bucket_size``: megatron DDP's communication overlap
    (Megatron-LM's ``--overlap-grad-reduce``, ``--overlap-param-gather``, ``--ddp-bucket-size``).
    """
    from nemo import lightning as nl
    from nemo.lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from nemo_minitron.model.precision import dtype_fields

    from nemo_minitron.checkpoint import write_queue

    platform.activate()
    write_queue.install()  # checkpoint saves survive SLURM's USR1/TERM (the preemption checkpoint among them)
    world = parallel.world_size_from_env()
    devices = max(1, world // num_nodes)
    from megatron.core.distributed import DistributedDataParallelConfig

    # NeMo's default DDP config plus the overlap settings; megatron's DDP would raise on a NaN gradient (NeMo
    # turns that check on) and end a days-long run with a traceback: the model's NonFiniteGuard skips such a
    # step instead and stops only at the limit
    ddp = DistributedDataParallelConfig(check_for_nan_in_grad=False, overlap_grad_reduce=overlap_grad_reduce,
                                        overlap_param_gather=overlap_param_gather, bucket_size=bucket_size)
    strategy = nl.MegatronStrategy(
        ddp=ddp, tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep, sequence_parallel=layout.sequence_parallel,
        ckpt_async_save=False, ckpt_parallel_save=False, ckpt_load_strictness="log_all",
        ckpt_optim_fully_reshardable=optim_fully_reshardable,
        pipeline_dtype=dtype_fields(precision)["pipeline_dtype"],
    )

    class RunCheckpoint(ModelCheckpoint):
        """NeMo's ModelCheckpoint; a test can pause a save after its files are written and before the
        unfinished marker is removed (``nemo_minitron.faults``, point ``checkpoint_save@STEP``)."""

        def _get_finalize_save_checkpoint_callback(self, trainer, filepath, global_step):
            finalize = super()._get_finalize_save_checkpoint_callback(trainer, filepath, global_step)

            def paused_then_finalize():
                from nemo_minitron import faults

                faults.pause_point(f"checkpoint_save@{global_step}")
                return finalize()

            return paused_then_finalize

    checkpoint = RunCheckpoint(
        dirpath=str(run_dir / "checkpoints"), filename="{step}", monitor="step", mode="max",
        every_n_train_steps=ckpt_every, save_top_k=keep, save_last=True, save_on_train_epoch_end=False,
        always_save_context=False, save_context_on_train_end=False, save_optim_on_train_end=True,
    )
    trainer = nl.Trainer(
        accelerator=platform.lightning_accelerator(), devices=devices, num_nodes=num_nodes,
        max_steps=max_steps, val_check_interval=val_check_interval, limit_val_batches=limit_val_batches,
        num_sanity_val_steps=0, log_every_n_steps=1, enable_progress_bar=False,
        check_val_every_n_epoch=None,  # val_check_interval counts global steps (survives resume)
        logger=False, callbacks=list(callbacks), strategy=strategy,
        plugins=nl.MegatronMixedPrecision(precision=PLUGIN_PRECISION[precision],
                                          **(fp8.plugin_kwargs() if fp8 is not None else {})),
    )
    log = nl.NeMoLogger(explicit_log_dir=str(run_dir), ckpt=checkpoint, use_datetime_version=False,
                        tensorboard=TensorBoardLogger(save_dir="tb", name="", version=""))  # NeMo puts it under run_dir
    app_state = log.setup(trainer, resume_if_exists=True)
    # NeMo moves a restarted run's top-level files into run_N/; metrics.jsonl spans restarts and the run lock
    # (nemo_minitron.runlock) belongs to this run: keep both
    app_state.files_to_move = [f for f in app_state.files_to_move
                               if Path(f).name not in ("metrics.jsonl", ".nemo-minitron.lock")]
    return trainer


def optimizer(lr: float, min_lr: float, warmup_steps: int, max_steps: int, weight_decay: float,
              clip_grad: float, beta1: float = 0.9, beta2: float = 0.95, distributed: bool = True,
              precision: str = "fp32"):
    """Megatron Adam + linear warmup and cosine decay to ``min_lr`` (NeMo's scheduler).

    ``distributed``: megatron's distributed optimizer (ZeRO-1: fp32 main parameters and Adam moments sharded
    over the data-parallel ranks; gradients reduce-scattered, parameters all-gathered). ``precision`` must
    be the trainer's: with bf16/fp16 the optimizer keeps fp32 main parameters beside the 16-bit model.
    """
    from megatron.core.optimizer import OptimizerConfig
    from nemo import lightning as nl
    from nemo.lightning.pytorch.optim import CosineAnnealingScheduler

    cfg = OptimizerConfig(optimizer="adam", lr=lr, min_lr=min_lr, weight_decay=weight_decay,
                          adam_beta1=beta1, adam_beta2=beta2, clip_grad=clip_grad,
                          use_distributed_optimizer=distributed, bf16=precision == "bf16", fp16=precision == "fp16")
    sched = CosineAnnealingScheduler(warmup_steps=warmup_steps, constant_steps=0, max_steps=max_steps, min_lr=min_lr)
    return nl.MegatronOptimizerModule(config=cfg, lr_scheduler=sched)


def resume(run_dir: Path):
    """NeMo's AutoResume from the newest complete checkpoint by step (:func:`last_complete_checkpoint`; NeMo's
    own choice among ``*-last`` checkpoints is the newest by modification time)."""
    from nemo import lightning as nl

    last = last_complete_checkpoint(run_dir / "checkpoints")
    return nl.AutoResume(resume_if_exists=True, resume_ignore_no_checkpoint=True,
                         resume_from_path=str(last) if last is not None else None,
                         resume_from_directory=str(run_dir / "checkpoints"))
