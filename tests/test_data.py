"""Training data through megatron-core's GPT datasets (NeMo's PreTrainingDataModule): blend syntax and
shares, seed-deterministic shuffling, data-parallel sharding of each global batch, refusals of bad data,
the dry run's data report, and preprocess of many files into the parts of a blend."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from conftest import WORKERS, ByteTokenizer, torchrun


def _settings(train, seed=1234, seq_length=16, mbs=2, gbs=4):
    from nemo_minitron.data.blend import training_settings

    return training_settings(train, seq_length, mbs, gbs, seed=seed)


def _train_ds(settings, cache, num_samples):
    from nemo_minitron.data.module import GPTDataModule

    m = GPTDataModule(settings, cache)
    m.build(num_samples // settings.global_batch_size, num_samples, 0, 0)
    return m


def test_blend_syntax_from_yaml_and_command_line(tmp_path):
    from nemo_minitron import config
    from nemo_minitron.data.blend import Blend, settings_from
    from nemo_minitron.errors import UserError

    assert Blend.parse("/d/web", "x") == Blend(("/d/web",))
    assert Blend.parse(["/d/web", "/d/code"], "x") == Blend(("/d/web", "/d/code"))
    assert Blend.parse([0.3, "/d/web", 0.7, "/d/code"], "x") == Blend(("/d/web", "/d/code"), (0.3, 0.7))
    assert Blend.parse(["30", "/d/web", "70", "/d/code"], "x").weights == (30.0, 70.0)  # Megatron's strings
    base = ["teacher=t", "student=s", "output=o"]
    cfg = config.load("distill", [*base, "data.train=[0.3,/d/web,0.7,/d/code]", "data.split=99,1,0"])
    s = settings_from(cfg.data)
    assert s.train == Blend(("/d/web", "/d/code"), (0.3, 0.7)) and s.split == "99,1,0" and s.has_validation
    assert s.train.arg() == "[0.3,/d/web,0.7,/d/code]"  # what pipeline and search hand to distill
    yaml_file = tmp_path / "r.yaml"  # the same in a YAML file (a recipe)
    yaml_file.write_text("train: [0.3, /d/web, 0.7, /d/code]\n")
    from omegaconf import OmegaConf

    assert Blend.parse(OmegaConf.load(yaml_file).train, "x") == s.train
    for bad, msg in (([0.3, "/d/web", 0.7], "odd number"), ([0, "/d/web", 1, "/d/code"], "positive"),
                     ([-1, "/d/web", 2, "/d/code"], "positive"), ([0.5, "/d/web", "/d/code", 0.5], "alternates"),
                     ([], "empty")):
        with pytest.raises(UserError, match=msg):
            Blend.parse(bad, "data.train")
    for over, msg in ((["data.split=1,2"], "three"), (["data.split=99,1,0", "data.validation=/v"], "set one")):
        with pytest.raises(UserError, match=msg):
            settings_from(config.load("distill", [*base, "data.train=/d", *over]).data)


def test_blend_shares_and_seeded_order(tiny_data, second_data, tmp_path, dist_single):
    """0.25 / 0.75 over 10,000 samples: each within 2 points of its share; one seed, one order."""
    n = 10_000
    s = _settings([0.25, str(tiny_data), 0.75, str(second_data)])
    ds = _train_ds(s, tmp_path / "a", n)._train_ds
    ids = Counter(int(ds[i]["dataset_id"]) for i in range(n))
    assert abs(ids[0] / n - 0.25) < 0.02 and abs(ids[1] / n - 0.75) < 0.02, ids
    first = [ds[i]["tokens"].tolist() for i in range(64)]
    again = _train_ds(s, tmp_path / "b", n)._train_ds  # rebuilt from scratch in another cache
    assert [again[i]["tokens"].tolist() for i in range(64)] == first
    other = _train_ds(_settings([0.25, str(tiny_data), 0.75, str(second_data)], seed=7), tmp_path / "c", n)._train_ds
    assert [other[i]["tokens"].tolist() for i in range(64)] != first
    # the samples are shuffled, not the stream in order: consecutive samples are not consecutive text
    single = _train_ds(_settings(str(tiny_data)), tmp_path / "d", 64)._train_ds
    from nemo_minitron.data import indexed

    stream = indexed.windows(tiny_data, 8, 16)
    assert [single[i]["tokens"].tolist() for i in range(8)] != stream[:, :-1].tolist()
    assert all(single[i]["tokens"].shape == (16,) for i in range(8))


def _global_batches(loader, per_batch: int, count: int) -> list:
    it = iter(loader)
    out = []
    for _ in range(count):
        out.append([row for _ in range(per_batch) for row in next(it)["tokens"].tolist()])
    return out


@pytest.mark.parallel
def test_data_parallel_ranks_split_each_global_batch(tiny_data, second_data, tmp_path, dist_single):
    """DP=2 under torchrun: in every global batch the two ranks' samples are disjoint and together the
    DP=1 global batch (NeMo's MegatronDataSampler over megatron's pretraining sampler)."""
    train = [0.25, str(tiny_data), 0.75, str(second_data)]
    out = tmp_path / "dp2.json"
    torchrun([WORKERS / "data_dp.py", json.dumps(train), tmp_path / "cache_dp2", out, 6])
    got = json.loads(out.read_text())
    m = _train_ds(_settings(train), tmp_path / "cache_dp1", 4 * 6)
    ref = _global_batches(m.data_sampler.transform_dataloader(m.train_dataloader()), 2, 6)  # DP=1: 2 micro-batches
    for g, want in enumerate(ref):
        r0, r1 = got["0"][g], got["1"][g]
        assert len(r0) == len(r1) == 2
        assert not {tuple(x) for x in r0} & {tuple(x) for x in r1}, g
        assert r0 + r1 == want, g  # rank r reads the r-th slice of the global batch


def test_refusals_of_bad_training_data(tiny_ckpt, tiny_student, tiny_data, tmp_path, capsys):
    """Before any model or trainer: a bad blend, a missing or empty prefix, ids the model cannot embed."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from nemo_minitron.cli import main
    from nemo_minitron.data import indexed

    empty = tmp_path / "empty"
    IndexedDatasetBuilder(f"{empty}.bin", dtype=DType.optimal_dtype(256)).finalize(f"{empty}.idx")

    class Shifted(ByteTokenizer):  # ids 100..355: data tokenized for a larger vocabulary than the model's 256
        def __len__(self):
            return 356

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [b + 100 for b in text.encode("utf-8")]}

    wide = tmp_path / "wide"
    indexed.write(wide, ["café naïve " * 50], Shifted(), progress=False)  # max id 0xC3 + 100 = 295
    out = tmp_path / "out"
    base = [f"teacher={tiny_ckpt}", f"student={tiny_student}", f"output={out}", "data.seq_length=32",
            "data.global_batch_size=4", "trainer.max_steps=2"]
    cases = [
        (f"data.train=[0.3,{tiny_data},0.7]", "odd number"),
        (f"data.train=[0,{tiny_data},1,{tiny_data}]", "positive"),
        (f"data.train=[0.5,{tiny_data},0.5,{tmp_path / 'nope'}]", "not found"),
        (f"data.train={empty}", "empty"),
        (f"data.train=[{tiny_data},{wide}]", "token id 295"),
        (f"data.train={tiny_data} data.validation={wide}", "different tokenizers"),
        (f"data.train={tiny_data} data.split=90,10,0", "the validation part"),  # 4 documents: none for it
    ]
    for arg, msg in cases:
        assert main(["distill", *base, *arg.split()]) == 2, arg
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and err.count("\n") == 1, (msg, err)
    assert not out.exists()


