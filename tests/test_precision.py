"""The production GPU path's configuration, checked on CPU: TE/local and FP8 settings reach NeMo/megatron's
TransformerConfig exactly as configured, and impossible combinations are refused before any work."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf


HOPPER = dict(cuda=True, te=True, capability=(9, 0))
CPU = dict(cuda=False, te=False, capability=None)  # the CPU path, forced (also on a machine with CUDA and TE)

MODEL = dict(transformer_impl=None, precision="bf16", fp8=None, fp8_recipe="delayed", fp8_margin=0,
             fp8_amax_history_len=1024, fp8_amax_compute_algo="max", fp8_param=False,
             fp8_first_last_layers_bf16=False, num_layers_at_start_in_bf16=1, num_layers_at_end_in_bf16=1)


def _m(**kw):
    return OmegaConf.create({**MODEL, **kw})


def test_fp8_settings_reach_transformer_config():
    from nemo.collections.llm.gpt.model.base import transformer_engine_layer_spec

    from nemo_minitron.model import tiny_spec
    from nemo_minitron.model.precision import Platform, resolve

    over = resolve(_m(fp8="hybrid", fp8_recipe="tensorwise", fp8_param=True, fp8_margin=1,
                      fp8_first_last_layers_bf16=True, num_layers_at_end_in_bf16=2), Platform(**HOPPER))
    spec = tiny_spec()
    cfg = spec.config_cls()(**spec.args, apply_rope_fusion=False, **over)  # NeMo's LlamaConfig, megatron's checks
    assert (cfg.fp8, cfg.fp8_recipe, cfg.fp8_param, cfg.fp8_margin) == ("hybrid", "tensorwise", True, 1)
    assert (cfg.fp8_amax_history_len, cfg.fp8_amax_compute_algo) == (1024, "max")
    assert (cfg.first_last_layers_bf16, cfg.num_layers_at_start_in_bf16, cfg.num_layers_at_end_in_bf16) == (True, 1, 2)
    assert cfg.bf16 and cfg.params_dtype == torch.bfloat16 and not cfg.fp16
    assert cfg.transformer_impl == "transformer_engine" and cfg.transformer_layer_spec is transformer_engine_layer_spec


def test_cpu_defaults_to_local_spec_without_fp8():
    from nemo.collections.llm.gpt.model.base import local_layer_spec

    from nemo_minitron.model.precision import Platform, resolve

    over = resolve(_m(), Platform(**CPU))  # no CUDA, no TE
    assert over["transformer_impl"] == "local" and over["transformer_layer_spec"] is local_layer_spec
    assert "fp8" not in over


@pytest.mark.parametrize("kw,env,msg", [
    (dict(fp8="hybrid"), dict(cuda=True, te=False, capability=(9, 0)), "needs Transformer Engine"),
    (dict(transformer_impl="transformer_engine"), dict(cuda=True, te=False, capability=(9, 0)), "not importable"),
    (dict(fp8="hybrid"), dict(cuda=True, te=True, capability=(8, 0)), "compute capability >= 8.9"),
    (dict(fp8="e4m3", fp8_recipe="mxfp8"), HOPPER, ">= 10.0"),
    (dict(fp8="hybrid", fp8_recipe="delayed", fp8_first_last_layers_bf16=True), HOPPER, "current-scaling"),
    (dict(fp8="hybrid", fp8_recipe="per_block"), HOPPER, "fp8_recipe"),
    (dict(fp8="e5m2"), HOPPER, "model.fp8="),
    (dict(fp8="hybrid", transformer_impl="local"), HOPPER, "transformer_impl=transformer_engine"),
])
def test_invalid_precision_combinations_refused(kw, env, msg):
    from nemo_minitron.errors import UserError
    from nemo_minitron.model.precision import Platform, resolve

    with pytest.raises(UserError, match=msg):
        resolve(_m(**kw), Platform(**env))


def test_fp8_shape_rule():
    from nemo_minitron.errors import UserError
    from nemo_minitron.model.precision import check_fp8_shapes

    check_fp8_shapes(dict(hidden_size=3072, ffn_hidden_size=9216, num_attention_heads=32, num_query_groups=8,
                          kv_channels=128), tp=8)
    with pytest.raises(UserError, match=r"ffn_hidden_size / TP = 1100"):
        check_fp8_shapes(dict(hidden_size=3072, ffn_hidden_size=8800), tp=8)


def test_cli_refuses_fp8_here_and_unaligned_fp8_prune_targets(tiny_ckpt, tiny_student, tiny_data, tmp_path, capsys,
                                                               monkeypatch):
    from nemo_minitron.cli import main
    from nemo_minitron.model import precision

    # the platform as this CPU machine's, also where CUDA and TE are present (there FP8 would be accepted)
    monkeypatch.setattr(precision, "current", lambda: precision.Platform(**CPU))

    args = [f"teacher={tiny_ckpt}", f"student={tiny_student}", f"output={tmp_path / 'o'}", f"data.train={tiny_data}",
            "data.seq_length=32", "data.global_batch_size=4"]
    assert main(["distill", *args, "model.fp8=hybrid"]) == 2
    assert "needs Transformer Engine" in capsys.readouterr().err
    assert main(["prune", f"model={tiny_ckpt}", f"output={tmp_path / 'p'}", f"data.calibration={tiny_data}",
                 "prune.hidden_size=40", "prune.fp8_shapes=true"]) == 2
    assert "multiples of 16: hidden_size = 40" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "p").exists()


def test_fp8_reaches_the_students_config_after_nemos_strategy_connects(tiny_student, tmp_path, dist_single):
    """What ``trainer.fit`` does first: NeMo's strategy copies its precision plugin's settings over the model's
    TransformerConfig (``update_config_with_dtype_overrides``). The student's config must still carry the FP8
    settings afterwards: the plugin is built with them (without them, fp8 became None here)."""
    from nemo_minitron import parallel
    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.distill.model import DistillationGPTModel
    from nemo_minitron.distill.pair import DistillSettings
    from nemo_minitron.distill.train import build_trainer
    from nemo_minitron.model.build import instantiate
    from nemo_minitron.model.precision import FP8, Platform, resolve

    over = resolve(_m(fp8="hybrid", fp8_recipe="tensorwise", fp8_param=True, fp8_margin=1,
                      fp8_first_last_layers_bf16=True, num_layers_at_end_in_bf16=2), Platform(**HOPPER))
    spec = ck.read_spec(tiny_student)
    model = DistillationGPTModel(instantiate(spec, 1, 1, apply_rope_fusion=False, **over), teacher_ckpt=tiny_student,
                                 settings=DistillSettings())
    trainer = build_trainer(tmp_path / "run", parallel.Layout(), "bf16", max_steps=1, val_check_interval=1,
                            limit_val_batches=0, ckpt_every=1, keep=1, callbacks=[], fp8=FP8.of(over))
    trainer.strategy.connect(model)
    c = model.config
    assert (c.fp8, c.fp8_recipe, c.fp8_param, c.fp8_margin) == ("hybrid", "tensorwise", True, 1)
    assert (c.fp8_amax_history_len, c.fp8_amax_compute_algo) == (1024, "max")
    assert (c.first_last_layers_bf16, c.num_layers_at_start_in_bf16, c.num_layers_at_end_in_bf16) == (True, 1, 2)
    assert c.bf16 and not c.fp16

    # and without FP8 asked for, the plugin resets nothing that was not set
    plain = DistillationGPTModel(instantiate(spec, 1, 1, **resolve(_m(), Platform(**HOPPER))),
                                 teacher_ckpt=tiny_student, settings=DistillSettings())
    build_trainer(tmp_path / "run2", parallel.Layout(), "bf16", max_steps=1, val_check_interval=1,
                  limit_val_batches=0, ckpt_every=1, keep=1, callbacks=[]).strategy.connect(plain)
    assert plain.config.fp8 is None and plain.config.bf16


@pytest.mark.parametrize("teacher_fp8", [True, False])
def test_teacher_gets_the_same_precision_or_bf16(tiny_ckpt, tiny_student, monkeypatch, teacher_fp8):
    from nemo_minitron import config
    from nemo_minitron.checkpoint import nemo as ck
    from nemo_minitron.distill.command import precision_overrides
    from nemo_minitron.model import precision

    monkeypatch.setattr(precision, "current", lambda: precision.Platform(**HOPPER))
    cfg = config.load("distill", [f"teacher={tiny_ckpt}", f"student={tiny_student}", "output=x", "data.train=x",
                                  "model.fp8=hybrid", "model.fp8_recipe=tensorwise", f"model.teacher_fp8={teacher_fp8}"])
    student, teacher = precision_overrides(cfg, ck.read_spec(tiny_student), ck.read_spec(tiny_ckpt), 1)
    assert student["fp8"] == "hybrid" and student["transformer_impl"] == "transformer_engine"
    assert teacher.get("fp8") == ("hybrid" if teacher_fp8 else None)
    assert teacher["transformer_layer_spec"] is student["transformer_layer_spec"] and teacher["bf16"]
    assert {k: v for k, v in teacher.items() if not k.startswith("fp8")} == \
        {k: v for k, v in student.items() if not k.startswith("fp8") and (teacher_fp8 or k not in (
            "first_last_layers_bf16", "num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"))}
