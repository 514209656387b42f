"""Tokenizer identity (issue 18): ``preprocess`` writes ``PREFIX.json`` with the tokenizer's fingerprint; data
tokenized by another tokenizer of the same vocabulary size, and a teacher/student pair with permuted
vocabularies, are refused in one line before any model is built, with nothing written.

Real tokenizers: SmolLM2's, and the same tokenizer with the ids of two frequent tokens swapped (same size,
same special tokens, a different vocabulary). The models are tiny Llamas with SmolLM2's vocabulary size.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import subprocess

import pytest
import torch

from conftest import CLI, REPO, ByteTokenizer

SWAP = ("Ġthe", "Ġand")  # both frequent in Shakespeare: the permuted tokenizer's data differs from the real one's


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    """(SmolLM2's tokenizer dir, the same with two token ids swapped)."""
    from nemo_minitron.checkpoint.hf import smollm2_dir

    src = smollm2_dir()
    base = tmp_path_factory.mktemp("toks")
    real, perm = base / "real", base / "perm"
    for d in (real, perm):
        d.mkdir()
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (src / name).is_file():
                shutil.copy(src / name, d / name)
    j = json.loads((perm / "tokenizer.json").read_text())
    vocab = j["model"]["vocab"]
    a, b = SWAP
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (perm / "tokenizer.json").write_text(json.dumps(j, ensure_ascii=False))
    return real, perm


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, toks, dist_single):
    """Tiny checkpoints with SmolLM2's vocabulary size: teacher and student with the real tokenizer, the same
    student with the permuted one, and a student without a tokenizer."""
    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.model import build, tiny_spec

    real, perm = toks
    base = tmp_path_factory.mktemp("ckpts")
    small = dict(vocab_size=49152, hidden_size=32, kv_channels=8, num_layers=2)
    t_spec, s_spec = tiny_spec(ffn_hidden_size=64, **small), tiny_spec(ffn_hidden_size=32, **small)
    torch.manual_seed(0)
    teacher, student = build(t_spec), build(s_spec)
    out = {"teacher": ck.save(base / "teacher", teacher, t_spec, tokenizer_dir=real),
           "student": ck.save(base / "student", student, s_spec, tokenizer_dir=real),
           "student_perm": ck.save(base / "student_perm", student, s_spec, tokenizer_dir=perm),
           "student_bare": ck.save(base / "student_bare", student, s_spec)}
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory, toks):
    """Held-out plays preprocessed (by the real CLI, in-process) with the real and the permuted tokenizer."""
    from nemo_minitron.cli import main
    from nemo_minitron.data.corpus import shakespeare_files

    real, perm = toks
    base = tmp_path_factory.mktemp("data")
    texts = base / "texts"
    texts.mkdir()
    for f in shakespeare_files("heldout"):
        (texts / f.name).write_text(f.read_text()[:20000])
    out = {}
    for name, tok in (("good", real), ("bad", perm)):
        assert main(["preprocess", f"input={texts}", f"tokenizer={tok}", f"output_prefix={base / name}"]) == 0
        out[name] = base / name
    return out


def _refused(capsys, args: list, *fragments: str) -> str:
    """``nemo-minitron ARGS`` exits 2 with one ``error:`` line holding every fragment; returns the line."""
    from nemo_minitron.cli import main

    assert main(args) == 2, args
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    assert not any(x.startswith("error") for x in err[:-1]), err
    for f in fragments:
        assert f in err[-1], (f, err[-1])
    return err[-1]


def _distill(ckpts, out, train, student="student", extra=()):
    return ["distill", f"teacher={ckpts['teacher']}", f"student={ckpts[student]}", f"output={out}",
            f"data.train={train}", "data.seq_length=32", "data.global_batch_size=4", "trainer.max_steps=2", *extra]


