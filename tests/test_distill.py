"""Distillation: the vocab-parallel KL against a full-logits reference, one step at TP=1/TP=2/PP=2,
NeMo-trainer runs (CLI): teacher correction, fine-tuning and refusals of bad input. The trainer at every
parallel layout, kill-and-resume and resharding are in test_cluster.py."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import WORKERS, cli, commands, torchrun



# ------------------------------------------------------------------------------------------------
# losses
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_matches_full_reference_and_its_gradient(reverse, temperature):
    from nemo_minitron.distill.losses import kl_div, kl_div_reference

    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 7, 211, generator=g, requires_grad=True)
    t = torch.randn(3, 7, 211, generator=g) * 2
    w = torch.rand(3, 7, generator=g)
    ours = kl_div(s, t, temperature, reverse, chunk_tokens=5)  # chunks do not divide 21 tokens
    (ours * w).sum().backward()
    g_ours, s.grad = s.grad.clone(), None
    ref = kl_div_reference(s, t, temperature, reverse)
    (ref * w).sum().backward()
    assert ours.shape == (3, 7)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_ours, s.grad, rtol=1e-5, atol=1e-7)
    assert (ours > 0).all()


def test_kl_ignores_vocab_padding_columns():
    from nemo_minitron.distill.losses import kl_div, kl_div_reference

    s, t = torch.randn(6, 250), torch.randn(6, 250)
    s_pad = torch.cat([s, torch.full((6, 6), 30.0)], -1)  # padding rows can hold anything
    t_pad = torch.cat([t, torch.randn(6, 6)], -1)
    torch.testing.assert_close(kl_div(s_pad, t_pad, vocab_size=250), kl_div_reference(s, t), rtol=1e-5, atol=1e-6)


def test_vocab_parallel_kl_equals_full_logits_at_tp2(tmp_path):
    """Two processes each hold half of the vocabulary; the KL and its gradient equal the full computation."""
    out = tmp_path / "kl.pt"
    torchrun([WORKERS / "kl_tp.py", out])
    res = torch.load(out)
    for rev in (False, True):
        torch.testing.assert_close(res[rev]["kl"], res[rev]["ref"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(res[rev]["grad"], res[rev]["ref_grad"], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# one step at several layouts
# ------------------------------------------------------------------------------------------------
SETTINGS = {"lm_weight": 0.5, "intermediate_pairs": [[-1, -1]], "intermediate_loss": "cosine"}


@pytest.mark.parallel
def test_one_distillation_step_is_layout_independent(tiny_ckpt, tiny_student, tiny_windows, tmp_path):
    """TP=1 in this process; TP=2 and PP=2 one after the other in one 2-process launch."""
    import importlib.util

    _, windows = tiny_windows
    spec = importlib.util.spec_from_file_location("distill_step_worker", WORKERS / "distill_step.py")
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    ref = worker.step(tiny_ckpt, tiny_student, torch.load(windows), SETTINGS)
    out = tmp_path / "steps.pt"
    torchrun([WORKERS / "distill_step.py", tiny_ckpt, tiny_student, windows, out, "2x1,1x2", json.dumps(SETTINGS)])
    res = torch.load(out)
    assert ref["terms"]["kd_loss"] > 0 and ref["terms"]["lm_loss"] > 0 and ref["terms"]["intermediate_loss"] > 0
    assert "kd_projections.0.weight" in ref["grads"]  # hidden 48 -> 64: learned projection is trained
    for layout in ("2x1", "1x2"):
        got = res[layout]
        for k in ("loss", "kd_loss", "lm_loss", "intermediate_loss"):
            assert got["terms"][k] == pytest.approx(ref["terms"][k], rel=1e-5), (layout, k)
        assert set(got["grads"]) == set(ref["grads"])
        for name, g in ref["grads"].items():
            torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-6, msg=f"{layout} {name}")


# ------------------------------------------------------------------------------------------------
# the output layer fused with the loss (distill.fused_output) against materialized logits
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fused_ckpts(tmp_path_factory, dist_single):
    """Teacher/student checkpoints, tied and untied, vocabulary 250 (padded to 256: padding at TP=1 and 2),
    plus a student padded to 250 only (its logits are cut to the teacher's width at TP=1)."""
    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.model import build, tiny_spec

    root = tmp_path_factory.mktemp("fused")
    shapes = {"teacher": {}, "student": dict(num_layers=2, hidden_size=48, ffn_hidden_size=96)}
    for seed, (name, tied, extra) in enumerate([("teacher", False, {}), ("teacher_tied", True, {}),
                                                ("student", False, {}), ("student_tied", True, {}),
                                                ("student_cut", False, {"make_vocab_size_divisible_by": 50})]):
        spec = tiny_spec(vocab_size=250, share_embeddings_and_output_weights=tied,
                         **shapes[name.split("_")[0]], **extra)
        torch.manual_seed(seed)
        model = build(spec)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
        ck.save(root / name, model, spec)
    windows = torch.randint(0, 250, (4, 33), generator=torch.Generator().manual_seed(3))
    torch.save(windows, root / "windows.pt")
    return root


def _fused_worker():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fused_output_worker", WORKERS / "fused_output.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _assert_fused_matches(results, where):
    for r in results:
        f, u = r["fused"], r["unfused"]
        what = f"{where} {r['case']}"
        assert set(f["terms"]) == set(u["terms"]), what
        for k, ref in u["terms"].items():
            assert f["terms"][k] == pytest.approx(ref, rel=1e-6, abs=1e-9), (what, k)
        assert set(f["grads"]) == set(u["grads"]), what
        assert any(n.endswith(("output_layer.weight", "word_embeddings.weight")) for n in u["grads"]), what
        for name, g in u["grads"].items():  # 1e-5 relative to the tensor's largest entry
            torch.testing.assert_close(f["grads"][name], g, rtol=1e-5, atol=1e-5 * float(g.abs().max()),
                                       msg=lambda m: f"{what} {name}: {m}")


def test_fused_output_equals_materialized_logits_at_tp1(fused_ckpts):
    """Same weights and tokens: loss terms and every student gradient (output layer, tied embedding,
    learned projection) of the fused path equal today's, for tied/untied, T=1/2, forward/reverse KL,
    lm_weight 0/0.5 (with an intermediate loss), automatic and uneven chunks, and a student whose padded
    vocabulary is narrower than the teacher's."""
    w = _fused_worker()
    windows = torch.load(fused_ckpts / "windows.pt")
    res = w.run_cases(fused_ckpts, windows, w.CASES)
    assert len(res) == 16 and all(r["unfused"]["terms"]["kd_loss"] > 0 for r in res)
    assert any("embedding.word_embeddings.weight" in r["fused"]["grads"] and r["case"]["tied"]
               and "output_layer.weight" not in r["fused"]["grads"] for r in res)  # tied: one shared weight
    _assert_fused_matches(res, "TP=1")
    cut = [dict(tied=False, temperature=2.0, reverse_kl=rev, lm_weight=0.5, chunk_tokens=7) for rev in (False, True)]
    _assert_fused_matches(w.run_cases(fused_ckpts, windows, cut, student_name="student_cut"), "TP=1 cut vocab")


def test_fused_output_loss_with_16bit_weights(dist_single):
    """bf16 hidden states and weights (the GPU path: 16-bit logit blocks, fp32 weight-gradient accumulation):
    the same objective as bf16 logits + kl_div + megatron's cross-entropy, gradients within bf16 rounding."""
    from megatron.core import tensor_parallel

    from nemo_minitron.distill.losses import fused_output_loss, kl_div

    g = torch.Generator().manual_seed(0)
    n, v = 96, 300
    hs = torch.randn(n, 32, generator=g).bfloat16().requires_grad_(True)
    ws = (torch.randn(v, 32, generator=g) * 0.5).bfloat16().requires_grad_(True)
    ht, wt = torch.randn(n, 48, generator=g).bfloat16(), (torch.randn(v, 48, generator=g) * 0.5).bfloat16()
    labels, w = torch.randint(0, 290, (n,), generator=g), torch.rand(n, generator=g)
    obj, kd, lm = fused_output_loss(hs, ws, ht, wt, labels, w, 1.0, 0.5, 2.0, True, 290, chunk_tokens=7)
    obj.backward()
    got = hs.grad.clone(), ws.grad.clone()
    hs.grad = ws.grad = None
    zs = hs @ ws.t()
    ref_kd = (kl_div(zs.unsqueeze(0), (ht @ wt.t()).unsqueeze(0), 2.0, True, 290)[0] * w).sum()
    ref_lm = (tensor_parallel.vocab_parallel_cross_entropy(zs.float().unsqueeze(1), labels.unsqueeze(1))[:, 0] * w).sum()
    (ref_kd + 0.5 * ref_lm).backward()
    assert float(kd) == pytest.approx(float(ref_kd), rel=1e-5) and float(lm) == pytest.approx(float(ref_lm), rel=1e-5)
    for a, b in zip(got, (hs.grad, ws.grad)):
        assert a.dtype == torch.bfloat16
        assert float((a.float() - b.float()).abs().max()) <= 2e-2 * float(b.float().abs().max())


@pytest.mark.parallel
def test_fused_output_equals_materialized_logits_at_tp2_and_pp2(fused_ckpts, tmp_path):
    """At TP=2 (vocabulary 250 padded to 256: the last shard has padding columns) and at PP=2 (tied: the last
    stage's copy of the embedding), in one torchrun launch: 8 of the 16 cases at each, every factor at both
    levels and every pair of factors in all four combinations."""
    out = tmp_path / "fused.pt"
    torchrun([WORKERS / "fused_output.py", fused_ckpts, fused_ckpts / "windows.pt", out, "2x1,1x2"])
    res = torch.load(out)
    for layout in ("2x1", "1x2"):
        assert len(res[layout]) == 8
        _assert_fused_matches(res[layout], f"TPxPP={layout}")


# ------------------------------------------------------------------------------------------------
# the command: NeMo trainer, resume, teacher correction, refusals
# ------------------------------------------------------------------------------------------------
def _args(teacher, student, data, out, steps=8, *extra):
    return [f"teacher={teacher}", f"student={student}", f"output={out}", f"data.train={data}",
            f"data.validation={data}", "data.seq_length=32", "data.micro_batch_size=2", "data.global_batch_size=4",
            "data.num_val_samples=8", f"trainer.max_steps={steps}", "trainer.val_check_interval=4",
            "trainer.log_every_n_steps=1", "checkpoint.every_n_steps=2", "optim.lr=3e-3", "optim.warmup_steps=2",
            *extra]


def _metrics(run_dir):
    from nemo_minitron.distill.train import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")


def test_teacher_correction_then_distill(tiny_ckpt, tiny_student, tiny_data, tmp_path, dist_single):
    out = tmp_path / "tc"
    p = cli("distill", *_args(tiny_ckpt, tiny_student, tiny_data, out, 2, "distill.teacher_correction=true",
                              "finetune.max_steps=2", "finetune.lr=1e-2"))
    corrected = out / "teacher_corrected" / "model"
    assert "fine-tuned 2 steps" in p.stdout
    from nemo_minitron.checkpoint import nemo as ck

    ck.validate(corrected)
    ft = _metrics(out / "teacher_corrected")
    assert sorted(ft["train"]) == [1, 2] and "kd_loss" not in ft["train"][1]
    assert (out / "student" / "context" / "io.json").is_file()
    # the distillation's teacher is the corrected one (read from its checkpoint), and the correction changed it:
    # a lower loss than the uncorrected teacher on the data it was corrected on
    assert f"read from {corrected};" in p.stdout, p.stdout[-3000:]
    from nemo_minitron.checkpoint.loader import load_model
    from nemo_minitron.data import indexed
    from nemo_minitron.evaluate import heldout_loss

    windows = indexed.windows(str(tiny_data), 8, 32)
    before = heldout_loss(load_model(tiny_ckpt)[0], windows, 4)["loss"]
    after = heldout_loss(load_model(corrected)[0], windows, 4)["loss"]
    assert after < before - 0.05, (before, after)


def test_finetune_command(tiny_ckpt, tiny_data, tmp_path):
    """finetune, with validation drawn from the training data by Megatron's split (data.split)."""
    def finetune(out, lr):
        return {"name": out.name, "args": [
            "finetune", f"model={tiny_ckpt}", f"output={out}", f"data.train={tiny_data}", "data.seq_length=32",
            "data.global_batch_size=4", "trainer.max_steps=3", f"optim.lr={lr}", "optim.min_lr=0",
            "checkpoint.every_n_steps=2", "data.split=50,50,0", "data.num_val_samples=8", "trainer.val_check_interval=3"]}

    out = tmp_path / "ft"
    # the validation loss is the trained model's on the held-out split: below the untrained one's (lr ~ 0, the
    # same windows) by a real margin; both runs in one process
    outs = commands([finetune(out, "1e-2"), finetune(tmp_path / "ft0", "1e-12")])
    assert outs["ft"].strip().splitlines()[-1] == f"wrote checkpoint: {out / 'model'}"
    m = _metrics(out)
    assert m["train"][3]["loss"] < m["train"][1]["loss"]
    untrained = _metrics(tmp_path / "ft0")
    assert sorted(m["val"]) == [3] == sorted(untrained["val"])
    assert m["val"][3] < untrained["val"][3] - 0.1, (m["val"], untrained["val"])
    assert list((out / "data_index").glob("*GPTDataset-valid-*"))  # the split's validation part, cached


def test_distill_refuses_bad_input_before_work(tiny_ckpt, tiny_student, tiny_data, tmp_path, capsys):
    from nemo_minitron.cli import main

    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.model import build, tiny_spec

    other = tmp_path / "other_vocab"
    ck.save(other, build(tiny_spec(vocab_size=300)), tiny_spec(vocab_size=300))
    out = tmp_path / "out"
    cases = [
        (_args(tiny_ckpt, other, tiny_data, out), "vocabulary"),
        (_args(tiny_ckpt, tmp_path / "nope", tiny_data, out), "does not exist"),
        (_args(tiny_ckpt, tiny_student, tiny_data, out, 8, "data.global_batch_size=3"), "not divisible"),
        (_args(tiny_ckpt, tiny_student, tiny_data, out, 8, "distill.intermediate_pairs=[[5,0]]"), "out of range"),
        (_args(tiny_ckpt, tiny_student, tiny_data, out, 8, "distill.kd_weight=0"), "objective is empty"),
        (_args(tiny_ckpt, tiny_student, tmp_path / "nodata", out), "data.train"),
        (_args(tiny_ckpt, tiny_student, tiny_data, out, 8, "data.num_val_samples=100000"), "data.validation"),
    ]
    for args, msg in cases:  # in-process: refusals come before any model or trainer is built
        assert main(["distill", *map(str, args)]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err, (msg, err[-500:])
    assert not out.exists()
    # a padding-only difference is accepted (the teacher is built with the student's padding); sizes must match
    from nemo_minitron.distill.pair import check_vocab
    from nemo_minitron.errors import UserError

    a, b = tiny_spec(vocab_size=300), tiny_spec(vocab_size=300, make_vocab_size_divisible_by=64)
    check_vocab(a, b)
    with pytest.raises(UserError, match="differ"):
        check_vocab(a, tiny_spec(vocab_size=301))
