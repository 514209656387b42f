"""``nemo-minitron export``: a NeMo 2 checkpoint (any TP/PP layout it was saved at, local or TE names)
-> a Hugging Face directory of the model's family (``LlamaForCausalLM``, ``Qwen2ForCausalLM``,
``Qwen3ForCausalLM``: :mod:`~nemo_minitron.model.families`) that ``transformers.AutoModelForCausalLM.from_pretrained``
loads without custom code.

The config carries the real (pruned) shapes, with an explicit ``head_dim`` (heads x head_dim may differ
from hidden after width pruning), the RoPE base and Llama-3.1 scaling, tied or untied embeddings, and
the tokenizer's special tokens; vocabulary rows beyond the tokenizer (megatron padding) are removed.
Written to ``OUTPUT.partial`` and renamed when complete; a failed write (disk full, quota, file size limit)
removes it and ends in one line naming the output and the OS error.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from nemo_minitron import parallel
from nemo_minitron.checkpoint import hf, nemo
from nemo_minitron.errors import UserError
from nemo_minitron.faults import pause_point
from nemo_minitron.model.spec import ModelSpec

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def hf_config(spec: ModelSpec, vocab_size: int, dtype: str, tokenizer=None) -> dict:
    fam = spec.family
    cfg = {
        "architectures": [fam.hf_architectures[0]], "model_type": fam.hf_model_type,
        "hidden_size": spec.hidden_size, "intermediate_size": spec.ffn_hidden_size,
        "num_hidden_layers": spec.num_layers, "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_query_groups, "head_dim": spec.kv_channels,
        "vocab_size": vocab_size, "max_position_embeddings": spec.get("seq_length", 4096),
        "rms_norm_eps": spec.get("layernorm_epsilon", 1e-5), "rope_theta": float(spec.get("rotary_base", 10000.0)),
        "tie_word_embeddings": spec.tied,
        "initializer_range": spec.get("init_method_std", 0.02), "torch_dtype": str(DTYPES[dtype]).split(".")[1],
        "rope_scaling": None, **fam.hf_fields,
    }
    if fam.moe is not None:  # a mixture of experts: the expert count, width, top-k and routing rule
        cfg.update({fam.moe.num_experts: spec.num_moe_experts, fam.moe.expert_width: spec.moe_ffn_hidden_size,
                    "num_experts_per_tok": spec.moe_router_topk, "output_router_logits": False,
                    "router_aux_loss_coef": float(spec.get("moe_aux_loss_coeff", 0.001)), **fam.moe.hf_fields})
        if fam.moe.norm_topk_prob is not None:
            cfg[fam.moe.norm_topk_prob] = not spec.get("moe_router_pre_softmax", False)
        elif spec.get("moe_router_pre_softmax", False):
            raise UserError(f"{fam.hf_architectures[0]} always renormalizes its top-k routing probabilities; this "
                            "model does not (moe_router_pre_softmax=true): it cannot be exported as that class")
    scaled = {cls: kind for kind, cls in fam.rope_scaling.items()}  # Llama31Config: Llama-3.1's 'llama3'
    if spec.config_class in scaled:
        cfg["rope_scaling"] = {"rope_type": scaled[spec.config_class], "factor": spec.get("scale_factor", 8.0),
                               "low_freq_factor": spec.get("low_freq_factor", 1.0),
                               "high_freq_factor": spec.get("high_freq_factor", 4.0),
                               "original_max_position_embeddings": spec.get("old_context_len", 8192)}
    if tokenizer is not None:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(tokenizer, key, None) is not None:
                cfg[key] = getattr(tokenizer, key)
    return cfg


def export_hf(source, output, dtype: str = "bf16", overwrite: bool = False, max_shard_size: str = "5GB") -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from nemo_minitron.checkpoint.loader import describe, load_model
    from nemo_minitron.model.shards import gather_full

    if dtype not in DTYPES:
        raise UserError(f"export.dtype={dtype!r}: one of {', '.join(DTYPES)}")
    output = Path(output)
    nemo.check_output(output, overwrite)
    kind, path, spec = describe(source)
    if kind != "nemo":
        raise UserError(f"{path} is already a Hugging Face checkpoint; export takes a NeMo checkpoint")
    tok_dir = nemo.tokenizer_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir)) if tok_dir else None

    t0 = time.time()
    parallel.initialize(1, 1)
    print(f"loading {path} ...", flush=True)
    model, spec, _ = load_model(path)
    sd = hf.mcore_to_hf(parallel.to_host(gather_full(model)), spec)  # host copies: they are written to files
    del model
    vocab = spec.vocab_size  # the rows megatron built past it are padding (ModelSpec.padded_vocab)
    if tokenizer is not None and len(tokenizer) < vocab and spec.get("make_vocab_size_divisible_by", 1) > 1:
        vocab = len(tokenizer)  # a checkpoint whose vocab_size is itself a padded one
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        if k in sd:
            sd[k] = sd[k][:vocab]
    if spec.tied:  # the output layer is the embedding: written (and counted) once
        sd.pop("lm_head.weight")
    from tqdm import tqdm

    total = sum(v.numel() for v in sd.values())
    with tqdm(total=total * DTYPES[dtype].itemsize, unit="B", unit_scale=True, desc=f"converting to {dtype}",
              disable=total < (256 << 20), mininterval=2) as bar:  # progress for large models only
        for k in list(sd):
            sd[k] = sd[k].to(DTYPES[dtype]).contiguous()
            bar.update(sd[k].numel() * DTYPES[dtype].itemsize)
    print(f"writing {total / 1e6:.1f}M parameters ({total:,}; {total * DTYPES[dtype].itemsize / 2**20:.0f} MiB, "
          f"{dtype}) in shards of at most {max_shard_size} ...", flush=True)
    cfg = hf_config(spec, vocab, dtype, tokenizer)
    tmp = nemo.staging(output)
    with nemo.writing(output, tmp):  # a failed write: one line, nothing left behind
        nemo.remove(tmp)  # a killed run's leftover
        with torch.device("meta"):
            hf_model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
        hf_model.load_state_dict(sd, strict=not spec.tied, assign=True)
        if spec.tied:
            hf_model.tie_weights()
        hf_model.save_pretrained(str(tmp), max_shard_size=max_shard_size, safe_serialization=True)
        pause_point("export_write")  # test hook: weights written, the directory not yet complete
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
            GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id).save_pretrained(str(tmp))
        (tmp / "nemo_minitron_export.json").write_text(json.dumps({"source": str(path), "dtype": dtype}, indent=2))
        nemo.publish(tmp, output)
    print(f"exported {spec.num_layers} layers, hidden {spec.hidden_size}, ffn {spec.ffn_hidden_size}, "
          f"heads {spec.num_attention_heads}/{spec.num_query_groups}, head_dim {spec.kv_channels}, vocab {vocab}, "
          f"{dtype} ({time.time() - t0:.1f}s)")
    return output


def export_nemo(source, output, overwrite: bool = False) -> Path:
    """A NeMo 2 checkpoint -> one ``.nemo`` file (weights kept in the checkpoint's own precision)."""
    from nemo_minitron.checkpoint import archive
    from nemo_minitron.checkpoint.loader import describe

    output = Path(output)
    if output.suffix != ".nemo":
        raise UserError(f"format=nemo writes a single file: output must end in .nemo (got {output})")
    kind, path, spec = describe(source)
    if kind != "nemo":
        raise UserError(f"{path} is a Hugging Face checkpoint; export takes a NeMo checkpoint")
    t0 = time.time()
    archive.pack(path, output, overwrite=overwrite)
    print(f"packed {path} ({spec.num_layers} layers, hidden {spec.hidden_size}) into {output.stat().st_size / 2**20:.1f} MiB "
          f"({time.time() - t0:.1f}s)")
    return output


def run(cfg) -> None:
    if cfg.format == "hf":
        out = export_hf(cfg.model, cfg.output, dtype=cfg.export.dtype, overwrite=cfg.overwrite,
                        max_shard_size=cfg.export.max_shard_size)
    elif cfg.format == "nemo":
        out = export_nemo(cfg.model, cfg.output, overwrite=cfg.overwrite)
    else:
        raise UserError(f"format={cfg.format!r}: one of hf, nemo")
    print(f"wrote checkpoint: {out.absolute()}")
