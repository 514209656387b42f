"""Command configs: ``conf/<command>.yaml`` + ``key=value`` overrides, validated before any work.

Overrides follow Hydra's syntax: ``a.b=value`` sets an existing key (an unknown key is an error),
``+a.b=value`` adds a new one, ``~a.b`` removes one. Values are parsed as YAML (``true``, ``null``,
``[1,2]``, ``1e-4``), anything else stays a string.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from nemo_minitron.errors import UserError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# The parallel layout has one spelling in every command, NeMo 2's (``nl.MegatronStrategy``'s arguments under
# ``trainer.strategy``); the NeMo 1 / Megatron-Bridge spelling under ``model.`` is read as an alias, with a notice.
LAYOUT_KEYS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "sequence_parallel",
               "expert_model_parallel_size")
LAYOUT_ALIASES = {f"model.{k}": f"trainer.strategy.{k}" for k in LAYOUT_KEYS}
_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)$")


def conf_path(command: str) -> Path:
    return CONF_DIR / f"{command}.yaml"


def parse_value(text: str):
    if _FLOAT.match(text):
        return float(text)
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def load(command: str, overrides: list[str]) -> DictConfig:
    path = conf_path(command)
    if not path.is_file():
        raise UserError(f"no config for command {command!r} ({path})")
    cfg = OmegaConf.load(path)
    OmegaConf.set_struct(cfg, True)
    recipes = [o.split("=", 1)[1] for o in overrides if o.startswith("recipe=")]
    overrides = [o for o in overrides if not o.startswith("recipe=")]
    for name in recipes:  # conf/recipes/NAME.yaml: a partial config of this command, applied first
        rpath = conf_path(command).parent / "recipes" / f"{name}.yaml"
        if not rpath.is_file():
            avail = sorted(p.stem for p in rpath.parent.glob("*.yaml"))
            raise UserError(f"no recipe {name!r} ({rpath}); available: {', '.join(avail) or 'none'}")
        recipe = OmegaConf.load(rpath)
        if recipe.pop("command", command) != command:
            raise UserError(f"recipe {name!r} is for another command")
        _unalias_recipe(recipe, cfg, f"recipe {name!r}")
        try:
            cfg = OmegaConf.merge(cfg, recipe)
        except OmegaConfBaseException as e:
            raise UserError(f"recipe {name!r}: {e.msg}") from None
    for item in overrides:
        if item.startswith("~"):
            key = item[1:]
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            if node is None or leaf not in node:
                raise UserError(f"cannot remove unknown config key {key!r}")
            with _open(node):
                del node[leaf]
            continue
        if "=" not in item:
            raise UserError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        add = key.startswith("+")
        key = key.lstrip("+")
        if not key:
            raise UserError(f"override {item!r} has an empty key")
        key = _unalias(key, cfg)
        if not add and not _has_key(cfg, key):
            raise UserError(f"unknown config key {key!r} for command {command!r} "
                            f"(see nemo-minitron {command} --help; prefix with + to add a key)")
        new = parse_value(value)
        if not add:
            old = OmegaConf.select(cfg, key, throw_on_missing=False)
            parent, _, leaf = key.rpartition(".")
            required = OmegaConf.is_missing(OmegaConf.select(cfg, parent) if parent else cfg, leaf)
            if (isinstance(old, str) or required) and not isinstance(new, (list, dict)) and new is not None:
                new = value  # paths and names stay strings ("2024", "1e-3_run")
            _check_type(key, old, new)
        try:
            if add:
                with _open(cfg):
                    OmegaConf.update(cfg, key, new, force_add=True)
            else:
                OmegaConf.update(cfg, key, new, merge=True)
        except (ConfigAttributeError, ConfigKeyError) as e:
            raise UserError(f"unknown config key {key!r} for command {command!r}: {e.msg}") from None
        except OmegaConfBaseException as e:
            raise UserError(f"bad value for {key!r}: {e.msg}") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(f"missing required config value(s): {', '.join(missing)} (e.g. {missing[0]}=...)")
    return cfg


# each command's output key and the keys naming what it reads: an output inside an input would write into it
# (or, with overwrite=true, an input inside the output would be deleted with it)
OUTPUTS = {"import": ("output", ("source",)), "export": ("output", ("model",)), "convert": ("output", ("model",)),
           "prune": ("output", ("model",)), "distill": ("output", ("teacher", "student")),
           "finetune": ("output", ("model",)), "search": ("output", ("model",)), "pipeline": ("run_dir", ("teacher",))}


def check_output_paths(command: str, cfg: DictConfig) -> None:
    """Refuse an output that is an input, lies inside one, or (with overwrite=true) holds one."""
    if command not in OUTPUTS:
        return
    out_key, in_keys = OUTPUTS[command]
    out = Path(str(cfg[out_key])).expanduser().absolute()
    for key in in_keys:
        value = str(cfg[key])
        src = Path(value).expanduser()
        if not (src.is_file() or any((src / n).exists() for n in ("config.json", "context", "student", "model"))):
            continue  # a name (smollm2-135m), a missing path or not a model: the command's own check says so
        src = src.resolve()
        o = out.resolve() if out.exists() else out.parent.resolve() / out.name
        if o == src or src in o.parents:
            raise UserError(f"{out_key}={cfg[out_key]} is inside {key}={value}: the output must not be written into "
                            "what the command reads")
        if cfg.get("overwrite") and o in src.parents:
            raise UserError(f"{key}={value} is inside {out_key}={cfg[out_key]}, which overwrite=true would delete")


def _unalias(key: str, cfg: DictConfig, where: str = "") -> str:
    """``model.tensor_model_parallel_size`` -> ``trainer.strategy.tensor_model_parallel_size`` (one notice)."""
    canonical = LAYOUT_ALIASES.get(key)
    if canonical is None or _has_key(cfg, key) or not _has_key(cfg, canonical):
        return key
    if os.environ.get("RANK", "0") == "0":
        print(f"note: {where + ': ' if where else ''}{key} is read as {canonical} (the layout's spelling in every "
              f"command)", file=sys.stderr, flush=True)
    return canonical


def _unalias_recipe(recipe: DictConfig, cfg: DictConfig, where: str) -> None:
    """A recipe's ``model.<layout key>`` moved to ``trainer.strategy`` before it is merged."""
    model = recipe.get("model")
    if not isinstance(model, DictConfig):
        return
    for leaf in LAYOUT_KEYS:
        if leaf in model:
            key = _unalias(f"model.{leaf}", cfg, where)
            if key != f"model.{leaf}":
                OmegaConf.update(recipe, key, model.pop(leaf), force_add=True)


