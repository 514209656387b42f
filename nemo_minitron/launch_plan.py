"""Dry runs: the resolved launch of a distillation (nodes, GPUs, TP/PP/DP split, memory per GPU for
teacher + student), computed from the model configs alone and refused when the layout cannot work.

    nemo-minitron distill ... --dry-run          nemo-minitron pipeline ... --dry-run

The memory estimate is per GPU: weights in ``model.precision`` (bf16 by default), Megatron's distributed
optimizer over data parallel (fp32 master weights + Adam moments sharded over DP; ``optim.distributed_optimizer
=false``: not sharded), fp32 gradients, the student's activations, and the logits: with ``distill.fused_output``
(the default) the fused loss's chunk blocks, weight-gradient accumulator and hidden-state gradient
(``losses.fused_output_bytes``), else the materialized logits (student, teacher, and the KL's gradient, each
s*b*V/TP). The teacher holds weights only.

Activations (Korthikanti et al. 2022, bytes for 16-bit activations, per layer and micro-batch of s x b tokens):
``model.recompute_granularity=selective`` keeps 34*s*b*h/TP with sequence parallelism ((10 + 24/TP)*s*b*h
without); no recomputation adds the attention scores, 5*a*s*s*b/TP (an upper bound: Transformer Engine's fused
attention does not keep them); ``full`` keeps each recomputed group's input, 2*s*b*h (/TP with sequence
parallelism), plus one group's working set. The first pipeline stage holds the most: under 1F1B
min(PP, micro-batches per step) micro-batches are in flight there, each with the stage's L/PP layers.

Mixtures of experts (``trainer.strategy.expert_model_parallel_size`` = EP, carved from the data-parallel ranks as
megatron does, the experts keeping TP as their own tensor parallelism): the expert weights of every layer are split
over TP x EP x PP (E/EP experts per rank), everything else over TP x PP; the distributed optimizer shards the
dense parameters over DP and the expert parameters over the expert-data-parallel DP/EP ranks, so both come to
1/(TP x PP x DP) of their state per GPU. A MoE layer's activations replace the dense MLP's 19*s*b*h of the
formula above with the router's fp32 logits and probabilities (8*s*b*E bytes) and, for each of the top-k copies
of every token, the permuted input (2*s*b*h), the gate/up output (4*s*b*f) and the activation output
(2*s*b*f), f the expert width (all /TP). The token dispatcher's all-to-all moves each rank's k*s*b*h routed
activations (/TP with sequence parallelism) out and back (dispatch and combine) in the forward and again in the
backward, (EP-1)/EP of them to other ranks, per MoE layer and micro-batch.
"""

from __future__ import annotations

from nemo_minitron.errors import UserError
from nemo_minitron.model import count_params, expert_params


def _check(spec, what: str, tp: int, pp: int, ep: int = 1) -> None:
    try:
        spec.validate_layout(tp, pp, ep if spec.moe else 1)
    except UserError as e:
        raise UserError(f"{what}: {e}") from None


def _split(spec, tp: int, pp: int, ep: int) -> float:
    """Parameters per GPU: the dense part over TP x PP, the experts over TP x EP x PP."""
    e = expert_params(spec)
    return (count_params(spec) - e) / (tp * pp) + e / (tp * ep * pp)


