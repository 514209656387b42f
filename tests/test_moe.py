"""Mixture-of-experts families on tiny random models from ``transformers``: Mixtral (top-k probabilities always
renormalized) and Qwen3-MoE (q/k norms; ``norm_topk_prob=False``, the full softmax's probabilities). Import, the
Hugging Face directory read directly and the HF export are compared with ``transformers`` itself (logits, fp32,
1e-5 of their scale); the commands that do not handle experts yet refuse in one line."""

import json

import pytest
import torch

from conftest import WORKERS, cli, cli_here, commands, torchrun
from hf_fixtures import TEXT

MOE_MODELS = {  # name -> (model_type, config overrides)
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=96)),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                                    intermediate_size=160, head_dim=16, norm_topk_prob=False)),
}


def _experts_like_trained(src) -> None:
    """Give the random model two traits of trained mixtures of experts that pruning exploits, so that the tests
    below can tell a good choice from a bad one (with i.i.d. random experts every choice is alike): experts of
    unequal strength (each layer's experts scaled by 0.15 .. 1.5, in a random order per layer) and redundant neurons
    (each expert's second half of neurons near copies of its first half, as correlated activations make them in a
    trained model)."""
    import re

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    sd = model.state_dict()
    g = torch.Generator().manual_seed(5)
    experts = {}
    for k in sd:
        m = re.match(r"model\.layers\.(\d+)\..*experts\.(\d+)\.(w1|w3|gate_proj|up_proj)\.weight$", k)
        if m:
            experts.setdefault((int(m.group(1)), int(m.group(2))), []).append(k)
    n = 1 + max(j for _, j in experts)
    with torch.no_grad():
        for layer in {l for l, _ in experts}:
            scales = torch.linspace(0.15, 1.5, n)[torch.randperm(n, generator=g)]
            for j in range(n):
                for k in experts[(layer, j)]:  # gate and up rows: neuron f + F/2 ~ neuron f
                    w = sd[k]
                    half = w.shape[0] // 2
                    w[half:2 * half] = w[:half] + 0.05 * torch.randn(half, w.shape[1], generator=g)
                down = experts[(layer, j)][0].replace("w1", "w2").replace("w3", "w2")
                down = down.replace("gate_proj", "down_proj").replace("up_proj", "down_proj")
                sd[down] *= scales[j]
    model.save_pretrained(str(src))


@pytest.fixture(scope="module")
def moe_ckpts(tmp_path_factory, dist_single):
    from hf_fixtures import make_and_import

    return make_and_import(tmp_path_factory.mktemp("moe"), MOE_MODELS, _experts_like_trained)


def _ids(src):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src))
    return torch.tensor([tok(TEXT)["input_ids"][:96]] * 2)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids), None)[..., :320]


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _close(got, ref, what):
    diff, scale = (got.double() - ref.double()).abs().max().item(), max(1.0, ref.abs().max().item())
    print(f"{what}: max |diff| = {diff:.2e} (max |logit| {scale:.1f})")
    assert diff <= 1e-5 * scale, (what, diff, scale)


