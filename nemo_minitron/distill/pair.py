"""A trainable student and a frozen teacher run side by side on the same micro-batch.

Plain megatron-core, no trainer: :class:`DistillationPair` is what both the NeMo model
(:mod:`nemo_minitron.distill.model`) and the tests drive.

Pipeline parallelism: student and teacher are split over the same stages. A stage that is not the last
sends ``cat([student_hidden, teacher_hidden], -1)`` to the next one (:meth:`tensor_shapes` tells
megatron's schedule the widened shape), and :meth:`set_input_tensor` splits what it receives, so the
teacher's activations travel with the student's and the loss is computed on the last stage. The teacher
part is detached: no gradient flows into or out of the teacher.

Tensor parallelism: the logits stay vocab-sharded; :func:`nemo_minitron.distill.losses.kl_div` reduces
only per-token statistics across the tensor-parallel group.

Fused output (``DistillSettings.fused_output``, the default): on the last stage both models run up to their
final norm (``GPTModel.post_process`` off for the call), and :func:`nemo_minitron.distill.losses.fused_output_loss`
applies both output layers inside the loss, chunk of tokens by chunk. The student's hidden states enter it the
way megatron's ``ColumnParallelLinear`` takes its input (copied to the TP region: the hidden-state gradient is
all-reduced over the TP group; all-gathered under sequence parallelism), its output weight is
``output_layer.weight`` or, with tied embeddings, ``shared_embedding_or_output_weight()`` (the embedding, or
the last stage's copy of it under PP, whose gradient megatron all-reduces with the first stage's as usual).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nemo_minitron.distill import losses
from nemo_minitron.errors import UserError


@dataclass
class DistillSettings:
    """The objective: ``kd_weight * KL + lm_weight * CE + intermediate_weight * sum(hidden losses)``."""

    kd_weight: float = 1.0
    lm_weight: float = 0.0
    temperature: float = 1.0
    reverse_kl: bool = False
    chunk_tokens: int = losses.DEFAULT_CHUNK_TOKENS
    # the output layers fused with the KL/CE, chunked over tokens: the full logits are never held
    fused_output: bool = True
    # [[student_layer, teacher_layer], ...], global 0-based layer numbers (negative: from the end)
    intermediate_pairs: list = field(default_factory=list)
    intermediate_loss: str = "cosine"  # cosine | mse
    intermediate_weight: float = 1.0
    # scale the intermediate term to the logit term's magnitude each step (then weight multiplies that)
    intermediate_balance: bool = False
    intermediate_projection: str = "learned"  # learned | fixed (when hidden sizes differ)

    def validate(self) -> None:
        if self.kd_weight < 0 or self.lm_weight < 0 or self.intermediate_weight < 0:
            raise UserError("distill.kd_weight, distill.lm_weight and distill.intermediate_weight must be >= 0")
        if self.kd_weight == 0 and self.lm_weight == 0 and not self.intermediate_pairs:
            raise UserError("the objective is empty: set distill.kd_weight or distill.lm_weight above 0")
        if self.temperature <= 0:
            raise UserError(f"distill.temperature must be > 0, got {self.temperature}")
        if self.intermediate_loss not in ("cosine", "mse"):
            raise UserError(f"distill.intermediate_loss must be cosine or mse, got {self.intermediate_loss!r}")
        if self.intermediate_projection not in ("learned", "fixed"):
            raise UserError("distill.intermediate_projection must be learned or fixed")
        for p in self.intermediate_pairs:
            if len(p) != 2 or not all(isinstance(i, int) for i in p):
                raise UserError(f"distill.intermediate_pairs entries are [student_layer, teacher_layer], got {p}")


def padded_vocab(config) -> int:
    """The (padded) vocabulary width megatron builds for ``config`` at its TP size."""
    div = config.make_vocab_size_divisible_by * config.tensor_model_parallel_size
    return ((config.vocab_size + div - 1) // div) * div


def check_vocab(student_spec, teacher_spec) -> None:
    """Refuse teacher/student pairs whose vocabularies differ (before any work). Padding may differ: the
    teacher is built with the student's ``make_vocab_size_divisible_by``, so their vocab shards line up."""
    vs, vt = student_spec.vocab_size, teacher_spec.vocab_size
    if vs != vt:
        raise UserError(f"teacher vocabulary ({vt} tokens) and student vocabulary ({vs} tokens) differ: "
                        "distillation needs the same tokenizer (padding differences are fine)")


