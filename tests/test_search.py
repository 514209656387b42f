"""Architecture search: candidate enumeration (valid shapes only, at any TP/PP), every candidate built and
sharded for real under torchrun, the search command end to end on a tiny model (ranking, short
distillations, table, winner, resume), and refusals before any work."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import WORKERS, cli_here, in_process, torchrun

REPO = Path(__file__).resolve().parent.parent


def _llama8b_spec():
    from nemo_minitron.model.spec import from_hf_config

    return from_hf_config(json.loads((REPO / "conf/recipes/llama-3.1-8b/config.json").read_text()))


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (8, 2)])
def test_enumeration_emits_only_valid_shapes_within_budget(tp, pp):
    from nemo_minitron.model import count_params, tiny_spec
    from nemo_minitron.model.precision import check_fp8_shapes
    from nemo_minitron.model.spec import ModelSpec
    from nemo_minitron.prune.plan import validate_targets
    from nemo_minitron.search.space import DIMS, enumerate_candidates

    smol_like = ModelSpec("LlamaConfig", dict(tiny_spec().args, num_layers=30, hidden_size=576, ffn_hidden_size=1536,
                                              num_attention_heads=9, num_query_groups=3, kv_channels=64,
                                              vocab_size=49152))
    specs = [tiny_spec(), tiny_spec(num_attention_heads=8, num_query_groups=4, ffn_hidden_size=192), smol_like,
             _llama8b_spec()]
    total = 0
    for spec in specs:
        P = count_params(spec)
        for frac in (0.4, 0.5, 0.7):
            for fp8 in (False, True):
                cands, stats = enumerate_candidates(spec, int(frac * P), 0.08, tp=tp, pp=pp, fp8_shapes=fp8,
                                                    multiple=16 if spec.hidden_size < 1024 else 128,
                                                    dims=DIMS)
                assert stats["combinations"] > 0
                names = [c["name"] for c in cands]
                assert len(names) == len(set(names))
                for c in cands:
                    shape = {k: c[k] for k in DIMS}
                    validate_targets(spec, {k: v for k, v in shape.items() if k != "num_layers"}, tp)
                    s2 = spec.replace(kv_channels=spec.kv_channels, **shape)
                    s2.validate_layout(tp, pp)
                    assert count_params(s2) == c["params"]
                    assert 0.92 * frac * P - 1 <= c["params"] <= 1.08 * frac * P + 1
                    assert s2.kv_channels == spec.kv_channels
                    assert c["num_attention_heads"] // c["num_query_groups"] <= (
                        spec.num_attention_heads // spec.num_query_groups)
                    if fp8:
                        check_fp8_shapes({**shape, "kv_channels": spec.kv_channels}, tp)
                total += len(cands)
    assert total > 0


def test_enumeration_finds_the_published_minitron_4b_width_shape():
    """Llama-3.1-8B at ~4.5B, TP=8: the published Width shape (hidden 3072, ffn 9216, 32 heads / 8 groups,
    32 layers) is among the candidates when its values are in the space."""
    from nemo_minitron.search.space import enumerate_candidates

    spec = _llama8b_spec()
    cands, _ = enumerate_candidates(spec, 4_500_000_000, 0.05, tp=8, pp=1, multiple=128,
                                    space={"ffn_hidden_size": [7168, 9216, 10752, 14336]})
    names = {c["name"] for c in cands}
    assert "L32-h3072-f9216-a32-g8" in names
    assert all(c["ffn_hidden_size"] in (7168, 9216, 10752, 14336) for c in cands)


def test_budget_parsing_and_refusals():
    from nemo_minitron.errors import UserError
    from nemo_minitron.search.space import parse_budget

    assert parse_budget("50%", 1000) == 500
    assert parse_budget(0.5, 1000) == 500
    assert parse_budget("0.25", 1000) == 250
    assert parse_budget("4.5B", 8_000_000_000) == 4_500_000_000
    assert parse_budget("70M", 134_000_000) == 70_000_000
    assert parse_budget(600, 1000) == 600
    for bad in ("1.5B", "abc", "0", "100%", 2000):
        with pytest.raises(UserError):
            parse_budget(bad, 1000)


def test_candidate_parameter_counts_are_the_built_models(dist_single):
    """A candidate's parameter count (what the budget is checked against) is the number of parameters of the
    megatron model built with its shape, tied and untied embeddings alike (not count_params against itself)."""
    from nemo_minitron.model import build, count_params, tiny_spec
    from nemo_minitron.search.space import DIMS, enumerate_candidates

    checked = 0
    for spec in (tiny_spec(), tiny_spec(share_embeddings_and_output_weights=True, ffn_hidden_size=192)):
        built = sum(p.numel() for p in build(spec).parameters())  # tied: one shared tensor, counted once
        assert count_params(spec) == built
        cands, _ = enumerate_candidates(spec, int(0.6 * built), 0.1, tp=1, pp=1, fp8_shapes=False, multiple=16,
                                        dims=DIMS)
        assert cands
        for c in cands:
            s2 = spec.replace(kv_channels=spec.kv_channels, **{k: c[k] for k in DIMS})
            assert c["params"] == sum(p.numel() for p in build(s2).parameters()), c["name"]
            checked += 1
    assert checked >= 4


def test_every_candidate_builds_and_shards_at_tp2_and_pp2(tiny_ckpt, tiny_windows, tmp_path, dist_single):
    """Each candidate the enumeration emits at TP=2 / PP=2 is pruned into a real sharded megatron model under
    torchrun, and its loss equals the single-process model's for the same candidate."""
    sys.path.insert(0, str(WORKERS))
    import search_candidates

    windows, wpath = tiny_windows
    ref = search_candidates.losses(tiny_ckpt, windows, 1, 1)
    assert len(ref) >= 10
    out = tmp_path / "layouts.json"
    torchrun([WORKERS / "search_candidates.py", tiny_ckpt, wpath, out, "2x1,1x2"], timeout=900)
    for layout, got in json.loads(out.read_text()).items():
        assert len(got) >= 4, (layout, got)
        for name, r in got.items():
            assert name in ref, name
            assert r["loss"] == pytest.approx(ref[name]["loss"], abs=2e-5), (layout, name)


