"""Bad input a user can give, across every command, run as real processes (the cases of one group share one
process and its imports): each ends in exactly one line ``error: ...`` naming the problem, exit status 2,
before any work, and writes nothing. Paths with spaces and non-ASCII characters work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

WORKER = REPO / "tests" / "workers" / "bad_input.py"
OUT = "never-written"  # every case's output path ends in this name; none may exist afterwards


def _hf_dir(root: Path) -> Path:
    from hf_fixtures import make_hf_llama

    return make_hf_llama(root / "hf", num_hidden_layers=2)


def _variant(base: Path, path: Path, edit=None, config=None) -> Path:
    shutil.copytree(base, path)
    if config is not None:
        cfg = json.loads((path / "config.json").read_text())
        config(cfg)
        (path / "config.json").write_text(json.dumps(cfg))
    if edit is not None:
        edit(path)
    return path


def _truncate(f: Path, keep: float = 0.5) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])


def _corrupt_header(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[8:40] = b"\x00\xff" * 16  # the JSON header after the 8-byte length
    f.write_bytes(bytes(data))


def _safetensors_edit(f: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(f))
    fn(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def _ckpt_with_context(base: Path, path: Path, **spec_overrides) -> Path:
    """``base``'s weights under a config that does not describe them (what a hand-edited or mixed-up
    checkpoint looks like to the loader)."""
    from nemo_minitron.checkpoint import nemo as ck

    shutil.copytree(base, path)
    spec = ck.read_spec(base)
    spec.args.update(spec_overrides)
    shutil.rmtree(path / "context")
    ck.write_context(path, spec)
    return path


def _prefix_copy(prefix: Path, dest: Path, idx=True, bin_=True) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if idx:
        shutil.copy(f"{prefix}.idx", f"{dest}.idx")
    if bin_:
        shutil.copy(f"{prefix}.bin", f"{dest}.bin")
    return dest


def build_cases(root: Path, ckpt: Path, data: Path) -> tuple[dict, dict]:
    """{group: [case, ...]}, {id: (expected substring, [paths that must not exist])}."""
    import torch

    hf = _hf_dir(root)
    c = {}  # id -> (argv, expected message part)
    out = lambda name: root / name / OUT  # noqa: E731

    # ---- import: Hugging Face checkpoints ----------------------------------------------------------------
    st = "model.safetensors"
    bad = {
        "import_truncated_safetensors": (_variant(hf, root / "trunc", lambda p: _truncate(p / st)), "truncated"),
        "import_corrupt_safetensors": (_variant(hf, root / "corrupt", lambda p: _corrupt_header(p / st)), "safetensors"),
        "import_config_missing_field": (_variant(hf, root / "nofield", config=lambda d: d.pop("hidden_size")), "hidden_size"),
        "import_config_wrong_type": (_variant(hf, root / "wrongtype", config=lambda d: d.update(num_hidden_layers="two")),
                                     "num_hidden_layers='two' is not a positive integer"),
        "import_config_unsupported_arch": (_variant(hf, root / "gpt2", config=lambda d: d.update(architectures=["GPT2LMHeadModel"])),
                                           "GPT2LMHeadModel"),
        # what the Qwen converter cannot represent: one line naming the field
        "import_qwen2_sliding_window": (_variant(hf, root / "q2swa", config=lambda d: d.update(
            architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=True)), "use_sliding_window"),
        "import_qwen2_rope_yarn": (_variant(hf, root / "q2yarn", config=lambda d: d.update(
            architectures=["Qwen2ForCausalLM"], model_type="qwen2",
            rope_scaling={"rope_type": "yarn", "factor": 4.0})), "rope_scaling type 'yarn'"),
        "import_qwen3_moe": (_variant(hf, root / "q3moe", config=lambda d: d.update(
            architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe")), "num_experts=None is not a positive"),
        "import_config_not_json": (_variant(hf, root / "notjson", lambda p: (p / "config.json").write_text("{hidden_size: 64,")),
                                   "config.json"),
        "import_missing_tensor": (_variant(hf, root / "missing", lambda p: _safetensors_edit(
            p / st, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))), "model.layers.1.mlp.down_proj.weight"),
        "import_misshaped_tensor": (_variant(hf, root / "misshaped", lambda p: _safetensors_edit(
            p / st, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(7, 64)}))), "model.layers.0.mlp.up_proj.weight"),
        "import_no_weights": (_variant(hf, root / "noweights", lambda p: (p / st).unlink()), "safetensors"),
        "import_source_absent": (root / "no-such-model", "no-such-model"),
    }
    for k, (src, msg) in bad.items():
        c[k] = (["import", f"source={src}", f"output={out(k)}"], msg)
    c["import_output_inside_input"] = (["import", f"source={hf}", f"output={hf / 'nemo' / OUT}"], "inside")
    c["import_output_is_a_file"] = (["import", f"source={hf}", f"output={hf / 'config.json'}"], "config.json")
    c["import_unwritable_output"] = (["import", f"source={hf}", f"output=/proc/self/{OUT}"], "cannot write")

    # ---- NeMo checkpoints: evaluate, export, convert ---------------------------------------------------------
    nemo_bad = {
        "ckpt_missing_tensor": (_ckpt_with_context(ckpt, root / "ck-missing", num_layers=5), "layers"),
        "ckpt_extra_tensor": (_ckpt_with_context(ckpt, root / "ck-extra", share_embeddings_and_output_weights=True),
                              "output_layer"),
        "ckpt_misshaped_tensor": (_ckpt_with_context(ckpt, root / "ck-shape", ffn_hidden_size=96), "shape"),
        "ckpt_not_a_checkpoint": (root / "empty-dir", "neither a NeMo 2 checkpoint"),
        "ckpt_truncated_shard": (_variant(ckpt, root / "ck-trunc", lambda p: _truncate(next((p / "weights").glob("*.distcp")))),
                                 "truncated"),
    }
    (root / "empty-dir").mkdir()
    notar = root / "notatar.nemo"
    notar.write_bytes(os.urandom(4096))
    zipped = root / "zip.nemo"
    shutil.make_archive(str(root / "zipped"), "zip", ckpt)
    shutil.move(str(root / "zipped.zip"), zipped)
    nemo_bad["nemo_not_a_tar"] = (notar, "not a readable .nemo (tar) archive")
    nemo_bad["nemo_holds_another_archive"] = (zipped, "zip archive")
    nemo1 = root / "nemo1.nemo"  # a NeMo 1 model archive: a tar of model_config.yaml + model_weights.ckpt
    import tarfile

    (root / "n1").mkdir()
    (root / "n1" / "model_config.yaml").write_text("hidden_size: 64\n")
    (root / "n1" / "model_weights.ckpt").write_bytes(b"\0" * 64)
    with tarfile.open(nemo1, "w:") as tar:
        for f in ("model_config.yaml", "model_weights.ckpt"):
            tar.add(root / "n1" / f, arcname=f"./{f}")
    for k, (src, msg) in {"import_nemo_not_a_tar": (notar, "not a readable .nemo (tar) archive"),
                          "import_nemo_is_a_zip": (zipped, "zip archive"),
                          "import_nemo_holds_a_nemo1_model": (nemo1, "NeMo 1")}.items():
        c[k] = (["import", f"source={src}", f"output={out(k)}"], msg)
    for k, (src, msg) in nemo_bad.items():
        c[f"evaluate_{k}"] = (["evaluate", f"model={src}", f"data={data}", "eval.num_samples=4", "eval.seq_length=16",
                               f"output_json={out('ev-' + k)}"], msg)
    for k in ("ckpt_misshaped_tensor", "nemo_not_a_tar", "ckpt_not_a_checkpoint"):
        src, msg = nemo_bad[k]
        c[f"export_{k}"] = (["export", f"model={src}", f"output={out('ex-' + k)}"], msg)
    c["export_bad_format"] = (["export", f"model={ckpt}", "format=onnx", f"output={out('ex-format')}"], "format")
    c["export_output_inside_input"] = (["export", f"model={ckpt}", f"output={ckpt / 'hf' / OUT}"], "inside")
    c["convert_bad_impl"] = (["convert", f"model={ckpt}", "transformer_impl=cuda", f"output={out('conv')}"], "transformer_impl")

    # ---- data: indexed datasets ----------------------------------------------------------------------------
    ev = lambda d: ["evaluate", f"model={ckpt}", f"data={d}", "eval.num_samples=4", "eval.seq_length=16"]  # noqa: E731
    c["data_idx_without_bin"] = (ev(_prefix_copy(data, root / "d1" / "p", bin_=False)), ".bin")
    d2 = _prefix_copy(data, root / "d2" / "p")
    _truncate(Path(f"{d2}.bin"), 0.3)
    c["data_bin_truncated"] = (ev(d2), "truncated")
    (root / "d3" / "prefix").mkdir(parents=True)
    c["data_prefix_is_a_directory"] = (ev(root / "d3" / "prefix"), "directory")
    c["data_prefix_absent"] = (ev(root / "d4" / "nothing"), "nothing")
    c["evaluate_zero_samples"] = (ev(data) + ["eval.num_samples=0"], "num_samples")
    # downstream tasks: named before any model is loaded
    et = lambda *extra: ["evaluate", f"model={ckpt}", f"output_json={root / OUT}", *extra]  # noqa: E731
    c["evaluate_task_without_data"] = (et("eval.tasks=[lambada_openai]"), "no requested task can run: lambada_openai")
    c["evaluate_task_unknown"] = (et("eval.tasks=[no_such_task]"), "unknown lm-eval task(s): no_such_task")
    c["evaluate_task_generative"] = (et("eval.tasks=[gsm8k]"), "task gsm8k is generative")
    c["evaluate_task_limit_zero"] = (et("eval.tasks=[piqa]", "eval.limit=0"), "eval.limit=0")
    c["evaluate_nothing"] = (et(), "nothing to evaluate")

    # ---- preprocess: text ----------------------------------------------------------------------------------
    txt = root / "text"
    txt.mkdir()
    (txt / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (txt / "empty.txt").write_text("")
    (txt / "bad.jsonl").write_text('{"text": "one"}\n{"text": "two"\n')
    (txt / "notext.jsonl").write_text('{"body": "one"}\n{"body": "two"}\n')
    pre = lambda name, *extra: ["preprocess", f"input={txt / name}", f"tokenizer={hf}",  # noqa: E731
                                f"output_prefix={out('pre-' + name)}", *extra]
    c["preprocess_binary_text"] = (pre("binary.txt"), "is not text")
    c["preprocess_empty_text"] = (pre("empty.txt"), "no documents")
    c["preprocess_jsonl_bad_line"] = (pre("bad.jsonl"), "bad.jsonl:2: not a JSON object")
    c["preprocess_jsonl_without_text"] = (pre("notext.jsonl"), "text")
    (txt / "good.txt").write_text("To be, or not to be.\n")
    c["preprocess_output_prefix_is_a_directory"] = (["preprocess", f"input={txt / 'good.txt'}", f"tokenizer={hf}",
                                                     f"output_prefix={txt}"], "is a directory")
    c["preprocess_tokenizer_absent"] = (["preprocess", f"input={txt / 'good.txt'}", f"tokenizer={root / 'no-tok'}",
                                         f"output_prefix={out('pre-tok')}"], "no-tok")

    # ---- prune: targets ------------------------------------------------------------------------------------
    pr = lambda name, *extra: ["prune", f"model={ckpt}", f"data.calibration={data}",  # noqa: E731
                               "data.calibration_samples=8", "data.seq_length=16", "prune.depth_samples=8",
                               f"output={out('pr-' + name)}", *extra]
    c["prune_target_zero"] = (pr("zero", "prune.hidden_size=0"), "hidden_size")
    c["prune_target_negative"] = (pr("neg", "prune.ffn_hidden_size=-64"), "ffn_hidden_size")
    c["prune_target_larger_than_source"] = (pr("large", "prune.ffn_hidden_size=512"), "ffn_hidden_size")
    c["prune_target_not_integer"] = (pr("float", "prune.hidden_size=48.5"), "hidden_size")
    c["prune_heads_not_in_groups"] = (pr("heads", "prune.num_attention_heads=3"), "num_attention_heads")
    c["prune_drop_layers_out_of_range"] = (pr("range", "prune.drop_layers=[9]"), "drop_layers")
    c["prune_drop_layers_repeated"] = (pr("rep", "prune.drop_layers=[2,2]"), "drop_layers")
    c["prune_conflicting_depth_keys"] = (pr("conflict", "prune.num_layers=2", "prune.drop_layers=[1]"), "disagree")
    other = root / "other-scores.pt"
    torch.save({"heads": torch.rand(8, 8), "ffn": torch.rand(8, 512), "hidden": torch.rand(512)}, other)
    c["prune_scores_from_another_model"] = (pr("scores", "prune.hidden_size=48", f"prune.scores={other}"), "scores")
    c["prune_output_inside_input"] = (pr("inside", "prune.hidden_size=48", f"output={ckpt / OUT}"), "inside")
    c["prune_no_target"] = (pr("none"), "target")

    # ---- distill / finetune / search / pipeline -------------------------------------------------------------
    kd = lambda name, *extra: ["distill", f"teacher={ckpt}", f"student={ckpt}", f"output={out('kd-' + name)}",  # noqa: E731
                               f"data.train={data}", f"data.validation={data}", "data.seq_length=16",
                               "data.micro_batch_size=2", "data.global_batch_size=2", "data.num_val_samples=2",
                               "trainer.max_steps=1", *extra]
    c["distill_blend_missing_part"] = (kd("blend", f"data.train=[0.5,{data},0.5,{root / 'gone'}]"), "gone")
    c["distill_teacher_not_a_checkpoint"] = (kd("teacher", f"teacher={root / 'empty-dir'}"), "empty-dir")
    c["distill_output_inside_input"] = (kd("inside", f"output={ckpt / OUT}"), "inside")
    c["distill_negative_steps"] = (kd("steps", "trainer.max_steps=-1"), "max_steps")
    c["finetune_zero_steps"] = (["finetune", f"model={ckpt}", f"output={out('ft')}", f"data.train={data}",
                                 "trainer.max_steps=0"], "max_steps")
    c["search_params_over_100"] = (["search", f"model={ckpt}", f"output={out('se')}", f"data.calibration={data}",
                                    f"data.train={data}", f"data.validation={data}", "search.params=150%"],
                                   "search.params")
    c["pipeline_teacher_absent"] = (["pipeline", f"run_dir={out('pl')}", f"teacher={root / 'no-teacher'}"], "no-teacher")
    c["pipeline_target_zero"] = (["pipeline", f"run_dir={out('pl2')}", f"teacher={ckpt}", "prune.hidden_size=0"], "hidden_size")

    must_not_exist = {}  # a case's output and the directories it would have created
    for k, (argv, _) in c.items():
        paths = [Path(str(a).split("=", 1)[1]) for a in argv if str(a).endswith(OUT) and "=" in str(a)]
        must_not_exist[k] = [q for p in paths for q in (p, p.parent) if q == p or not q.exists()]
    groups = {"hf": [k for k in c if k.startswith(("import", "preprocess"))]}  # no NeMo model built
    groups["nemo"] = [k for k in c if k not in groups["hf"]]
    return ({g: [{"id": k, "argv": [str(a) for a in c[k][0]]} for k in ks] for g, ks in groups.items()},
            {k: (c[k][1], must_not_exist[k]) for k in c})


# a path with spaces and non-ASCII characters must work (not a bad input)
UNICODE_DIR = "a dir with spaces – ünïcødé"


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, tiny_ckpt, tiny_data):
    root = tmp_path_factory.mktemp("bad")
    groups, expect = build_cases(root, Path(tiny_ckpt), Path(tiny_data))
    good = root / UNICODE_DIR
    groups["hf"].append({"id": "unicode_paths_work", "argv": ["import", f"source={root / 'hf'}", f"output={good / 'ckpt ü'}"]})
    results = {}
    env = {**os.environ, "NEMO_MINITRON_LOG_DIR": str(root / "logs"), "PYTHONPATH": str(REPO / "tests")}
    procs = []
    for name, cases in groups.items():
        (root / f"{name}.json").write_text(json.dumps(cases))
        procs.append(subprocess.Popen([sys.executable, WORKER, root / f"{name}.json", root / f"{name}.out.json"],
                                      cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
    for name in groups:
        results.update(json.loads((root / f"{name}.out.json").read_text()))
    return root, results, expect


CASE_IDS = [
    "import_truncated_safetensors", "import_corrupt_safetensors", "import_config_missing_field",
    "import_config_wrong_type", "import_config_unsupported_arch", "import_config_not_json", "import_missing_tensor",
    "import_misshaped_tensor", "import_no_weights", "import_source_absent", "import_output_inside_input",
    "import_output_is_a_file", "import_unwritable_output", "import_nemo_not_a_tar", "import_nemo_is_a_zip",
    "import_nemo_holds_a_nemo1_model", "import_qwen2_sliding_window", "import_qwen2_rope_yarn", "import_qwen3_moe",
    *[f"evaluate_{k}" for k in ("ckpt_missing_tensor", "ckpt_extra_tensor", "ckpt_misshaped_tensor", "ckpt_not_a_checkpoint",
                                "ckpt_truncated_shard", "nemo_not_a_tar", "nemo_holds_another_archive")],
    "export_ckpt_misshaped_tensor", "export_nemo_not_a_tar", "export_ckpt_not_a_checkpoint", "export_bad_format",
    "export_output_inside_input", "convert_bad_impl",
    "data_idx_without_bin", "data_bin_truncated", "data_prefix_is_a_directory", "data_prefix_absent",
    "evaluate_zero_samples", "evaluate_task_without_data", "evaluate_task_unknown", "evaluate_task_generative",
    "evaluate_task_limit_zero", "evaluate_nothing",
    "preprocess_binary_text", "preprocess_empty_text", "preprocess_jsonl_bad_line", "preprocess_jsonl_without_text",
    "preprocess_output_prefix_is_a_directory", "preprocess_tokenizer_absent",
    "prune_target_zero", "prune_target_negative", "prune_target_larger_than_source", "prune_target_not_integer",
    "prune_heads_not_in_groups", "prune_drop_layers_out_of_range", "prune_drop_layers_repeated",
    "prune_conflicting_depth_keys", "prune_scores_from_another_model", "prune_output_inside_input", "prune_no_target",
    "distill_blend_missing_part", "distill_teacher_not_a_checkpoint", "distill_output_inside_input",
    "distill_negative_steps", "finetune_zero_steps", "search_params_over_100", "pipeline_teacher_absent",
    "pipeline_target_zero",
]


@pytest.mark.parametrize("case", CASE_IDS)
def test_bad_input_is_one_line_exit_2_nothing_written(outcomes, case):
    root, results, expect = outcomes
    r = results[case]
    msg, never = expect[case]
    lines = [x for x in r["stderr"].splitlines() if x.strip() and not x.startswith("note: ")]
    assert r["rc"] == 2 and len(lines) == 1 and lines[0].startswith("error: "), (r["rc"], r["stderr"][-2000:])
    assert "internal error" not in lines[0] and "Traceback" not in r["stderr"] + r["stdout"]
    assert msg.lower() in lines[0].lower(), lines[0]
    written = [str(p) for p in never if p.exists()]
    assert not written, written


def test_paths_with_spaces_and_non_ascii_work(outcomes):
    from nemo_minitron.checkpoint import nemo as ck

    root, results, _ = outcomes
    r = results["unicode_paths_work"]
    assert r["rc"] == 0, r["stderr"][-2000:]
    assert ck.is_checkpoint(root / UNICODE_DIR / "ckpt ü")


def test_the_corpus_is_whole(outcomes):
    _, results, expect = outcomes
    assert sorted(CASE_IDS) == sorted(expect) and len(CASE_IDS) >= 40
