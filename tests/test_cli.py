"""The command line and config system: help, resolved config, overrides, typed values, errors."""

import pytest

from nemo_minitron import cli, config
from nemo_minitron.errors import UserError


def test_help_lists_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_command_help_shows_config(command, capsys):
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"nemo-minitron {command}" in out and "default config" in out


def test_print_config_resolves_overrides_without_running(capsys, tmp_path):
    assert cli.main(["evaluate", "model=m", "data=d", "eval.seq_length=512", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "seq_length: 512" in out and "model: m" in out


def test_overrides_typed_and_checked():
    cfg = config.load("evaluate", ["model=2024", "data=x", "eval.num_samples=16", "+extra.lr=1e-4"])
    assert cfg.model == "2024" and cfg.eval.num_samples == 16 and cfg.extra.lr == pytest.approx(1e-4)
    with pytest.raises(UserError, match="unknown config key 'eval.nope'"):
        config.load("evaluate", ["model=m", "data=d", "eval.nope=1"])
    with pytest.raises(UserError, match="wrong type"):
        config.load("evaluate", ["model=m", "data=d", "eval.seq_length=long"])
    with pytest.raises(UserError, match="missing required config value.*model"):
        config.load("evaluate", ["data=d"])  # data is optional (eval.tasks alone); model is not
    with pytest.raises(UserError, match="not key=value"):
        config.load("evaluate", ["model"])


def test_unknown_command_and_option(capsys):
    assert cli.main(["bogus"]) == 2
    assert cli.main(["evaluate", "model=m", "data=d", "--frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'bogus'" in err and "unknown option --frobnicate" in err


def test_internal_error_is_one_line_naming_the_log_with_the_traceback(monkeypatch, capsys, tmp_path):
    """A bug (not the user's input) ends in one line naming the file that holds the traceback, exit status 1."""
    import nemo_minitron.evaluate as evaluate

    def broken(cfg):
        raise KeyError("a key the code expected")

    monkeypatch.setenv("NEMO_MINITRON_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setattr(evaluate, "run", broken)
    assert cli.main(["evaluate", "model=m", "data=d"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: internal error in nemo-minitron evaluate (KeyError: ")
    log = err[0].rsplit("the traceback is in ", 1)[1]
    assert log.startswith(str(tmp_path / "logs")) and "-evaluate-rank0-" in log
    text = open(log).read()
    assert text.startswith("nemo-minitron evaluate model=m data=d") and "Traceback" in text and "in broken" in text


LAYOUT_COMMANDS = ("prune", "distill", "finetune", "evaluate", "search", "pipeline")


@pytest.mark.parametrize("command", LAYOUT_COMMANDS)
def test_layout_keys_have_one_spelling_in_every_command(command, capsys, monkeypatch):
    """trainer.strategy.* everywhere; model.* read as its alias with one notice, also from a recipe."""
    required = [f"{k}=x" for k in sorted(config.OmegaConf.missing_keys(config.OmegaConf.load(config.conf_path(command))))]
    canonical = config.load(command, [*required, "trainer.strategy.tensor_model_parallel_size=2",
                                      "trainer.strategy.pipeline_model_parallel_size=4"])
    assert capsys.readouterr().err == ""
    aliased = config.load(command, [*required, "model.tensor_model_parallel_size=2",
                                    "model.pipeline_model_parallel_size=4"])
    notes = capsys.readouterr().err.strip().splitlines()
    assert notes == [f"note: model.{k} is read as trainer.strategy.{k} (the layout's spelling in every command)"
                     for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size")]
    for cfg in (canonical, aliased):
        assert (cfg.trainer.strategy.tensor_model_parallel_size, cfg.trainer.strategy.pipeline_model_parallel_size) == (2, 4)
    assert config.to_yaml(canonical) == config.to_yaml(aliased)
    if "sequence_parallel" in canonical.trainer.strategy:
        assert config.load(command, [*required, "model.sequence_parallel=false"]).trainer.strategy.sequence_parallel is False


def test_recipe_layout_alias(tmp_path, capsys, monkeypatch):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "old.yaml").write_text("command: distill\nmodel:\n  tensor_model_parallel_size: 8\n  precision: bf16\n")
    (tmp_path / "distill.yaml").write_text(config.conf_path("distill").read_text())
    monkeypatch.setattr(config, "CONF_DIR", tmp_path)
    cfg = config.load("distill", ["recipe=old", "teacher=t", "student=s", "output=o", "data.train=d", "data.validation=v"])
    assert cfg.trainer.strategy.tensor_model_parallel_size == 8 and cfg.model.precision == "bf16"
    assert "tensor_model_parallel_size" not in cfg.model
    assert "recipe 'old': model.tensor_model_parallel_size is read as" in capsys.readouterr().err


def test_terminal_shows_our_lines_and_the_log_keeps_the_chatter(tiny_ckpt, tiny_data, tmp_path):
    """A command run directly: NeMo's, megatron's and Lightning's import chatter goes to the run's log file,
    the terminal gets the command's own lines only."""
    from conftest import cli as run_cli

    logs = tmp_path / "logs"
    p = run_cli("evaluate", f"model={tiny_ckpt}", f"data={tiny_data}", "eval.num_samples=4", "eval.seq_length=16",
                env={"NEMO_MINITRON_LOG_DIR": str(logs)})
    shown = [x for x in (p.stdout + p.stderr).splitlines() if x.strip()]
    assert shown and all(x.startswith(("native model", "nemo model", "evaluating", "wrote")) or ": loss " in x
                         for x in shown), shown
    kept = "".join(f.read_text() for f in logs.glob("*-evaluate-*.log"))
    assert kept.startswith("nemo-minitron evaluate ") and ("[NeMo W" in kept or "OneLogger" in kept), kept[:500]
