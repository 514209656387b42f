"""Activation-based importance, from forward passes only (Minitron, 2407.14679 §2).

Per unit and per calibration sample, an activation magnitude is reduced over the sequence; the per-sample
values are then reduced over the batch (all samples). Defaults: mean over sequence, L2 over batch (the
paper's best; ModelOpt's choice).

- attention heads: norm of each head's attention output (input of ``linear_proj``), either as it enters
  ``linear_proj`` (``head_importance="activation"``, the paper's literal definition: norm over head_dim) or
  as it reaches the residual stream (``"contribution"``, the default: the norm of the head's output through
  its own ``linear_proj`` columns). On SmolLM2-135M the literal definition ranks heads no better than chance
  (see the width-pruning issue note); the contribution is what the residual stream actually receives.
- MLP neurons: |activation| of each intermediate neuron (input of ``linear_fc2``, after the gated activation);
- embedding channels: |output| of every RMSNorm/LayerNorm site (both norms of every layer), summed over
  sites. With the Transformer Engine spec the norms are fused into ``linear_qkv``/``linear_fc1``; the norm
  output is then recomputed from their input and ``layer_norm_weight``.

- mixture-of-experts layers (every MLP a router + experts; tokens reach an expert already permuted, without their
  sample, so these are per-token statistics). Each **expert**, by ``expert_importance``:
  ``router_mass`` (the default): the routing probability it receives, summed over the tokens routed to it (how
  much of the tokens' routing weight would have to go elsewhere without it); ``output_norm``: the norm of its
  router-weighted output, summed over the tokens routed to it (how strongly it writes into the residual stream).
  Both are divided by the number of tokens and both are kept in the scores (``expert_router_mass``,
  ``expert_output_norm``). On the tiny test models (experts of unequal strength) the routing mass beat random
  choices under both routing rules, the output norm only under renormalized top-k (Mixtral), not under
  Qwen3-MoE's plain softmax probabilities (``tests/test_moe.py``). Each expert's **neurons** score the L2 norm,
  over the tokens routed to that expert, of their router-weighted activation (input of its ``linear_fc2``).

``ImportanceRecorder`` holds this rank's hooks and accumulators (local layers, local TP shard; with data
parallelism each DP rank sees its share of the calibration windows and the accumulators are summed over DP);
:func:`gather` turns them into full scores on every rank (TP all-gather, PP all-gather, summed embedding
channels over pipeline stages).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

SEQ_AGGS = ("mean", "l2", "var", "max")
HEAD_IMPORTANCE = ("contribution", "activation")
EXPERT_IMPORTANCE = ("router_mass", "output_norm")
BATCH_AGGS = ("l2", "mean", "var", "max")


def _seq_reduce(x: torch.Tensor, how: str) -> torch.Tensor:
    """x: [s, b, units] non-negative magnitudes (or signed values for var) -> [b, units]."""
    if how == "mean":
        return x.abs().mean(0)
    if how == "l2":
        return x.norm(dim=0)
    if how == "var":
        return x.var(0, unbiased=False)
    if how == "max":
        return x.abs().amax(0)
    raise ValueError(how)


class _Acc:
    """Streaming batch reduction of per-sample values [b, units]."""

    def __init__(self):
        self.n = 0
        self.sum = self.sumsq = self.max = None

    def add(self, v: torch.Tensor) -> None:
        v = v.detach().double()
        s, sq, m = v.sum(0), (v * v).sum(0), v.amax(0)
        if self.sum is None:
            self.sum, self.sumsq, self.max = s, sq, m
        else:
            self.sum += s
            self.sumsq += sq
            self.max = torch.maximum(self.max, m)
        self.n += v.shape[0]

    def all_reduce_data_parallel(self) -> None:
        """Merge the statistics of every DP rank (each saw its share of the calibration windows)."""
        from nemo_minitron import parallel

        if parallel.data_parallel_size() == 1 or self.sum is None:
            return
        n = torch.tensor([float(self.n)], dtype=torch.float64, device=self.sum.device)
        for t in (n, self.sum, self.sumsq):
            parallel.data_parallel_all_reduce(t)
        parallel.data_parallel_all_reduce(self.max, dist.ReduceOp.MAX)
        self.n = int(n.item())

    def result(self, how: str) -> torch.Tensor:
        if how == "l2":
            return self.sumsq.sqrt()
        if how == "mean":
            return self.sum / self.n
        if how == "var":
            mean = self.sum / self.n
            return (self.sumsq / self.n - mean * mean).clamp_min(0)
        if how == "max":
            return self.max
        raise ValueError(how)


def _rms_norm(x, weight, eps):
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


class ImportanceRecorder:
    """Forward hooks on this rank's layers that accumulate head, neuron and channel activations."""

    def __init__(self, model, seq_agg: str = "mean", batch_agg: str = "l2", head_importance: str = "contribution",
                 expert_importance: str = "router_mass"):
        if seq_agg not in SEQ_AGGS or batch_agg not in BATCH_AGGS or head_importance not in HEAD_IMPORTANCE \
                or expert_importance not in EXPERT_IMPORTANCE:
            raise ValueError(f"aggregation must be seq in {SEQ_AGGS}, batch in {BATCH_AGGS}, "
                             f"head_importance in {HEAD_IMPORTANCE}, expert_importance in {EXPERT_IMPORTANCE}")
        self.expert_importance = expert_importance
        self.model, self.seq_agg, self.batch_agg = model, seq_agg, batch_agg
        self.head_importance = head_importance
        cfg = model.config
        self.d = cfg.kv_channels
        self.eps = cfg.layernorm_epsilon
        self.layers = list(model.decoder.layers)
        self.heads = [_Acc() for _ in self.layers]
        self.ffn = [_Acc() for _ in self.layers]
        self.hidden = [(_Acc(), _Acc()) for _ in self.layers]  # (input norm, pre-MLP norm) sites
        self.moe = any(hasattr(layer.mlp, "router") for layer in self.layers)
        if self.moe:
            from megatron.core import parallel_state as ps

            if ps.get_expert_tensor_parallel_world_size() > 1 or ps.get_expert_model_parallel_world_size() > 1:
                from nemo_minitron.errors import UserError

                raise UserError("expert importance at expert tensor or expert model parallel size > 1 is not built "
                                "yet: calibrate a mixture-of-experts model at TP = EP = 1")
            n = len(self.layers[0].mlp.experts.local_experts)
            dev = next(model.parameters()).device  # accumulated on the compute device, beside the activations
            self.tokens = [0] * len(self.layers)                  # tokens that entered each MoE layer
            self.expert_out = [torch.zeros(n, dtype=torch.float64, device=dev) for _ in self.layers]  # output norms
            self.expert_mass = [torch.zeros(n, dtype=torch.float64, device=dev) for _ in self.layers]  # routing probs
            self.expert_ffn = [[None] * n for _ in self.layers]   # per expert: sum of squared activations
        self.handles = []
        self.samples = 0

    # ---- hooks --------------------------------------------------------------------------------
    def _heads_hook(self, i):
        def hook(module, args):
            x = args[0].detach()  # [s, b, heads_local * d]
            s, b = x.shape[:2]
            x = x.reshape(s, b, -1, self.d)
            if self.head_importance == "activation":
                per_head = x.float().norm(dim=-1)
            else:  # each head through its own linear_proj columns (one head at a time: memory s*b*h)
                w = module.weight.detach().reshape(module.weight.shape[0], -1, self.d)
                per_head = torch.stack([(x[:, :, j] @ w[:, j].t()).float().norm(dim=-1)
                                        for j in range(x.shape[2])], dim=-1)
            self.heads[i].add(_seq_reduce(per_head, self.seq_agg))
        return hook

    def _ffn_hook(self, i):
        def hook(module, args):
            self.ffn[i].add(_seq_reduce(args[0].detach().float(), self.seq_agg))
        return hook

    def _moe_tokens_hook(self, i):
        def hook(module, args):
            self.tokens[i] += args[0].shape[0] * args[0].shape[1]  # [s, b, h]
        return hook

    def _expert_ffn_hook(self, i, j):
        def hook(module, args):
            sq = args[0].detach().double().pow(2).sum(0)  # [tokens routed to expert j, F] -> [F]
            acc = self.expert_ffn[i][j]
            self.expert_ffn[i][j] = sq if acc is None else acc.add_(sq)
        return hook

    def _expert_out_hook(self, i, j):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            self.expert_out[i][j] += out.detach().double().norm(dim=-1).sum()
        return hook

    def _router_hook(self, i):
        def hook(module, args, output):
            probs = output[0].detach()  # [tokens, experts]: a token's probability for each expert it is routed to
            self.expert_mass[i] += probs.double().sum(0)
        return hook

    def _norm_out_hook(self, acc):
        def hook(module, args, output):
            acc.add(_seq_reduce(output.detach().float(), self.seq_agg))
        return hook

    def _fused_norm_hook(self, acc):
        def hook(module, args):
            # TE spec: the norm lives inside linear_qkv / linear_fc1 (layer_norm_weight)
            out = _rms_norm(args[0].detach(), module.layer_norm_weight, self.eps)
            acc.add(_seq_reduce(out, self.seq_agg))
        return hook

    def attach(self) -> "ImportanceRecorder":
        for i, layer in enumerate(self.layers):
            att, mlp = layer.self_attention, layer.mlp
            self.handles.append(att.linear_proj.register_forward_pre_hook(self._heads_hook(i)))
            if hasattr(mlp, "router"):  # experts (megatron's SequentialMLP: one MLP module per local expert)
                self.handles.append(mlp.register_forward_pre_hook(self._moe_tokens_hook(i)))
                self.handles.append(mlp.router.register_forward_hook(self._router_hook(i)))
                for j, expert in enumerate(mlp.experts.local_experts):
                    self.handles.append(expert.linear_fc2.register_forward_pre_hook(self._expert_ffn_hook(i, j)))
                    self.handles.append(expert.linear_fc2.register_forward_hook(self._expert_out_hook(i, j)))
            else:
                self.handles.append(mlp.linear_fc2.register_forward_pre_hook(self._ffn_hook(i)))
            sites = ((layer.input_layernorm, att.linear_qkv), (layer.pre_mlp_layernorm, getattr(mlp, "linear_fc1", None)))
            for (norm, fused), acc in zip(sites, self.hidden[i]):
                if hasattr(fused, "layer_norm_weight"):
                    self.handles.append(fused.register_forward_pre_hook(self._fused_norm_hook(acc)))
                else:
                    self.handles.append(norm.register_forward_hook(self._norm_out_hook(acc)))
        return self

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc):
        self.detach()

    # ---- results ------------------------------------------------------------------------------
    def local_scores(self) -> dict:
        """This rank's scores: heads [L_local, H_local], ffn [L_local, F_local], hidden [h] (summed over sites)."""
        if self.hidden[0][0].n == 0:
            raise RuntimeError("no calibration forward pass was recorded")
        for acc in [*self.heads, *self.ffn, *(a for pair in self.hidden for a in pair)]:
            acc.all_reduce_data_parallel()  # DP > 1: each DP rank calibrated on its share of the windows
        ba = self.batch_agg
        out = {"heads": torch.stack([a.result(ba) for a in self.heads]),
               "hidden": sum(a.result(ba) for pair in self.hidden for a in pair)}  # summed over norm sites
        if not self.moe:
            out["ffn"] = torch.stack([a.result(ba) for a in self.ffn])
            return out
        from nemo_minitron import parallel

        dev = out["heads"].device
        tokens = torch.tensor([float(t) for t in self.tokens], dtype=torch.float64, device=dev)
        out_sum, mass = torch.stack(self.expert_out), torch.stack(self.expert_mass)
        width = self.layers[0].mlp.experts.local_experts[0].linear_fc2.weight.shape[1]
        ffn = torch.stack([torch.stack([torch.zeros(width, dtype=torch.float64, device=dev) if a is None else a
                                        for a in layer]) for layer in self.expert_ffn])
        for t in (tokens, out_sum, mass, ffn):  # DP > 1: every rank saw its share of the windows
            parallel.data_parallel_all_reduce(t)
        out["expert_output_norm"] = out_sum / tokens.clamp_min(1)[:, None]   # [L, E]
        out["expert_router_mass"] = mass / tokens.clamp_min(1)[:, None]      # [L, E]
        out["experts"] = out["expert_" + self.expert_importance].clone()
        out["expert_ffn"] = ffn.sqrt()                             # [L, E, F_expert]
        return out


def gather(local: dict) -> dict:
    """Full scores on every rank: heads [L, H], ffn [L, F], hidden [h] (float64)."""
    if not dist.is_initialized():
        return local
    from megatron.core import parallel_state as ps

    out = {}
    tp = ps.get_tensor_model_parallel_world_size()
    keys = [k for k in ("heads", "ffn", "experts", "expert_ffn", "expert_output_norm", "expert_router_mass")
            if k in local]
    for key in keys:
        t = local[key].contiguous()
        if tp > 1 and key in ("heads", "ffn"):  # expert scores are whole: measured at expert TP = EP = 1 only
            parts = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(parts, t, group=ps.get_tensor_model_parallel_group())
            t = torch.cat(parts, dim=1)
        out[key] = t
    hidden = local["hidden"].clone()
    pp = ps.get_pipeline_model_parallel_world_size()
    if pp > 1:
        from nemo_minitron import parallel

        group = ps.get_pipeline_model_parallel_group()
        dist.all_reduce(hidden, group=group)
        for key in keys:  # stages hold consecutive layers (and may hold different numbers of them)
            out[key] = torch.cat(parallel.all_gather_tensors(out[key], group), dim=0)
    out["hidden"] = hidden
    return out