@pytest.mark.parametrize("name", list(MOE_MODELS))
def test_moe_import_and_export_match_transformers(name, moe_ckpts, tmp_path):
    from nemo_minitron import cli as cli_mod
    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.checkpoint.loader import load_model
    from nemo_minitron.model import count_params

    src, ckpt = moe_ckpts[name]
    hf_cfg = json.loads((src / "config.json").read_text())
    spec = ck.read_spec(ckpt)
    experts = hf_cfg.get("num_local_experts") or hf_cfg.get("num_experts")
    width = hf_cfg.get("moe_intermediate_size") or hf_cfg["intermediate_size"]
    assert spec.config_class == {"mixtral": "MixtralConfig", "qwen3_moe": "Qwen3MoEConfig"}[name]
    assert (spec.num_moe_experts, spec.moe_router_topk, spec.moe_ffn_hidden_size) == \
        (experts, hf_cfg["num_experts_per_tok"], width)
    # Mixtral renormalizes the top-k probabilities (megatron: softmax over the top-k logits); Qwen3-MoE without
    # norm_topk_prob keeps the full softmax's (megatron: pre-softmax)
    assert spec.get("moe_router_pre_softmax") is (name == "qwen3_moe")
    hf_model = _hf(src)
    assert count_params(spec) == sum(p.numel() for p in hf_model.parameters())
    per_expert = 3 * spec.hidden_size * width * spec.num_layers
    assert count_params(spec) - count_params(spec, active=True) == (experts - spec.moe_router_topk) * per_expert

    ids = _ids(src)
    with torch.no_grad():
        ref = hf_model.double()(ids).logits.float()
    for source in (ckpt, src):
        model, _, _ = load_model(source)
        _close(_logits(model, ids), ref, f"{name} {source.name} vs transformers")

    out = tmp_path / "hf"
    assert cli_mod.main(["export", f"model={ckpt}", "format=hf", f"output={out}", "export.dtype=fp32"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == hf_cfg["architectures"]
    for key in ("num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                "intermediate_size", "norm_topk_prob"):
        assert cfg.get(key) == hf_cfg.get(key), key
    with torch.no_grad():
        _close(_hf(out).double()(ids).logits.float(), ref, f"{name} HF export")


def test_moe_refusals(moe_ckpts, tiny_ckpt, tmp_path, capsys, monkeypatch):
    """What the converter cannot represent is named before any weight is read; commands that do not handle experts
    yet refuse in one line (no traceback)."""
    from nemo_minitron import cli as cli_mod
    from nemo_minitron.errors import UserError
    from nemo_minitron.model.spec import from_hf_config

    src, ckpt = moe_ckpts["qwen3_moe"]
    base = json.loads((src / "config.json").read_text())
    for change, words in ((dict(num_experts_per_tok=9), "more than the 8 experts"),
                          (dict(decoder_sparse_step=2), "decoder_sparse_step=2"),
                          (dict(mlp_only_layers=[1]), "mlp_only_layers"),
                          (dict(num_experts=0), "num_experts=0")):
        with pytest.raises(UserError, match=words):
            from_hf_config({**base, **change})
    mixtral = json.loads((moe_ckpts["mixtral"][0] / "config.json").read_text())
    with pytest.raises(UserError, match="router_jitter_noise"):
        from_hf_config({**mixtral, "router_jitter_noise": 0.1})

    capsys.readouterr()
    prune = ["prune", f"model={ckpt}", f"output={tmp_path / 'p'}", f"data.calibration={tmp_path / 'none'}"]
    for args, words in ((["prune.num_moe_experts=1"], "fewer than the 2 experts each token is routed to"),
                        (["prune.ffn_hidden_size=32"], "has no dense MLP"),
                        (["prune.moe_ffn_hidden_size=0"], "must be a positive integer"),
                        (["prune.num_moe_experts=4", "prune.expert_importance=bogus"], "expert_importance"),
                        (["prune.num_moe_experts=4", "WORLD_SIZE=2"], "runs in one process for now")):
        with monkeypatch.context() as m:
            if "WORLD_SIZE=2" in args:  # as torchrun sets it (DP=2): a valid layout, the refusal is MoE's
                m.setenv("WORLD_SIZE", "2")
                args = args[:-1]
            assert cli_mod.main(prune + args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (args, err)
    assert cli_mod.main(["prune", f"model={moe_ckpts['mixtral'][1]}", f"output={tmp_path / 'p'}",
                         "prune.num_moe_experts=3", f"data.calibration={tmp_path / 'none'}"]) == 2
    assert "experts" not in capsys.readouterr().err  # Mixtral: 4 experts, top-2: 3 is allowed (the data is not)
    with monkeypatch.context() as m:  # expert parallelism: experts that do not divide, a dense model, tasks
        m.setenv("WORLD_SIZE", "2")
        for args, words in ((["model.expert_model_parallel_size=3"], "not divisible by TP*PP*EP"),):
            assert cli_mod.main(["evaluate", f"model={ckpt}", f"data={tmp_path / 'none'}", *args]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            if args[0].startswith("model."):  # the spelling, read as the layout key (one notice)
                assert err[0].startswith("note: model.expert_model_parallel_size is read as trainer.strategy.")
                err = err[1:]
            assert len(err) == 1 and words in err[0], (args, err)
    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.model.spec import tiny_spec

    with pytest.raises(UserError, match="num_moe_experts=8 is not divisible by expert_model_parallel_size=3"):
        ck.read_spec(ckpt).validate_layout(1, 1, 3)
    with pytest.raises(UserError, match="not a mixture of experts"):
        tiny_spec().validate_layout(1, 1, 2)
    kd = ["distill", f"teacher={ckpt}", f"student={ckpt}", f"output={tmp_path / 'd'}", f"data.train={tmp_path / 'none'}"]
    for world, args, words in (
            ("6", ["trainer.strategy.expert_model_parallel_size=3"],
             "num_moe_experts=8 is not divisible by expert_model_parallel_size=3"),
            ("2", ["model.moe_aux_loss_coeff=-1"], "model.moe_aux_loss_coeff=-1 must be a number >= 0"),
            ("4", ["trainer.strategy.expert_model_parallel_size=2", "trainer.strategy.tensor_model_parallel_size=2",
                   "trainer.strategy.sequence_parallel=false"], "need sequence parallelism"),
            ("4", ["trainer.strategy.expert_model_parallel_size=4", "trainer.strategy.tensor_model_parallel_size=2"],
             "not divisible by TP*PP*EP")):
        with monkeypatch.context() as m:
            m.setenv("WORLD_SIZE", world)
            assert cli_mod.main(kd + args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (args, err)
    dense = ["distill", f"teacher={tiny_ckpt}", f"student={tiny_ckpt}", f"output={tmp_path / 'd'}",
             f"data.train={tmp_path / 'none'}"]
    for world, args, words in (("2", ["trainer.strategy.expert_model_parallel_size=2"],
                                "neither the teacher nor the student has experts"),
                               ("1", ["model.moe_aux_loss_coeff=0.01"], "the student has no experts")):
        with monkeypatch.context() as m:
            m.setenv("WORLD_SIZE", world)
            assert cli_mod.main(dense + args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (args, err)
    assert not (tmp_path / "p").exists() and not (tmp_path / "d").exists()


def test_prune_command_on_moe(moe_ckpts, moe_data, tmp_path):
    """``nemo-minitron prune`` on Qwen3-MoE, on the emulated GPU: experts, expert width, embedding channels and one
    layer, with the default least-squares refit; the report counts total and active parameters; the HF export loads in
    transformers with the pruned shapes and its logits equal the pruned checkpoint's."""
    from nemo_minitron import cli as cli_mod
    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.checkpoint.loader import load_model
    from nemo_minitron.model import count_params

    src, ckpt = moe_ckpts["qwen3_moe"]
    out = tmp_path / "pruned"
    # on the emulated GPU (test_gpu_path.py): the expert importance, plan, refit and trim keep every tensor on
    # the compute device, as CUDA needs
    cli("prune", f"model={ckpt}", f"output={out}", f"data.calibration={moe_data['qwen3_moe']}",
        "data.calibration_samples=32", "data.seq_length=32", "prune.depth_samples=8", "prune.num_moe_experts=5",
        "prune.moe_ffn_hidden_size=32", "prune.hidden_size=48", "prune.num_layers=2",
        env={"NEMO_MINITRON_EMULATE_GPU": "1"})
    spec = ck.read_spec(out)
    assert (spec.num_layers, spec.num_moe_experts, spec.moe_ffn_hidden_size, spec.hidden_size) == (2, 5, 32, 48)
    rep = json.loads((out / "pruning" / "report.json").read_text())
    assert rep["params"]["pruned"] == count_params(spec) and rep["params"]["pruned_active"] == count_params(spec, True)
    assert rep["shapes"]["num_moe_experts"] == {"source": 8, "pruned": 5}
    assert rep["reconstruction"] == "least_squares" and rep["expert_importance"] == "router_mass"
    assert len(rep["plan"]["experts_kept"]) == 2 and all(len(e) == 5 for e in rep["plan"]["experts_kept"])

    hf = tmp_path / "hf"
    assert cli_mod.main(["export", f"model={out}", "format=hf", f"output={hf}", "export.dtype=fp32"]) == 0
    cfg = json.loads((hf / "config.json").read_text())
    assert (cfg["num_experts"], cfg["moe_intermediate_size"], cfg["hidden_size"], cfg["num_hidden_layers"]) == \
        (5, 32, 48, 2)
    ids = _ids(src)
    with torch.no_grad():
        ref = _hf(hf).double()(ids).logits.float()
    _close(_logits(load_model(out)[0], ids), ref, "pruned Qwen3-MoE checkpoint vs its HF export")


def _prune_by_hand(sd: dict, cfg: dict, plan, hidden) -> tuple[dict, dict]:
    """The same experts, expert neurons and hidden channels removed from the Hugging Face model's tensors."""
    names = {"mixtral": ("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{j}.", "w1", "w3", "w2"),
             "qwen3_moe": ("mlp.gate.weight", "mlp.experts.{j}.", "gate_proj", "up_proj", "down_proj")}
    router, expert, gate, up, down = names[cfg["model_type"]]
    out = {}
    for k, w in sd.items():
        if ".experts." in k or k.endswith(router):
            continue
        if hidden is not None:
            if k.endswith(("norm.weight",)) and "q_norm" not in k and "k_norm" not in k:
                w = w[hidden]
            elif k.endswith(("o_proj.weight",)):
                w = w[hidden]
            elif k.endswith(("embed_tokens.weight", "lm_head.weight", "q_proj.weight", "k_proj.weight",
                             "v_proj.weight")):
                w = w[:, hidden]
        out[k] = w
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        kept = plan.experts[l].tolist()
        r = sd[p + router][kept]
        out[p + router] = r[:, hidden] if hidden is not None else r
        for new, j in enumerate(kept):
            neurons = plan.expert_ffn[l][j]
            src, dst = p + expert.format(j=j), p + expert.format(j=new)
            for name in (gate, up):
                w = sd[src + f"{name}.weight"][neurons]
                out[dst + f"{name}.weight"] = w[:, hidden] if hidden is not None else w
            w = sd[src + f"{down}.weight"][:, neurons]
            out[dst + f"{down}.weight"] = w[hidden] if hidden is not None else w
    cfg = dict(cfg)
    cfg["num_local_experts" if cfg["model_type"] == "mixtral" else "num_experts"] = len(plan.experts[0])
    cfg["intermediate_size" if cfg["model_type"] == "mixtral" else "moe_intermediate_size"] = \
        len(plan.expert_ffn[0][plan.experts[0][0].item()])
    if hidden is not None:
        cfg.update(hidden_size=len(hidden), head_dim=cfg.get("head_dim") or 16)  # head_dim is kept
    return out, cfg


@pytest.mark.parametrize("name", list(MOE_MODELS))
def test_moe_pruning_equals_removal_by_hand(name, moe_ckpts, tmp_path):
    """Experts (with their router rows), each kept expert's neurons and the embedding channels, ranked by the
    calibration's importance and removed from the megatron model, give the logits of transformers' model with
    the same units removed by hand (1e-5); the pruned checkpoint exports as the family's class with those shapes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from nemo_minitron import cli as cli_mod
    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.checkpoint.loader import load_model
    from nemo_minitron.prune.plan import make_plan, validate_targets
    from nemo_minitron.prune.width import calibrate, prune_model

    src, ckpt = moe_ckpts[name]
    model, spec, _ = load_model(ckpt)
    g = torch.Generator().manual_seed(3)
    scores = calibrate(model, torch.randint(0, 320, (8, 33), generator=g), 4, progress=False)
    E, F = spec.num_moe_experts, spec.moe_ffn_hidden_size
    assert scores["experts"].shape == (spec.num_layers, E) and scores["expert_ffn"].shape == (spec.num_layers, E, F)
    assert (scores["experts"] > 0).all() and "ffn" not in scores
    targets = validate_targets(spec, {"num_moe_experts": E - 2 if E > 4 else E - 1,
                                      "moe_ffn_hidden_size": F * 2 // 3, "hidden_size": 48})
    plan = make_plan(scores, spec, targets)
    assert any(e.tolist() != list(range(len(e))) for e in plan.experts), "the plan drops only the last experts"
    pruned, spec2 = prune_model(model, spec, plan)
    assert (spec2.num_moe_experts, spec2.moe_ffn_hidden_size, spec2.hidden_size) == \
        (targets["num_moe_experts"], targets["moe_ffn_hidden_size"], 48)

    hf_cfg = json.loads((src / "config.json").read_text())
    sd = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).state_dict()
    sd2, cfg2 = _prune_by_hand(sd, hf_cfg, plan, plan.hidden)
    cfg2.pop("architectures"), cfg2.pop("transformers_version", None)
    hf2 = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg2)).eval()
    hf2.load_state_dict(sd2, strict=True)
    ids = _ids(src)
    with torch.no_grad():
        ref = hf2.double()(ids).logits.float()
    _close(_logits(pruned, ids), ref, f"{name} pruned vs transformers pruned by hand")

    ck.save(tmp_path / "pruned", pruned, spec2, tokenizer_dir=src)
    out = tmp_path / "hf"
    assert cli_mod.main(["export", f"model={tmp_path / 'pruned'}", "format=hf", f"output={out}",
                         "export.dtype=fp32"]) == 0
    with torch.no_grad():
        _close(_hf(out).double()(ids).logits.float(), ref, f"{name} pruned, HF export")


@pytest.fixture(scope="module")
def moe_samples(moe_ckpts):
    """{name: [48, 65] token sequences sampled from the tiny model itself}: text it predicts well, so that a held-out
    loss measures what pruning costs (a random model's loss on random tokens would not)."""
    out = {}
    for name, (src, _) in moe_ckpts.items():
        torch.manual_seed(0)
        with torch.no_grad():
            out[name] = _hf(src).generate(torch.randint(0, 320, (48, 1)), do_sample=True, top_k=0, max_new_tokens=64,
                                          min_new_tokens=64, pad_token_id=0)
    return out


@pytest.fixture(scope="module")
def moe_data(moe_samples, tmp_path_factory):
    """{name: the model's samples as a Megatron indexed dataset prefix}."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    root, out = tmp_path_factory.mktemp("moe_data"), {}
    for name, samples in moe_samples.items():
        builder = IndexedDatasetBuilder(str(root / f"{name}.bin"), dtype=DType.optimal_dtype(320))
        for row in samples:
            builder.add_document(row, [len(row)])
        builder.finalize(str(root / f"{name}.idx"))
        out[name] = root / name
    return out


@pytest.mark.parametrize("name", list(MOE_MODELS))
def test_expert_importance_beats_random_and_refit_beats_trim(name, moe_ckpts, moe_samples):
    """Held-out loss (on the model's own samples) after removing half the experts: the least important ones by
    calibration beat random choices (4 seeds); after halving every expert's width, the least-squares refit of each
    kept expert's linear_fc2 on its routed tokens beats trimming."""
    from nemo_minitron.checkpoint.loader import load_model
    from nemo_minitron.evaluate import heldout_loss
    from nemo_minitron.prune.plan import make_plan, random_scores, validate_targets
    from nemo_minitron.prune.reconstruct import reconstruct
    from nemo_minitron.prune.width import calibrate, prune_model

    model, spec, _ = load_model(moe_ckpts[name][1])
    windows = moe_samples[name].unfold(1, 33, 32).reshape(-1, 33)  # [96, 33]
    cal, held = windows[:64], windows[64:]
    scores = calibrate(model, cal, 4, progress=False)

    def loss(m):
        return heldout_loss(m, held, 4)["loss"]

    rows = [f"{name}: unpruned {loss(model):.4f}"]
    experts = validate_targets(spec, {"num_moe_experts": spec.num_moe_experts // 2})
    ours = loss(prune_model(model, spec, make_plan(scores, spec, experts))[0])  # router_mass, the default
    norm = loss(prune_model(model, spec, make_plan(dict(scores, experts=scores["expert_output_norm"]), spec,
                                                   experts))[0])
    rand = [loss(prune_model(model, spec, make_plan(random_scores(spec, s), spec, experts))[0]) for s in range(4)]
    fitted, spec2, _ = reconstruct(model, spec, make_plan(scores, spec, experts), cal, 4, progress=False)
    assert spec2.num_moe_experts == spec.num_moe_experts // 2
    assert loss(fitted) == pytest.approx(ours, abs=1e-6)  # experts dropped whole: nothing to refit
    rows.append(f"experts {spec.num_moe_experts} -> {spec2.num_moe_experts}: router mass {ours:.4f}, output norm "
                f"{norm:.4f}, random {', '.join(f'{r:.4f}' for r in rand)}")

    width = validate_targets(spec, {"moe_ffn_hidden_size": spec.moe_ffn_hidden_size // 2})
    plan = make_plan(scores, spec, width)
    trimmed = loss(prune_model(model, spec, plan)[0])
    refit = loss(reconstruct(model, spec, plan, cal, 4, progress=False)[0])
    rows.append(f"expert width {spec.moe_ffn_hidden_size} -> {width['moe_ffn_hidden_size']}: trimmed {trimmed:.4f}, "
                f"least squares {refit:.4f}")
    print("\n" + "\n".join(rows))
    assert ours < min(rand), (ours, rand)
    assert ours < sum(rand) / len(rand) - 0.02, (ours, rand)  # clearly lower, not a tie
    assert refit < trimmed, (refit, trimmed)


def test_expert_parallel_matches_one_process(moe_ckpts, moe_data, tmp_path, capsys):
    """Qwen3-MoE at expert parallelism 2 (torchrun, 2 processes; all-to-all token dispatch over gloo): each rank
    builds half of every layer's experts from the NeMo checkpoint (megatron's sharded load) and from the HF
    directory (our slicing); the held-out loss equals one process's, the experts gathered back equal the
    checkpoint's tensors, and ``evaluate trainer.strategy.expert_model_parallel_size=2`` reports the same loss."""
    from nemo_minitron.checkpoint.loader import load_model
    from nemo_minitron.data import indexed
    from nemo_minitron.evaluate import heldout_loss
    from nemo_minitron.model.shards import gather_full

    src, ckpt = moe_ckpts["qwen3_moe"]
    data = moe_data["qwen3_moe"]
    model, spec, _ = load_model(ckpt)
    ref = heldout_loss(model, indexed.windows(data, 16, 32), 4)["loss"]
    full = gather_full(model)
    # on the emulated GPU (test_gpu_path.py): every tensor of the expert sharding, the all-to-all dispatch and the
    # gathering lives on the compute device as on CUDA + NCCL, or the run fails
    torchrun([str(WORKERS / "moe_layouts.py"), str(ckpt), str(src), str(data), str(tmp_path)], nproc=2,
             env={"NEMO_MINITRON_EMULATE_GPU": "1"})
    got = torch.load(tmp_path / "ep2.pt", weights_only=False)
    for rank in got["ranks"]:
        for name in ("nemo", "hf"):
            assert rank[name]["local_experts"] == spec.num_moe_experts // 2
            assert rank[name]["device"] == "emulated_gpu"
            assert rank[name]["loss"] == pytest.approx(ref, abs=1e-5), (name, rank[name]["loss"], ref)
    assert got["full"].keys() == full.keys()
    assert all(torch.equal(got["full"][k], full[k]) for k in full)
    one = tmp_path / "one.json"  # the task in one process: the same documents, the same scores
    cli_here(capsys, "evaluate", f"model={ckpt}", "eval.tasks=[piqa]", "eval.limit=4", "eval.batch_size=1",
             f"output_json={one}")
    want = json.loads(one.read_text())["tasks"]["piqa"]
    assert want["n"] == 4
    for name in ("nemo", "hf"):
        res = json.loads((tmp_path / f"{name}.json").read_text())
        assert res["loss"] == pytest.approx(ref, abs=1e-5), (name, res["loss"], ref)
        got = res["tasks"]["piqa"]
        assert got["n"] == 4 and got["metrics"].keys() == want["metrics"].keys()
        for metric, value in want["metrics"].items():
            assert got["metrics"][metric] == pytest.approx(value, abs=1e-9), (name, metric)


# a teacher and a smaller student (4 of the teacher's 8 experts' count, narrower, another seed) of 4 layers (PP=2
# splits them); vocabulary 512, which megatron pads alike at TP=1 and TP=2 (320 would pad to 384 and 512: the LM
# loss over the padded vocabulary, megatron's, would then differ by layout)
MOE_KD = {"teacher": ("qwen3_moe", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                                         num_hidden_layers=4, vocab_size=512, norm_topk_prob=False)),
          "student": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         num_hidden_layers=4, vocab_size=512, hidden_size=48, head_dim=12,
                                         norm_topk_prob=False))}
KD_TERMS = ("loss", "kd_loss", "lm_loss", "moe_aux_loss")


def test_distillation_at_expert_parallelism_equals_one_process(moe_data, dist_single, tmp_path):
    """``distill`` of a Qwen3-MoE student from a Qwen3-MoE teacher for 3 steps at EP=2 (x DP=4), EP=2 x TP=2 (sequence
    parallel, the dispatcher's uneven gathers over TP) and EP=2 x PP=2, all in one 4-process launch: per-step loss
    terms within 1e-5 of one process, the router's load-balancing loss among them (``moe_aux_loss``, its own logged
    term: the checkpoint's coefficient x the sum over layers), and final students (saved from expert-parallel shards,
    read in one process) within 1e-4. ``model.moe_aux_loss_coeff=0`` drops the term and changes the training."""
    from hf_fixtures import make_and_import
    from nemo_minitron.checkpoint.loader import load_model
    from nemo_minitron.distill.train import read_metrics

    ck = make_and_import(tmp_path / "models", MOE_KD)
    teacher, student = ck["teacher"][1], ck["student"][1]

    def args(out, *extra):
        return ["distill", f"teacher={teacher}", f"student={student}", f"output={tmp_path / out}",
                f"data.train={moe_data['qwen3_moe']}", "data.seq_length=32", "data.micro_batch_size=2",
                "data.global_batch_size=8", "trainer.max_steps=3", "trainer.val_check_interval=1000",
                "trainer.log_every_n_steps=1", "checkpoint.every_n_steps=1000", "optim.lr=3e-3", "optim.warmup_steps=1",
                "distill.lm_weight=0.5", *extra]

    ep2 = "trainer.strategy.expert_model_parallel_size=2"
    layouts = {"EP2": [ep2], "EP2xTP2": [ep2, "trainer.strategy.tensor_model_parallel_size=2"],
               "EP2xPP2": [ep2, "trainer.strategy.pipeline_model_parallel_size=2"]}
    one = commands([{"name": "single", "args": args("single")},
                    {"name": "no_aux", "args": args("no_aux", "model.moe_aux_loss_coeff=0")}])
    outs = commands([{"name": n, "args": args(n, *extra)} for n, extra in layouts.items()], nproc=4)
    shown = {"EP2": "TP=1 PP=1 DP=4 EP=2", "EP2xTP2": "TP=2 PP=1 DP=2 EP=2 SP", "EP2xPP2": "TP=1 PP=2 DP=2 EP=2"}

    def weights(run):
        model, _, _ = load_model(tmp_path / run / "student")
        return {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}

    ref = read_metrics(tmp_path / "single" / "metrics.jsonl")["train"]
    assert sorted(ref) == [1, 2, 3] and ref[3]["kd_loss"] < ref[1]["kd_loss"]
    for step in ref:  # the checkpoint's coefficient (HF router_aux_loss_coef 0.001) x 4 layers x ~1 (balanced: 1)
        assert 0.9 * 4e-3 < ref[step]["moe_aux_loss"] < 4 * 4e-3, ref[step]
    ref_w = weights("single")
    for name in layouts:
        assert f"({shown[name]}, fp32, distributed optimizer over DP=" in outs[name], outs[name][-2000:]
        got = read_metrics(tmp_path / name / "metrics.jsonl")["train"]
        assert sorted(got) == [1, 2, 3], name
        for step in ref:
            for k in KD_TERMS:
                assert got[step][k] == pytest.approx(ref[step][k], abs=1e-5, rel=1e-5), (name, step, k)
        w = weights(name)
        assert w.keys() == ref_w.keys()
        for k in w:
            # Adam divides each update by its gradient's running RMS: where a gradient is near zero, float rounding
            # of another reduction order moves the weight by a visible share of lr (measured: 1.6e-5, lr 3e-3)
            torch.testing.assert_close(w[k], ref_w[k], rtol=1e-4, atol=1e-4, msg=lambda m: f"{name} {k}: {m}")
    off = read_metrics(tmp_path / "no_aux" / "metrics.jsonl")["train"]
    assert "moe_aux_loss" not in off[1] and off[1]["kd_loss"] == ref[1]["kd_loss"]  # the same start
    router = [k for k in ref_w if k.endswith("mlp.router.weight")]
    assert router and not all(torch.equal(weights("no_aux")[k], ref_w[k]) for k in router)  # the aux loss trained them
    assert "moe_aux " in one["single"] and "moe_aux " not in one["no_aux"]
