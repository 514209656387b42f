"""CPU accommodations for NeMo 2.7.3 and megatron-core 0.15 (see ../shared/notes/STACK.md).

megatron-core and NeMo assume CUDA in many places: ``torch.cuda.current_device()`` as a device argument,
literal ``device="cuda"`` factories, ``torch.cuda.synchronize()``, CUDA RNG state tracking for dropout
forks, optimizer dispatch on ``param.type() == "torch.cuda.FloatTensor"``, fused kernels that need
Transformer Engine, and gloo's refusal of 0-dim all-gathers.

:func:`activate` installs one accommodation for each of those, and only when CUDA is *not* available.
On a machine with CUDA it returns immediately and changes nothing: the production path (TE layer spec,
NCCL, bf16/FP8) runs exactly as NeMo and megatron-core ship it.

What is changed, in one list:

1. A global ``TorchFunctionMode`` rewrites every CUDA device argument (``"cuda"``, ``"cuda:N"``, an
   integer ordinal) to ``cpu`` and makes ``Tensor.cuda()`` a no-op, so megatron's hard-coded CUDA
   factories (schedules, p2p communication, rerun state machine, tensor-parallel buffers, causal mask)
   allocate on the CPU, and ``Tensor.type()`` names CPU tensors as their CUDA types (megatron's mixed
   precision and distributed optimizers dispatch on ``"torch.cuda.BFloat16Tensor"`` and the like).
2. ``torch.cuda.current_device`` returns the CPU device, ``torch.cuda.synchronize`` /
   ``torch.cuda.set_device`` / ``torch.cuda.empty_cache`` are no-ops, and ``torch.cuda.Stream`` /
   ``torch.cuda.stream`` are inert stand-ins (NeMo's ``MegatronParallel`` uses a side stream; megatron's MoE
   all-to-all dispatcher records an event on one and synchronizes on it). megatron's MoE router tests
   ``moe_utils.te_general_gemm``, a name bound only when Transformer Engine imports: it is bound to None. Its
   all-to-all dispatcher turns the split sizes into numpy arrays only when they are CUDA tensors: CPU ones
   are converted too (``all_to_all_single`` takes no tensor as split sizes).
3. The CUDA RNG used by megatron's ``CudaRNGStatesTracker`` is mapped to the CPU generator, so
   ``model_parallel_cuda_manual_seed`` and dropout forks work and stay reproducible; a fork of a state
   nobody added (NeMo seeds only on CUDA) seeds it by megatron's rule instead of failing.
4. gloo: 0-dim tensors given to ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` are viewed 1-d,
   ``all_gather_into_tensor`` falls back to ``all_gather`` and ``reduce_scatter_tensor`` to an
   ``all_reduce`` of which each rank keeps its slice (gloo lacks both fused collectives, which megatron's
   distributed optimizer and sequence parallelism use for every gradient bucket and activation). An
   ``all_gather`` of parts with uneven first dimensions (megatron's MoE all-to-all dispatcher at TP > 1 gathers
   each TP rank's routed tokens) travels padded to the longest part, and ``reduce_scatter`` of a list (its
   combine) is an ``all_reduce`` of which each rank keeps its part: gloo has neither.
5. Gradient clipping: megatron's ``clip_grad_by_total_norm_fp32`` asserts CUDA grads; a CPU version
   scales the same grads by the same coefficient.
6. Resume with megatron's distributed optimizer over torch's Adam (no Apex/TE): the empty optimizer state
   gets its initial values before megatron reads it as the load template (see ``_patch_megatron``).
   NeMo's checkpoint loader asserts ``torch.cuda.is_initialized()`` to move loaded tensors to the
   current GPU (``nemo.lightning.io.pl._fix_tensors_device``): on CPU there is nothing to move.
7. Sequence parallelism without Apex or TE: megatron's only norm then is ``WrappedTorchNorm`` (torch's
   LayerNorm/RMSNorm), which refuses ``sequence_parallel``. The norm itself needs nothing for it: each TP
   rank normalizes its slice of the sequence, and megatron all-reduces the norm weights' gradients over TP
   when they carry the ``sequence_parallel`` attribute. So the norm is built as usual and its parameters
   are marked, which is what Apex's ``FusedLayerNorm`` and TE's norms do.
8. :func:`config_overrides` names the megatron ``TransformerConfig`` fields that must be off without
   TE/CUDA (every fusion, ``gradient_accumulation_fusion``, MoE's grouped GEMM and fused permutation and
   router); the model builder applies them. With CUDA it
   only turns off the fusions whose kernels are not installed (a CUDA machine without Transformer Engine or
   apex: :func:`missing_kernel_overrides`); that is the one thing this module does where CUDA is present.
9. Attention: megatron's local ``DotProductAttention`` (the only core attention without TE) forms the
   [batch x heads, s, s] scores with ``baddbmm`` and a separate masked softmax; on a CPU that is the
   slowest part of a long sequence (a 2,000-token 5-shot MMLU prompt: 1.7x the time of torch's fused
   kernel). Where its result is plain softmax attention -- causal, or under a boolean mask (the downstream
   scorer's shared contexts) -- with no window, softmax offset, query-key layer scaling or attention dropout
   at work, it is computed by ``torch.nn.functional.scaled_dot_product_attention`` (same scale,
   grouped-query heads, gradients); anything else takes megatron's own path. With CUDA, TE's fused
   attention is the core attention instead.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch

_ACTIVE = False
_LOCK = threading.Lock()


def has_cuda() -> bool:
    """True when a usable CUDA device is present (the production target)."""
    return torch.cuda.is_available()


@functools.lru_cache(maxsize=1)
def has_transformer_engine() -> bool:
    """True when Transformer Engine imports (it never does on our CPU machines)."""
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a broken TE build raising OSError/RuntimeError
        return False
    return True


def device() -> torch.device:
    """The device model tensors live on for this process (the compute device)."""
    if has_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return _TARGET[0]


def lightning_accelerator():
    """Lightning's ``accelerator`` for a trainer: "gpu" with CUDA, the emulated GPU in its tests, else "cpu"."""
    if has_cuda():
        return "gpu"
    from nemo_minitron.platform import emulated_gpu

    return emulated_gpu.lightning_accelerator() if emulated_gpu.active() else "cpu"


