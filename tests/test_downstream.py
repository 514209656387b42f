"""evaluate's lm-evaluation-harness hook: a real task on local data runs; tasks without data offline are
named before any model is loaded; unknown task names are refused."""

from __future__ import annotations

import json

import pytest

from conftest import cli
from hf_fixtures import TEXT, make_hf_llama


def _mc_accuracy(hf_dir, rows) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32).eval()
    right = 0
    for r in rows:
        scores = []
        for choice in r["choices"]:
            ctx = tok(r["question"], add_special_tokens=False)["input_ids"]
            whole = tok(r["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            cont = whole[len(ctx):]
            with torch.no_grad():
                logp = model(torch.tensor([whole[:-1]])).logits.float().log_softmax(-1)[0]
            scores.append(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
        right += int(max(range(len(scores)), key=scores.__getitem__) == r["label"])
    return right / len(rows)


def test_lm_eval_tasks_local_and_unavailable(tmp_path):
    hf = make_hf_llama(tmp_path / "hf")
    (tmp_path / "text.txt").write_text(TEXT * 40)
    cli("preprocess", f"input={tmp_path / 'text.txt'}", f"tokenizer={hf}", f"output_prefix={tmp_path / 'data'}")
    rows = [{"question": f"To be, or not to {w}", "choices": ["be", "sea", "die"], "label": 0}
            for w in ("", "-", "...")] + [{"question": "the slings and", "choices": ["arrows", "be"], "label": 0}]
    (tmp_path / "mc.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(
        "task: minitron_tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'mc.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n")
    base = [f"model={hf}", f"data={tmp_path / 'data'}", "eval.num_samples=4", "eval.seq_length=32",
            f"eval.task_include_path={tasks}"]
    out = tmp_path / "res.json"
    p = cli("evaluate", *base, "eval.tasks=[minitron_tiny_mc,hellaswag]", f"output_json={out}", timeout=900,
            env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert "task hellaswag unavailable" in p.stdout and "Rowan/hellaswag" in p.stdout
    res = json.loads(out.read_text())
    # the accuracy is the model's own: recomputed here with transformers (argmax of each choice's summed
    # log-likelihood after the question, as lm-eval scores multiple_choice)
    assert res["tasks"]["minitron_tiny_mc"]["acc"] == pytest.approx(_mc_accuracy(hf, rows), abs=1e-9)
    assert "hellaswag" in res["tasks_unavailable"] and res["loss"] > 0

    p = cli("evaluate", *base, "eval.tasks=[hellaswag]", check=False, env={"HF_DATASETS_OFFLINE": "1"})
    assert p.returncode == 2 and "no requested task can run: hellaswag" in p.stderr
    p = cli("evaluate", *base, "eval.tasks=[no_such_task]", check=False)
    assert p.returncode == 2 and "unknown lm-eval task(s): no_such_task" in p.stderr
