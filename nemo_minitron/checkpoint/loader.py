"""Loading any model source (NeMo 2 checkpoint or Hugging Face directory) into this rank's megatron chunk."""

from __future__ import annotations

from pathlib import Path

from nemo_minitron.checkpoint import hf, nemo
from nemo_minitron.errors import UserError
from nemo_minitron.model import ModelSpec, build
from nemo_minitron.model.shards import load_full_state_dict


def describe(source) -> tuple[str, Path, ModelSpec]:
    """Validate a source without loading weights: ('nemo'|'hf', path, spec). Errors name the problem."""
    path = hf.resolve_source(str(source))
    if nemo.is_partial(path):
        raise UserError(f"{path} is an unfinished write (a killed or failed run left it): re-run the command "
                        "that writes it")
    for final in ("student", "model"):  # a distill / finetune run directory: its finished checkpoint
        if not (path / "context").exists() and (path / final / "context").is_dir():
            path = path / final
            break
    if nemo.is_checkpoint(path):
        nemo.validate(path)
        spec = nemo.read_spec(path)
        nemo.check_tensors(path, spec)
        return "nemo", path, spec
    if (path / "context").is_dir() or (path / "weights").is_dir():
        nemo.validate(path)  # an incomplete NeMo checkpoint: say what is missing
    if path.is_file() and path.suffix == ".nemo":
        from nemo_minitron.checkpoint import archive

        archive.check(path)  # a broken archive says so; a good one is unpacked by import first
        raise UserError(f"{path} is a .nemo archive: unpack it into a checkpoint directory first "
                        f"(nemo-minitron import source={path} output=DIR)")
    if path.is_dir() and not (path / "config.json").is_file():
        raise UserError(f"{path} is not a model checkpoint: neither a NeMo 2 checkpoint (context/io.json) nor a "
                        "Hugging Face one (config.json)")
    cfg = hf.read_config(path)
    spec = hf_spec(cfg)
    hf.weight_files(path)
    return "hf", path, spec


def hf_spec(cfg: dict) -> ModelSpec:
    from nemo_minitron.model.spec import from_hf_config

    return from_hf_config(cfg)


def load_model(source, tp: int = 1, pp: int = 1):
    """(model chunk, spec, kind) for ``source`` at the current parallel layout (state must be initialized)."""
    kind, path, spec = describe(source)
    spec.validate_layout(tp, pp)
    model = build(spec, tp, pp, initialize=False)
    if kind == "nemo":
        nemo.load_weights(path, model)
    else:
        sd = hf.read_state_dict(path)
        hf.check_state_dict(sd, spec)
        load_full_state_dict(model, hf.hf_to_mcore(sd, spec))
    model.eval()
    return model, spec, kind


def check_vocab(spec: ModelSpec, max_token: int, what: str) -> None:
    if max_token >= spec.vocab_size:
        raise UserError(f"{what} holds token id {max_token} but the model's vocabulary has {spec.vocab_size} "
                        f"entries: data and model use different tokenizers")