def backend() -> str:
    """The torch.distributed backend: NCCL with CUDA, gloo without."""
    return "nccl" if has_cuda() else "gloo"


def cpu_mode_active() -> bool:
    return _ACTIVE


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_kernel_overrides() -> dict:
    """Fusions NeMo's configs turn on whose kernels are not installed here (a CUDA machine without Transformer
    Engine or apex, such as a plain PyTorch image): megatron refuses them when the config is made
    (``apply_rope_fusion``: "Please install TE >= 1.4") or the model is built (``persist_layer_norm`` with
    torch's norm), or fails at the first forward (the fused masked softmax of bf16 attention scores)."""
    over = {}
    if not has_transformer_engine():
        over["apply_rope_fusion"] = False  # TE's fused RoPE
        # MoE: TE's grouped GEMM experts and its fused token permutation / router kernels (NeMo's Qwen3-MoE
        # configs turn the first two on); without them megatron's SequentialMLP and torch permutation run
        over.update(moe_grouped_gemm=False, moe_permute_fusion=False, moe_router_fusion=False)
    if not _importable("apex"):
        over["persist_layer_norm"] = False  # apex's persistent LayerNorm (the local spec's norm is torch's then)
    if not _importable("scaled_upper_triang_masked_softmax_cuda"):
        over["masked_softmax_fusion"] = False  # megatron's fused softmax kernels (apex / Megatron-LM builds)
    if not (has_transformer_engine() or _importable("fused_weight_gradient_mlp_cuda")):
        over["gradient_accumulation_fusion"] = False  # the fused weight-gradient GEMM (apex or TE)
    return over


def config_overrides() -> dict:
    """TransformerConfig fields to force on this machine: with CUDA only the fusions whose kernels are missing
    (:func:`missing_kernel_overrides`, none in NVIDIA's NeMo container); without CUDA every fusion off, fp32."""
    if has_cuda():
        return missing_kernel_overrides()
    return dict(
        use_cpu_initialization=True,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        moe_router_fusion=False,
        fp16=False,
        bf16=False,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        autocast_dtype=torch.float32,
        fp8=None,
    )


