"""Worker for parallel distillation tests: one distillation step at TP/PP (no trainer).

    torchrun --nproc-per-node 2 distill_step.py TEACHER STUDENT WINDOWS.pt OUT.pt TP PP SETTINGS_JSON

Rank 0 writes {'loss', 'terms', 'grads'} (student gradients as full tensors under global names) to OUT.pt.
"""

import json
import sys

import torch


def main():
    teacher_ckpt, student_ckpt, windows_path, out, tp, pp, settings = sys.argv[1:8]
    tp, pp = int(tp), int(pp)
    from nemo_minitron import parallel
    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.distill.pair import DistillationPair, DistillSettings, distill_step
    from nemo_minitron.model import build
    from nemo_minitron.model.shards import gather_full

    parallel.initialize(tp, pp)
    models = {}
    for name, path in (("teacher", teacher_ckpt), ("student", student_ckpt)):
        spec = ck.read_spec(path)
        models[name] = (build(spec, tp, pp, initialize=False), spec)
        ck.load_weights(path, models[name][0])
    (student, s_spec), (teacher, t_spec) = models["student"], models["teacher"]
    pair = DistillationPair(student, teacher, DistillSettings(**json.loads(settings)), s_spec.vocab_size,
                            s_spec.num_layers, t_spec.num_layers)
    pair.make_projections()
    res = distill_step(pair, torch.load(windows_path), micro_batch_size=2)
    grads = gather_full(student, "grad")
    if parallel.is_rank0():
        torch.save({"loss": res["loss"], "terms": res, "grads": grads}, out)
    parallel.destroy()


if __name__ == "__main__":
    main()