# ---------------------------------------------------------------------------------------------------------
# the command, end to end on a tiny imported HF Llama and real text
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def search_inputs(tiny_ckpt, tiny_data, second_data, tmp_path_factory):
    """The tiny NeMo checkpoint as the model; real text (byte tokens) for calibration and validation, and a
    blend of two corpora for the finalists' distillations."""
    return {"teacher": tiny_ckpt, "data": tiny_data, "train": f"[0.5,{tiny_data},0.5,{second_data}]",
            "tmp": tmp_path_factory.mktemp("search")}


def _search_args(d, out):
    return [f"model={d['teacher']}", f"output={out}", f"data.calibration={d['data']}",
            f"data.train={d['train']}", f"data.validation={d['data']}", "data.seq_length=32",
            "data.calibration_samples=8", "search.params=0.6", "search.tolerance=0.1", "search.multiple=16",
            "search.max_candidates=6", "search.top_k=2", "search.distill_steps=4", "search.eval_samples=8",
            "search.eval_seq_length=32", "search.rank_samples=8", "search.depth_samples=8", "distill.seq_length=32",
            "distill.micro_batch_size=2", "distill.global_batch_size=4", "distill.lr=3e-3", "distill.min_lr=3e-4",
            "search.baseline={hidden_size: 48, ffn_hidden_size: 96}"]


