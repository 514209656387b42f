"""``nemo-minitron <command> [key=value ...]``: conf/<command>.yaml + overrides -> the command's ``run``.

    nemo-minitron --help                     list the commands
    nemo-minitron <command> --help           the command's description and its full default config
    nemo-minitron <command> ... --print-config   print the resolved config and exit without running

Bad input ends with one line ``error: ...`` on stderr and exit status 2, before any work and with
nothing written. An internal error (a bug) ends with one line naming the log file that holds its traceback,
exit status 1. On success the last line printed names what the command wrote.
Multi-process: ``torchrun --nproc-per-node N -m nemo_minitron.cli <command> ...`` (or srun).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

from nemo_minitron.errors import UserError

# command -> (module with run(cfg), one-line description)
COMMANDS = {
    "import": ("nemo_minitron.checkpoint.importer", "Hugging Face checkpoint (Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen3-MoE) or .nemo -> NeMo 2 checkpoint"),
    "preprocess": ("nemo_minitron.data.preprocess", "text / jsonl -> Megatron indexed dataset (PREFIX.bin/.idx)"),
    "evaluate": ("nemo_minitron.evaluate", "held-out LM loss and perplexity of a NeMo or HF checkpoint"),
    "export": ("nemo_minitron.checkpoint.export", "NeMo checkpoint -> Hugging Face directory (transformers-loadable)"),
    "convert": ("nemo_minitron.checkpoint.convert", "NeMo checkpoint for the other layer spec (Transformer Engine <-> local)"),
    "prune": ("nemo_minitron.prune.command", "width pruning (heads, query groups, MLP neurons, channels) -> NeMo checkpoint"),
    "distill": ("nemo_minitron.distill.command", "knowledge distillation of a student from a frozen teacher (NeMo trainer)"),
    "finetune": ("nemo_minitron.distill.command:run_finetune", "LM fine-tuning (teacher correction) with NeMo's trainer"),
    "search": ("nemo_minitron.search.command", "architecture search: best student shape for a parameter budget"),
    "pipeline": ("nemo_minitron.pipeline", "the whole recipe: import, prune, distill, evaluate, export, report"),
}


def _usage() -> str:
    lines = ["usage: nemo-minitron <command> [key=value ...] [--help] [--print-config]", "", "commands:"]
    for name, (_, desc) in COMMANDS.items():
        lines.append(f"  {name:<12} {desc}")
    lines += ["", "Overrides use Hydra/OmegaConf dotted keys, e.g. eval.seq_length=512; see <command> --help."]
    return "\n".join(lines)


def _quiet() -> None:
    """Keep NeMo/megatron import chatter (deprecation and missing-TE warnings) off the terminal."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for name in ("nemo_logger", "NeMo", "megatron", "lightning", "pytorch_lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    try:  # a file size limit (ulimit -f): writes fail with EFBIG -> one error line, not a process killed mid-write
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    except (AttributeError, ValueError):  # no SIGXFSZ here, or called from a thread other than the main one
        pass
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r} (one of: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    from nemo_minitron import config

    if "-h" in rest or "--help" in rest:
        print(f"nemo-minitron {command}: {COMMANDS[command][1]}\n")
        print(config.header(command))
        print("\ndefault config (override any key with key=value):\n")
        print(config.conf_path(command).read_text().split("\n", len(config.header(command).splitlines()))[-1])
        return 0
    print_only = "--print-config" in rest
    dry_run = "--dry-run" in rest
    overrides = [a for a in rest if a not in ("--print-config", "--dry-run")]
    from nemo_minitron import terminal

    with terminal.filtered(command, argv) as log:  # the terminal shows our lines; the log file keeps the rest
        return _run(command, overrides, print_only, dry_run, log)


def _run(command: str, overrides: list, print_only: bool, dry_run: bool, log) -> int:
    from nemo_minitron import config

    unknown_flags = [a for a in overrides if a.startswith("--")]
    try:
        if unknown_flags:
            raise UserError(f"unknown option {unknown_flags[0]} (options: --help, --print-config, --dry-run)")
        cfg = config.load(command, overrides)
        config.check_output_paths(command, cfg)
        if print_only:
            print(config.to_yaml(cfg), end="")
            return 0
        _quiet()
        mod_name, _, fn = COMMANDS[command][0].partition(":")
        module = importlib.import_module(mod_name)
        if dry_run:
            if not hasattr(module, "dry_run") or fn:
                raise UserError(f"--dry-run is available for distill, search and pipeline, not {command}")
            module.dry_run(cfg)
            return 0
        getattr(module, fn or "run")(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BaseException as e:  # a bug (or a fault nothing anticipated): one line, the traceback in the log file
        if isinstance(e, (SystemExit, GeneratorExit)):  # (torch's CheckpointException is a BaseException too)
            raise
        import traceback

        text = traceback.format_exc()
        if log.write(text):
            where = str(log.path)
        else:  # nowhere to write it: the traceback itself
            sys.__stderr__.write(text)
            where = "(stderr above)"
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"error: internal error in nemo-minitron {command} ({type(e).__name__}: {first}); the traceback is in "
              f"{where}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
