"""``nemo-minitron convert``: a NeMo 2 checkpoint for the other layer spec (Transformer Engine <-> local).

What differs between the two specs in a checkpoint, measured with megatron-core 0.15.3: **not the names**.
The local spec's ``sharded_state_dict`` maps ``input_layernorm.`` / ``pre_mlp_layernorm.`` to TE's fused
``self_attention.linear_qkv.layer_norm_`` / ``mlp.linear_fc1.layer_norm_`` keys, and both specs write one
``_extra_state`` object per linear layer. The one content difference is that object: TE stores its FP8
scaling state there (amax history, scales) and the local spec writes ``None``. So converting is:

* ``transformer_impl=local``: load (under the local spec), drop the FP8 state, write. A model trained in
  FP8 on the cluster becomes a plain checkpoint to prune, evaluate or export on CPU.
* ``transformer_impl=transformer_engine``: the same tensors, loaded under the TE spec where it can be
  built (TE + CUDA, so every tensor is proven to load into TE's fused modules), otherwise under the local
  spec, which writes the identical keys; the FP8 state starts fresh when the job on the cluster starts.
  ``fp8_state=keep`` carries existing FP8 scaling state over (TE spec only).

Either way the output holds exactly the source's tensor keys and values (checked on the written files before
they are renamed into place), is written atomically (a failed write: one line naming the output and the OS
error, nothing left), and records the conversion in ``OUTPUT/convert.json``.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import torch

from nemo_minitron import parallel
from nemo_minitron.checkpoint import nemo
from nemo_minitron.errors import UserError

IMPLS = ("transformer_engine", "local")
FP8_STATES = ("drop", "keep")


def _has_content(v) -> bool:
    if v is None:
        return False
    if isinstance(v, io.BytesIO):
        return len(v.getbuffer()) > 0
    if isinstance(v, torch.Tensor):
        return v.numel() > 0
    return True


def read_weights(path: Path, model) -> tuple[dict, int]:
    """Load ``path`` into ``model``: (its tensors by state-dict name, number of ``_extra_state`` objects holding
    FP8 state)."""
    state = nemo.load_weights(path, model)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
    fp8 = sum(1 for k, v in state.items() if k.endswith("_extra_state") and _has_content(v))
    return tensors, fp8


def convert(source, output, transformer_impl: str, fp8_state: str = "drop", overwrite: bool = False) -> dict:
    from nemo_minitron.checkpoint.loader import describe
    from nemo_minitron.model import build
    from nemo_minitron.model import precision

    if transformer_impl not in IMPLS:
        raise UserError(f"transformer_impl={transformer_impl!r}: one of {', '.join(IMPLS)}")
    if fp8_state not in FP8_STATES:
        raise UserError(f"fp8_state={fp8_state!r}: one of {', '.join(FP8_STATES)}")
    env = precision.current()
    te_buildable = env.te and env.cuda
    if fp8_state == "keep" and transformer_impl == "local":
        raise UserError("fp8_state=keep: the local spec has no FP8 state to keep (use fp8_state=drop)")
    if fp8_state == "keep" and not te_buildable:
        raise UserError("fp8_state=keep needs the Transformer Engine spec built here (Transformer Engine and a GPU); "
                        "without them the FP8 state can only be dropped (fp8_state=drop)")
    output = Path(output)
    nemo.check_output(output, overwrite)
    kind, path, spec = describe(source)
    if kind != "nemo":
        raise UserError(f"{path} is a Hugging Face checkpoint; convert takes a NeMo checkpoint (use import first)")
    if output.absolute() == Path(path).absolute():
        raise UserError("output must differ from model (the source is read while the output is written)")

    t0 = time.time()
    parallel.initialize(1, 1)
    built = "transformer_engine" if transformer_impl == "transformer_engine" and te_buildable else "local"
    layer_spec = precision.resolve({"transformer_impl": built}, env)["transformer_layer_spec"]
    print(f"loading {path} under the {built} layer spec ...", flush=True)
    model = build(spec, initialize=False, transformer_layer_spec=layer_spec)
    before, fp8_found = read_weights(path, model)
    keep = fp8_state == "keep"
    record = {"source": str(path), "transformer_impl": transformer_impl, "built_with": built,
              "fp8_state": "kept" if keep else "dropped", "fp8_state_objects_in_source": fp8_found}

    def extra(tmp: Path) -> None:
        # the output must hold exactly the source's tensors, under the same keys: checked on the written
        # files before they are renamed into place, so a failed check publishes nothing
        check = build(spec, initialize=False, transformer_layer_spec=layer_spec)
        after, fp8_left = read_weights(tmp, check)
        if before.keys() != after.keys() or nemo.checkpoint_keys(path) != nemo.checkpoint_keys(tmp):
            raise RuntimeError(f"convert: keys differ between {path} and {output}")
        diff = [k for k in before if not torch.equal(before[k], after[k])]
        if diff or (fp8_left and not keep):
            raise RuntimeError(f"convert: {output} differs from its source ({diff[:3]}, fp8 state left: {fp8_left})")
        record.update(tensors=len(after), seconds=round(time.time() - t0, 1))
        (tmp / "convert.json").write_text(json.dumps(record, indent=2))

    nemo.save(output, model, spec, nemo.tokenizer_dir(path), overwrite=overwrite, extra=extra,
              drop_extra_state=not keep)
    print(f"converted {record['tensors']} tensors for the {transformer_impl} spec; FP8 scaling state "
          f"{'kept' if keep else 'dropped'} ({fp8_found} objects in the source) ({record['seconds']}s)")
    return record


def run(cfg) -> None:
    convert(cfg.model, cfg.output, cfg.transformer_impl, cfg.fp8_state, overwrite=cfg.overwrite)
    print(f"wrote checkpoint: {Path(cfg.output).absolute()}")
