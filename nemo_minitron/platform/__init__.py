"""Platform accommodations. Everything that lets the CUDA-first stack run on a CPU-only torch lives in
:mod:`nemo_minitron.platform.cpu`; nothing else in the package patches NeMo or megatron-core."""

from nemo_minitron.platform.cpu import (  # noqa: F401
    activate,
    config_overrides,
    backend,
    cpu_mode_active,
    device,
    has_cuda,
    has_transformer_engine,
    lightning_accelerator,
)
