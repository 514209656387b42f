"""Calibration statistics gathered once, and any candidate's least-squares refit solved from them.

Every candidate of an architecture search prunes the same source model on the same calibration tokens, so
what its refit needs can be measured once (:func:`collect`, in the same forward pass as the importance
scores): for every layer, the Gram matrix ``G = sum a a^T`` of each linear layer's input that can lose
channels, in the source model:

    site   layer                          input a (its channels)               lost with
    qkv    self_attention.linear_qkv      normalized residual stream (hidden)  hidden_size
    fc1    mlp.linear_fc1                 normalized residual stream (hidden)  hidden_size
    proj   self_attention.linear_proj     attention output (heads x head_dim)  num_attention_heads / groups
    fc2    mlp.linear_fc2                 MLP activation (ffn)                 ffn_hidden_size

A candidate's refit of a layer is then the closed-form solve of :func:`~nemo_minitron.prune.reconstruct.
refit_from_rows` on the kept rows ``G[kept]`` (:func:`one_shot`): no calibration forward pass per candidate.
Unlike the sequential refit (``prune.reconstruction=least_squares``), each layer is fitted to the source
model's activations, not to those of the already-refitted layers before it; the search keeps the
sequential refit for its finalists' checkpoints.

Layout. Each TP rank keeps the rows of every matrix for its chunk of the input channels (``G[rows_r, :]``,
``n/TP x n``: for ``linear_proj`` / ``linear_fc2`` exactly the input channels of its weight shard); with data
parallelism the sums are all-reduced over DP; each pipeline stage holds its own layers. A solve gathers the
kept rows over TP. On disk (``DIR/stats/``): one file per layer per (TP, PP) rank, and ``meta.json`` written
last (the completion marker and what the statistics were measured on). When a rank's share does not fit
``max_bytes`` it stays on disk and each layer is read when a candidate needs it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from nemo_minitron import parallel, platform
from nemo_minitron.errors import UserError
from nemo_minitron.model import build
from nemo_minitron.model.shards import layer_offset, transform_into
from nemo_minitron.model.spec import ModelSpec
from nemo_minitron.prune.plan import WidthPlan
from nemo_minitron.prune.reconstruct import kept_head_columns, refit_from_rows
from nemo_minitron.prune.trim import new_spec, trim

SITES = {"qkv": "self_attention.linear_qkv", "fc1": "mlp.linear_fc1", "proj": "self_attention.linear_proj",
         "fc2": "mlp.linear_fc2"}
ROW_PARALLEL = ("proj", "fc2")  # the input's channels are split over TP like the weight's columns
SITES_OF_DIM = {"hidden_size": ("qkv", "fc1"), "ffn_hidden_size": ("fc2",), "num_attention_heads": ("proj",),
                "num_query_groups": ("proj",)}
_SITE_OF_WEIGHT = {f"{module}.weight": site for site, module in SITES.items()}
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def sites_for(dims) -> tuple:
    """The sites whose inputs lose channels when the given width dimensions are pruned."""
    return tuple(s for s in SITES if any(s in SITES_OF_DIM.get(d, ()) for d in dims))


def input_size(spec: ModelSpec, site: str) -> int:
    return {"qkv": spec.hidden_size, "fc1": spec.hidden_size, "proj": spec.num_attention_heads * spec.kv_channels,
            "fc2": spec.ffn_hidden_size}[site]


def bytes_per_rank(spec: ModelSpec, sites, tp: int = 1, pp: int = 1) -> int:
    """Float64 bytes of one (TP, PP) rank's statistics: its rows of every matrix of its stage's layers."""
    per_layer = sum(input_size(spec, s) ** 2 // tp for s in sites) * 8
    return per_layer * (spec.num_layers // pp)


def _rms_norm(x, weight, eps):
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


class _RowGram:
    """Forward pre-hook accumulating this TP rank's rows of the Gram matrix of a linear layer's input."""

    def __init__(self, module, site: str, eps: float):
        from megatron.core import parallel_state as ps

        self.site, self.eps, self.G = site, eps, None
        self.tp = ps.get_tensor_model_parallel_world_size()
        self.rank = ps.get_tensor_model_parallel_rank()
        self.group = ps.get_tensor_model_parallel_group()
        self.sp = site not in ROW_PARALLEL and bool(getattr(module, "sequence_parallel", False))
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        x = args[0].detach()
        if hasattr(module, "layer_norm_weight"):  # Transformer Engine: the norm is fused into the linear
            x = _rms_norm(x, module.layer_norm_weight, self.eps)
        x = x.reshape(-1, x.shape[-1]).float()
        if self.tp == 1:
            own, full = x, x
        elif self.site in ROW_PARALLEL:  # this rank holds its channels of every token: gather the channels
            parts = [torch.empty_like(x) for _ in range(self.tp)]
            dist.all_gather(parts, x.contiguous(), group=self.group)
            own, full = x, torch.cat(parts, dim=1)
        else:  # every channel of this rank's tokens (a slice of the sequence with sequence parallelism)
            if self.sp:
                parts = [torch.empty_like(x) for _ in range(self.tp)]
                dist.all_gather(parts, x.contiguous(), group=self.group)
                x = torch.cat(parts, dim=0)
            own, full = x.chunk(self.tp, dim=1)[self.rank], x
        g = (own.T @ full).double()
        self.G = g if self.G is None else self.G.add_(g)

    def result(self) -> torch.Tensor:
        self.handle.remove()
        return parallel.data_parallel_all_reduce(self.G)  # DP > 1: each DP rank saw its share of the windows


@dataclass
class Stats:
    """This rank's calibration statistics: {(global layer, site): G[rows of this TP rank, :]} in float64, held
    in memory or read per layer from ``path``."""

    sites: tuple
    meta: dict
    grams: dict = field(default_factory=dict)
    path: Path | None = None
    _loaded: tuple = (None, None)  # (layer, {site: tensor}) most recently read from disk

    def _layer(self, layer: int) -> dict:
        if self.grams:
            return {s: self.grams[(layer, s)] for s in self.sites if (layer, s) in self.grams}
        if self._loaded[0] != layer:
            f = _rank_dir(self.path) / f"layer{layer:04d}.pt"
            self._loaded = (layer, torch.load(f, map_location=platform.device(), weights_only=True))
        return self._loaded[1]

    def rows(self, layer: int, site: str, kept: torch.Tensor) -> torch.Tensor:
        """``G[kept, :]`` of ``site`` in ``layer`` (global index), gathered over TP (every TP rank calls it)."""
        from megatron.core import parallel_state as ps

        own = self._layer(layer)[site]
        tp = ps.get_tensor_model_parallel_world_size()
        if tp > 1:
            parts = [torch.empty_like(own) for _ in range(tp)]
            dist.all_gather(parts, own.contiguous(), group=ps.get_tensor_model_parallel_group())
            own = torch.cat(parts, dim=0)
        return own[kept.to(own.device)]

    def save(self, path: Path) -> None:
        """The first DP rank of each (TP, PP) position writes its layers' files (the DP ranks hold the same sums);
        rank 0 writes meta.json after all have (the completion mark)."""
        from megatron.core import parallel_state as ps

        path = Path(path)
        if ps.get_data_parallel_rank() == 0:
            d = _rank_dir(path)
            d.mkdir(parents=True, exist_ok=True)
            for layer in sorted({layer for layer, _ in self.grams}):
                tmp = d / f"layer{layer:04d}.pt.partial"
                torch.save(parallel.to_host(self._layer(layer)), tmp)
                tmp.replace(d / f"layer{layer:04d}.pt")
        parallel.barrier()
        if parallel.is_rank0():
            (path / "meta.json.partial").write_text(json.dumps(self.meta, indent=2))
            (path / "meta.json.partial").replace(path / "meta.json")
        parallel.barrier()
        self.path = path


def _rank_dir(path: Path) -> Path:
    from megatron.core import parallel_state as ps

    return Path(path) / (f"tp{ps.get_tensor_model_parallel_rank()}-pp{ps.get_pipeline_model_parallel_rank()}")


def collect(model, windows, micro_batch_size: int, sites, meta: dict, progress: bool = True,
            **importance) -> tuple[dict, Stats]:
    """(importance scores, statistics) from one calibration pass over ``windows``: the importance hooks of
    :func:`~nemo_minitron.prune.width.calibrate` and a Gram hook on each site of every layer of this stage.
    ``meta``: what they were measured on (saved with them, checked by :func:`load`)."""
    from nemo_minitron.prune.width import calibrate

    off = layer_offset(model)
    eps = model.config.layernorm_epsilon
    hooks = {(off + j, s): _RowGram(layer.get_submodule(SITES[s]), s, eps)
             for j, layer in enumerate(model.decoder.layers) for s in sites}
    try:
        scores = calibrate(model, windows, micro_batch_size, progress=progress, **importance)
    finally:
        for h in hooks.values():
            h.handle.remove()
    grams = {k: h.result() for k, h in hooks.items()}
    return scores, Stats(tuple(sites), {**meta, "sites": list(sites)}, grams)


def load(path: Path, meta: dict, sites, max_bytes: int, what: str = "search.stats") -> Stats:
    """Statistics a run saved in ``path``: refused in one line when they were measured on another model, data
    or layout (``meta``, compared key by key) or hold fewer ``sites``. Held in memory when this rank's share
    fits ``max_bytes``, else read per layer when needed."""
    path = Path(path)
    f = path / "meta.json"
    if not f.is_file():
        raise UserError(f"{what}={path}: no complete calibration statistics there (meta.json is written last)")
    saved = json.loads(f.read_text())
    if not set(sites) <= set(saved.get("sites", ())):
        raise UserError(f"{what}={path}: holds statistics of {saved.get('sites')}, this search needs {list(sites)}")
    for key, want in meta.items():
        if saved.get(key) != want:
            raise UserError(f"{what}={path}: measured with {key}={saved.get(key)!r}, this search has {want!r}")
    stats = Stats(tuple(sites), saved, path=path)
    if saved.get("bytes_per_rank", 0) <= max_bytes:
        for f in sorted(_rank_dir(path).glob("layer*.pt")):
            layer = int(f.stem[len("layer"):])
            for s, t in torch.load(f, map_location=platform.device(), weights_only=True).items():
                if s in stats.sites:
                    stats.grams[(layer, s)] = t
    return stats


def kept_inputs(plan: WidthPlan, spec: ModelSpec, layer: int, site: str):
    """The kept input channels of ``site`` in ``layer`` under ``plan`` (None when the site loses none)."""
    if site in ("qkv", "fc1"):
        return plan.hidden
    if site == "fc2":
        return None if plan.ffn is None else plan.ffn[layer]
    return None if plan.groups is None else kept_head_columns(plan, spec, layer)


def one_shot(model, spec: ModelSpec, plan: WidthPlan, stats: Stats, damping: float, tp: int = 1, pp: int = 1,
             layers=None):
    """(pruned model chunk, pruned spec): :func:`~nemo_minitron.prune.width.prune_model` with the layers that
    lose input channels refitted from ``stats`` (the source model's Gram matrices), one tensor at a time, no
    forward pass. ``layers``: the global layers to refit (the others are trimmed only: a depth-pruned
    candidate drops them next)."""

    def transform(name, full):
        m = _LAYER.match(name)
        site = _SITE_OF_WEIGHT.get(m.group(2)) if m else None
        if site is not None and site in stats.sites and (layers is None or int(m.group(1)) in layers):
            layer = int(m.group(1))
            kept = kept_inputs(plan, spec, layer, site)
            if kept is not None and len(kept) < full.shape[1]:
                W = full.double()
                new = torch.zeros_like(W)
                new[:, kept.to(W.device)] = refit_from_rows(W, stats.rows(layer, site, kept), kept, damping)
                full = new.to(full.dtype)
        return trim({name: full}, spec, plan)[name]

    spec2 = new_spec(spec, plan.targets)
    pruned = build(spec2, tp, pp, initialize=False)
    transform_into(model, pruned, transform)
    pruned.eval()
    return pruned, spec2