# --------------------------------------------------------------------------------------------------
# 1. device rewriting
# --------------------------------------------------------------------------------------------------
_CPU = torch.device("cpu")
_TARGET = [_CPU]  # where "cuda" goes: the CPU, or the emulated GPU of the tests (emulated_gpu.py)


def _is_cuda_device(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    if isinstance(dev, int) and not isinstance(dev, bool):
        return True  # a bare ordinal means a CUDA device in torch
    return False


class _CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU for every torch function and tensor method."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "cuda":  # Tensor.cuda(...) / Module-free tensors
            return args[0] if _TARGET[0] is _CPU else args[0].to(_TARGET[0])
        if name == "is_pinned":
            return False
        if name == "type" and len(args) == 1 and not kwargs:  # t.type(): megatron's optimizers dispatch on
            out = func(*args)                                   # "torch.cuda.FloatTensor" / BFloat16Tensor
            out = out.replace(f"torch.{_TARGET[0].type}.", "torch.")
            return "torch.cuda." + out[len("torch."):] if out.startswith("torch.") and ".cuda." not in out else out
        dev = kwargs.get("device")
        if dev is not None and _is_cuda_device(dev):
            kwargs = dict(kwargs)
            kwargs["device"] = _TARGET[0]
        if name == "to" and args and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _TARGET[0]) + tuple(args[2:])
        if "pin_memory" in kwargs and kwargs["pin_memory"]:
            kwargs = dict(kwargs)
            kwargs["pin_memory"] = False
        if name == "pin_memory" and args:
            return args[0]
        return func(*args, **kwargs)