def _check_type(key: str, old, new) -> None:
    """An override keeps the type of the default (ints may become floats; null defaults take anything)."""
    if old is None or new is None:
        return
    if isinstance(old, DictConfig) or isinstance(new, dict):
        if not (isinstance(old, DictConfig) and isinstance(new, dict)):
            raise UserError(f"{key} is a config group; set its fields ({key}.FIELD=...)")
        return
    if isinstance(old, bool) or isinstance(new, bool):
        ok = isinstance(old, bool) and isinstance(new, bool)
    elif isinstance(old, (int, float)):
        ok = isinstance(new, (int, float)) and (isinstance(old, float) or isinstance(new, int))
    elif isinstance(old, str):
        return
    else:
        ok = type(old) is type(new) or not isinstance(new, (int, float, bool, str))
    if not ok:
        raise UserError(f"{key}={new!r} has the wrong type: expected {type(old).__name__} like the default {old!r}")


def _has_key(cfg: DictConfig, key: str) -> bool:
    node = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in list(node.keys()):
            return False
        node = node._get_node(part)
    return True


class _open:
    """Temporarily lift struct mode on a node."""

    def __init__(self, node):
        self.node = node

    def __enter__(self):
        OmegaConf.set_struct(self.node, False)

    def __exit__(self, *exc):
        OmegaConf.set_struct(self.node, True)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def header(command: str) -> str:
    """The comment block at the top of ``conf/<command>.yaml`` (the command's description)."""
    lines = []
    for line in conf_path(command).read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip() if line.startswith("# ") else line[1:])
    return "\n".join(lines)
