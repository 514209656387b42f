"""Distillation throughput on one GPU: a ~1B-parameter student against a ~2B teacher in bf16.

    python bench/gpu_distill.py [--preset 1b-2b|tiny] [--steps 8] [--seq 2048] [--micro-batch-size 2]
                                [--peak-tflops 989]

Needs only torch, megatron-core and this project (no NeMo, no Transformer Engine: megatron's local layer
spec), so it runs on a bare GPU machine where those travel as wheels. Runs real distillation steps
(:func:`nemo_minitron.distill.pair.distill_step`: student forward + backward, teacher forward,
vocab-parallel KL) plus an Adam step, in bf16 with fp32 optimizer state, and prints tokens/s and model
FLOPs utilization (MFU = achieved model FLOPs / ``--peak-tflops``; H100/H200 SXM dense bf16: 989).
Model FLOPs per token: student 6*N + 12*L*h*s (forward + backward), teacher 2*N + 4*L*h*s (forward),
N excluding the input embedding. On a machine without CUDA it runs on the CPU (for a quick check, with
``--preset tiny``) with the project's CPU platform layer. Last line: ``gpu_distill_tokens_per_s: VALUE``.
"""

import argparse
import time

import torch

PRESETS = {
    # Llama-3.2-1B-like student, ~2B Llama-style teacher; both 128k vocabulary (Llama 3)
    "1b-2b": {"student": dict(layers=16, hidden=2048, ffn=8192, heads=32, groups=8),
              "teacher": dict(layers=24, hidden=2560, ffn=10240, heads=32, groups=8), "vocab": 128256},
    "tiny": {"student": dict(layers=2, hidden=64, ffn=128, heads=4, groups=2),
             "teacher": dict(layers=4, hidden=96, ffn=192, heads=4, groups=2), "vocab": 1024},
}


def build(shape: dict, vocab: int, seq: int, bf16: bool):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from nemo_minitron import platform

    extra = {k: v for k, v in platform.config_overrides().items() if k not in ("bf16", "fp16", "params_dtype", "pipeline_dtype")}
    cfg = TransformerConfig(
        num_layers=shape["layers"], hidden_size=shape["hidden"], ffn_hidden_size=shape["ffn"],
        num_attention_heads=shape["heads"], num_query_groups=shape["groups"], gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, normalization="RMSNorm", add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32, init_method_std=0.02,
        **extra)
    model = GPTModel(cfg, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=vocab,
                     max_sequence_length=seq, position_embedding_type="rope",
                     share_embeddings_and_output_weights=False)
    return model.to(platform.device()), cfg


def params(shape, vocab):
    h, f, L = shape["hidden"], shape["ffn"], shape["layers"]
    d = h // shape["heads"]
    per_layer = h * (shape["heads"] + 2 * shape["groups"]) * d + shape["heads"] * d * h + 3 * h * f + 2 * h
    return L * per_layer + h * vocab  # without the input embedding (no FLOPs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="1b-2b", choices=sorted(PRESETS))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--num-micro-batches", type=int, default=4)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    a = ap.parse_args()

    from nemo_minitron import parallel, platform
    from nemo_minitron.distill.pair import DistillationPair, DistillSettings, distill_step

    parallel.initialize(1, 1)
    cuda = platform.has_cuda()
    p = PRESETS[a.preset]
    torch.manual_seed(0)
    student, _ = build(p["student"], p["vocab"], a.seq, bf16=cuda)
    teacher, _ = build(p["teacher"], p["vocab"], a.seq, bf16=cuda)
    pair = DistillationPair(student, teacher, DistillSettings(), p["vocab"], p["student"]["layers"],
                            p["teacher"]["layers"])
    master = [q.detach().float().clone().requires_grad_(True) for q in student.parameters()]
    opt = torch.optim.AdamW(master, lr=1e-5, fused=cuda)
    n = a.micro_batch_size * a.num_micro_batches
    windows = torch.randint(0, p["vocab"], (n, a.seq + 1), generator=torch.Generator().manual_seed(0))

    def step():
        for q in student.parameters():
            q.grad = None
        res = distill_step(pair, windows, a.micro_batch_size)
        for m, q in zip(master, student.parameters()):
            m.grad = q.grad.float()
        opt.step()
        with torch.no_grad():
            for m, q in zip(master, student.parameters()):
                q.copy_(m)
        return res

    for _ in range(a.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        res = step()
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / a.steps
    tokens = n * a.seq
    s, t = p["student"], p["teacher"]
    flops_tok = (6 * params(s, p["vocab"]) + 12 * s["layers"] * s["hidden"] * a.seq
                 + 2 * params(t, p["vocab"]) + 4 * t["layers"] * t["hidden"] * a.seq)
    tflops = flops_tok * tokens / dt / 1e12
    dev = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"{dev}: student {params(s, p['vocab']) / 1e9:.2f}B + teacher {params(t, p['vocab']) / 1e9:.2f}B params "
          f"(non-embedding + head), {'bf16' if cuda else 'fp32'}, local spec, {n}x{a.seq} tokens/step")
    print(f"  step {dt * 1e3:.0f} ms, KD loss {res['kd_loss']:.3f}, {tflops:.0f} model TFLOP/s, "
          f"MFU {tflops / a.peak_tflops * 100:.1f}% of {a.peak_tflops:.0f}")
    if cuda:
        print(f"  peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print(f"gpu_distill_tokens_per_s: {tokens / dt:.0f}")


if __name__ == "__main__":
    main()
