"""NeMo 2 checkpoints, written and read without NeMo's trainer.

Layout (what NeMo 2.7.3's ``ModelCheckpoint``/``import_ckpt`` write, and what NeMo loads):

    CKPT/context/io.json, model.yaml   the serialized ``TrainerContext`` (NeMo config class + arguments,
             nemo_tokenizer/           tokenizer artifacts)
    CKPT/weights/                      megatron ``dist_checkpointing`` of ``model.sharded_state_dict(prefix="module.")``

Only portable model arguments are written: platform settings (fusions forced off on CPU, fp32) and the
parallel layout are not, so a checkpoint written on CPU at TP=1 loads on an H100 cluster at TP=8, and back.

Writes are atomic: everything goes to ``CKPT.partial`` and is renamed into place only after every rank
finished, so an interrupted run never leaves a directory at ``CKPT`` that looks complete (and a leftover
``*.partial`` is never taken for a checkpoint; the next write replaces it). A failed write (disk full, quota,
file size limit) removes the partial output and is refused with one line naming the path and the OS error
(:func:`writing`, shared by export, import, ``.nemo`` archives and convert).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import tempfile
from contextlib import contextmanager
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


PARTIAL = ".partial"
_PARTIAL_NAME = re.compile(r"\.partial(-old)?$")


def staging(path: Path) -> Path:
    """Where ``path`` is written until it is complete: ``PATH.partial``, in the same directory (one rename)."""
    path = Path(path)
    return path.with_name(path.name + PARTIAL)


def is_partial(path: Path) -> bool:
    """A name this project writes to or moves aside before a rename (``*.partial``, ``*.partial-old``): never a
    complete output, whatever it holds."""
    return bool(_PARTIAL_NAME.search(Path(path).name))


def remove(path: Path) -> None:
    """Remove a file, link or directory tree if it is there."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink(missing_ok=True)


def publish(tmp: Path, path: Path) -> None:
    """Move a completely written ``tmp`` (directory or file) to ``path``, replacing what was there.

    A kill at any moment leaves the previous ``path`` or the new one, never a half-removed one: a directory
    being replaced is first renamed aside to ``PATH.partial-old`` (so between the two renames there is no
    ``path`` at all) and removed after the new one is in place."""
    tmp, path = Path(tmp), Path(path)
    old = path.with_name(path.name + PARTIAL + "-old")
    remove(old)
    if os.path.lexists(path) and (path.is_dir() or tmp.is_dir()):
        path.rename(old)
        try:
            tmp.rename(path)
        except BaseException:
            old.rename(path)  # the previous one back in place
            raise
        remove(old)
    else:
        os.replace(tmp, path)  # atomic for a file


# --------------------------------------------------------------------------------------------------
# write errors
# --------------------------------------------------------------------------------------------------
_ERRNO_IN_TEXT = re.compile(r"\[Errno (\d+)\]|os error (\d+)")
_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)
_WRITE_ERRNOS = (*_SPACE_ERRNOS, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG, errno.ENOTDIR,
                 errno.EISDIR, errno.ENOENT)


def _causes(e: BaseException):
    """``e`` and the exceptions behind it: causes, contexts, and the per-rank failures of
    torch.distributed.checkpoint's ``CheckpointException`` ({rank: (exception, traceback)})."""
    todo, seen = [e], set()
    while todo:
        x = todo.pop(0)
        if not isinstance(x, BaseException) or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        todo += [x.__cause__, x.__context__]
        failures = getattr(x, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) and f else f for f in failures.values()]


def os_error(e: BaseException) -> OSError | None:
    """The OS error behind ``e``: an ``OSError`` itself or in its chain, or the errno a library kept only in
    its message (safetensors: ``I/O error: File too large (os error 27)``; a worker's ``[Errno 28] ...``)."""
    for x in _causes(e):
        if isinstance(x, OSError) and x.errno:
            return x
        m = _ERRNO_IN_TEXT.search(str(x))
        if m:
            n = int(m.group(1) or m.group(2))
            return OSError(n, os.strerror(n))
    return None


