"""NeMo 2 checkpoints, written and read without NeMo's trainer.

Layout (what NeMo 2.7.3's ``ModelCheckpoint``/``import_ckpt`` write, and what NeMo loads):

    CKPT/context/io.json, model.yaml   the serialized ``TrainerContext`` (NeMo config class + arguments,
             nemo_tokenizer/           tokenizer artifacts)
    CKPT/weights/                      megatron ``dist_checkpointing`` of ``model.sharded_state_dict(prefix="module.")``

Only portable model arguments are written: platform settings (fusions forced off on CPU, fp32) and the
parallel layout are not, so a checkpoint written on CPU at TP=1 loads on an H100 cluster at TP=8, and back.

Writes are atomic: everything goes to ``CKPT.partial-<id>`` and is renamed into place only after every
rank finished, so an interrupted run never leaves a directory at ``CKPT`` that looks complete.
"""

from __future__ import annotations

import json
import pickle
import shutil
import tempfile
from pathlib import Path


from nemo_minitron import parallel
from nemo_minitron.errors import UserError
from nemo_minitron.model.spec import RUNTIME_FIELDS, ModelSpec

CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}


def check_output(path: Path, overwrite: bool) -> None:
    """Refuse an output path that exists and is not empty (unless ``overwrite``)."""
    path = Path(path)
    if path.exists() and (path.is_file() or any(path.iterdir())) and not overwrite:
        raise UserError(f"output {path} exists and is not empty (pass overwrite=true to replace it)")


def publish(tmp: Path, path: Path) -> None:
    """Move a completely written ``tmp`` directory to ``path``, replacing what was there."""
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    tmp.rename(path)


def is_checkpoint(path: Path) -> bool:
    path = Path(path)
    return (path / "context" / "io.json").is_file() and (path / "weights").is_dir()


