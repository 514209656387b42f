"""Model families beyond Llama on tiny random models from ``transformers``: Qwen2 (q/k/v biases; tied and untied
output layer) and Qwen3 (per-head q/k RMSNorm). Import, export and every pruning dimension are compared with
``transformers`` itself: logits after import and after export, and a pruned model against the same units removed
by hand from the Hugging Face model. (TP=2 and PP=2: ``test_reconstruct.py``'s layout launch runs these models too.)"""

import json

import pytest
import torch

from conftest import FAMILY_MODELS
from hf_fixtures import TEXT


def _ids(src):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src))
    return torch.tensor([tok(TEXT)["input_ids"][:96]] * 2)


def _megatron_logits(model, ids, vocab):
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids), None)[..., :vocab]


def _hf_logits(path_or_model, ids):
    """transformers' logits, computed in float64 (the reference without its own float32 rounding), as float32."""
    from transformers import AutoModelForCausalLM

    model = path_or_model
    if not isinstance(model, torch.nn.Module):
        model = AutoModelForCausalLM.from_pretrained(str(path_or_model), dtype=torch.float32).eval()
    with torch.no_grad():
        return model.double()(ids).logits.float()


def assert_logits_close(got, ref, what=""):
    """Equal to 1e-5 relative to the logits' scale (max |logit|; the tiny random models' reach ~10): float32
    rounding over a few layers, measured against transformers in float64."""
    diff, scale = (got.double() - ref.double()).abs().max().item(), max(1.0, ref.abs().max().item())
    print(f"{what}: max |diff| = {diff:.2e} (max |logit| {scale:.1f})")
    assert diff <= 1e-5 * scale, (what, diff, scale)


def test_family_declarations_match_nemo():
    """Every declared family names NeMo classes that exist, and its features are those classes' defaults."""
    from nemo.collections.llm.gpt.model.base import GPTConfig, GPTModel

    from nemo_minitron.model import families

    assert {f.name for f in families.FAMILIES} == {"llama", "qwen2", "qwen3", "mixtral", "qwen3_moe"}
    for fam in families.FAMILIES:
        assert issubclass(fam.nemo_class(fam.nemo_model), GPTModel)
        for name in fam.config_classes:
            cls = fam.nemo_class(name)
            assert issubclass(cls, GPTConfig)
            for feature, value in fam.features.items():
                assert getattr(cls, feature) == value, (fam.name, name, feature)