def check_tokenizers(student_source, teacher_source) -> None:
    """Refuse a teacher and a student whose tokenizers differ in content (a permuted vocabulary has the same
    size, so :func:`check_vocab` cannot see it, yet every logit would be compared with the wrong token).
    Skipped when either checkpoint holds no tokenizer."""
    from nemo_minitron.data.tokenizer import compare, fingerprint_of

    s, t = fingerprint_of(student_source), fingerprint_of(teacher_source)
    if s is None or t is None:
        return
    reason = compare(t, s, ("teacher", "student"))
    if reason:
        same = f" (same size {s['vocab_size']})" if s.get("vocab_size") == t.get("vocab_size") else ""
        raise UserError(f"teacher and student tokenizers differ: {reason}{same}; distillation needs the same "
                        f"tokenizer")


def _layers(model):
    return model.decoder.layers


def _inner(model):
    from nemo_minitron.model.build import unwrap

    return unwrap(model)


class _without_output_layer:
    """Run a megatron ``GPTModel`` up to its final norm: ``GPTModel._postprocess`` returns the decoder's
    (final-norm) hidden states ``[s, b, h]`` when ``post_process`` is off; the decoder keeps its own flag."""

    def __init__(self, *models):
        self.models = [_inner(m) for m in models]

    def __enter__(self):
        for m in self.models:
            m.post_process = False

    def __exit__(self, *exc):
        for m in self.models:
            m.post_process = True


def output_weight(model):
    """This rank's vocabulary shard of the output weight: the tied embedding (the last stage's copy under
    PP) when embeddings are shared, else ``output_layer.weight``."""
    m = _inner(model)
    if m.share_embeddings_and_output_weights:
        return m.shared_embedding_or_output_weight()
    return m.output_layer.weight


def to_output_region(hidden: torch.Tensor, model, grad: bool = True) -> torch.Tensor:
    """What megatron's ``ColumnParallelLinear`` does to its input before the matmul: all-gather the sequence
    under sequence parallelism (reduce-scatter of the gradient), else copy to the TP region (all-reduce of
    the gradient over the tensor-parallel group)."""
    from megatron.core.tensor_parallel import mappings

    layer = _inner(model).output_layer
    group = getattr(layer, "tp_group", None)
    if getattr(layer, "sequence_parallel", False):
        return mappings.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=grad, group=group)
    if grad and not getattr(layer, "disable_grad_reduce", False):
        return mappings.copy_to_tensor_model_parallel_region(hidden, group=group)
    return hidden


def _full_sequence(hidden: torch.Tensor, model) -> torch.Tensor:
    """A layer's output as the whole sequence on every TP rank. Under sequence parallelism each TP rank holds
    its slice of the sequence: all-gather it; the gradient is each rank's own slice (every TP rank computes
    the same loss on the gathered tensor, so a sum over ranks would count it TP times)."""
    if not getattr(_inner(model).config, "sequence_parallel", False):
        return hidden
    from megatron.core.tensor_parallel import mappings

    return mappings.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)


def _layer_offset(model) -> int:
    from nemo_minitron.model.shards import layer_offset

    return layer_offset(model)