def _diagnose(tmp: Path) -> OSError | None:
    """Why writing ``tmp`` failed when the library's error lost the errno (torch's serializer says only
    ``unexpected pos 704 vs 598``): a file there at this process's file size limit (EFBIG), or a small probe
    write beside it that fails now (disk full, quota), while the partial output still holds its space."""
    import resource

    files = [tmp] if tmp.is_file() else [f for f in tmp.rglob("*") if f.is_file()] if tmp.is_dir() else []
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY and any(f.stat().st_size >= soft for f in files):
        return OSError(errno.EFBIG, os.strerror(errno.EFBIG))
    probe = tmp / f".write-probe-{os.getpid()}" if tmp.is_dir() else tmp.with_name(tmp.name + ".probe")
    try:
        with open(probe, "wb") as fh:
            for _ in range(16):  # 1 MiB
                fh.write(bytes(1 << 16))
                fh.flush()
    except OSError as e:
        if e.errno in _SPACE_ERRNOS:
            return OSError(e.errno, os.strerror(e.errno))
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
    return None


def write_error(e: BaseException) -> OSError | None:
    """The file-system error behind ``e`` (disk full, quota, file size limit, permissions...), or None when
    ``e`` is something else (a worker's lost connection is not a write error)."""
    err = os_error(e)
    return err if err is not None and err.errno in _WRITE_ERRNOS else None


@contextmanager
def writing(output: Path, tmp: Path, owner: bool = True):
    """The writing phase of ``output``, staged at ``tmp``.

    Any exception (Ctrl-C included) removes ``tmp`` (``owner``: the rank that removes it; the others only
    report). A failed write -- disk full, quota, file size limit, no permission, also when safetensors,
    torch, megatron or tarfile wrapped the OS error -- becomes one line ``cannot write OUTPUT: <OS error>``
    (a UserError: the CLI prints it and exits 2); anything else propagates unchanged. A SIGKILL leaves
    ``tmp``, which nothing takes for a complete output and the next write replaces."""
    try:
        yield
    except UserError:
        if owner:
            remove(tmp)
        raise
    except BaseException as e:
        err = None
        # (torch.distributed.checkpoint's CheckpointException is a BaseException, not an Exception)
        if not isinstance(e, (KeyboardInterrupt, SystemExit)):
            err = os_error(e)
            if err is None and os.path.lexists(tmp):
                try:
                    err = _diagnose(Path(tmp))
                except OSError:  # another rank removed it meanwhile
                    err = None
        if owner:
            remove(tmp)
        if err is not None and err.errno in _WRITE_ERRNOS:  # os_error() or _diagnose(): see write_error()
            raise UserError(f"cannot write {output}: {err.strerror or err}") from None
        raise  # not a write error (e.g. a worker's lost connection): the original error, with its traceback


def is_checkpoint(path: Path) -> bool:
    path = Path(path)
    return (not is_partial(path) and (path / "context" / "io.json").is_file()
            and (path / "weights").is_dir())


