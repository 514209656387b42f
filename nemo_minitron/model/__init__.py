"""Building NeMo's GPT/Llama model (a megatron-core ``GPTModel``) from a portable config.

``ModelSpec`` is what a checkpoint stores: NeMo's config class and its constructor arguments, free of
platform and parallel-layout settings. :func:`build` turns it into megatron modules for this rank, with
the Transformer Engine layer spec when TE and CUDA are present and the local spec otherwise (NeMo's
``default_layer_spec`` makes that choice, in one place).
"""

from nemo_minitron.model.spec import ModelSpec, from_hf_config, tiny_spec  # noqa: F401
from nemo_minitron.model.build import build, instantiate, count_params, expert_params, unwrap  # noqa: F401