class DistillationPair:
    """Student (trainable megatron ``GPTModel`` chunk) + teacher (frozen chunk on the same stage)."""

    def __init__(self, student, teacher, settings: DistillSettings, vocab_size: int,
                 student_layers: int, teacher_layers: int):
        from megatron.core import parallel_state

        settings.validate()
        self.student, self.teacher, self.settings = student, teacher, settings
        self.vocab_size = vocab_size
        self.h_student = student.config.hidden_size
        self.h_teacher = teacher.config.hidden_size
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.last_stage = parallel_state.is_pipeline_last_stage()
        # multi-token prediction heads use the output layer inside the model: keep the logits there
        self.fused = settings.fused_output and not any(getattr(_inner(m), "mtp_process", False)
                                                        for m in (student, teacher))
        self._pairs = self._resolve_pairs(student_layers, teacher_layers)
        self._captured: dict = {}
        self._hooks = []
        for k, (si, ti) in enumerate(self._pairs):
            self._hooks.append(_layers(student)[si].register_forward_hook(self._capture(("s", k))))
            self._hooks.append(_layers(teacher)[ti].register_forward_hook(self._capture(("t", k))))

    # ---------------------------------------------------------------------------------------------
    def _resolve_pairs(self, n_s: int, n_t: int):
        """Global layer pairs -> local indices on this stage; they must all live on the last stage."""
        out = []
        for s_layer, t_layer in self.settings.intermediate_pairs:
            s_layer, t_layer = s_layer % n_s, t_layer % n_t
            s_loc = s_layer - _layer_offset(self.student)
            t_loc = t_layer - _layer_offset(self.teacher)
            s_here = 0 <= s_loc < len(_layers(self.student))
            t_here = 0 <= t_loc < len(_layers(self.teacher))
            if self.last_stage and not (s_here and t_here):
                raise UserError(f"intermediate pair [{s_layer}, {t_layer}] is not on the last pipeline stage: "
                                "choose layers of the last stage (intermediate losses are computed there)")
            if self.last_stage:
                out.append((s_loc, t_loc))
        return out

    def _capture(self, key):
        def hook(module, args, output):
            self._captured[key] = output[0] if isinstance(output, tuple) else output
        return hook

    def active_terms(self) -> list:
        st = self.settings
        return [k for k, on in (("kd_loss", st.kd_weight > 0), ("lm_loss", st.lm_weight > 0),
                                ("intermediate_loss", bool(st.intermediate_pairs))) if on]

    def make_projections(self):
        """Projections student hidden -> teacher hidden for intermediate pairs (None when widths match).

        ``learned``: a trainable bias-free linear layer, attached to the student chunk as ``kd_projections``
        (so the optimizer and resume checkpoints include it; :meth:`detach_projections` removes it before the
        student is exported). ``fixed``: a frozen random orthogonal map.
        """
        if not self._pairs or self.h_student == self.h_teacher:
            return None
        projs = torch.nn.ModuleList()
        gen = torch.Generator().manual_seed(0)
        for _ in self._pairs:
            lin = torch.nn.Linear(self.h_student, self.h_teacher, bias=False)
            w = torch.linalg.qr(torch.randn(self.h_teacher, self.h_student, generator=gen))[0]
            lin.weight.data.copy_(w[:, : self.h_student] if w.shape[1] >= self.h_student else w)
            lin.weight.requires_grad_(self.settings.intermediate_projection == "learned")
            projs.append(lin)
        dev = next(self.student.parameters()).device
        self.student.kd_projections = projs.to(dev)
        return projs

    def detach_projections(self):
        if hasattr(self.student, "kd_projections"):
            del self.student.kd_projections

    # ---------------------------------------------------------------------------------------------
    def set_input_tensor(self, input_tensor) -> None:
        """Split what the previous stage sent into the student's and the teacher's input."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        if input_tensor is None:
            self.student.set_input_tensor(None)
            self.teacher.set_input_tensor(None)
            return
        self.student.set_input_tensor(input_tensor[..., : self.h_student])
        self.teacher.set_input_tensor(input_tensor[..., self.h_student:].detach())

    def forward(self, input_ids, position_ids, attention_mask=None):
        """Non-last stage: the concatenated hidden states to send on. Last stage: logits of both, or with
        ``fused_output`` the final-norm hidden states of both (the output layers run inside the loss), and
        the captured intermediate hidden states; consumed by :meth:`loss`."""
        self._captured = {}
        fused = self.fused and self.last_stage
        if fused:
            with _without_output_layer(self.student, self.teacher):
                student_out = self.student(input_ids, position_ids, attention_mask)
                with torch.no_grad():
                    teacher_out = self.teacher(input_ids, position_ids, attention_mask)
        else:
            student_out = self.student(input_ids, position_ids, attention_mask)
            with torch.no_grad():
                teacher_out = self.teacher(input_ids, position_ids, attention_mask)
        if not self.last_stage:
            return torch.cat([student_out, teacher_out.detach().to(student_out.dtype)], dim=-1)
        hidden = [(self._captured[("s", k)], self._captured[("t", k)]) for k in range(len(self._pairs))]
        if fused:
            return {"student_hidden": student_out, "teacher_hidden": teacher_out.detach(), "hidden": hidden}
        return {"student_logits": student_out, "teacher_logits": teacher_out, "hidden": hidden}

    def tensor_shapes(self, recv_shapes, send_shapes):
        """megatron ``adjust_tensor_shapes_fn``: widen the inter-stage tensors by the teacher's hidden."""
        def widen(shapes):
            return [tuple(s[:-1]) + (s[-1] + self.h_teacher,) for s in shapes]
        return widen(recv_shapes), widen(send_shapes)

    # ---------------------------------------------------------------------------------------------
    def loss(self, out: dict, labels: torch.Tensor, loss_mask: torch.Tensor):
        """(weighted loss sum, token count, {term: sum}) for one micro-batch on the last stage."""
        st = self.settings
        mask = loss_mask.float()
        tokens = mask.sum()
        terms = {}
        total = torch.zeros((), dtype=torch.float32, device=mask.device)
        if "student_hidden" in out:
            total = total + self._fused_logit_terms(out, labels, mask, terms)
        else:
            total = total + self._logit_terms(out, labels, mask, terms)
        if out["hidden"]:
            projs = getattr(self.student, "kd_projections", None)
            inter = torch.zeros((), dtype=torch.float32, device=mask.device)
            smask = mask.transpose(0, 1)  # hidden states are [s, b, h]
            for k, (hs, ht) in enumerate(out["hidden"]):
                hs, ht = _full_sequence(hs, self.student), _full_sequence(ht, self.teacher)
                if projs is not None:
                    hs = projs[k](hs)
                inter = inter + (losses.hidden_loss(hs, ht, st.intermediate_loss) * smask).sum()
            terms["intermediate_loss"] = inter
            scale = st.intermediate_weight
            if st.intermediate_balance and "kd_loss" in terms and inter.detach() > 0:
                scale = scale * (terms["kd_loss"].detach() / inter.detach())
            total = total + scale * inter
        return total, tokens, {k: v.detach().clone() for k, v in terms.items()}

    def _fused_logit_terms(self, out: dict, labels, mask, terms: dict):
        """The KL and CE terms straight from the final hidden states (:func:`losses.fused_output_loss`)."""
        st = self.settings
        if st.kd_weight == 0 and st.lm_weight == 0:
            return 0.0
        hs = to_output_region(out["student_hidden"], self.student)  # [s, b, h]
        ws = output_weight(self.student)
        ht = wt = None
        if st.kd_weight > 0:
            ht = to_output_region(out["teacher_hidden"], self.teacher, grad=False)
            wt = output_weight(self.teacher)
            v = min(ws.shape[0], wt.shape[0])  # TP=1: vocabularies that differ only by padding
            ws, wt = ws[:v], wt[:v]
        objective, kd_sum, lm_sum = losses.fused_output_loss(
            hs.reshape(-1, hs.shape[-1]), ws, None if ht is None else ht.reshape(-1, ht.shape[-1]), wt,
            labels.transpose(0, 1).reshape(-1) if st.lm_weight > 0 else None, mask.transpose(0, 1).reshape(-1),
            kd_weight=st.kd_weight, lm_weight=st.lm_weight, temperature=st.temperature, reverse=st.reverse_kl,
            vocab_size=self.vocab_size, chunk_tokens=st.chunk_tokens)
        if st.kd_weight > 0:
            terms["kd_loss"] = kd_sum
        if st.lm_weight > 0:
            terms["lm_loss"] = lm_sum
        return objective

    def _logit_terms(self, out: dict, labels, mask, terms: dict):
        """The KL and CE terms on materialized logits (``distill.fused_output=false``)."""
        from megatron.core import tensor_parallel

        st = self.settings
        s_logits, t_logits = out["student_logits"], out["teacher_logits"]
        if s_logits.shape[-1] != t_logits.shape[-1]:
            s_logits, t_logits = losses.match_vocab(s_logits, t_logits)  # TP=1, padding differs
        total = torch.zeros((), dtype=torch.float32, device=s_logits.device)
        if st.kd_weight > 0:
            kl = losses.kl_div(s_logits, t_logits, st.temperature, st.reverse_kl, self.vocab_size, st.chunk_tokens)
            terms["kd_loss"] = (kl * mask).sum()
            total = total + st.kd_weight * terms["kd_loss"]
        if st.lm_weight > 0:
            # megatron's cross-entropy over the whole (padded) shard, as the fused path computes it
            ce = tensor_parallel.vocab_parallel_cross_entropy(s_logits.float().transpose(0, 1).contiguous(),
                                                              labels.transpose(0, 1).contiguous())
            terms["lm_loss"] = (ce.transpose(0, 1) * mask).sum()
            total = total + st.lm_weight * terms["lm_loss"]
        return total