def test_dry_run_reports_the_data(tiny_ckpt, tiny_student, tiny_data, second_data, capsys):
    from nemo_minitron.cli import main
    from nemo_minitron.data import indexed

    args = ["distill", f"teacher={tiny_ckpt}", f"student={tiny_student}", "output=unused",
            f"data.train=[0.25,{tiny_data},0.75,{second_data}]", "data.seq_length=32", "data.global_batch_size=8",
            "trainer.max_steps=1000", "trainer.devices=1", "--dry-run"]
    assert main(args) == 0
    out = capsys.readouterr().out
    n1, n2 = indexed.num_tokens(tiny_data), indexed.num_tokens(second_data)
    assert "data: 8,000 samples x 33 tokens" in out
    # 8,000 x 0.75 x 1.005 samples of 32 tokens from the second component: its epochs
    epochs2 = 6030 * 32 / (n2 - 1)
    assert f"75.0%  {second_data}: {n2 / 1e3:.2f}K tokens" in out and f"= {epochs2:.2f} epoch(s)" in out
    assert f"25.0%  {tiny_data}: {n1 / 1e3:.2f}K tokens" in out
    assert "sample index: ~" in out and "unused/data_index" in out


def test_preprocess_many_files_per_file_and_together(tmp_path, capsys):
    from nemo_minitron.data import indexed
    from nemo_minitron.data.corpus import shakespeare_files

    src = tmp_path / "texts"
    src.mkdir()
    files = shakespeare_files("heldout")[:3]
    for f in files:
        (src / f.name).write_text(f.read_text()[:3000])
    tok = tmp_path / "tok"
    from hf_fixtures import make_tokenizer

    make_tokenizer(tok)
    from nemo_minitron.cli import main

    # in-process: the command's own code without a new interpreter per call
    assert main(["preprocess", f"input={src}", f"tokenizer={tok}", f"output_prefix={tmp_path / 'parts'}",
                 "preprocess.per_file=true"]) == 0
    p = capsys.readouterr()
    assert p.out.strip().splitlines()[-1] == f"wrote datasets: 3 prefixes in {tmp_path / 'parts'}"
    assert "tokenizing 3 file(s)" in p.err  # one progress bar over the whole input
    parts = [tmp_path / "parts" / f.stem for f in sorted(files)]
    assert all(indexed.exists(x) for x in parts)
    assert f"data.train=[{','.join(str(x) for x in parts)}]" in p.out
    assert main(["preprocess", f"input={src}/*.txt", f"tokenizer={tok}", f"output_prefix={tmp_path / 'all'}"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("wrote dataset:")
    assert indexed.num_tokens(tmp_path / "all") == sum(indexed.num_tokens(x) for x in parts)
    # a second run refuses to overwrite a part, and writes nothing
    assert main(["preprocess", f"input={src}", f"tokenizer={tok}", f"output_prefix={tmp_path / 'parts'}",
                 "preprocess.per_file=true"]) == 2
    assert "exists" in capsys.readouterr().err