def test_search_end_to_end(search_inputs, tmp_path, dist_single, capsys):
    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.model import count_params

    d = search_inputs
    out = tmp_path / "search"
    res = cli_here(capsys, "search", *_search_args(d, out))  # the orchestrator here, its stages in processes
    assert res.stdout.strip().splitlines()[-1] == f"wrote search table: {out / 'search.md'}"
    # the finalists are evaluated by one evaluate process (a list of models)
    ev_lines = [line for line in res.stdout.splitlines() if " -m nemo_minitron.cli evaluate " in line]
    assert len(ev_lines) == 1 and ev_lines[0].startswith("[evaluate] ") and "model=[" in ev_lines[0]
    table = json.loads((out / "search.json").read_text())
    src_params = count_params(ck.read_spec(d["teacher"]))
    assert table["source_params"] == src_params and table["budget"] == round(0.6 * src_params)

    # every candidate: within the budget, a loss right after pruning, ranked by it
    cands = table["candidates"]
    assert 1 <= len(cands) <= 6
    for c in cands:
        assert 0.9 * table["budget"] <= c["params"] <= 1.1 * table["budget"]
        assert c["pruned_loss"] > 0
    assert [c["pruned_rank"] for c in cands] == list(range(1, len(cands) + 1))
    assert [c["pruned_loss"] for c in cands] == sorted(c["pruned_loss"] for c in cands)

    # finalists: the top 2 by pruned loss + the baseline, each distilled and evaluated
    fin = {r["name"]: r for r in table["finalists"]}
    top2 = [c["name"] for c in cands[:2]]
    assert set(fin) == set(top2) | {table["baseline"]["name"]}
    for name, r in fin.items():
        assert ck.is_checkpoint(Path(r["checkpoint"])) and ck.is_checkpoint(Path(r["pruned_checkpoint"]))
        ev = json.loads((out / "eval" / f"{name}.json").read_text())
        assert r["distilled_loss"] == ev["loss"]
        metrics = (out / "distill" / name / "metrics.jsonl").read_text()
        assert '"step": 4' in metrics
        spec = ck.read_spec(Path(r["checkpoint"]))
        assert (spec.num_layers, spec.hidden_size, spec.ffn_hidden_size) == (
            r["num_layers"], r["hidden_size"], r["ffn_hidden_size"])
    # the winner has the lowest loss after distillation among the top K; the flag agrees with the ranks
    best = min(top2, key=lambda n: fin[n]["distilled_loss"])
    assert table["winner"] == best
    by_pruned = sorted(top2, key=lambda n: fin[n]["pruned_loss"])
    by_dist = sorted(top2, key=lambda n: fin[n]["distilled_loss"])
    assert table["ranking_changed"] == (by_pruned != by_dist)
    b = table["baseline"]
    assert b["winner_minus_baseline"] == pytest.approx(fin[best]["distilled_loss"] - fin[b["name"]]["distilled_loss"])
    md = (out / "search.md").read_text()
    assert "loss after distillation" in md and "(baseline)" in md and f"Winner: **{best}**" in md
    win = (out / "winner.yaml").read_text()
    assert f"name: {best}" in win and "prune:" in win

    # the pruned checkpoint of a finalist (the sequential refit) has the loss recorded for it on the ranking
    # windows, near the one-shot refit's that ranked it
    ev = cli_here(capsys, "evaluate", f"model={fin[top2[0]]['pruned_checkpoint']}", f"data={d['data']}",
                  "eval.num_samples=8", "eval.seq_length=32")
    assert f"loss {fin[top2[0]]['pruned_loss_sequential']:.4f}" in ev.stdout
    assert abs(fin[top2[0]]["pruned_loss_sequential"] - fin[top2[0]]["pruned_loss"]) < 0.2

    # ranked from statistics gathered in the one calibration pass; a re-run that finds them (a rank phase killed
    # after the calibration) does no second calibration pass and ranks the same
    assert "calibration statistics of qkv, fc1, proj, fc2 for every layer" in res.stdout
    assert json.loads((out / "stats" / "meta.json").read_text())["sites"] == ["qkv", "fc1", "proj", "fc2"]
    ranked = json.loads((out / "candidates.json").read_text())
    assert ranked["rank"] == {"num_samples": 8, "refit": "one_shot"}
    (out / "candidates.json").unlink()  # ... and, above search.stats_max_gib, read layer by layer from disk
    again = cli_here(capsys, "search", *_search_args(d, out), "search.phase=rank", "search.stats_max_gib=0")
    assert "(no calibration pass" in again.stdout and "calibration:" not in again.stdout + again.stderr
    assert "on disk in" in again.stdout and "read per layer" in again.stdout
    assert [c["pruned_loss"] for c in json.loads((out / "candidates.json").read_text())["candidates"]] == \
        [c["pruned_loss"] for c in ranked["candidates"]]
    # the same finalists as ranking with today's sequential refit of every candidate (which the finalists'
    # checkpoints get): the recorded losses are those of the sequential ranking
    seq = tmp_path / "sequential"
    cli_here(capsys, "search", *_search_args(d, seq), "search.phase=rank", "search.rank_refit=sequential")
    by_seq = {c["name"]: c for c in json.loads((seq / "candidates.json").read_text())["candidates"]}
    assert json.loads((seq / "candidates.json").read_text())["finalists"] == ranked["finalists"]
    for name in top2:
        assert fin[name]["pruned_loss_sequential"] == pytest.approx(by_seq[name]["pruned_loss"], abs=1e-6)

    # re-running the same command redoes nothing but the table (the report phase alone: the SLURM job array's
    # report job, tests/test_slurm.py)
    again = cli_here(capsys, "search", *_search_args(d, out))
    assert "[rank] complete, skipped" in again.stdout
    assert all(f"[distill_{n}] complete, skipped" in again.stdout for n in fin)
    assert f"winner: {best}" in again.stdout

    # a finalist index out of range is refused (the CLI's code, in this process)
    from nemo_minitron import config
    from nemo_minitron.errors import UserError
    from nemo_minitron.search import command

    with pytest.raises(UserError, match=f"{len(fin)} finalists"):
        command.run(config.load("search", [*_search_args(d, out), "search.phase=distill", "search.candidate=7"]))