def test_fingerprint_sees_a_permuted_vocabulary_of_the_same_size(toks):
    from nemo_minitron.data import tokenizer as tok

    a, b = tok.fingerprint_of(toks[0]), tok.fingerprint_of(toks[1])
    assert a["vocab_size"] == b["vocab_size"] == 49152
    assert a["special_tokens"] == b["special_tokens"] and a["special_tokens"]["eos_token_id"] is not None
    assert tok.compare(a, a) is None
    assert tok.compare(a, b).startswith("vocabulary content differs (sha256 ")
    other = dict(a, special_tokens=dict(a["special_tokens"], eos_token_id=0))
    assert tok.compare(a, other) == f"special token eos_token_id {a['special_tokens']['eos_token_id']} vs 0"
    assert tok.compare(a, dict(a, vocab_size=49153)) == "vocab size 49152 vs 49153"
    assert tok.compare(a, dict(a, name_or_path="elsewhere")) is None  # informational only


def test_preprocess_writes_the_tokenizer_sidecar(data, toks):
    from nemo_minitron.data import indexed
    from nemo_minitron.data import tokenizer as tok

    for name, d in (("good", toks[0]), ("bad", toks[1])):
        side = indexed.read_sidecar(data[name])
        assert side["tokenizer"] == tok.fingerprint_of(d)
        assert side["tokens"] == indexed.num_tokens(data[name]) and side["documents"] == 4
        assert not list(data[name].parent.glob("*.partial"))
    # the swap changes the tokens: the two datasets are not the same ids under another name
    good, bad = indexed.token_stream(data["good"]), indexed.token_stream(data["bad"])
    assert len(good) == len(bad) and (good != bad).any()


def test_distill_and_finetune_refuse_data_of_another_tokenizer_of_the_same_size(ckpts, data, tmp_path, capsys):
    out = tmp_path / "out"
    line = _refused(capsys, _distill(ckpts, out, data["bad"]),
                    f"data.train {data['bad']} was tokenized by another tokenizer than the model's: "
                    "vocabulary content differs (sha256 ", f"tokenizer={ckpts['student']}")
    _refused(capsys, _distill(ckpts, out, f"[{data['good']},{data['bad']}]"), f"data.train {data['bad']} ")
    _refused(capsys, _distill(ckpts, out, data["good"], extra=[f"data.validation={data['bad']}"]),
             f"data.validation {data['bad']} was tokenized by another tokenizer")
    _refused(capsys, ["finetune", f"model={ckpts['student']}", f"output={out}", f"data.train={data['bad']}",
                      "data.seq_length=32", "data.global_batch_size=4", "trainer.max_steps=2"],
             f"data.train {data['bad']} was tokenized by another tokenizer")
    # the data of the student's own tokenizer passes (refused only later, by the validation length check)
    _refused(capsys, _distill(ckpts, out, data["good"], extra=[f"data.validation={data['good']}",
                                                                "data.num_val_samples=400000"]), "would repeat them")
    assert not out.exists()
    assert "vocabulary content differs" in line


def test_prune_and_evaluate_refuse_data_of_another_tokenizer_of_the_same_size(ckpts, data, tmp_path, capsys):
    out = tmp_path / "pruned"
    base = ["prune", f"model={ckpts['teacher']}", f"output={out}", "prune.ffn_hidden_size=32",
            "data.calibration_samples=4", "data.seq_length=32", "data.micro_batch_size=2"]
    _refused(capsys, [*base, f"data.calibration={data['bad']}"],
             f"data.calibration {data['bad']} was tokenized by another tokenizer than the model's: "
             "vocabulary content differs")
    _refused(capsys, [*base, f"data.calibration={data['good']}", f"data.validation={data['bad']}"],
             f"data.validation {data['bad']} was tokenized by another tokenizer")
    _refused(capsys, ["evaluate", f"model={ckpts['teacher']}", f"data={data['bad']}", "eval.num_samples=2",
                      "eval.seq_length=32", "eval.micro_batch_size=1", f"output_json={tmp_path / 'e.json'}"],
             f"data {data['bad']} was tokenized by another tokenizer")
    assert not out.exists() and not (tmp_path / "pruned.partial").exists() and not (tmp_path / "e.json").exists()



