"""Worker for parallel distillation tests: one distillation step at TP/PP (no trainer).

    torchrun --nproc-per-node 2 distill_step.py TEACHER STUDENT WINDOWS.pt OUT.pt LAYOUTS SETTINGS_JSON
    (LAYOUTS e.g. "2x1,1x2": each layout in turn, in the same processes)

Rank 0 writes {layout: {'loss', 'terms', 'grads'}} (student gradients as full tensors under global names) to
OUT.pt. The tests also call :func:`step` in the pytest process (TP=1).
"""

import json
import sys

import torch


def step(teacher_ckpt, student_ckpt, windows, settings: dict, tp=1, pp=1) -> dict:
    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.distill.pair import DistillationPair, DistillSettings, distill_step
    from nemo_minitron.model import build
    from nemo_minitron.model.shards import gather_full

    models = {}
    for name, path in (("teacher", teacher_ckpt), ("student", student_ckpt)):
        spec = ck.read_spec(path)
        models[name] = (build(spec, tp, pp, initialize=False), spec)
        ck.load_weights(path, models[name][0])
    (student, s_spec), (teacher, t_spec) = models["student"], models["teacher"]
    pair = DistillationPair(student, teacher, DistillSettings(**settings), s_spec.vocab_size,
                            s_spec.num_layers, t_spec.num_layers)
    pair.make_projections()
    res = distill_step(pair, windows, micro_batch_size=2)
    out = {"loss": res["loss"], "terms": res, "grads": gather_full(student, "grad")}
    for h in pair._hooks:
        h.remove()
    return out


def main():
    teacher_ckpt, student_ckpt, windows_path, out, layouts, settings = sys.argv[1:7]
    from nemo_minitron import parallel

    results = {}
    for layout in layouts.split(","):
        tp, pp = (int(x) for x in layout.split("x"))
        parallel.initialize(tp, pp)
        results[layout] = step(teacher_ckpt, student_ckpt, torch.load(windows_path), json.loads(settings), tp, pp)
    if parallel.is_rank0():
        torch.save(results, out)
    parallel.destroy()


if __name__ == "__main__":
    main()