def test_search_statistics_and_one_shot_ranking_equal_across_layouts(tiny_ckpt, tiny_windows, tmp_path,
                                                                      dist_single):
    """The calibration statistics (every site's Gram matrix, rows split over TP, sums over DP) and every
    candidate's ranking loss with its refit solved from them, at TP=2 x DP=2 (4 processes): one process's."""
    sys.path.insert(0, str(WORKERS))
    import search_stats
    import torch

    windows, wpath = tiny_windows
    ref = search_stats.run(tiny_ckpt, windows, 1, 1)
    assert len(ref["losses"]) >= 10 and len(ref["grams"]) == 4 * 4
    out = tmp_path / "tp2dp2.pt"
    torchrun([WORKERS / "search_stats.py", tiny_ckpt, wpath, out, 2, 1], nproc=4, timeout=900)
    got = torch.load(out)
    assert got["grams"].keys() == ref["grams"].keys()
    for k, G in ref["grams"].items():  # float32 activations summed in another order: 1e-6 of the matrix's scale
        torch.testing.assert_close(got["grams"][k], G, rtol=0, atol=1e-6 * float(G.abs().max()),
                                   msg=lambda m: f"{k}: {m}")
    for k in ("heads", "ffn", "hidden"):
        torch.testing.assert_close(got["scores"][k], ref["scores"][k], rtol=1e-5, atol=1e-8)
    common = set(got["losses"]) & set(ref["losses"])  # (shapes TP=2 cannot split are not candidates there)
    assert len(common) >= 6
    for name in common:
        assert got["losses"][name] == pytest.approx(ref["losses"][name], abs=1e-5), name


