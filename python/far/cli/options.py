"""The grammar every `far` command shares: the same option names for the same things.

    MODEL                   positional: a checkpoint file, a zoo name or a timm model name (far.models.resolve)
    -o/--output FILE        the file a command writes (refused if it exists, unless -f/--force)
    -f/--force              overwrite existing output files
    -q/--quiet              no progress bars or notes (results are still printed)
    --data, --device, --threads, --backend, --batch-size, --limit, --workers, --json
"""
from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import Iterable, Optional

from far.errors import ConfigError

BACKEND_CHOICES = ("auto", "torch", "cpp", "cuda", "triton")
MODEL_HELP = "a checkpoint file, a zoo name (e.g. fmnist_far_tiny) or a timm model name"
FMNIST_NOTE = ("Fashion-MNIST comes from Debian's dataset-fashion-mnist (apt-get install -y dataset-fashion-mnist) "
               "or env FAR_FASHION_MNIST; a PATH is an ImageNet-style folder (one subfolder per class).")


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions are wrapped paragraphs, epilogs (examples) are kept as written; an option's default
    is shown when it has a meaningful one and its help does not already say it (never for flags)."""

    def _fill_text(self, text, width, indent):
        paras = text.split("\n\n")
        return "\n\n".join(p if p.startswith(" ") or "\n  " in p else
                           textwrap.fill(" ".join(p.split()), width, initial_indent=indent,
                                         subsequent_indent=indent) for p in paras)

    def _get_help_string(self, action):
        h = action.help or ""
        flag = action.nargs == 0  # store_true / store_false: the help says what the flag does
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS  # not 0
        if "default" not in h and not flag and not unset and action.option_strings:
            h += " (default: %(default)s)"
        return h


HIDDEN_SIZE_HELP = ("LSTM units per head and direction: N for every converted block, or N,N,... one per converted "
                    "block in model order (e.g. 32,32,48,32 widens the third)")


def parse_hidden_size(text: Optional[str]):
    """--hidden-size: None -> None, "N" -> N, "N,N,..." -> [N, ...] (one per converted block); ConfigError unless
    every N is an integer >= 1."""
    if text is None:
        return None
    try:
        sizes = [int(v) for v in str(text).split(",")]
    except ValueError:
        raise ConfigError(f"--hidden-size: expected N or N,N,... (integers, one per converted block), "
                          f"got {text!r}") from None
    if any(k < 1 for k in sizes):
        raise ConfigError(f"--hidden-size: every size must be >= 1, got {text!r}")
    for k in sizes:  # before any tensor is allocated (a size of 1e9 would ask the allocator for terabytes)
        check_arch_limit("hidden_size", k)
    return sizes[0] if len(sizes) == 1 else sizes


def check_arch_limit(name: str, value: int) -> None:
    """ConfigError unless an architecture size `name` (a key of far.checkpoint.ARCH_LIMITS, e.g. num_classes,
    hidden_size) lies within the limits a checkpoint may hold; names without a limit pass."""
    from far.checkpoint import ARCH_LIMITS

    if name in ARCH_LIMITS:
        lo, hi = ARCH_LIMITS[name]
        if not lo <= value <= hi:
            raise ConfigError(f"--{name.replace('_', '-')} must lie in [{lo}, {hi}], got {value}")


def describe_hidden_size(value) -> str:
    """How a --hidden-size value reads in a report: 'head_dim', '48' or '32/32/48/32' (per block)."""
    if value is None:
        return "head_dim"
    return str(value) if isinstance(value, int) else "/".join(map(str, value)) + " per block"


def warn(msg: str) -> None:
    """A note that an option has no effect (or something else the user should know): one stderr line."""
    print(f"far: warning: {msg}", file=sys.stderr, flush=True)


def note(args: argparse.Namespace, msg: str) -> None:
    """Progress text on stderr, unless --quiet."""
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr, flush=True)


def at_least(args: argparse.Namespace, lo: int, *names: str) -> None:
    """ConfigError unless every given option (None = unset) is >= lo."""
    for name in names:
        v = getattr(args, name, None)
        if v is not None and v < lo:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {lo}, got {v}")


def add_model(p: argparse.ArgumentParser, help: str = MODEL_HELP, optional: bool = False,
              default: Optional[str] = None) -> None:
    p.add_argument("model", metavar="MODEL", help=help, nargs="?" if optional else None, default=default)


def add_output(p: argparse.ArgumentParser, required: bool = False, help: str = "the checkpoint file to write") -> None:
    p.add_argument("-o", "--output", required=required, metavar="FILE", help=help)


def add_common(p: argparse.ArgumentParser, *, force: bool = True, quiet: str = "no progress bars or notes") -> None:
    if force:
        p.add_argument("-f", "--force", action="store_true", help="overwrite existing output files")
    p.add_argument("-q", "--quiet", action="store_true", help=quiet)


def add_device(p, threads: bool = True) -> None:
    p.add_argument("--device", metavar="cpu|cuda[:N]", default=None,
                   help="where to run (default: cuda if available, else cpu; under torchrun the process's GPU)")
    if threads:
        add_threads(p)


def add_threads(p) -> None:
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch (at most the CPU cores; default: torch's)")


def add_data(p, required: bool = True, eval_only: bool = True) -> None:
    p.add_argument("--data", required=required, default=None if required else "fashion-mnist",
                   metavar="fashion-mnist|PATH", help="'fashion-mnist' or an image folder with one subfolder per class")
    if eval_only:
        p.add_argument("--split", choices=("train", "test"), default="test", help="Fashion-MNIST split to evaluate")
        p.add_argument("--limit", type=int, metavar="N", help="evaluate the first N images only")
    p.add_argument("--workers", type=int, metavar="N",
                   help="DataLoader workers for image folders (default: min(8, CPU cores) to evaluate, 0 to train)")


# suffix -> the kind of file it names; an output whose suffix names another kind than the one the
# command writes is refused (`far export -o m.safetensors` would write ONNX under a checkpoint's name)
SUFFIX_KINDS = {".onnx": "an ONNX graph", ".safetensors": "a far checkpoint", ".json": "a JSON report",
                ".pt": "a torch.save file", ".pth": "a torch.save file", ".ckpt": "a torch.save file",
                **{s: "a figure" for s in (".png", ".pdf", ".svg", ".jpg", ".jpeg")}}


def check_suffix(path, kind: str, what: str) -> None:
    """ConfigError if `path`'s suffix names another kind of file than `kind` (a value of SUFFIX_KINDS);
    unknown suffixes and none pass."""
    named = SUFFIX_KINDS.get(Path(path).suffix.lower())
    if named is not None and named != kind:
        good = ", ".join(s for s, k in SUFFIX_KINDS.items() if k == kind)
        raise ConfigError(f"{what} {path}: this command writes {kind}, but the name's suffix says {named}; "
                          f"name it {good}")


def output_checks(args: argparse.Namespace, inputs: Iterable = (), *names: str, also: Iterable = (),
                  output_kind: str = "a far checkpoint") -> None:
    """Check every output option in `names` (e.g. "output", "json", "plot") before any work: a file name in
    a writable existing folder, not one of `inputs`, not existing unless --force; no two outputs the same
    file, nor any of `also` ((option, path) pairs: other files the command writes, e.g. those of its
    --out-dir); a --plot in a format matplotlib writes (from the suffix: far.utils.plot.save_figure); -o and
    --json not named as another kind of file (check_suffix; -o writes `output_kind`)."""
    from far.utils.fs import check_output

    seen = {}  # resolved path -> the option that writes it
    for what, path in also:
        seen.setdefault(Path(path).resolve(), what)
    for name in names:
        path = getattr(args, name, None)
        if path:
            what = f"--{name.replace('_', '-')}" if name != "output" else "-o/--output"
            other = seen.setdefault(Path(path).resolve(), what)
            if other != what:
                raise ConfigError(f"{what} {path}: {other} writes the same file; give each output its own file")
            check_output(path, force=getattr(args, "force", False), inputs=inputs, what=what)
            if name == "plot":
                _check_figure_format(path)
            elif name in ("output", "json"):
                check_suffix(path, output_kind if name == "output" else "a JSON report", what)


def _check_figure_format(path) -> None:
    """ConfigError unless matplotlib writes the format of `path`'s suffix (PNG without one); nothing to
    check without matplotlib (the command says so itself)."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        return
    fmt = Path(path).suffix[1:].lower() or "png"
    formats = FigureCanvasBase.get_supported_filetypes()
    if fmt not in formats:
        raise ConfigError(f"--plot {path}: matplotlib cannot write .{fmt} files; give one of "
                          + ", ".join(f".{k}" for k in sorted(formats)))


