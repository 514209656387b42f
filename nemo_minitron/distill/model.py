"""NeMo integration of distillation: a NeMo GPT model holding the student and a frozen teacher.

:class:`DistillationGPTModel` extends NeMo's ``GPTModel``: ``self.module`` is the trainable student (what
NeMo's strategy wraps in DDP, gives to the Megatron optimizer and checkpoints), the teacher is kept outside
the module tree (never wrapped, never in the optimizer, never saved). Training steps run
:class:`~nemo_minitron.distill.pair.DistillationPair`; validation steps are the student's own LM loss.
:class:`PipelineTeacherActivations` tells megatron's pipeline schedule about the widened inter-stage tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from nemo.collections import llm
import lightning.pytorch as pl
from nemo.lightning.megatron_parallel import MaskedTokenLossReduction

from nemo_minitron.distill.pair import DistillationPair, DistillSettings
from nemo_minitron.model import precision

TERMS = ("kd_loss", "lm_loss", "intermediate_loss")


def _recompute(config) -> str:
    if not getattr(config, "recompute_granularity", None):
        return ""
    extra = (f" {config.recompute_method} {config.recompute_num_layers}" if config.recompute_granularity == "full"
             else "")
    return f" recompute={config.recompute_granularity}{extra}"


class InitializedGPTModel(llm.GPTModel):
    """NeMo ``GPTModel`` whose weights come from a NeMo 2 checkpoint when the model is configured
    (a resumed run then overwrites them with its own checkpoint)."""

    def __init__(self, config, init_from: str | None = None, **kwargs):
        super().__init__(config, **kwargs)
        self.init_from = init_from

    def configure_model(self, vp_stage=None) -> None:
        if hasattr(self, "module"):
            return
        super().configure_model(vp_stage)
        if self.init_from:
            from nemo_minitron.checkpoint import nemo as ck

            ck.load_weights(self.init_from, self.module)
        from nemo_minitron import parallel

        if parallel.is_rank0():  # what megatron built with (after NeMo's strategy and precision plugin)
            c = self.config
            print(f"model built: TP={c.tensor_model_parallel_size} PP={c.pipeline_model_parallel_size} "
                  f"sequence_parallel={bool(c.sequence_parallel)} bf16={bool(c.bf16)} fp16={bool(c.fp16)} "
                  f"{precision.describe(c).split(' ', 1)[1]}{_recompute(c)}", flush=True)

    # -- non-finite guard (trainer.max_nonfinite_steps) ------------------------------------------------
    nonfinite_guard = None  # a distill.train.NonFiniteGuard, set by the command before fitting
    loss_name = "lm_loss"  # what a non-finite total loss is called in messages (fine-tuning: the LM loss)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        """Forward + backward (gradients reduced), then the optimizer step unless the guard skips it."""
        loss = optimizer_closure()
        guard = self.nonfinite_guard
        if guard is not None:
            terms = getattr(self, "last_terms", None) or {}
            if guard.check(self.module, loss, terms, self.trainer.global_step + 1, loss_name=self.loss_name):
                return  # no update (the next step's closure zeroes the gradients)
        optimizer.step()

    def lr_scheduler_step(self, scheduler, metric):
        guard = self.nonfinite_guard
        if guard is not None and guard.skip_scheduler:
            guard.skip_scheduler = False  # a skipped step does not advance the schedule
            return
        super().lr_scheduler_step(scheduler, metric)

    def fault_scale(self, term: str) -> float:
        """1.0, or NaN where the test-only hook (``nemo_minitron.faults``) poisons this micro-batch's term."""
        from nemo_minitron import faults

        trainer = getattr(self, "_trainer", None)
        if trainer is None or not trainer.training or faults._nonfinite_spec() is None:
            return 1.0
        step = trainer.global_step + 1
        seen = getattr(self, "_fault_micro", {})
        if seen.get("step") != step:
            seen = {"step": step}
        index = seen.get(term, 0)
        seen[term] = index + 1
        self._fault_micro = seen
        return faults.loss_scale(term, step, index)

    @property
    def training_loss_reduction(self):
        if not self._training_loss_reduction:
            self._training_loss_reduction = _LMLossReduction(self)
        return self._training_loss_reduction

    def data_step(self, dataloader_iter) -> dict:
        from nemo_minitron.data.module import trace_batch

        batch = super().data_step(dataloader_iter)
        trainer = getattr(self, "_trainer", None)
        if trainer is not None:
            trace_batch(batch, trainer.training, trainer.global_step + 1 if trainer.training else trainer.global_step)
        return batch