def test_search_refusals(search_inputs, tmp_path, capsys):
    from hf_fixtures import make_hf_llama

    d = search_inputs
    out = tmp_path / "s"
    stats = tmp_path / "stats"  # statistics saved by a run with other calibration settings
    stats.mkdir()
    (stats / "meta.json").write_text(json.dumps({
        "model": str(d["teacher"]), "calibration": str(d["data"]), "calibration_samples": 4, "seq_length": 32,
        "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "seq_agg": "mean", "batch_agg": "l2",
        "sites": ["qkv", "fc1", "proj", "fc2"]}))
    cases = [
        (["search.params=200%"], "budget must be below"),
        (["search.params=2.0"], "fraction of the source is at most 1"),
        (["search.params=0.05", "search.tolerance=0.01"], "no candidate shape"),
        ([f"model={make_hf_llama(tmp_path / 'hf')}"], "import it first"),
        (["search.phase=distill"], "run search.phase=rank"),
        (["search.phase=nope"], "search.phase"),
        (["search.baseline={hidden_size: 999}"], "larger than the source"),
        (["trainer.strategy.tensor_model_parallel_size=3"], "not divisible"),
        (["search.rank_refit=once"], "search.rank_refit"),
        (["search.score=mmlu"], "search.score='mmlu'"),
        (["search.score=downstream", "search.score_tasks=[no_such_task]"], "unknown lm-eval task"),
        (["search.score=downstream", "search.score_tasks=[]"], "needs search.score_tasks"),
        ([f"search.stats={stats}"], "measured with calibration_samples=4, this search has 8"),
        ([f"search.stats={tmp_path}"], "no complete calibration statistics"),
    ]
    from nemo_minitron import config
    from nemo_minitron.errors import UserError
    from nemo_minitron.search import command

    for extra, msg in cases:  # in-process: the same code the CLI runs, without its start-up per case
        args = _search_args(d, out) + extra
        if extra[0].startswith("model="):
            args = [a for a in args if not a.startswith("model=")] + extra
        with pytest.raises(UserError, match=msg.replace(".", r"\.")):
            command.run(config.load("search", args))
        assert not (out / "candidates.json").exists()
    res = in_process(capsys, "search", *_search_args(d, out), "search.params=200%")  # the CLI's exit status and line
    assert res.returncode == 2 and res.stderr.startswith("error: ") and "budget must be below" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    # the finalists' distillations get every precision/FP8/memory key (planned for the cluster: FP8 accepted)
    fp8 = ["trainer.transformer_impl=transformer_engine", "trainer.precision=bf16", "trainer.fp8=hybrid",
           "trainer.fp8_recipe=tensorwise", "trainer.fp8_first_last_layers_bf16=true", "trainer.teacher_fp8=true",
           "trainer.recompute_granularity=selective", "optim.overlap_grad_reduce=true", "optim.bucket_size=1000000"]
    dry = cli_here(capsys, "search", *_search_args(d, out), *fp8, "--dry-run")
    line = next(x for x in dry.stdout.splitlines() if x.startswith("each finalist's distillation: nemo-minitron distill"))
    for key in ("model.transformer_impl=transformer_engine", "model.precision=bf16", "model.fp8=hybrid",
                "model.fp8_recipe=tensorwise", "model.fp8_first_last_layers_bf16=true", "model.teacher_fp8=true",
                "model.recompute_granularity=selective", "optim.overlap_grad_reduce=true",
                "optim.bucket_size=1000000", "trainer.strategy.tensor_model_parallel_size=1", "trainer.max_steps=4"):
        assert f" {key} " in f" {line} ", key
    assert "candidates" in dry.stdout and "dry run: nothing was run" in dry.stdout
    assert "each finalist's distillation: 4 steps" in dry.stdout and "data: 16 samples x 33 tokens" in dry.stdout
    assert dry.stdout.count(" 50.0%  ") == 2 and "sample index: ~" in dry.stdout


def test_search_ranks_finalists_by_downstream_accuracy(family_ckpts, tmp_path, capsys, dist_single):
    """search.score=downstream: the distilled finalists are scored on lm-eval tasks (the same seeded documents for
    each) and ranked by their average accuracy, the loss shown beside it; a tiny Qwen2 with its tokenizer."""
    from hf_fixtures import TEXT

    hf_src, ckpt = family_ckpts["qwen2"]
    (tmp_path / "text.txt").write_text(TEXT * 60)
    assert in_process(capsys, "preprocess", f"input={tmp_path / 'text.txt'}", f"tokenizer={hf_src}",
                      f"output_prefix={tmp_path / 'data'}").returncode == 0
    data, out = tmp_path / "data", tmp_path / "s"
    res = cli_here(capsys, "search", f"model={ckpt}", f"output={out}", f"data.calibration={data}", f"data.train={data}",
              f"data.validation={data}", "data.seq_length=32", "data.calibration_samples=8", "search.params=0.85",
              "search.tolerance=0.1", "search.multiple=16", "search.max_candidates=3", "search.top_k=2",
              "search.distill_steps=2", "search.eval_samples=4", "search.eval_seq_length=32", "search.rank_samples=4",
              "search.depth_samples=4", "distill.seq_length=32", "distill.micro_batch_size=2",
              "distill.global_batch_size=4", "search.score=downstream", "search.score_tasks=[piqa,arc_easy]",
              "search.score_limit=8")
    table = json.loads((out / "search.json").read_text())
    assert table["score"] == "downstream" and table["score_tasks"]["tasks"] == ["piqa", "arc_easy"]
    fin = [r for r in table["finalists"] if r["in_top_k"]]
    assert len(fin) == 2
    for r in fin:
        ev = json.loads((out / "eval" / f"{r['name']}.json").read_text())
        assert ev["tasks"]["piqa"]["n"] == 8 and ev["tasks"]["arc_easy"]["n"] == 8
        acc = (ev["tasks"]["piqa"]["metrics"]["acc_norm"][0] + ev["tasks"]["arc_easy"]["metrics"]["acc_norm"][0]) / 2
        assert r["distilled_accuracy"] == pytest.approx(acc) and r["distilled_loss"] == ev["loss"]
    ranked = sorted(fin, key=lambda r: (-r["distilled_accuracy"], r["distilled_loss"]))
    assert [r["distilled_rank"] for r in ranked] == [1, 2] and table["winner"] == ranked[0]["name"]
    assert table["loss_and_score_agree"] == (
        [r["name"] for r in ranked] == [r["name"] for r in sorted(fin, key=lambda r: r["distilled_loss"])])
    md = (out / "search.md").read_text()
    assert "accuracy after distillation" in md and "Ranked by **downstream accuracy**" in md
    assert res.stdout.strip().splitlines()[-1] == f"wrote search table: {out / 'search.md'}"