@pytest.mark.parametrize("name", list(FAMILY_MODELS))
def test_import_and_export_match_transformers(name, family_ckpts, tmp_path):
    """Logits of the imported NeMo checkpoint (and of the HF directory read directly) equal transformers' to 1e-5;
    the HF export is the family's own class with its config, and its logits equal again; the .nemo round trip."""
    from nemo_minitron import cli as cli_mod
    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.checkpoint.loader import load_model

    src, ckpt = family_ckpts[name]
    hf_cfg = json.loads((src / "config.json").read_text())
    spec = ck.read_spec(ckpt)
    assert spec.config_class == {"qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}[hf_cfg["model_type"]]
    assert (spec.qkv_bias, spec.qk_norm) == ((True, False) if hf_cfg["model_type"] == "qwen2" else (False, True))
    assert spec.tied == hf_cfg["tie_word_embeddings"] and spec.get("rotary_base") == hf_cfg["rope_theta"]
    ids = _ids(src)
    ref = _hf_logits(src, ids)
    for source in (ckpt, src):
        model, _, _ = load_model(source)
        assert_logits_close(_megatron_logits(model, ids, 320), ref, f"{name} {source.name} vs transformers")

    out = tmp_path / "hf"
    assert cli_mod.main(["export", f"model={ckpt}", "format=hf", f"output={out}", "export.dtype=fp32"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == hf_cfg["architectures"] and cfg["model_type"] == hf_cfg["model_type"]
    assert cfg["head_dim"] == 16 and cfg["tie_word_embeddings"] == hf_cfg["tie_word_embeddings"]
    assert_logits_close(_hf_logits(out, ids), ref, f"{name} HF export")

    assert cli_mod.main(["export", f"model={ckpt}", "format=nemo", f"output={tmp_path / 'm.nemo'}"]) == 0
    assert cli_mod.main(["import", f"source={tmp_path / 'm.nemo'}", f"output={tmp_path / 'back'}"]) == 0
    assert ck.read_spec(tmp_path / "back") == spec
    assert_logits_close(_megatron_logits(load_model(tmp_path / "back")[0], ids, 320), ref, f"{name} .nemo round trip")


def _remove_by_hand(sd: dict, cfg: dict, plan, drop=()) -> tuple[dict, dict]:
    """The Hugging Face state dict and config with ``plan``'s units (and the layers ``drop``) removed by hand, by
    HF names: embedding channels from every tensor that reads or writes the residual stream, MLP neurons from
    gate/up rows and down columns, heads and query groups from q/k/v rows (and biases) and o_proj columns."""
    d = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    per = cfg["num_attention_heads"] // cfg["num_key_value_heads"]
    hk = plan.hidden
    out = {}
    for name, w in sd.items():
        if name.startswith("model.layers."):
            l, rest = int(name.split(".")[2]), name.split(".", 3)[3]
            if plan.groups is not None and rest.startswith(("self_attn.q_proj", "self_attn.o_proj")):
                heads = [g * per + int(h) for g, hs in zip(plan.groups[l].tolist(), plan.heads[l]) for h in hs]
                rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads])
                w = w[:, rows] if rest.startswith("self_attn.o_proj") else w[rows]
            if plan.groups is not None and rest.startswith(("self_attn.k_proj", "self_attn.v_proj")):
                w = w[torch.cat([torch.arange(g * d, (g + 1) * d) for g in plan.groups[l].tolist()])]
            if plan.ffn is not None and rest.startswith(("mlp.gate_proj", "mlp.up_proj")):
                w = w[plan.ffn[l]]
            if plan.ffn is not None and rest.startswith("mlp.down_proj"):
                w = w[:, plan.ffn[l]]
            if hk is not None:
                if rest.endswith("layernorm.weight") or rest.startswith(("self_attn.o_proj", "mlp.down_proj")):
                    w = w[hk]
                elif rest.endswith("_proj.weight"):  # q, k, v, gate, up: input columns
                    w = w[:, hk]
        elif hk is not None:
            w = w[hk] if name == "model.norm.weight" else w[:, hk]  # embedding, lm_head: channel columns
        out[name] = w
    keep = [l for l in range(cfg["num_hidden_layers"]) if l not in drop]
    renum = {}
    for name, w in out.items():
        if name.startswith("model.layers."):
            parts = name.split(".")
            if int(parts[2]) not in keep:
                continue
            parts[2] = str(keep.index(int(parts[2])))
            name = ".".join(parts)
        renum[name] = w
    t = plan.targets
    cfg = {k: v for k, v in cfg.items() if k != "layer_types"}  # one per layer: transformers derives it again
    cfg = dict(cfg, head_dim=d, num_hidden_layers=len(keep), hidden_size=t.get("hidden_size", cfg["hidden_size"]),
               intermediate_size=t.get("ffn_hidden_size", cfg["intermediate_size"]),
               num_attention_heads=t.get("num_attention_heads", cfg["num_attention_heads"]),
               num_key_value_heads=t.get("num_query_groups", cfg["num_key_value_heads"]))
    return renum, cfg


CASES = {  # width targets, layers dropped
    "hidden_ffn_heads": ({"hidden_size": 48, "ffn_hidden_size": 96, "num_attention_heads": 2}, []),
    "query_groups_depth": ({"num_query_groups": 1, "num_attention_heads": 2}, [1]),
}


@pytest.mark.parametrize("name", list(FAMILY_MODELS))
def test_every_pruning_dimension_equals_removal_by_hand(name, family_ckpts, tmp_path):
    """Embedding channels, MLP neurons, heads within their groups, whole query groups (q/k/v biases sliced with
    their rows, q/k norms kept) and layers: the pruned megatron model's logits equal those of the transformers
    model with the same units removed by hand (1e-5), and its HF export loads and equals them too."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from nemo_minitron import cli as cli_mod
    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.checkpoint.loader import load_model
    from nemo_minitron.prune.depth import drop_layers
    from nemo_minitron.prune.plan import make_plan, random_scores
    from nemo_minitron.prune.width import prune_model

    src, ckpt = family_ckpts[name]
    ids = _ids(src)
    hf_cfg = json.loads((src / "config.json").read_text())
    hf_sd = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).state_dict()
    model, spec, _ = load_model(ckpt)
    for i, (case, (targets, drop)) in enumerate(CASES.items()):
        plan = make_plan(random_scores(spec, i), spec, targets)
        pruned, spec2 = prune_model(model, spec, plan)
        if drop:
            pruned, spec2 = drop_layers(pruned, spec2, drop)
        sd, cfg = _remove_by_hand(hf_sd, hf_cfg, plan, drop)
        by_hand = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg)).eval()
        by_hand.load_state_dict(sd, strict=not hf_cfg["tie_word_embeddings"])
        if hf_cfg["tie_word_embeddings"]:
            by_hand.tie_weights()
        ref = _hf_logits(by_hand, ids)
        got = _megatron_logits(pruned, ids, 320)
        assert_logits_close(got, ref, f"{name} {case}: pruned vs removed by hand")
        assert (got - _megatron_logits(model, ids, 320)).abs().max() > 1e-2  # it did prune

        ck.save(tmp_path / case, pruned, spec2, tokenizer_dir=src)
        out = tmp_path / f"{case}-hf"
        assert cli_mod.main(["export", f"model={tmp_path / case}", "format=hf", f"output={out}",
                             "export.dtype=fp32"]) == 0
        exported = json.loads((out / "config.json").read_text())
        assert {k: exported[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                          "num_key_value_heads", "head_dim", "num_hidden_layers")} == \
            {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                                 "head_dim", "num_hidden_layers")}
        assert_logits_close(_hf_logits(out, ids), ref, f"{name} {case}: export")


def test_least_squares_refits_the_qkv_bias_as_an_intercept(family_ckpts, tiny_windows):
    """The bias is the weight of a constant input channel: a pruned channel that is constant on the calibration
    tokens is absorbed into the bias exactly; on the tiny Qwen2, pruning embedding channels with least squares
    changes every ``linear_qkv`` bias (and only those), and the refit lowers the loss on the calibration windows."""
    from nemo_minitron.checkpoint.loader import load_model
    from nemo_minitron.model.forward import lm_loss
    from nemo_minitron.model.shards import gather_full
    from nemo_minitron.prune.plan import make_plan
    from nemo_minitron.prune.reconstruct import refit
    from nemo_minitron.prune.width import prune_model, prune_width

    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 6, generator=g, dtype=torch.float64)
    a[:, 4] = 3.0  # a pruned channel that is constant: its contribution is a bias
    W, b = torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    x = torch.cat([a, torch.ones(500, 1, dtype=torch.float64)], 1)
    kept = torch.tensor([0, 1, 2, 3, 5, 6])  # channel 4 pruned; 6 is the constant channel of [W | b]
    fit = refit(torch.cat([W, b[:, None]], 1), x.T @ x, kept, damping=1e-12)
    torch.testing.assert_close(fit[:, -1], b + 3.0 * W[:, 4])
    torch.testing.assert_close(fit[:, :-1], W[:, [0, 1, 2, 3, 5]])

    windows, _ = tiny_windows
    model, spec, _ = load_model(family_ckpts["qwen2"][1])
    targets = {"hidden_size": 40}
    ls, _, scores, plan, _ = prune_width(model, spec, targets, windows=windows, micro_batch_size=2,
                                         reconstruction="least_squares", progress=False)
    trimmed, _ = prune_model(model, spec, make_plan(scores, spec, targets))
    new, old = gather_full(ls), gather_full(trimmed)
    changed = {k for k in new if not torch.equal(new[k], old[k])}
    assert {k for k in changed if k.endswith("bias")} == {f"decoder.layers.{l}.self_attention.linear_qkv.bias"
                                                          for l in range(spec.num_layers)}
    # layer 0's linear_qkv output on the calibration tokens (its input is the source's in every variant): the
    # intercept fit reproduces it better than the weight-only fit, which beats trimming
    qkv = model.decoder.layers[0].self_attention.linear_qkv
    inputs = []
    handle = qkv.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().reshape(-1, 64)))
    lm_loss(model, windows, 2)
    handle.remove()
    a = torch.cat(inputs).double()
    W, b, hk = qkv.weight.detach().double(), qkv.bias.detach().double(), plan.hidden
    target = a @ W.T + b
    W_only = refit(W, a.T @ a, hk, 0.01)
    err = {"intercept": new["decoder.layers.0.self_attention.linear_qkv.weight"].double(),
           "weight_only": W_only, "trimmed": W[:, hk]}
    bias = {"intercept": new["decoder.layers.0.self_attention.linear_qkv.bias"].double()}
    err = {k: float(((a[:, hk] @ w.T + bias.get(k, b) - target) ** 2).sum() / (target ** 2).sum())
           for k, w in err.items()}
    print("layer 0 linear_qkv relative output error:", err)
    assert err["intercept"] < err["weight_only"] < 0.9 * err["trimmed"]  # the fit with more freedom fits better


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_search_ranking_refit_from_statistics(name, family_ckpts, tiny_windows):
    """The search's one-shot ranking (calibration statistics gathered once, closed-form refits per candidate) on
    the families' extra tensors: q/k/v bias rows sliced exactly as trimming slices them (the one-shot refit keeps
    biases), q/k norms copied; and a first layer's refit equal to the sequential refit's."""
    from nemo_minitron.checkpoint.loader import load_model
    from nemo_minitron.model.shards import gather_full
    from nemo_minitron.prune import stats as calstats
    from nemo_minitron.prune.plan import make_plan, random_scores
    from nemo_minitron.prune.reconstruct import reconstruct
    from nemo_minitron.prune.width import prune_model

    windows, _ = tiny_windows
    model, spec, _ = load_model(family_ckpts[name][1])
    _, stats = calstats.collect(model, windows, 2, tuple(calstats.SITES), {}, progress=False)
    plan = make_plan(random_scores(spec, 2), spec, {"hidden_size": 48, "ffn_hidden_size": 96, "num_attention_heads": 2})
    one, spec2 = calstats.one_shot(model, spec, plan, stats, damping=0.01)
    trimmed, _ = prune_model(model, spec, plan)
    a, b = gather_full(one), gather_full(trimmed)
    extra = [k for k in b if k.endswith(("linear_qkv.bias", "q_layernorm.weight", "k_layernorm.weight"))]
    assert len(extra) == 4 * (1 if name == "qwen2" else 2)
    for k in extra:
        assert torch.equal(a[k], b[k]), k
    # layer 1's refit is the sequential one (its input is the source's in both): the solve reads these models'
    # statistics right
    plan = make_plan(random_scores(spec, 3), spec, {"ffn_hidden_size": 96})
    one, _ = calstats.one_shot(model, spec, plan, stats, damping=0.01)
    seq, _, _ = reconstruct(model, spec, plan, windows, 2, damping=0.01, progress=False)
    fc2 = lambda m, l: m.decoder.layers[l].mlp.linear_fc2.weight  # noqa: E731
    torch.testing.assert_close(fc2(one, 0), fc2(seq, 0), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(fc2(one, 0), fc2(prune_model(model, spec, plan)[0], 0), atol=1e-4)  # it refitted


def test_distillation_from_a_qwen_teacher(family_ckpts, tiny_windows):
    """A pruned Qwen2 student distilled from its teacher in-process (megatron's schedule, the fused KL): every
    student parameter, the q/k/v biases included, gets a gradient, and 8 AdamW steps lower the KL on the windows."""
    from nemo_minitron.checkpoint.loader import load_model
    from nemo_minitron.distill.pair import DistillationPair, DistillSettings, distill_step
    from nemo_minitron.prune.plan import make_plan, random_scores
    from nemo_minitron.prune.width import prune_model

    windows, _ = tiny_windows
    teacher, spec, _ = load_model(family_ckpts["qwen2"][1])
    plan = make_plan(random_scores(spec, 0), spec, {"hidden_size": 48, "ffn_hidden_size": 96})
    student, spec2 = prune_model(teacher, spec, plan)
    student.train()
    pair = DistillationPair(student, teacher, DistillSettings(), spec.vocab_size, spec2.num_layers, spec.num_layers)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    losses = []
    for step in range(9):
        opt.zero_grad()
        losses.append(distill_step(pair, windows, 4, forward_only=step == 8)["kd_loss"])
        if step == 0:
            params = dict(student.named_parameters())
            assert any(k.endswith("linear_qkv.bias") for k in params)
            for k, p in params.items():
                assert p.grad is not None and p.grad.abs().sum() > 0, k
        if step < 8:
            opt.step()
    print("KL per step:", [round(x, 4) for x in losses])
    assert losses[-1] < 0.8 * losses[0]
