"""The CPU platform module: active without CUDA, inert with it."""

import subprocess
import sys

from nemo_minitron import platform


def test_active_on_cpu(dist_single):
    import torch

    assert not torch.cuda.is_available()
    assert platform.cpu_mode_active()
    assert platform.backend() == "gloo" and platform.device().type == "cpu"
    # a hard-coded CUDA factory (as in megatron's schedules) lands on the CPU
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert platform.config_overrides()["apply_rope_fusion"] is False
    # megatron's optimizers dispatch on the CUDA type names
    assert torch.zeros(2).type() == "torch.cuda.FloatTensor" and torch.zeros(2).bfloat16().type() == "torch.cuda.BFloat16Tensor"
    assert torch.zeros(2).type(torch.float64).dtype == torch.float64  # a conversion stays a conversion


def test_sequence_parallel_norm_marks_its_parameters(dist_single):
    """megatron's torch norm refuses sequence parallelism; on CPU it is built and its weights are marked for
    the gradient all-reduce over TP (what Apex's and TE's norms do)."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from nemo_minitron.model import tiny_spec
    from nemo_minitron.model.build import instantiate

    cfg = instantiate(tiny_spec(), sequence_parallel=False)
    cfg.sequence_parallel = True  # as NeMo's strategy sets it (TP=1 here: only the norm's construction matters)
    norm = WrappedTorchNorm(cfg, 64, eps=1e-5)
    assert all(getattr(p, "sequence_parallel", False) for p in norm.parameters())
    cfg.sequence_parallel = False
    assert not any(getattr(p, "sequence_parallel", False) for p in WrappedTorchNorm(cfg, 64).parameters())


def test_inert_when_cuda_present():
    code = (
        "import torch; torch.cuda.is_available = lambda: True\n"
        "orig = torch.cuda.current_device\n"
        "from nemo_minitron import platform\n"
        "from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer as D\n"
        "from megatron.core.transformer.torch_norm import WrappedTorchNorm as N\n"
        "before = (D.state_dict, D.load_state_dict, N.__new__)\n"
        "assert platform.activate() is False\n"
        "assert torch.cuda.current_device is orig\n"
        "assert (D.state_dict, D.load_state_dict, N.__new__) == before\n"
        "assert platform.config_overrides() == {}\n"
        "assert platform.backend() == 'nccl'\n"
        "assert not platform.cpu_mode_active()\n"
        "print('inert')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "inert" in out.stdout


def test_layer_spec_choice_is_nemos(tiny_spec, dist_single):
    """Without TE the local spec is built (norms as separate modules), chosen by NeMo's default_layer_spec."""
    from nemo_minitron.model import build

    model = build(tiny_spec)
    names = {k for k, _ in model.named_parameters()}
    assert "decoder.layers.0.input_layernorm.weight" in names
    assert not any("layer_norm_weight" in n for n in names)
    assert platform.has_transformer_engine() is False