class _LMLossReduction(MaskedTokenLossReduction):
    """NeMo's token-mean LM loss (fine-tuning, teacher correction), open to the test-only fault hook."""

    def __init__(self, owner: "InitializedGPTModel"):
        super().__init__()
        self._owner = [owner]  # a list: not a submodule

    def forward(self, batch, forward_out):
        loss_sum, tokens, report = super().forward(batch, forward_out)
        scale = self._owner[0].fault_scale("lm_loss")
        if scale != 1.0:
            loss_sum = loss_sum * scale
            report = {"loss_sum_and_ub_size": torch.cat([loss_sum.detach().clone().view(1),
                                                         tokens.view(1).to(loss_sum.dtype)])}
        return loss_sum, tokens, report


class _DistillLossReduction(MaskedTokenLossReduction):
    def __init__(self, owner: "DistillationGPTModel"):
        super().__init__()
        self._owner = [owner]  # a list: not a submodule

    def forward(self, batch, forward_out):
        pair = self._owner[0].pair
        total, tokens, terms = pair.loss(forward_out, batch["labels"], batch["loss_mask"])
        for k in list(terms):
            scale = self._owner[0].fault_scale(k)
            if scale != 1.0:  # test-only hook: this micro-batch's term (and so the total) becomes NaN
                terms[k], total = terms[k] * scale, total * scale
        ub = torch.cat([total.detach().clone().view(1), tokens.detach().view(1)])
        report = {"loss_sum_and_ub_size": ub}
        for k in TERMS:
            report[k] = terms.get(k, torch.zeros((), device=total.device)).view(1)
        return total, tokens.clone().detach().to(torch.int), report

    def reduce(self, losses_reduced_per_micro_batch):
        from megatron.core import parallel_state

        loss = super().reduce(losses_reduced_per_micro_batch)
        if losses_reduced_per_micro_batch:
            sums = torch.stack([torch.cat([x[k] for k in TERMS] + [x["loss_sum_and_ub_size"][1:].float()])
                                for x in losses_reduced_per_micro_batch]).sum(0)
            torch.distributed.all_reduce(sums, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
            active = self._owner[0].pair.active_terms()
            means = (sums[:len(TERMS)] / sums[-1]).tolist()  # one read back to the host for all the terms
            self._owner[0].last_terms = {k: means[i] for i, k in enumerate(TERMS) if k in active}
        return loss


class DistillationGPTModel(InitializedGPTModel):
    """Student (``self.module``) trained against a frozen teacher loaded from ``teacher_ckpt``."""

    def __init__(self, config, teacher_ckpt: str, settings: DistillSettings, init_from: str | None = None,
                 teacher_overrides: dict | None = None, **kwargs):
        super().__init__(config, init_from=init_from, **kwargs)
        self.teacher_ckpt = str(teacher_ckpt)
        self.teacher_overrides = dict(teacher_overrides or {})
        self.settings = settings
        self.last_terms: dict = {}
        self.loss_name = "loss"  # the weighted sum of the terms

    def configure_model(self, vp_stage=None) -> None:
        if hasattr(self, "module"):
            return
        super().configure_model(vp_stage)
        from nemo_minitron.checkpoint import nemo as ck
        from nemo_minitron.model import build
        from nemo_minitron.model.build import real_vocab

        # the teacher's vocabulary padded as the student's, so their vocab shards hold the same token ids
        t_spec = ck.read_spec(self.teacher_ckpt).replace(
            make_vocab_size_divisible_by=self.config.make_vocab_size_divisible_by)
        teacher = build(t_spec, self.config.tensor_model_parallel_size, self.config.pipeline_model_parallel_size,
                        initialize=False, **{"sequence_parallel": bool(self.config.sequence_parallel),
                                             **self.teacher_overrides})
        read = ck.load_weights(self.teacher_ckpt, teacher)  # strict: refuses a checkpoint lacking any tensor
        tensors = {k: v for k, v in teacher.state_dict().items() if not k.endswith("_extra_state")}
        unread = sorted(set(tensors) - set(read))
        if unread:  # cannot happen after a strict load; a teacher left at its initial values must never train
            raise RuntimeError(f"teacher tensors not read from {self.teacher_ckpt}: {unread[:3]}")
        from nemo_minitron import parallel

        if parallel.is_rank0():
            n = sum(v.numel() for v in tensors.values())
            print(f"teacher: all {len(tensors)} tensors ({n / 1e6:.2f}M parameters on this rank) read from "
                  f"{self.teacher_ckpt}; {precision.describe(teacher.config)}", flush=True)
        # outside the module tree: Lightning, DDP, the optimizer and checkpoints never see the teacher
        object.__setattr__(self, "teacher", teacher)
        pair = DistillationPair(self.module, teacher, self.settings, real_vocab(self.config),
                                self.config.num_layers, t_spec.num_layers)
        pair.make_projections()
        object.__setattr__(self, "pair", pair)

    def on_train_start(self) -> None:
        """Log the teacher's LM loss on the first validation batch (samples 0..global batch - 1 of the
        validation set; the first training batch when there is no validation data): a teacher that was not
        loaded, or loaded wrongly, shows here as a loss near ln(vocab) before any step is spent."""
        super().on_train_start()
        from nemo_minitron import parallel
        from nemo_minitron.model.forward import lm_loss

        dm = self.trainer.datamodule
        ds, what = getattr(dm, "_validation_ds", None), "validation"
        if ds is None:
            ds, what = dm._train_ds, "training"
        gbs = dm.data_sampler.global_batch_size
        if ds is None or len(ds) < gbs:
            return
        samples = [ds[i] for i in range(gbs)]
        windows = torch.stack([torch.cat([s["tokens"], s["labels"][-1:]]) for s in samples])
        was_training = self.teacher.training
        self.teacher.eval()
        with torch.no_grad():
            total, count = lm_loss(self.teacher, windows, dm.data_sampler.micro_batch_size)
        self.teacher.train(was_training)
        loss = total / count
        self.teacher_first_loss = loss
        if parallel.is_rank0():
            print(f"teacher LM loss on the first {what} batch: {loss:.4f} ({gbs} x {windows.shape[1] - 1} tokens)",
                  flush=True)
            path = getattr(self, "metrics_path", None)
            if path is not None:
                import json

                with open(path, "a") as fh:
                    fh.write(json.dumps({"step": self.trainer.global_step, "teacher_loss": loss,
                                         "teacher_loss_on": what}) + "\n")

    def student(self):
        from nemo_minitron.model.build import unwrap

        return unwrap(self.module)

    # -- what megatron's schedule calls -----------------------------------------------------------
    def _distilling(self) -> bool:
        trainer = getattr(self, "_trainer", None)
        return trainer is not None and trainer.training

    def set_input_tensor(self, input_tensor) -> None:
        if self._distilling():
            self.pair.set_input_tensor(input_tensor)
        else:
            self.student().set_input_tensor(input_tensor)

    def forward_step(self, batch):
        if not self._distilling():
            return super().forward_step(batch)  # validation: the student's own LM loss
        return self.pair.forward(batch.get("tokens"), batch.get("position_ids"), batch.get("attention_mask"))

    def configure_callbacks(self):
        return [PipelineTeacherActivations(self)]

    @property
    def training_loss_reduction(self):
        if not self._training_loss_reduction:
            self._training_loss_reduction = _DistillLossReduction(self)
        return self._training_loss_reduction


class PipelineTeacherActivations(pl.Callback):
    """Tells megatron's pipeline schedule that inter-stage tensors carry the teacher's hidden states too.

    NeMo builds a ``MegatronStep`` per training step and lets callbacks transform it
    (``on_megatron_step_start``); its ``adjust_tensor_shapes_fn`` is what the schedule uses for the
    send/receive shapes. Validation (the student alone) keeps the default shapes.
    """

    def __init__(self, module: "DistillationGPTModel"):
        self._module = [module]  # configured (and its pair made) after callbacks are attached

    def on_megatron_step_start(self, step):
        from megatron.core import parallel_state

        if step.forward_only or parallel_state.get_pipeline_model_parallel_world_size() == 1:
            return step
        pair = self._module[0].pair
        step.__class__ = type("DistillationMegatronStep", (step.__class__,),
                              {"adjust_tensor_shapes_fn": property(lambda _: pair.tensor_shapes)})
        return step


def save_student(model: InitializedGPTModel, path: Path, spec, tokenizer_dir, overwrite: bool = True) -> Path:
    """Write the trained student (without distillation projections) as a plain NeMo 2 checkpoint."""
    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.model.build import unwrap

    trainer = getattr(model, "_trainer", None)
    ddp = getattr(getattr(trainer, "strategy", None), "ddp_config", None)
    if ddp is not None and ddp.use_distributed_optimizer and ddp.overlap_param_gather:
        # the last optimizer step's parameter all-gather is still pending (it overlaps the next forward, which
        # never comes): complete it, as NeMo does before its own checkpoint saves
        trainer.strategy.megatron_parallel.force_param_sync()
    student = unwrap(model.module)
    pair = getattr(model, "pair", None)
    projections = getattr(student, "kd_projections", None)
    if pair is not None:
        pair.detach_projections()
    try:
        return ck.save(path, student, spec, tokenizer_dir, overwrite=overwrite)
    finally:
        if projections is not None:
            student.kd_projections = projections