def distill_step(pair: DistillationPair, windows: torch.Tensor, micro_batch_size: int,
                 forward_only: bool = False) -> dict:
    """One distillation forward (+ backward) over ``windows`` ([n, L+1] tokens) with megatron's schedules,
    without a trainer. Returns mean per-token values of ``loss`` and each term (on every rank); gradients
    of the mean loss are accumulated in the student's ``.grad``."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_minitron import platform
    from nemo_minitron.model.forward import _position_ids, split_window

    dev = platform.device()
    n, L1 = windows.shape
    num_mb = n // micro_batch_size
    micro = list(windows.to(dev).split(micro_batch_size))
    total_tokens = float(n * (L1 - 1))

    class _Chunk(torch.nn.Module):  # what the schedule calls: set_input_tensor + forward of the pair
        def __init__(self):
            super().__init__()
            self.module = pair.student
            self.config = pair.student.config

        def set_input_tensor(self, t):
            pair.set_input_tensor(t)

    chunk = _Chunk()

    def forward_step(data_iterator, model):
        inputs, labels = split_window(next(data_iterator))
        out = pair.forward(inputs, _position_ids(inputs), None)

        def loss_func(output):
            total, tokens, terms = pair.loss(output, labels, torch.ones_like(labels, dtype=torch.float32))
            scaled = total * (num_mb / total_tokens)
            return scaled, {"loss_sum": total.detach().clone(), **terms}

        return out, loss_func

    fwd_bwd = get_forward_backward_func()
    kwargs = {}
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        kwargs["adjust_tensor_shapes_fn"] = pair.tensor_shapes
    out = fwd_bwd(forward_step_func=forward_step, data_iterator=iter(micro), model=[chunk],
                  num_microbatches=num_mb, seq_length=L1 - 1, micro_batch_size=micro_batch_size,
                  forward_only=forward_only, **kwargs)
    names = ["loss_sum", "kd_loss", "lm_loss", "intermediate_loss"]
    vals = torch.zeros(len(names), dtype=torch.float64, device=dev)
    if parallel_state.is_pipeline_last_stage():
        for d in out:
            for i, k in enumerate(names):
                if k in d:
                    vals[i] += d[k].double()
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(vals, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    res = {k.replace("loss_sum", "loss"): float(v) / total_tokens for k, v in zip(names, vals.tolist())}
    return res
