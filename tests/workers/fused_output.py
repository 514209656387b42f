"""Worker: one distillation step with the output layer fused into the loss vs on materialized logits.

    torchrun --nproc-per-node 2 fused_output.py CKPT_DIR WINDOWS.pt OUT.pt LAYOUTS    (LAYOUTS e.g. "2x1,1x2")

For every layout (TP x PP, one after another in the same processes) and every case of :data:`HALF` (half
of :data:`CASES`: tied/untied embeddings, temperature, forward/reverse KL, cross-entropy weight with an
intermediate loss, automatic/uneven chunks), the same student/teacher weights and tokens go through ``distill_step`` twice: with
``fused_output`` on and off. Rank 0 writes ``{layout: [{case, fused: {terms, grads}, unfused: ...}]}``.
The tests also call :func:`run_cases` in the pytest process (TP=1, all 16 cases).
"""

import itertools
import sys

import torch

CASES = [dict(tied=tied, temperature=t, reverse_kl=rev, lm_weight=lm,
              intermediate_pairs=[[-1, -1]] if lm else [], chunk_tokens=5 if rev else 0)
         for tied, t, rev, lm in itertools.product((False, True), (1.0, 2.0), (False, True), (0.0, 0.5))]
# the half of them with an even number of "second" levels: each factor at both levels, every pair of factors
# in all four combinations (a 2^(4-1) design), for the torchrun layouts
HALF = [c for c in CASES if (c["tied"] + (c["temperature"] != 1.0) + c["reverse_kl"] + (c["lm_weight"] > 0)) % 2 == 0]


def load(ckpt_dir, name, tp, pp):
    from pathlib import Path

    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.model import build

    path = Path(ckpt_dir) / name
    spec = ck.read_spec(path)
    model = build(spec, tp, pp, initialize=False)
    ck.load_weights(path, model)
    return model, spec


def run_cases(ckpt_dir, windows, cases, tp=1, pp=1, student_name=None):
    """[{case, fused: {terms, grads}, unfused: {terms, grads}}] with gradients gathered to full tensors."""
    from nemo_minitron.distill.pair import DistillationPair, DistillSettings, distill_step
    from nemo_minitron.model.shards import gather_full

    out, models = [], {}
    for case in cases:
        case = dict(case)
        tied = case.pop("tied")
        names = (student_name or ("student_tied" if tied else "student"), "teacher_tied" if tied else "teacher")
        for n in names:
            if n not in models:
                models[n] = load(ckpt_dir, n, tp, pp)
        (student, s_spec), (teacher, t_spec) = models[names[0]], models[names[1]]
        res = {"case": {"tied": tied, **case}}
        pair = None
        for fused in (False, True):
            settings = DistillSettings(fused_output=fused, **case)
            if pair is None:
                pair = DistillationPair(student, teacher, settings, s_spec.vocab_size, s_spec.num_layers,
                                        t_spec.num_layers)
                pair.make_projections()  # the same (deterministic) projection for both runs
            else:
                pair.settings, pair.fused = settings, fused
            student.zero_grad(set_to_none=True)
            terms = distill_step(pair, windows, micro_batch_size=2)
            res["fused" if fused else "unfused"] = {"terms": terms, "grads": gather_full(student, "grad")}
        for h in pair._hooks:
            h.remove()
        pair.detach_projections()
        out.append(res)
    return out


def main():
    ckpt_dir, windows_path, out_path, layouts = sys.argv[1:5]
    from nemo_minitron import parallel

    windows = torch.load(windows_path)
    results = {}
    for layout in layouts.split(","):
        tp, pp = (int(x) for x in layout.split("x"))
        parallel.initialize(tp, pp)
        results[layout] = run_cases(ckpt_dir, windows, HALF, tp, pp)
    if torch.distributed.get_rank() == 0:
        torch.save(results, out_path)
    parallel.destroy()


if __name__ == "__main__":
    main()