def test_search_and_pipeline_refuse_data_of_another_tokenizer(ckpts, data, tmp_path, capsys):
    good, bad = data["good"], data["bad"]
    out = tmp_path / "search"
    _refused(capsys, ["search", f"model={ckpts['teacher']}", f"output={out}", f"data.calibration={good}",
                      f"data.validation={good}", f"data.train=[0.5,{good},0.5,{bad}]", "search.params=0.6"],
             f"data.train {bad} was tokenized by another tokenizer than the model's")
    run_dir = tmp_path / "run"
    _refused(capsys, ["pipeline", f"run_dir={run_dir}", f"teacher={ckpts['teacher']}", f"data.train={good}",
                      f"data.calibration={bad}", f"data.heldout={good}", "prune.hidden_size=null",
                      "prune.ffn_hidden_size=32"],
             f"data.calibration {bad} was tokenized by another tokenizer than the model's")
    assert not out.exists() and not run_dir.exists()

def test_teacher_and_student_with_permuted_vocabularies_are_refused(ckpts, data, tmp_path, capsys):
    out = tmp_path / "out"
    args = _distill(ckpts, out, data["bad"], student="student_perm")
    msg = "teacher and student tokenizers differ: vocabulary content differs (sha256 "
    _refused(capsys, args, msg, "(same size 49152)")
    _refused(capsys, [*args, "--dry-run"], msg, "(same size 49152)")
    assert not out.exists()


def test_no_tokenizer_no_sidecar_warns_once_and_checks_the_id_range(ckpts, data, tmp_path, capsys):
    from nemo_minitron.data import blend, indexed
    from nemo_minitron.data import tokenizer as tok

    legacy = tmp_path / "legacy"  # a prefix written before sidecars existed
    for ext in ("bin", "idx"):
        shutil.copy(f"{data['bad']}.{ext}", f"{legacy}.{ext}")
    fp = tok.fingerprint_of(ckpts["student"])
    blend.check_tokenizer([legacy, legacy], fp, "data.train")
    blend.check_tokenizer(legacy, fp, "data.validation")
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: {legacy} has no tokenizer sidecar ({legacy}.json); only the token id range is checked"]
    # a model without a tokenizer: nothing to compare, silently (its data is range-checked as before)
    assert tok.fingerprint_of(ckpts["student_bare"]) is None
    blend.check_tokenizer(data["bad"], None, "data.train")
    assert capsys.readouterr().err == ""

    class Shifted(ByteTokenizer):  # ids 49000..49255: another tokenizer, beyond the model's 49152 entries
        def __len__(self):
            return 60000

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [b + 49000 for b in text.encode("utf-8")]}

    wide = tmp_path / "wide"
    indexed.write(wide, ["café naïve " * 50], Shifted(), progress=False)  # no fingerprint: no sidecar
    assert indexed.read_sidecar(wide) is None
    out = tmp_path / "out"
    from nemo_minitron.cli import main

    assert main(_distill(ckpts, out, wide)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"warning: {wide} has no tokenizer sidecar")
    assert err[-1].startswith("error: ") and "holds token id 49195" in err[-1] and len(err) == 2, err
    assert not out.exists()


def test_preprocess_under_a_file_size_limit_fails_in_one_line_and_leaves_nothing(toks, tmp_path):
    from nemo_minitron.data.corpus import shakespeare_files

    text = tmp_path / "play.txt"
    text.write_text(shakespeare_files("heldout")[0].read_text())  # ~100K tokens: 200 KB of uint16
    prefix = tmp_path / "out" / "play"
    limit = 64 * 1024

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([*CLI, "preprocess", f"input={text}", f"tokenizer={toks[0]}", f"output_prefix={prefix}"],
                          capture_output=True, text=True, timeout=300, cwd=REPO, preexec_fn=limited,
                          env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    err = [x for x in proc.stderr.splitlines() if x.startswith(("error", "Traceback"))]
    assert proc.returncode == 2 and err == [f"error: cannot write {prefix}.bin: {os.strerror(errno.EFBIG)}"], proc.stderr[-3000:]
    assert not prefix.parent.exists()  # no .bin/.idx/.json, no .partial, not even the directory it made
