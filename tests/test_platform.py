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


def test_inert_when_cuda_present():
    code = (
        "import torch; torch.cuda.is_available = lambda: True\n"
        "orig = torch.cuda.current_device\n"
        "from nemo_minitron import platform\n"
        "assert platform.activate() is False\n"
        "assert torch.cuda.current_device is orig\n"
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