def test_moe_candidates_experts_and_expert_width_within_total_or_active_budget(capsys):
    """A mixture of experts (Qwen3-30B-A3B's published config): the MLP's search dimensions are the expert count
    (multiples of EP, at least top-k) and the expert width; the budget counts total or active parameters
    (search.params_kind), every candidate records both, and each one is a valid pruning at TP/PP/EP whose counts
    are those of its shape. The search dry run lists them (a run refuses a mixture of experts: its distillations are
    not built yet)."""
    from nemo_minitron.cli import main
    from nemo_minitron.errors import UserError
    from nemo_minitron.model import count_params
    from nemo_minitron.model.spec import from_hf_config
    from nemo_minitron.prune.plan import validate_targets
    from nemo_minitron.search.space import MOE_SEARCH_DIMS, default_dims, enumerate_candidates

    cfg = REPO / "conf/recipes/qwen3-30b-a3b"
    spec = from_hf_config(json.loads((cfg / "config.json").read_text()))
    dims = default_dims(spec, ["num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads"])
    assert dims == ["num_layers", "hidden_size", "num_moe_experts", "moe_ffn_hidden_size", "num_attention_heads"]
    seen = {}
    for kind, frac in (("total", 0.7), ("active", 0.8)):
        P = count_params(spec, active=kind == "active")
        cands, stats = enumerate_candidates(spec, int(frac * P), 0.05, dims=dims, tp=2, pp=2, ep=8, multiple=128,
                                            params_kind=kind)
        assert cands, stats
        for c in cands:
            shape = {k: c[k] for k in MOE_SEARCH_DIMS}
            validate_targets(spec, {k: v for k, v in shape.items() if k != "num_layers"}, 2)
            s2 = spec.replace(kv_channels=spec.kv_channels, **shape)
            s2.validate_layout(2, 2, 8)
            assert c["num_moe_experts"] % 8 == 0 and c["num_moe_experts"] >= spec.moe_router_topk
            assert c["total_params"] == count_params(s2) and c["active_params"] == count_params(s2, active=True)
            assert c["params"] == c[f"{kind}_params"] and 0.95 * frac * P - 1 <= c["params"] <= 1.05 * frac * P + 1
            assert f"-e{c['num_moe_experts']}-m{c['moe_ffn_hidden_size']}-" in c["name"]
        seen[kind] = {c["name"] for c in cands}
    # fewer experts cut total parameters but not active ones: the active budget is met by other shapes
    assert seen["total"] != seen["active"]
    assert any(c["num_moe_experts"] < 128 for c in enumerate_candidates(
        spec, int(0.7 * count_params(spec)), 0.05, dims=dims, ep=8, multiple=128)[0])
    with pytest.raises(UserError, match="ffn_hidden_size"):
        enumerate_candidates(spec, int(0.7 * count_params(spec)), 0.05, dims=["ffn_hidden_size"])
    with pytest.raises(UserError, match="not a mixture of experts"):
        enumerate_candidates(_llama8b_spec(), 4_000_000_000, 0.05, params_kind="active")

    base = ["search", f"model={cfg}", "output=unused", "search.params=0.75", "search.params_kind=active",
            "search.multiple=128", "trainer.strategy.expert_model_parallel_size=8", "--dry-run"]
    assert main(base) == 0
    out = capsys.readouterr().out
    assert "active parameters +-5%" in out and "M total, " in out and "M active)" in out
    assert "a search's distillations of a mixture of experts are not available yet" in out
