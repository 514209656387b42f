"""Single-file ``.nemo`` archives of NeMo 2 checkpoints.

A ``.nemo`` file is what NeMo's ``SaveRestoreConnector`` reads: an uncompressed tar. Ours holds the NeMo 2
checkpoint directory as its root (``context/`` with the serialized model config and tokenizer,
``weights/`` with the megatron dist-checkpoint) plus ``nemo_minitron_archive.json`` (file list with sizes).
NeMo unpacks it with ``SaveRestoreConnector._unpack_nemo_file`` and restores the model with
``nemo.lightning.io.load_context`` + dist-checkpoint loading; ``nemo-minitron import source=FILE.nemo``
does the same and writes an ordinary checkpoint directory.

Both directions write to ``TARGET.partial`` and rename when complete; a truncated or foreign archive is
refused with the reason before anything is written, and a failed write (disk full, quota, file size limit)
removes the partial output and is refused with one line naming the target and the OS error.
"""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
import time
from pathlib import Path

from tqdm import tqdm

from nemo_minitron.checkpoint import nemo
from nemo_minitron.errors import UserError
from nemo_minitron.faults import pause_point

MANIFEST = "nemo_minitron_archive.json"


def _files(ckpt: Path) -> list[Path]:
    return sorted(p for p in ckpt.rglob("*") if p.is_file() and p.relative_to(ckpt).parts[0] in ("context", "weights"))


def pack(ckpt: Path, output: Path, overwrite: bool = False) -> Path:
    """Write ``ckpt`` (a complete NeMo 2 checkpoint directory) as the single file ``output`` (.nemo)."""
    ckpt, output = Path(ckpt), Path(output)
    nemo.validate(ckpt)
    nemo.check_output(output, overwrite)
    if not output.parent.is_dir():
        raise UserError(f"output directory {output.parent} does not exist")
    files = _files(ckpt)
    manifest = {"format": "nemo2-checkpoint", "files": {str(f.relative_to(ckpt)): f.stat().st_size for f in files}}
    tmp = nemo.staging(output)
    total = sum(manifest["files"].values())
    with nemo.writing(output, tmp):  # a failed write: one line, no partial archive left
        nemo.remove(tmp)  # a killed run's leftover
        with tarfile.open(tmp, "w:") as tar, tqdm(total=total, unit="B", unit_scale=True, desc="packing .nemo",
                                                   disable=total < (64 << 20), mininterval=2) as bar:
            data = json.dumps(manifest, indent=1).encode()
            info = tarfile.TarInfo(MANIFEST)
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
            tar.addfile(info, io.BytesIO(data))
            for f in files:
                tar.add(f, arcname=str(f.relative_to(ckpt)))
                bar.update(f.stat().st_size)
                pause_point("archive_write")  # test hook: part of the archive written
        nemo.publish(tmp, output)
    return output


def check(path) -> dict:
    """A readable ``.nemo`` archive of a NeMo 2 checkpoint, complete as its manifest says (or one line why not)."""
    return _check_archive(Path(path))


def _check_archive(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file")
    if not tarfile.is_tarfile(path) and zipfile.is_zipfile(path):
        raise UserError(f"{path} is a zip archive, not a .nemo (tar) archive")
    try:
        with tarfile.open(path, "r:") as tar:
            members = {m.name: m for m in tar.getmembers()}
            if MANIFEST not in members:
                nemo1 = any(Path(n).name in ("model_config.yaml", "model_weights.ckpt") for n in members)
                raise UserError(f"{path} is not a nemo-minitron .nemo archive of a NeMo 2 checkpoint ({MANIFEST} "
                                f"missing{'; it holds a NeMo 1 model: convert it with NeMo first' if nemo1 else ''})")
            manifest = json.load(tar.extractfile(members[MANIFEST]))
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable .nemo (tar) archive: {e}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise UserError(f"{path}: its {MANIFEST} is not a nemo-minitron manifest")
    for name, size in manifest["files"].items():
        m = members.get(name)
        if m is None:
            raise UserError(f"{path} is incomplete: {name} is missing")
        if m.size != size:
            raise UserError(f"{path} is corrupt: {name} holds {m.size} bytes, expected {size}")
        if name.startswith("/") or ".." in Path(name).parts:
            raise UserError(f"{path} holds an unsafe member path {name!r}")
    return manifest


def unpack(archive: Path, output: Path, overwrite: bool = False) -> Path:
    """Extract a ``.nemo`` archive into a checkpoint directory ``output`` (validated before publishing)."""
    from nemo.core.connectors.save_restore_connector import SaveRestoreConnector

    archive, output = Path(archive), Path(output)
    _check_archive(archive)
    nemo.check_output(output, overwrite)
    tmp = nemo.staging(output)
    with nemo.writing(output, tmp):  # a failed write: one line, no partial checkpoint left
        nemo.remove(tmp)  # a killed run's leftover
        tmp.mkdir(parents=True)
        SaveRestoreConnector._unpack_nemo_file(str(archive), str(tmp))  # NeMo's own (safe) extraction
        (tmp / MANIFEST).unlink(missing_ok=True)
        nemo.validate(tmp, staged=True)
        nemo.publish(tmp, output)
    return output


def is_archive(source) -> bool:
    return str(source).endswith(".nemo") and Path(source).is_file()