def validate(path: Path, staged: bool = False) -> None:
    """Clear errors for a missing, incomplete or corrupt checkpoint, before any model is built.

    ``staged``: ``path`` is this process's own ``*.partial`` write, checked before it is published."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    if is_partial(path) and not staged:
        raise UserError(f"{path} is an unfinished write (a run was interrupted); use the output it was "
                        f"written for, {path.with_name(_PARTIAL_NAME.sub('', path.name))}, once complete")
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
    """Serialize NeMo's ``TrainerContext`` (the family's model class, e.g. ``LlamaModel`` or ``Qwen2Model``, + config
    + tokenizer) to ``path/context``."""
    import fiddle as fdl
    from nemo.lightning import Trainer
    from nemo.lightning.io.pl import TrainerContext

    from nemo_minitron.model.build import instantiate

    from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer

    config = instantiate(spec)  # platform-valid object; its io is replaced by the portable arguments
    with tempfile.TemporaryDirectory() as work:
        tokenizer = None
        if tokenizer_dir is not None:
            tokenizer = AutoTokenizer(str(_stage_tokenizer(tokenizer_dir, work)), use_fast=True)
        model = spec.model_cls()(config, tokenizer=tokenizer)
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

    from nemo_minitron.checkpoint import write_queue
    from nemo_minitron.faults import pause_point

    write_queue.install()
    path = Path(path).absolute()
    tmp = staging(path)
    rank0 = parallel.is_rank0()
    if rank0:
        check_output(path, overwrite)
    with writing(path, tmp, owner=rank0):  # a failed or interrupted write leaves no partial checkpoint
        if rank0:
            remove(tmp)  # a killed run's leftover
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
        if rank0:
            write_context(tmp, spec, tokenizer_dir)
            pause_point("nemo_save")  # test hook: weights and context written, not yet complete
            (tmp / "weights" / "nemo_minitron.json").write_text(json.dumps({"complete": True}))
            if extra is not None:
                extra(tmp)
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
    refit = _request_stored_vocab(path, sharded["state_dict"])
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        loaded = dist_checkpointing.load(
            sharded, str(Path(path) / "weights"),
            strict=StrictHandling.RAISE_ALL if strict else StrictHandling.LOG_ALL,
        )
    except (CheckpointingException, CheckpointException) as e:  # the weights do not fit the model they describe
        detail = str(e).strip().splitlines()[-1][:300]
        raise UserError(f"{path}: its weights do not load into the model its config describes ({detail})") from None
    state = {k.removeprefix("module."): v for k, v in loaded["state_dict"].items()}
    if refit:
        from megatron.core import parallel_state

        from nemo_minitron.model.shards import fit_rows, to_shard

        tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
        for k, rows in refit.items():
            k = k.removeprefix("module.")
            state[k] = to_shard(k, fit_rows(state[k], rows), rank, tp)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if strict and missing:
        raise UserError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return state


def _request_stored_vocab(path: Path, request: dict) -> dict:
    """Where the checkpoint's vocabulary rows (padded for the layout it was written at) differ from the rows
    this layout builds, ask for the whole stored tensor instead of this rank's shard (it is cut or padded and
    sharded after loading). Changes ``request`` in place; returns {key: rows this layout builds}."""
    import torch
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from nemo_minitron.model.shards import is_vocab

    from megatron.core import parallel_state

    wanted = {k: v for k, v in request.items() if isinstance(v, ShardedTensor) and is_vocab(k)}
    if not wanted:
        return {}
    tp, tp_rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    with open(Path(path) / "weights" / ".metadata", "rb") as fh:
        meta = pickle.load(fh).state_dict_metadata
    refit = {}
    for k, sh in wanted.items():
        size = getattr(meta.get(sh.key), "size", None)
        if size is None or tuple(size)[1:] != tuple(sh.global_shape)[1:] or size[0] == sh.global_shape[0]:
            continue  # the same padding (or a mismatch the loader reports)
        buf = torch.empty(tuple(size), dtype=sh.data.dtype, device=sh.data.device)
        # every TP rank now reads the whole tensor: one main replica (all-zero id) per copy, as megatron checks
        rid = sh.replica_id if isinstance(sh.replica_id, tuple) else (sh.replica_id,)
        rid = (*rid[:-1], rid[-1] * tp + tp_rank)
        request[k] = ShardedTensor.from_rank_offsets(sh.key, buf, replica_id=rid)
        refit[k] = sh.global_shape[0]
    return refit


def check_tensors(path: Path, spec: ModelSpec) -> None:
    """Refuse a checkpoint that lacks a tensor its model needs (or holds fewer layers than its config says),
    from the metadata alone: a model built from it would otherwise keep some weights at their initial values
    (Megatron-Bridge #1422) or fail deep inside megatron's loader."""
    with open(Path(path) / "weights" / ".metadata", "rb") as fh:
        meta = pickle.load(fh).state_dict_metadata
    shapes = _expected_shapes(spec)
    need = {k: spec.num_layers if k.startswith("module.decoder.layers.") else None for k in shapes}
    missing = [k for k in need if k not in meta]
    if missing:
        raise UserError(f"{path}: checkpoint lacks {len(missing)} of the model's tensors "
                        f"({', '.join(k.removeprefix('module.') for k in missing[:3])}{', ...' if len(missing) > 3 else ''})")
    for k, layers in need.items():
        size = getattr(meta[k], "size", None)
        if layers is not None and size is not None and size[0] != layers:
            raise UserError(f"{path}: checkpoint holds {size[0]} layers of {k.removeprefix('module.')}, "
                            f"its config says num_layers={layers}")
    for k, shape in shapes.items():
        size = getattr(meta[k], "size", None)
        if size is None:
            continue
        got = tuple(size)
        vocab = k.endswith(("word_embeddings.weight", "output_layer.weight"))
        if len(got) != len(shape) or any(g != s for g, s in zip(got, shape) if s is not None) \
                or (vocab and got[0] < spec.vocab_size):
            want = "x".join("V" if s is None else str(s) for s in shape)
            raise UserError(f"{path}: tensor {k.removeprefix('module.')} has shape {'x'.join(map(str, got))} but its "
                            f"config implies {want}: the weights and context/ are from different models")
    extra = sorted(k for k in meta if k.startswith("module.output_layer")) if spec.tied else []
    if extra:
        raise UserError(f"{path}: checkpoint holds {extra[0].removeprefix('module.')} but its config ties the output "
                        "layer to the embedding (share_embeddings_and_output_weights): weights and config disagree")


def _expected_shapes(spec: ModelSpec) -> dict:
    """Global shapes megatron stores for ``spec`` (layers stacked in the first dimension; the vocabulary, padded
    for the layout it was written at, as None)."""
    h, f, L = spec.hidden_size, spec.ffn_hidden_size, spec.num_layers
    heads, groups, d = spec.num_attention_heads, spec.num_query_groups, spec.kv_channels
    gated = spec.get("gated_linear_unit", True)
    lay = "module.decoder.layers."
    shapes = {"module.embedding.word_embeddings.weight": (None, h), "module.decoder.final_layernorm.weight": (h,),
              lay + "self_attention.linear_qkv.weight": (L, (heads + 2 * groups) * d, h),
              lay + "self_attention.linear_qkv.layer_norm_weight": (L, h),
              lay + "self_attention.linear_proj.weight": (L, h, heads * d),
              lay + "mlp.linear_fc1.weight": (L, (2 if gated else 1) * f, h),
              lay + "mlp.linear_fc1.layer_norm_weight": (L, h),
              lay + "mlp.linear_fc2.weight": (L, h, f)}
    if spec.moe:  # experts stacked after the layers: [layers, experts, ...] (SequentialMLP and TE's grouped GEMM)
        f, E = spec.moe_ffn_hidden_size, spec.num_moe_experts
        # the pre-MLP norm: the local spec stores it under TE's fused name (mlp.linear_fc1.layer_norm_weight),
        # the TE spec (whose MoE layer has no fused linear to put it in) as pre_mlp_layernorm.weight: either
        for k in ("mlp.linear_fc1.weight", "mlp.linear_fc2.weight", "mlp.linear_fc1.layer_norm_weight"):
            del shapes[lay + k]
        shapes.update({lay + "mlp.router.weight": (L, E, h),
                       lay + "mlp.experts.experts.linear_fc1.weight": (L, E, (2 if gated else 1) * f, h),
                       lay + "mlp.experts.experts.linear_fc2.weight": (L, E, h, f)})
    if spec.qkv_bias:
        shapes[lay + "self_attention.linear_qkv.bias"] = (L, (heads + 2 * groups) * d)
    if spec.qk_norm:
        shapes[lay + "self_attention.q_layernorm.weight"] = (L, d)
        shapes[lay + "self_attention.k_layernorm.weight"] = (L, d)
    if not spec.tied:
        shapes["module.output_layer.weight"] = (None, h)
    return shapes

