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
    with pytest.raises(UserError, match="missing required config value.*data"):
        config.load("evaluate", ["model=m"])
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