def plan(t_spec, s_spec, nodes: int, gpus_per_node: int, tp: int, pp: int, seq: int, mbs: int, gbs: int,
         fused_output: bool = True, chunk_tokens: int = 0, lm: bool = False, sequence_parallel: bool | None = None,
         distributed_optimizer: bool = True, precision: str = "bf16", recompute: dict | None = None,
         ep: int = 1) -> dict:
    """``recompute``: the resolved ``recompute_*`` fields (None: no recomputation); ``ep``: expert parallelism
    (mixtures of experts)."""
    from nemo_minitron.parallel import Layout

    world = nodes * gpus_per_node
    if world % (tp * pp):
        raise UserError(f"{nodes} node(s) x {gpus_per_node} GPUs = {world} is not divisible by TP*PP = {tp}*{pp}")
    layout = Layout.resolve(world, tp, pp, sequence_parallel, ep=ep)
    if ep > 1 and not (t_spec.moe or s_spec.moe):
        raise UserError(f"expert_model_parallel_size={ep}: neither model has experts (not a mixture of experts)")
    if layout.sequence_parallel and seq % tp:
        raise UserError(f"sequence length {seq} is not divisible by TP={tp} (sequence parallelism)")
    if tp > gpus_per_node:
        raise UserError(f"TP={tp} spans nodes ({gpus_per_node} GPUs per node): keep tensor parallelism within a node")
    _check(t_spec, "teacher", tp, pp, ep)
    _check(s_spec, "student", tp, pp, ep)
    dp = world // (tp * pp)
    if gbs % (mbs * dp):
        raise UserError(f"global batch {gbs} is not divisible by micro-batch {mbs} x data-parallel {dp}")
    gib = 2 ** 30
    t_p, s_p = count_params(t_spec), count_params(s_spec)
    wb = 4 if precision == "fp32" else 2
    t_gpu, s_gpu = _split(t_spec, tp, pp, ep), _split(s_spec, tp, pp, ep)  # parameters per GPU
    teacher_w = wb * t_gpu
    student_w = wb * s_gpu
    grads = 4 * s_gpu
    # Adam moments (+ fp32 main parameters beside 16-bit weights), sharded over DP by the distributed optimizer
    # (the experts' over the DP/EP expert-data-parallel ranks: the same 1/(TP x PP x DP) per GPU)
    optim = (8 if precision == "fp32" else 12) * (s_p / (tp * pp * dp) if distributed_optimizer else s_gpu)
    L_stage = s_spec.num_layers // pp
    micro = gbs // (mbs * dp)
    in_flight = min(pp, micro)  # 1F1B: the first stage holds this many micro-batches' activations
    act, act_desc = activation_bytes(s_spec, L_stage, seq, mbs, tp, layout.sequence_parallel, recompute, wb)
    act *= in_flight
    a2a = 0.0  # the token dispatcher's all-to-all bytes sent to other ranks per GPU per step
    if s_spec.moe and ep > 1:
        routed = s_spec.moe_router_topk * seq * mbs * s_spec.hidden_size * wb / (tp if layout.sequence_parallel else 1)
        a2a = 4 * routed * (ep - 1) / ep * L_stage * micro  # dispatch + combine, forward + backward
    if fused_output:
        from nemo_minitron.distill.losses import fused_output_bytes

        logits = fused_output_bytes(seq * mbs, s_spec.padded_vocab(tp) // tp, s_spec.hidden_size, lm, chunk_tokens,
                                    weight_bytes=wb)
    else:
        logits = 3 * 4 * seq * mbs * s_spec.padded_vocab(tp) / tp
    total = teacher_w + student_w + grads + optim + act + logits
    return {
        "nodes": nodes, "gpus_per_node": gpus_per_node, "world_size": world, "tp": tp, "pp": pp, "dp": dp,
        "sequence_parallel": layout.sequence_parallel, "distributed_optimizer": distributed_optimizer,
        "precision": precision,
        "micro_batches_per_step": micro, "micro_batches_in_flight": in_flight, "activations": act_desc,
        "tokens_per_step": gbs * seq,
        "teacher_params": t_p, "student_params": s_p, "ep": ep,
        **({"experts_per_rank": {"teacher": t_spec.num_moe_experts // ep if t_spec.moe else 0,
                                 "student": s_spec.num_moe_experts // ep if s_spec.moe else 0},
            "active_params": {"teacher": count_params(t_spec, active=True), "student": count_params(s_spec, active=True)},
            "all_to_all_gib_per_step": a2a / gib} if (t_spec.moe or s_spec.moe) else {}),
        "memory_gib_per_gpu": {"teacher_weights": teacher_w / gib, "student_weights": student_w / gib,
                               "student_grads_fp32": grads / gib,
                               ("optimizer_fp32_dp_sharded" if distributed_optimizer else "optimizer_fp32"): optim / gib,
                               "activations": act / gib, "logits_and_kl": logits / gib, "total": total / gib},
    }


def activation_bytes(spec, layers: int, seq: int, mbs: int, tp: int, sp: bool, recompute: dict | None,
                     weight_bytes: int = 2) -> tuple[float, str]:
    """(bytes, description) of one micro-batch's activations over ``layers`` layers (the module docstring)."""
    h, a = spec.hidden_size, spec.num_attention_heads
    sbh = seq * mbs * h * weight_bytes / 2
    kept = 34 / tp if sp or tp == 1 else 10 + 24 / tp  # per layer, in units of s*b*h (selective recompute)
    if spec.moe:  # the dense MLP's 19 units replaced by the router and the top-k routed copies (module docstring)
        k, f, E = spec.moe_router_topk, spec.moe_ffn_hidden_size, spec.num_moe_experts
        kept += (8 * E / h + k * (2 * h + 6 * f) / h - 19) / tp
    scores = 5 * a * seq / (h * tp)  # the attention scores' share, in the same units
    full_layer = kept + scores
    r = recompute or {}
    g, method, n = r.get("recompute_granularity"), r.get("recompute_method"), r.get("recompute_num_layers")
    if g == "selective":
        return kept * layers * sbh, "selective recompute"
    if g == "full":
        inp = 2 / (tp if sp else 1)
        if method == "uniform":  # every group of n layers keeps its input; one group is recomputed at a time
            groups = -(-layers // n)
            return (inp * groups + full_layer * min(n, layers)) * sbh, f"full recompute, uniform x {n}"
        k = min(n, layers)  # block: the first k layers of the stage are recomputed (inputs kept), the rest keep all
        return (inp * k + full_layer * (layers - k) + full_layer) * sbh, f"full recompute, block of {k}"
    return full_layer * layers * sbh, "no recompute"


def show(p: dict, t_desc: str, s_desc: str) -> str:
    m = p["memory_gib_per_gpu"]
    lines = [
        f"launch: {p['nodes']} node(s) x {p['gpus_per_node']} GPUs = {p['world_size']} ranks; "
        f"TP={p['tp']} x PP={p['pp']} x DP={p['dp']}" + (f" (EP={p['ep']} within DP)" if p.get("ep", 1) > 1 else "")
        + (", sequence parallel" if p.get("sequence_parallel") else "")
        + f"; {p.get('precision', 'bf16')}"
        + (f", distributed optimizer over DP={p['dp']}" if p.get("distributed_optimizer", True) else ", Adam (not sharded)"),
        f"  teacher {p['teacher_params'] / 1e9:.2f}B params ({t_desc})",
        f"  student {p['student_params'] / 1e9:.2f}B params ({s_desc})",
        f"  {p['micro_batches_per_step']} micro-batches per step per DP rank, {p['tokens_per_step']:,} tokens per step",
    ]
    if "experts_per_rank" in p:
        e, act = p["experts_per_rank"], p["active_params"]
        lines += [f"  experts per rank (EP={p['ep']}): teacher {e['teacher']}, student {e['student']}; active parameters "
                  f"per token: teacher {act['teacher'] / 1e9:.2f}B, student {act['student'] / 1e9:.2f}B",
                  f"  token all-to-all: {p['all_to_all_gib_per_step']:.1f} GiB per GPU per step to other ranks "
                  "(dispatch + combine, forward + backward)"]
    lines += [
        f"  activations: {p['activations']}, {p['micro_batches_in_flight']} micro-batch(es) in flight on the first "
        "stage (1F1B)",
        "  memory per GPU (GiB): " + ", ".join(f"{k} {v:.1f}" for k, v in m.items() if k != "total"),
        f"  total ~{m['total']:.1f} GiB per GPU (H100: 80 GiB)",
    ]
    if m["total"] > 80:
        lines.append("  WARNING: above 80 GiB: raise TP/PP or lower the micro-batch")
    return "\n".join(lines)


def describe_shape(spec) -> str:
    mlp = (f"{spec.num_moe_experts} experts (top-{spec.moe_router_topk}) of width {spec.moe_ffn_hidden_size}"
           if spec.moe else f"ffn {spec.ffn_hidden_size}")
    return (f"{spec.num_layers} layers, hidden {spec.hidden_size}, {mlp}, "
            f"{spec.num_attention_heads} heads / {spec.num_query_groups} groups, vocab {spec.vocab_size}")


def spec_of(source):
    """A model's spec from a NeMo checkpoint, a HF directory, or a HF directory holding only config.json."""
    from pathlib import Path

    from nemo_minitron.checkpoint import hf, nemo
    from nemo_minitron.model.spec import from_hf_config

    path = hf.resolve_source(str(source))
    if nemo.is_checkpoint(path):
        return nemo.read_spec(path)
    if (Path(path) / "config.json").is_file():
        return from_hf_config(hf.read_config(path))
    raise UserError(f"{source}: neither a NeMo checkpoint nor a directory with a Hugging Face config.json")