def set_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None) is not None:
        at_least(args, 1, "threads")
        import os

        cores = os.cpu_count() or 1
        if args.threads > cores:  # never useful, and a huge count makes torch spawn threads until it crashes
            raise ConfigError(f"--threads must be at most the {cores} CPU cores of this machine, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)


# ---- bring your own ViT: a timm architecture, its weights file, the blocks to replace ----
def add_teacher_args(p: argparse.ArgumentParser, teacher: bool = True) -> None:
    """--teacher, --teacher-weights (--weights), --model-kwargs, --replace, --pre-proj-init."""
    g = p.add_argument_group("the teacher and the conversion")
    if teacher:
        g.add_argument("--teacher", default=None, metavar="MODEL",
                       help="the attention teacher (instead of the positional MODEL), e.g. "
                            "timm:vit_small_patch14_dinov2")
    g.add_argument("--teacher-weights", "--weights", dest="teacher_weights", default=None, metavar="FILE",
                   help="weights of the timm architecture MODEL from a local file: .safetensors or a torch state "
                        "dict (torch.load weights_only=True; {'model': ...} / {'state_dict': ...} unwrapped; position "
                        "embeddings resized by timm). Nothing is downloaded")
    g.add_argument("--model-kwargs", default=None, metavar="K=V,...",
                   help="timm.create_model arguments of a timm MODEL, e.g. img_size=224,num_classes=0 (values: "
                        "ints, floats, true/false/none or words), or a JSON object")
    g.add_argument("--replace", default=None, metavar="BLOCKS",
                   help="replace the attention of these blocks only, e.g. 0-5 or 0,2,4-6 (default: every block); "
                        "the others keep the teacher's attention")
    g.add_argument("--pre-proj-init", choices=("v", "random"), default="v",
                   help="FAR's input projection starts from the attention's value projection (v) or random "
                        "(as the FAR authors' code)")


def teacher_spec(args: argparse.Namespace) -> str:
    """The teacher MODEL of the positional argument or --teacher (exactly one)."""
    given = [v for v in (getattr(args, "model", None), getattr(args, "teacher", None)) if v is not None]
    if len(given) != 1:
        raise ConfigError("give the teacher once: as MODEL or as --teacher MODEL" if given else
                          "no teacher: give MODEL (or --teacher MODEL), e.g. fmnist_deit_tiny or timm:NAME "
                          "--teacher-weights FILE")
    return given[0]


def _kwarg_value(text: str):
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def model_kwargs(args: argparse.Namespace) -> dict:
    """--model-kwargs parsed: 'img_size=224,num_classes=0' or a JSON object; architecture arguments only (timm's
    loader arguments, far.checkpoint.LOADER_KWARGS, are far's to set). Sizes are checked by far.create_model."""
    import json

    from far.checkpoint import LOADER_KWARGS

    text = getattr(args, "model_kwargs", None)
    if not text:
        return {}
    if text.strip().startswith("{"):
        try:
            out = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"--model-kwargs: not valid JSON ({e})") from None
        if not isinstance(out, dict):
            raise ConfigError("--model-kwargs: a JSON object {\"img_size\": 224, ...} or K=V pairs")
    else:
        out = {}
        for item in text.split(","):
            key, sep, val = item.partition("=")
            key = key.strip()
            if not sep or not key.isidentifier():
                raise ConfigError(f"--model-kwargs takes K=V pairs like img_size=224,num_classes=0, got {item!r}")
            out[key] = _kwarg_value(val)
    bad = sorted(set(out) & LOADER_KWARGS)
    if bad:
        raise ConfigError(f"--model-kwargs: {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} set by far (timm's "
                          "loader arguments); give architecture arguments only (weights: --weights FILE, or timm's "
                          "download)")
    return out