class _NullEvent:
    """Stand-in for torch.cuda.Event: CPU work is complete when issued (megatron's MoE all-to-all dispatcher
    records one on its device-to-host stream and synchronizes on it)."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


class _NullStream:
    """Stand-in for torch.cuda.Stream: usable as a context and in wait/record calls."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullEvent()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: _TARGET[0]
    cuda.synchronize = lambda *a, **k: None
    cuda.set_device = lambda *a, **k: None
    cuda.empty_cache = lambda *a, **k: None
    cuda.Stream = _NullStream
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    # 3. RNG: the "CUDA" generator is the CPU generator.
    cuda.manual_seed = torch.manual_seed
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    # MoE routers: moe_utils imports te_general_gemm inside its Transformer Engine try-block and tests
    # ``te_general_gemm is not None`` in every router forward; without TE the name is never bound (NameError)
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    # the all-to-all dispatcher moves its split sizes to the host as numpy arrays, but only from CUDA tensors
    # (``tensor.is_cuda``); on the CPU they stayed tensors, which all_to_all_single refuses as split sizes
    from megatron.core.transformer.moe import token_dispatcher

    orig_move = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.detach().cpu().numpy()
        return orig_move(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu

    # NeMo's strategy seeds the model-parallel RNG only on CUDA; seed a missing state on first use
    # (megatron's own rule: seed + 2718 + tensor-parallel rank), instead of failing in dropout forks.
    orig_fork = mrandom.CudaRNGStatesTracker.fork

    @contextlib.contextmanager
    def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            from megatron.core import parallel_state

            rank = parallel_state.get_tensor_model_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0
            self.add(name, 1234 + 2718 + rank)
        with orig_fork(self, name):
            yield

    mrandom.CudaRNGStatesTracker.fork = fork

    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as optimizer

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        coeff = max_norm / (total_norm + 1.0e-6)
        if coeff < 1.0:
            for p in parameters:
                g = getattr(p, "decoupled_grad", None) if use_decoupled_grad else p.grad
                if g is not None:
                    g.detach().mul_(coeff)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32

    # Without Apex/TE megatron's distributed optimizer wraps torch's Adam, whose per-parameter "step" its
    # state_dict() reads; on resume, NeMo asks for the state dict (the load template) before any step, when
    # torch's state is still empty, and megatron asserts. Give the empty state its initial values (zero
    # moments, step 0) first: the checkpoint's values then replace them, as with TE's or Apex's Adam.
    from megatron.core.optimizer import distrib_optimizer

    orig_state_dict = distrib_optimizer.DistributedOptimizer.state_dict

    def state_dict(self):
        if not getattr(distrib_optimizer, "HAVE_APEX_OR_TE", True) and self.optimizer is not None \
                and len(self.optimizer.state) == 0 and self.init_state_fn is not None:
            self.init_state_fn(self.optimizer, self.config)
            for st in self.optimizer.state.values():
                st.setdefault("step", torch.tensor(0.0))
        return orig_state_dict(self)

    distrib_optimizer.DistributedOptimizer.state_dict = state_dict

    # ... and loading a fully reshardable checkpoint into torch's Adam copies every per-parameter state
    # entry from the checkpoint's, but torch's "step" is restored from the param groups instead (megatron
    # skips it on the checkpoint side, not on ours): keep the restored step.
    orig_set = distrib_optimizer.DistributedOptimizer._set_main_param_and_optimizer_states

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if not getattr(distrib_optimizer, "HAVE_APEX_OR_TE", True) and "step" not in tensors \
                and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
            if "step" in state:
                tensors = {**tensors, "step": state["step"]}
        return orig_set(self, model_param, tensors)

    distrib_optimizer.DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states

    # ... and it restores that step as ONE tensor shared by every parameter's state, which torch's Adam then
    # increments once per parameter per step (wrong bias correction from the first step after a resume).
    orig_load = distrib_optimizer.DistributedOptimizer.load_state_dict

    def load_state_dict(self, state_dict):
        orig_load(self, state_dict)
        if not getattr(distrib_optimizer, "HAVE_APEX_OR_TE", True) and self.optimizer is not None:
            for st in self.optimizer.state.values():
                if torch.is_tensor(st.get("step")):
                    st["step"] = st["step"].detach().clone()

    distrib_optimizer.DistributedOptimizer.load_state_dict = load_state_dict

    import nemo.lightning.io.pl as nemo_io_pl

    nemo_io_pl._fix_tensors_device = lambda ckpt: ckpt


class _Completed:
    """A finished collective's handle (``Work``) for callers that asked for an asynchronous one."""

    def wait(self, *args, **kwargs):
        return True

    def is_completed(self):
        return True


def _patch_gloo_collectives() -> None:
    import torch.distributed as dist

    orig_gather = dist.all_gather_into_tensor

    @functools.wraps(orig_gather)
    def all_gather_into_tensor(output_tensor, input_tensor, group=None, async_op=False):
        if dist.get_backend(group) != "gloo":
            return orig_gather(output_tensor, input_tensor, group=group, async_op=async_op)
        inp = input_tensor.reshape(-1)
        world = dist.get_world_size(group)
        chunks = list(output_tensor.reshape(world, -1).unbind(0))
        work = dist.all_gather(chunks, inp.contiguous(), group=group, async_op=async_op)
        return work

    orig_rs = dist.reduce_scatter_tensor

    @functools.wraps(orig_rs)
    def reduce_scatter_tensor(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if dist.get_backend(group) != "gloo":
            return orig_rs(output, input, op=op, group=group, async_op=async_op)
        parts = list(input.reshape(dist.get_world_size(group), -1).unbind(0))  # equal parts, in rank order
        return reduce_scatter(output.view(-1), parts, op=op, group=group, async_op=async_op)

    orig_all_gather = dist.all_gather

    @functools.wraps(orig_all_gather)
    def all_gather(tensor_list, tensor, group=None, async_op=False):
        shapes = {tuple(t.shape) for t in tensor_list}
        if dist.get_backend(group) != "gloo" or shapes == {tuple(tensor.shape)}:
            return orig_all_gather(tensor_list, tensor, group=group, async_op=async_op)
        # uneven first dimensions (megatron's MoE dispatcher gathers each TP rank's routed tokens): gloo needs equal
        # sizes, so every part travels padded to the longest and is trimmed on arrival
        rows = max(t.shape[0] for t in tensor_list)
        pad = tensor.new_zeros((rows,) + tuple(tensor.shape[1:]))
        pad[:tensor.shape[0]] = tensor
        parts = [torch.empty_like(pad) for _ in tensor_list]
        orig_all_gather(parts, pad.contiguous(), group=group)
        for out, part in zip(tensor_list, parts):
            out.copy_(part[:out.shape[0]])
        return _Completed() if async_op else None

    orig_reduce_scatter = dist.reduce_scatter

    @functools.wraps(orig_reduce_scatter)
    def reduce_scatter(output, input_list, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if dist.get_backend(group) != "gloo":
            return orig_reduce_scatter(output, input_list, op=op, group=group, async_op=async_op)
        # gloo has no reduce_scatter: all-reduce the whole (every rank holds the same split sizes), keep this rank's
        rank = dist.get_rank(group)
        buf = torch.cat([t.reshape(-1) for t in input_list])
        dist.all_reduce(buf, op=op, group=group)
        start = sum(t.numel() for t in input_list[:rank])
        output.copy_(buf[start:start + output.numel()].view(output.shape))
        return _Completed() if async_op else None  # done already: megatron's overlapped path waits on it

    dist.all_gather_into_tensor = all_gather_into_tensor
    dist.reduce_scatter_tensor = reduce_scatter_tensor
    dist.all_gather = all_gather
    dist.reduce_scatter = reduce_scatter
    # megatron aliases the fused collectives at import time in a few modules
    import megatron.core.tensor_parallel.mappings as mappings

    for mod in (mappings,):
        if hasattr(mod, "dist_all_gather_func"):
            mod.dist_all_gather_func = all_gather_into_tensor
        if hasattr(mod, "dist_reduce_scatter_func"):
            mod.dist_reduce_scatter_func = reduce_scatter_tensor


def _patch_norm_for_sequence_parallel() -> None:
    import copy

    from megatron.core.transformer import torch_norm

    orig_new = torch_norm.WrappedTorchNorm.__new__

    def __new__(cls, config, hidden_size, *args, **kwargs):
        if not getattr(config, "sequence_parallel", False):
            return orig_new(cls, config, hidden_size, *args, **kwargs)
        plain = copy.copy(config)
        plain.sequence_parallel = False
        norm = orig_new(cls, plain, hidden_size, *args, **kwargs)
        for p in norm.parameters():
            setattr(p, "sequence_parallel", True)
        return norm

    torch_norm.WrappedTorchNorm.__new__ = staticmethod(__new__)


def _patch_attention() -> None:
    from megatron.core.transformer import dot_product_attention as dpa
    from megatron.core.transformer.enums import AttnMaskType

    orig_forward = dpa.DotProductAttention.forward
    if getattr(orig_forward, "_nemo_minitron_sdpa", False):
        return

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        sm = self.scale_mask_softmax
        if ((attention_mask is not None and attention_mask.dtype != torch.bool) or attention_bias is not None
                or packed_seq_params is not None or self.attn_mask_type != AttnMaskType.causal
                or attn_mask_type not in (None, AttnMaskType.causal)
                or sm.window_size is not None or sm.scale is not None or self.softmax_offset is not None
                or query.shape[0] != key.shape[0]
                or (self.training and self.attention_dropout.p > 0)):  # dropout applies in training mode, grad or not
            return orig_forward(self, query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if attention_mask is None:
            ctx = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        else:  # megatron's mask: True = not attended; SDPA's: True = attended
            ctx = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask,
                                                                   scale=self.softmax_scale)
        # [b, n, s, d] -> [s, b, n * d]
        return ctx.permute(2, 0, 1, 3).reshape(ctx.shape[2], ctx.shape[0], self.hidden_size_per_partition)

    forward._nemo_minitron_sdpa = True
    dpa.DotProductAttention.forward = forward


def activate() -> bool:
    """Install the CPU accommodations once per process. Returns True when they are active.

    Does nothing (returns False) when CUDA is available, or when ``NEMO_MINITRON_NO_CPU_PLATFORM=1``.
    """
    global _ACTIVE
    if has_cuda() or os.environ.get("NEMO_MINITRON_NO_CPU_PLATFORM") == "1":
        return False
    with _LOCK:
        if _ACTIVE:
            return True
        from nemo_minitron.platform import emulated_gpu

        _patch_gloo_collectives()  # first: the emulated GPU's collective checks (tests) wrap these shims, so they
        # see the caller's tensors and place; the other way round every call would come from this module, unchecked
        if emulated_gpu.activate():  # tests: the compute device is an emulated GPU, not the host
            _TARGET[0] = emulated_gpu.device()
        _patch_torch_cuda()
        _patch_megatron()
        _patch_norm_for_sequence_parallel()
        _patch_attention()
        _CudaToCpuMode().__enter__()  # stays pushed for the life of the process
        _ACTIVE = True
    return True