def validate(path: Path) -> None:
    """Clear errors for a missing, incomplete or corrupt checkpoint, before any model is built."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    if not (path / "context" / "io.json").is_file():
        raise UserError(f"{path} is not a NeMo 2 checkpoint: context/io.json is missing")
    w = path / "weights"
    if not (w / "metadata.json").is_file() or not (w / ".metadata").is_file():
        raise UserError(f"{path}: weights/ is incomplete (metadata.json or .metadata missing)")
    try:
        with open(w / ".metadata", "rb") as fh:
            meta = pickle.load(fh)
    except Exception as e:
        raise UserError(f"{w / '.metadata'} is corrupt ({e.__class__.__name__})") from None
    sizes = {}
    for item in getattr(meta, "storage_data", {}).values():
        rel = getattr(item, "relative_path", None)
        if rel:
            sizes[rel] = max(sizes.get(rel, 0), item.offset + item.length)
    for rel in sorted(sizes):
        f = w / rel
        if not f.is_file():
            raise UserError(f"{path}: weight shard weights/{rel} is missing")
        if f.stat().st_size < sizes[rel]:
            raise UserError(f"{path}: weight shard weights/{rel} is truncated "
                            f"({f.stat().st_size} bytes, needs {sizes[rel]})")


# --------------------------------------------------------------------------------------------------
# context
# --------------------------------------------------------------------------------------------------
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
)


def _stage_tokenizer(tokenizer_dir, workdir: Path):
    """Copy only the tokenizer files into ``workdir/nemo_tokenizer`` (NeMo's artifact name)."""
    stage = Path(workdir) / "nemo_tokenizer"
    stage.mkdir()
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copy2(Path(tokenizer_dir) / name, stage / name)
    return stage


def write_context(path: Path, spec: ModelSpec, tokenizer_dir=None) -> None:
    """Serialize NeMo's ``TrainerContext`` (LlamaModel + config + tokenizer) to ``path/context``."""
    import fiddle as fdl
    from nemo.collections.llm.gpt.model.llama import LlamaModel
    from nemo.lightning import Trainer
    from nemo.lightning.io.pl import TrainerContext

    from nemo_minitron.model.build import instantiate

    from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer

    config = instantiate(spec)  # platform-valid object; its io is replaced by the portable arguments
    with tempfile.TemporaryDirectory() as work:
        tokenizer = None
        if tokenizer_dir is not None:
            tokenizer = AutoTokenizer(str(_stage_tokenizer(tokenizer_dir, work)), use_fast=True)
        model = LlamaModel(config, tokenizer=tokenizer)
        model.__io__.config = fdl.Config(spec.config_cls(), **spec.args)
        trainer = Trainer(devices=1, accelerator="cpu", logger=False, enable_checkpointing=False)
        ctx = TrainerContext(model=model, trainer=trainer, extra={})
        ctx.io_dump(Path(path) / "context", yaml_attrs=["model"])


def read_spec(path: Path) -> ModelSpec:
    """The portable model description stored in a checkpoint's context (no objects are built)."""
    import fiddle as fdl
    from nemo.lightning.io.api import load_context

    path = Path(path)
    try:
        cfg = load_context(path / "context", subpath="model.config", build=False)
    except Exception as e:
        raise UserError(f"{path}: cannot read context/io.json ({e.__class__.__name__}: {e})") from None
    args = {k: v for k, v in fdl.ordered_arguments(cfg).items() if k not in RUNTIME_FIELDS}
    return ModelSpec(fdl.get_callable(cfg).__name__, args)


def tokenizer_dir(path: Path):
    """The Hugging Face tokenizer directory stored in a checkpoint's context, or None."""
    d = Path(path) / "context" / "nemo_tokenizer"
    return d if d.is_dir() else None


# --------------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------------
def save(path: Path, model, spec: ModelSpec, tokenizer_dir=None, overwrite: bool = False, extra=None,
         drop_extra_state: bool = False) -> Path:
    """Write a NeMo 2 checkpoint of ``model`` (this rank's chunk; every rank calls it).

    ``extra(tmp_dir)`` runs on rank 0 before the rename, so reports written beside the weights are part of
    the same atomic step. ``drop_extra_state`` writes every ``_extra_state`` (TE's FP8 scaling state) as
    ``None``, as the local spec does.
    """
    from megatron.core import dist_checkpointing

    path = Path(path).absolute()
    tmp = path.with_name(path.name + ".partial")
    if parallel.is_rank0():
        check_output(path, overwrite)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "weights").mkdir(parents=True)
    parallel.barrier()
    sharded = {"state_dict": {}, "sharded_state_dict": model.sharded_state_dict(prefix="module.", metadata=CONTENT_METADATA)}
    if drop_extra_state:
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        for name, v in sharded["sharded_state_dict"].items():
            if isinstance(v, ShardedObject) and name.endswith("_extra_state"):
                v.data = None
    dist_checkpointing.save(sharded, str(tmp / "weights"), content_metadata=CONTENT_METADATA)
    parallel.barrier()
    if parallel.is_rank0():
        try:
            write_context(tmp, spec, tokenizer_dir)
            (tmp / "weights" / "nemo_minitron.json").write_text(json.dumps({"complete": True}))
            if extra is not None:
                extra(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # never leave a partial checkpoint behind
            raise
        publish(tmp, path)
    parallel.barrier()
    return path


def checkpoint_keys(path: Path) -> set:
    """The tensor/object keys stored in a checkpoint's weights (from its metadata, no data read)."""
    with open(Path(path) / "weights" / ".metadata", "rb") as fh:
        meta = pickle.load(fh)
    return set(getattr(meta, "state_dict_metadata", {}).keys())


def load_weights(path: Path, model, strict: bool = True) -> dict:
    """Load ``path/weights`` into this rank's model chunk (any TP/PP layout, written with either layer spec).

    Returns what was read, by the chunk's state-dict names (``_extra_state`` objects included)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    # megatron writes the same keys for both layer specs (the local spec maps input_layernorm /
    # pre_mlp_layernorm to TE's fused linear_qkv.layer_norm_weight / linear_fc1.layer_norm_weight), and
    # TE's FP8 _extra_state lands in the local layers' extra state, which they ignore
    sharded = {"state_dict": model.sharded_state_dict(prefix="module.", metadata=CONTENT_METADATA)}
    loaded = dist_checkpointing.load(
        sharded, str(Path(path) / "weights"),
        strict=StrictHandling.RAISE_ALL if strict else StrictHandling.LOG_ALL,
    )
    state = {k.removeprefix("module."): v for k, v in loaded["state_dict"].items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if strict and missing:
        raise UserError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return state
