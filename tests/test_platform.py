"""The CPU platform module: active without CUDA, inert with it.

On a machine with CUDA the CPU-path tests are forced onto the CPU path: they run again in a pytest process
that sees no GPU (``CUDA_VISIBLE_DEVICES=""``), since the accommodations are installed per process and only
without CUDA."""

import os
import subprocess
import sys

import pytest
import torch

from nemo_minitron import platform


def _ran_without_cuda(request) -> bool:
    """With CUDA here: run this test in a fresh pytest process that sees no GPU and return True (it passed
    there); without CUDA: False, the test runs in this process."""
    if not torch.cuda.is_available():
        return False
    root = str(request.config.rootpath)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                          request.node.nodeid], cwd=root, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    return True


def test_active_on_cpu(request):
    if _ran_without_cuda(request):
        return
    request.getfixturevalue("dist_single")
    assert not torch.cuda.is_available()
    assert platform.cpu_mode_active()
    assert platform.backend() == "gloo" and platform.device().type == "cpu"
    # a hard-coded CUDA factory (as in megatron's schedules) lands on the CPU
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert platform.config_overrides()["apply_rope_fusion"] is False
    # megatron's optimizers dispatch on the CUDA type names
    assert torch.zeros(2).type() == "torch.cuda.FloatTensor" and torch.zeros(2).bfloat16().type() == "torch.cuda.BFloat16Tensor"
    assert torch.zeros(2).type(torch.float64).dtype == torch.float64  # a conversion stays a conversion


def test_sequence_parallel_norm_marks_its_parameters(request):
    """megatron's torch norm refuses sequence parallelism; on CPU it is built and its weights are marked for
    the gradient all-reduce over TP (what Apex's and TE's norms do)."""
    if _ran_without_cuda(request):
        return
    request.getfixturevalue("dist_single")
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
        "over = platform.config_overrides()  # only the fusions whose kernels are missing here (no TE, apex)\n"
        "assert set(over) <= {'apply_rope_fusion', 'persist_layer_norm', 'masked_softmax_fusion',\n"
        "                     'gradient_accumulation_fusion', 'moe_grouped_gemm', 'moe_permute_fusion',\n"
        "                     'moe_router_fusion'} and not any(over.values()), over\n"
        "assert platform.backend() == 'nccl'\n"
        "assert not platform.cpu_mode_active()\n"
        "print('inert')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "inert" in out.stdout


@pytest.mark.skipif(platform.has_transformer_engine(), reason="Transformer Engine is importable here, so NeMo's "
                    "default_layer_spec builds the TE spec (the TE configuration is checked in test_precision.py)")
def test_layer_spec_choice_is_nemos(tiny_spec, dist_single):
    """Without TE the local spec is built (norms as separate modules), chosen by NeMo's default_layer_spec."""
    from nemo_minitron.model import build

    model = build(tiny_spec)
    names = {k for k, _ in model.named_parameters()}
    assert "decoder.layers.0.input_layernorm.weight" in names
    assert not any("layer_norm_weight" in n for n in names)
    assert platform.has_transformer_engine() is False


def test_cuda_without_te_or_apex_turns_off_only_the_fusions_it_lacks(monkeypatch, tiny_spec, dist_single):
    """A CUDA machine without Transformer Engine or apex (a plain PyTorch image, like the lent H200): NeMo's
    Llama config asks for TE's fused RoPE and apex's persistent layer norm, which megatron refuses ("Please
    install TE >= 1.4"; "persist_layer_norm not supported by torch LayerNorm"). Only those fusions are turned
    off; with TE and apex nothing is."""
    from nemo_minitron.model.build import instantiate
    from nemo_minitron.platform import cpu

    monkeypatch.setattr(cpu, "has_cuda", lambda: True)
    monkeypatch.setattr(cpu, "has_transformer_engine", lambda: False)
    monkeypatch.setattr(cpu, "_importable", lambda module: False)
    assert cpu.config_overrides() == {"apply_rope_fusion": False, "persist_layer_norm": False,
                                      "masked_softmax_fusion": False, "gradient_accumulation_fusion": False,
                                      # MoE: TE's grouped-GEMM experts, fused permutation and router
                                      "moe_grouped_gemm": False, "moe_permute_fusion": False,
                                      "moe_router_fusion": False}
    cfg = instantiate(tiny_spec)  # NeMo's config and megatron's checks (raised before)
    assert cfg.bias_activation_fusion and cfg.bias_dropout_fusion  # torch-jit fusions: any CUDA has them
    cfg.use_cpu_initialization = True  # (this machine: build on the CPU) the model megatron builds from it
    assert cfg.configure_model(None).decoder.layers[0].input_layernorm is not None
    monkeypatch.setattr(cpu, "has_transformer_engine", lambda: True)
    monkeypatch.setattr(cpu, "_importable", lambda module: True)
    assert cpu.config_overrides() == {}
