"""``nemo-minitron import``: a Hugging Face checkpoint of a supported family (Llama/Mistral, Qwen2, Qwen3,
Mixtral, Qwen3-MoE: :mod:`~nemo_minitron.model.families`) or a ``.nemo`` archive -> a NeMo 2 checkpoint."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from nemo_minitron import parallel
from nemo_minitron.checkpoint import hf, nemo
from nemo_minitron.model import build, count_params
from nemo_minitron.model.spec import from_hf_config


def import_hf(source, output, overwrite: bool = False) -> Path:
    """Convert ``source`` (HF dir or ``smollm2-135m``) and write a NeMo 2 checkpoint at ``output``."""
    output = Path(output)
    nemo.check_output(output, overwrite)  # before the (possibly slow) GGUF conversion
    src = hf.resolve_source(str(source))
    hf_cfg = hf.read_config(src)
    spec = from_hf_config(hf_cfg)
    hf.check_tokenizer(src)
    hf.weight_files(src)

    t0 = time.time()
    parallel.initialize(1, 1)
    print(f"reading {src} ...", flush=True)
    sd = hf.read_state_dict(src)
    hf.check_state_dict(sd, spec)
    model = build(spec)
    full = {k: v.to(torch.float32) for k, v in hf.hf_to_mcore(sd, spec).items()}
    missing, unexpected = model.load_state_dict(full, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"conversion mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    meta = {"source": str(source), "source_path": str(src), "params": count_params(spec),
            **({"active_params": count_params(spec, active=True)} if spec.moe else {}),
            "config_class": spec.config_class, "rotary_base": spec.get("rotary_base")}
    # written beside the weights before the rename, so a kill never leaves a checkpoint without it
    nemo.save(output, model, spec, tokenizer_dir=src, overwrite=overwrite,
              extra=lambda tmp: (tmp / "nemo_minitron.json").write_text(json.dumps(meta, indent=2)))
    experts = (f"{spec.num_moe_experts} experts of ffn {spec.moe_ffn_hidden_size}, top-{spec.moe_router_topk} "
               f"({count_params(spec, active=True) / 1e6:.1f}M active), " if spec.moe else "")
    print(f"imported {spec.config_class}: {spec.num_layers} layers, hidden {spec.hidden_size}, "
          f"{experts or f'ffn {spec.ffn_hidden_size}, '}heads {spec.num_attention_heads}/{spec.num_query_groups} groups, "
          f"head_dim {spec.kv_channels}, vocab {spec.vocab_size}, rope base {spec.get('rotary_base')}, "
          f"{count_params(spec) / 1e6:.1f}M params ({time.time() - t0:.1f}s)")
    return output


def import_nemo(source, output, overwrite: bool = False) -> Path:
    """A ``.nemo`` archive -> a NeMo 2 checkpoint directory (validated, published atomically)."""
    from nemo_minitron.checkpoint import archive

    t0 = time.time()
    out = archive.unpack(source, output, overwrite=overwrite)
    spec = nemo.read_spec(out)
    print(f"imported {source}: {spec.config_class}, {spec.num_layers} layers, hidden {spec.hidden_size}, "
          f"{count_params(spec) / 1e6:.1f}M params ({time.time() - t0:.1f}s)")
    return out


def run(cfg) -> None:
    from nemo_minitron.checkpoint import archive

    if str(cfg.source).endswith(".nemo"):
        archive.check(cfg.source)  # not a tar, another archive, incomplete: one line, before anything is written
        out = import_nemo(cfg.source, cfg.output, overwrite=cfg.overwrite)
    else:
        out = import_hf(cfg.source, cfg.output, overwrite=cfg.overwrite)
    print(f"wrote checkpoint: {out.absolute()}")
