"""`far`: the entry point. User errors (far.errors.USER_ERRORS, bad paths, bad values) print one line
`far: error: ...` to stderr and exit with code 2; `far --debug ...` shows tracebacks; anything else
is a bug and keeps its traceback."""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

from far.cli import export, analyze, evaluate, imc, models, train
from far.cli.options import Formatter, warn
from far.errors import USER_ERRORS
from far.version import __version__

PROG = "far"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=Formatter,
        description="FAR engine: ViTs with every self-attention replaced by multi-head BiLSTMs, fused "
                    "kernels, and IMC crossbar emulation. MODEL is always a checkpoint file, a zoo name "
                    "(fmnist_deit_tiny, fmnist_far_tiny, fmnist_far_tiny_pruned, fmnist_far_tiny_xs, fmnist_far_tiny_wide, "
                    "fmnist_far_tiny_nr, fmnist_trex_tiny) "
                    "or a timm model name.",
        epilog="examples:\n"
               "  far info\n"
               "  far demo\n"
               "  far eval fmnist_far_tiny --data fashion-mnist --limit 1000\n"
               "  far convert fmnist_deit_tiny -o fmnist_tiny.safetensors\n"
               "  far export fmnist_far_tiny_pruned -o far_tiny_pruned.onnx\n"
               "  far analyze fmnist_deit_tiny fmnist_far_tiny --data fashion-mnist --limit 1000\n"
               "`far COMMAND --help` describes each command.")
    parser.add_argument("--version", action="version", version=f"far {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    models.add_parsers(sub)
    evaluate.add_parsers(sub)
    train.add_parsers(sub)
    imc.add_parsers(sub)
    export.add_parsers(sub)
    analyze.add_parsers(sub)
    return parser


def _fmt_error(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and e.filename and str(e.filename) not in e.strerror:
        return f"{e.filename}: {e.strerror}"
    msg = str(e).strip() or type(e).__name__
    if "\nOriginal Traceback" in msg:  # re-raised from a DataLoader worker: the original message is the last line
        last = msg.splitlines()[-1]
        prefix = f"{type(e).__module__}.{type(e).__qualname__}: "
        msg = last[len(prefix):] if last.startswith(prefix) else last.split(": ", 1)[-1]
    return " ".join(msg.split("\n"))  # one line


FAR_DIR = Path(__file__).resolve().parents[1]  # python/far


def far_warnings(previous):
    """A `warnings.showwarning` for a command: a warning that far's own code raises (a setting that has no effect:
    an EMA longer than the run, RandAugment on tensors, drop-path without timm blocks; non-finite logits) prints
    as the command's other warnings do, one `far: warning:` line, not Python's form with a file name and a source
    line; any other library's warning goes to `previous`. Whose warning it is comes from the code that called
    warnings.warn, not from the file its stacklevel names (drop-path's names contextlib)."""
    def show(message, category, filename, lineno, file=None, line=None):
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename == warnings.__file__:
            frame = frame.f_back  # warnings' own frames: the first other one called warnings.warn
        if frame is not None and Path(frame.f_code.co_filename).resolve().is_relative_to(FAR_DIR):
            warn(" ".join(str(message).split()))
        else:
            previous(message, category, filename, lineno, file, line)
    return show


def check_numbers(args: argparse.Namespace) -> None:
    """Values argparse lets through that no command can use: inf/nan for any number option, and
    architecture sizes beyond far.checkpoint.ARCH_LIMITS (e.g. --num-classes 1000000000)."""
    import math

    from far.cli.options import check_arch_limit
    from far.errors import ConfigError

    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
        if isinstance(value, int) and not isinstance(value, bool):
            check_arch_limit(name, value)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `far` console script; returns the exit code (0 ok, 2 user error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help / --version (0) or a usage error (2): argparse has printed it
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    import torch

    from far.utils.fs import command_inputs

    threads = torch.get_num_threads()
    try:
        check_numbers(args)
        with command_inputs(), warnings.catch_warnings():  # no command overwrites a file it has read
            warnings.showwarning = far_warnings(warnings.showwarning)  # put back on exit
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `far info | head`: stop quietly, as other command-line tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except Exception as e:  # noqa: BLE001 - user errors become one line; bugs keep their traceback
        if args.debug or not isinstance(e, (*USER_ERRORS, OSError, ValueError)):
            raise
        print(f"{PROG}: error: {_fmt_error(e)}", file=sys.stderr)
        return 2
    finally:  # main() may run in-process (tests, notebooks): leave torch's threads and process group as found
        torch.set_num_threads(threads)
        from far.train import cleanup_distributed
        from far.train.loop import clear_before_first_run

        cleanup_distributed()
        clear_before_first_run()  # notes of a run that never started


if __name__ == "__main__":
    raise SystemExit(main())
