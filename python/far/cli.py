"""The `far` command line: info, convert, eval (and a place for demo).

    far info                         versions, devices, kernel backends
    far info model.safetensors       a checkpoint's config summary
    far convert fmnist_deit_tiny -o model.safetensors
    far eval model.safetensors --data fashion-mnist --limit 1000

User errors (bad paths, corrupt checkpoints, unavailable backends, data that does not fit the model)
print one line `far: error: ...` to stderr and exit with code 2; `far --debug ...` shows tracebacks.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

PROG = "far"
BACKEND_CHOICES = ("auto", "torch", "cpp", "cuda", "triton")


class CLIError(Exception):
    """A user error: reported as one line `far: error: ...`, exit code 2."""


def _user_errors() -> tuple:
    """Exception types reported as one-line user errors (the rest are bugs and keep their traceback)."""
    from far_kernels import BackendUnavailable

    errors = [CLIError, OSError, ValueError, BackendUnavailable]
    try:
        from far.io import CheckpointError

        errors.append(CheckpointError)
    except ImportError:
        pass
    return tuple(errors)


def _fmt_error(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and e.filename and str(e.filename) not in e.strerror:
        return f"{e.filename}: {e.strerror}"
    msg = str(e).strip() or type(e).__name__
    return " ".join(msg.split("\n"))  # one line


# ---------------------------------------------------------------- info
def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except Exception as e:  # noqa: BLE001 - any import failure means "not usable"
        return f"not installed ({type(e).__name__})" if isinstance(e, ImportError) else f"broken ({e})"
    return getattr(mod, "__version__", "unknown")


def _resolve_backend(backend: Optional[str], device) -> str:
    """The bilstm_scan backend that `backend` (None = env FAR_BACKEND / auto) resolves to on `device`;
    raises BackendUnavailable (with the reason) if it cannot run there."""
    from far_kernels.ops.bilstm_scan import OP

    return OP.resolve(backend, device)


def _backend_lines(device: str) -> list:
    import far_kernels
    from far_kernels.ops.bilstm_scan import OP

    lines = []
    for name, why in far_kernels.backend_report(device).items():
        if why is None:
            op_why = OP.reason(name, device)
            status = "available" if op_why is None else f"available, but bilstm_scan: {op_why}"
        else:
            status = f"unavailable: {why}"
        lines.append(f"  {name:<7} {status}")
    try:
        auto = OP.resolve("auto", device)
    except Exception as e:  # noqa: BLE001
        auto = f"? ({e})"
    lines.append(f"  auto -> {auto}")
    env = os.environ.get("FAR_BACKEND")
    if env:
        try:
            default = OP.resolve(None, device)
        except Exception as e:  # noqa: BLE001 - report, do not fail `far info`
            default = f"error: {e}"
        lines.append(f"  default (env FAR_BACKEND={env}) -> {default}")
    return lines


def _checkpoint_file(spec: str) -> Path:
    """A CKPT argument (file or zoo name) as a file, or a one-line user error."""
    from far.models.zoo import checkpoint_file

    file = checkpoint_file(spec)
    if file is None:
        raise CLIError(f"{spec}: no such checkpoint (a file, or a zoo name such as fmnist_far_tiny)")
    return file


def _checkpoint_summary(path: str) -> list:
    """Lines describing a checkpoint's config (far.read_config: header only, validated)."""
    from far.io import read_config

    path = str(_checkpoint_file(path))
    cfg = read_config(path)
    arch = cfg["architecture"]
    pcfg = cfg.get("pretrained_cfg") or {}
    kwargs = arch.get("kwargs") or {}
    blocks = cfg["far"]["blocks"]
    meta = cfg.get("metadata") or {}
    size = Path(path).stat().st_size
    lines = [f"checkpoint   {path} ({size / 2**20:.2f} MiB, format {cfg['format']} v{cfg['format_version']}, "
             f"written by far {cfg.get('far_version', '?')})",
             f"architecture {arch['timm_name']}" + (f" {json.dumps(kwargs, sort_keys=True)}" if kwargs else "")]
    if pcfg.get("input_size"):
        def nums(v):
            return ", ".join(f"{x:g}" for x in v) if isinstance(v, (list, tuple)) else str(v)

        lines.append(f"input        {'x'.join(str(v) for v in pcfg['input_size'])}, "
                     f"mean ({nums(pcfg.get('mean'))}), std ({nums(pcfg.get('std'))})")
    num_classes = kwargs.get("num_classes", pcfg.get("num_classes"))
    if num_classes is not None:
        lines.append(f"classes      {num_classes}")
    if meta.get("teacher"):
        lines.append(f"teacher      {meta['teacher']}")
    if not blocks:
        lines.append("FAR blocks   none (a plain timm model, e.g. a teacher)")
    else:
        full = sum(2 * b["num_heads"] * b["head_dim"] for b in blocks)
        kept = sum(sum(map(sum, b["hidden_sizes"])) for b in blocks)
        lines.append(f"FAR blocks   {len(blocks)}, LSTM units kept {kept}/{full} ({100 * kept / max(full, 1):.1f}% "
                     "of head_dim per head and direction); hidden sizes per head:")
        w = max(len(b["name"]) for b in blocks)
        for b in blocks:
            fwd, bwd = b["hidden_sizes"]
            lines.append(f"  {b['name']:<{w}}  heads {b['num_heads']} x d {b['head_dim']}  fwd {fwd}  bwd {bwd}")
    for key, val in meta.items():
        if key != "teacher":
            lines.append(f"{key:<12} {json.dumps(val, sort_keys=True, default=str)}")
    return lines


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    import far
    from far_kernels._ext import EXT_ERROR, _C, ext_has_cuda

    if args.checkpoint:
        print("\n".join(_checkpoint_summary(args.checkpoint)))
        return 0
    cuda = torch.version.cuda
    print(f"far {far.__version__}  ({Path(far.__file__).parent})")
    print(f"python {platform.python_version()}, torch {torch.__version__}"
          + (f" (CUDA {cuda})" if cuda else " (CPU build)")
          + f", triton {_version('triton')}, timm {_version('timm')}, torchvision {_version('torchvision')}")
    print("devices:")
    print(f"  cpu     {os.cpu_count()} cores, torch uses {torch.get_num_threads()} threads")
    has_cuda = torch.cuda.is_available()
    if has_cuda:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"  cuda:{i}  {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB)")
    else:
        print("  cuda    none" + (" (CPU build of torch)" if not cuda else " (no GPU visible)"))
    if _C is None:
        print(f"extension: not loaded: {EXT_ERROR}")
    else:
        print(f"extension: far_kernels._C {'with CUDA kernels' if ext_has_cuda() else 'CPU kernels only'}")
    for dev in ["cpu"] + (["cuda"] if has_cuda else []):
        print(f"backends on {dev}:")
        print("\n".join(_backend_lines(dev)))
    return 0


# ---------------------------------------------------------------- convert
def cmd_convert(args: argparse.Namespace) -> int:
    import timm

    import far

    if not timm.is_model(args.model):
        raise CLIError(f"unknown model '{args.model}'; timm ViT names (e.g. deit_tiny_patch16_224) or "
                       "fmnist_deit_tiny / fmnist_deit_small (list them: python -c \"import timm; "
                       "print(timm.list_models('deit*'))\")")
    out = Path(args.output)
    if out.is_dir():
        raise CLIError(f"{out}: is a folder; -o takes the checkpoint file to write")
    if not out.parent.exists():
        raise CLIError(f"{out.parent}: no such folder for the output checkpoint")
    if out.exists() and not args.force:
        raise CLIError(f"{out}: exists; pass --force to overwrite")
    if args.hidden_size is not None and args.hidden_size < 1:
        raise CLIError(f"--hidden-size must be >= 1, got {args.hidden_size}")
    kwargs = {}
    if args.num_classes is not None:
        if args.num_classes < 1:
            raise CLIError(f"--num-classes must be >= 1, got {args.num_classes}")
        kwargs["num_classes"] = args.num_classes
    if args.pretrained:
        if not args.quiet:
            print(f"fetching pretrained weights of {args.model} through timm (needs a network) ...", flush=True)
        try:
            model = far.create_model(args.model, pretrained=True, far=False, **kwargs)
        except Exception as e:  # noqa: BLE001 - network / hub / missing-weights errors of every kind
            raise CLIError(f"could not get pretrained weights for {args.model}: {_fmt_error(e)} "
                           "(no network, or no pretrained weights exist for this model; drop --pretrained "
                           "for a randomly initialised model)") from e
    else:
        model = far.create_model(args.model, pretrained=False, far=False, **kwargs)
    far.convert(model, hidden_sizes=args.hidden_size, init=args.init)
    if not args.quiet:
        print(f"{args.model}: {len(far.far_modules(model))} attention blocks -> FAR "
              f"({'pretrained' if args.pretrained else 'random init'}, init={args.init}, "
              f"hidden size {args.hidden_size or 'head_dim'})")
        print(model.far_conversion.table())
    from far.io import save

    metadata = {"teacher": args.model, "pretrained": bool(args.pretrained), "init": args.init,
                "converted_by": "far convert"}
    save(model, str(out), metadata=metadata)
    if not args.quiet:
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return 0


# ---------------------------------------------------------------- eval
def _evaluate(model, dataset, batch_size: int, device, workers: int, progress: bool) -> dict:
    import torch

    from far.data import iterate_batches, num_batches

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32  # e.g. bf16 models
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    timed_images, timed_s = 0, 0.0  # model time, first (warm-up) batch excluded
    e2e_start = None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(dataset), unit="img", desc="eval", file=sys.stderr, dynamic_ncols=True)
    t_all = time.perf_counter()
    with torch.inference_mode():
        for i, (x, y) in enumerate(iterate_batches(dataset, batch_size, device=device, num_workers=workers)):
            x = x.to(dtype)
            sync()
            t0 = time.perf_counter()
            logits = model(x)
            correct += (logits.argmax(dim=-1) == y).sum()
            sync()
            t1 = time.perf_counter()
            if i == 0:
                e2e_start, e2e_images = t1, 0
            else:
                timed_images += x.shape[0]
                timed_s += t1 - t0
                e2e_images += x.shape[0]
            seen += x.shape[0]
            if bar is not None:
                bar.update(x.shape[0])
                bar.set_postfix(acc=f"{100.0 * int(correct) / seen:.2f}%", refresh=False)
    t_end = time.perf_counter()
    if bar is not None:
        bar.close()
    if seen == 0:
        raise CLIError("the dataset is empty")
    n_batches = num_batches(dataset, batch_size)
    if timed_images == 0:  # one batch only: nothing left after warm-up, report it (warm-up included)
        ips = e2e_ips = seen / max(t_end - t_all, 1e-9)
    else:
        ips = timed_images / max(timed_s, 1e-9)
        e2e_ips = e2e_images / max(t_end - e2e_start, 1e-9)
    c = int(correct)
    return {"num_images": seen, "correct": c, "accuracy": c / seen, "images_per_s": ips,
            "end_to_end_images_per_s": e2e_ips, "batches": n_batches, "seconds": t_end - t_all,
            "warmup_excluded": timed_images > 0}


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    threads = torch.get_num_threads()
    try:
        return _eval(args)
    finally:  # main() may run in-process (tests, notebooks): leave torch's thread count as it was
        torch.set_num_threads(threads)


def _device(name: Optional[str]):
    """The torch.device for --device NAME (None: cuda if available, else cpu); CLIError if unusable."""
    import torch

    dev_name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(dev_name)
    except RuntimeError as e:
        raise CLIError(f"--device {dev_name}: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError("--device cuda: no CUDA device is available "
                           + ("(CPU build of torch)" if torch.version.cuda is None else "(no GPU visible)"))
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {dev_name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type != "cpu":
        raise CLIError(f"--device must be cpu or cuda[:N], got {dev_name}")
    return device


def _eval(args: argparse.Namespace) -> int:
    import torch

    import far
    from far.data import make_dataset
    from far.hardware import device_name

    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise CLIError(f"--limit must be >= 1, got {args.limit}")
    if args.threads is not None:
        if args.threads < 1:
            raise CLIError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    ckpt = _checkpoint_file(args.checkpoint)
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise CLIError(f"{Path(args.json).parent}: no such folder for --json")
    backend = args.backend  # None = env FAR_BACKEND / auto
    used = _resolve_backend(backend, device)  # raises BackendUnavailable with the reason, before loading

    from far.io import load

    model = load(str(ckpt), device=str(device), backend=backend)
    model.eval()
    if not far.far_modules(model):
        used = "none (the checkpoint has no FAR blocks)"
    dataset = make_dataset(args.data, args.split, model, limit=args.limit, train=False)
    progress = not args.quiet and sys.stderr.isatty()
    workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1)
    res = _evaluate(model, dataset, args.batch_size, device, workers, progress)
    res = {
        "checkpoint": str(ckpt),
        "model": getattr(model, "far_arch", {}).get("timm_name")
        or (getattr(model, "pretrained_cfg", None) or {}).get("architecture"),
        "data": str(args.data),
        "split": args.split if str(args.data).lower() in ("fashion-mnist", "fashion_mnist", "fmnist") else None,
        **res,
        "backend": used,
        "device": str(device),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "far_version": far.__version__,
        "torch_version": torch.__version__,
    }
    where = f"{args.data} {res['split']}" if res["split"] else str(args.data)
    print(f"accuracy {100 * res['accuracy']:.2f}% ({res['correct']}/{res['num_images']}) on {where}")
    warm = "first batch excluded as warm-up" if res["warmup_excluded"] else "one batch: warm-up included"
    print(f"throughput {res['images_per_s']:.1f} images/s (model, {warm}; end-to-end "
          f"{res['end_to_end_images_per_s']:.1f})  backend {used}  device {device}  threads {res['threads']}  "
          f"batch {args.batch_size}")
    if args.json:
        out = Path(args.json)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(res, indent=2) + "\n")
        os.replace(tmp, out)
        if not args.quiet:
            print(f"wrote {out}")
    return 0


# ---------------------------------------------------------------- parser
class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions are wrapped paragraphs, epilogs (examples) are kept as written; an option's default
    is shown when it has a meaningful one and its help does not already say it."""

    def _fill_text(self, text, width, indent):
        import textwrap

        paras = text.split("\n\n")
        return "\n\n".join(p if p.startswith(" ") or "\n  " in p else
                           textwrap.fill(" ".join(p.split()), width, initial_indent=indent,
                                         subsequent_indent=indent) for p in paras)

    def _get_help_string(self, action):
        h = action.help or ""
        if "default" not in h and action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
            h += " (default: %(default)s)"
        return h


def _add_info_parser(sub) -> None:
    p = sub.add_parser(
        "info", formatter_class=_Formatter, help="versions, devices and kernel backends (or a checkpoint's config)",
        description="Print the far/torch/triton/timm versions, the CPU threads and CUDA devices, and every "
                    "kernel backend (torch, cpp, triton, cuda) per device with 'available' or the reason it "
                    "is not, plus what 'auto' picks. With a checkpoint, print its config instead: "
                    "architecture, source teacher, and per-block hidden sizes per head and direction.",
        epilog="examples:\n  far info\n  far info model.safetensors\n  FAR_BACKEND=torch far info")
    p.add_argument("checkpoint", nargs="?", metavar="CKPT", help="a FAR checkpoint (file or zoo name) to summarise")
    p.set_defaults(func=cmd_info)


def _add_convert_parser(sub) -> None:
    p = sub.add_parser(
        "convert", formatter_class=_Formatter, help="build a timm ViT, replace its attention by FAR, save it",
        description="Build the timm model MODEL (any timm ViT name, e.g. deit_tiny_patch16_224, or our "
                    "Fashion-MNIST ViTs fmnist_deit_tiny / fmnist_deit_small), replace every self-attention "
                    "by a multi-head BiLSTM (FARAttention), print the parameter table (attention vs FAR per "
                    "block) and write a FAR checkpoint (safetensors + JSON config). The converted model "
                    "still needs distillation to recover the teacher's accuracy.",
        epilog="examples:\n"
               "  far convert fmnist_deit_tiny -o fmnist_tiny.safetensors\n"
               "  far convert deit_tiny_patch16_224 --pretrained -o deit_tiny.safetensors     # needs a network\n"
               "  far convert deit_small_patch16_224 --hidden-size 32 --num-classes 100 -o small.safetensors")
    p.add_argument("model", metavar="MODEL", help="timm model name")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="checkpoint file to write")
    p.add_argument("--pretrained", action="store_true",
                   help="load the teacher's pretrained weights through timm (downloads; needs a network)")
    p.add_argument("--hidden-size", type=int, metavar="N",
                   help="LSTM units per head and direction (default: head_dim)")
    p.add_argument("--num-classes", type=int, metavar="K", help="classifier classes (default: the model's)")
    p.add_argument("--init", choices=("value", "random"), default="value",
                   help="pre_proj init: from the attention's value projection, or random")
    p.add_argument("-f", "--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=cmd_convert)


def _add_eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval", formatter_class=_Formatter, help="top-1 accuracy and throughput of a checkpoint on a dataset",
        description="Load a FAR checkpoint and measure its top-1 accuracy on a dataset under "
                    "torch.inference_mode, with the images/s of the model (first batch excluded as "
                    "warm-up; CUDA synchronized) and end to end, and the kernel backend actually used. "
                    "The dataset must fit the model (image size, channels, number of classes).",
        epilog="examples:\n"
               "  far eval fmnist_tiny.safetensors --data fashion-mnist\n"
               "  far eval fmnist_tiny.safetensors --data fashion-mnist --limit 1000 --backend torch --threads 2\n"
               "  far eval deit.safetensors --data ~/imagenet/val --device cuda --batch-size 512 --json res.json\n\n"
               "Fashion-MNIST comes from Debian's dataset-fashion-mnist (apt-get install -y "
               "dataset-fashion-mnist) or env FAR_FASHION_MNIST; a PATH is an ImageNet-style folder "
               "(one subfolder per class).")
    p.add_argument("checkpoint", metavar="CKPT",
                   help="FAR checkpoint (far convert / training output) or zoo name (e.g. fmnist_far_tiny)")
    p.add_argument("--data", required=True, metavar="fashion-mnist|PATH",
                   help="'fashion-mnist' or an image folder with one subfolder per class")
    p.add_argument("--split", choices=("train", "test"), default="test", help="Fashion-MNIST split")
    p.add_argument("--batch-size", type=int, default=256, metavar="B", help="images per batch")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate the first N images only")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default=None,
                   help="BiLSTM scan backend (default: env FAR_BACKEND, else auto); an unavailable one is an error")
    p.add_argument("--device", metavar="cpu|cuda", default=None, help="device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: torch's)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="DataLoader workers for image folders (default: min(8, CPU cores))")
    p.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from far.demo import format_table, run_demo

    for flag in ("num_images", "bench_images", "batch_size"):
        if getattr(args, flag) < 1:
            raise CLIError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.threads is not None:
        if args.threads < 1:
            raise CLIError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    result = run_demo(num_images=args.num_images, bench_images=args.bench_images, batch_size=args.batch_size,
                      out_dir=args.out_dir, plot=not args.no_plot, progress=not args.quiet)
    print(f"FAR demo on the bundled zoo: {result['num_images']} Fashion-MNIST test images (accuracy), "
          f"{result['bench_images']} for speed, batch {result['batch_size']}, {result['threads']} CPU threads")
    print(format_table(result))
    print(f"wrote {args.out_dir}/demo.json" + (f" and {result['plot']}" if result.get("plot") else "")
          + f" in {time.perf_counter() - t0:.0f} s")
    return 0


def _add_demo_parser(sub) -> None:
    p = sub.add_parser(
        "demo", formatter_class=_Formatter,
        help="the main job: zoo teacher vs FAR vs pruned FAR on Fashion-MNIST, every backend",
        description="Evaluate the bundled zoo on the Fashion-MNIST test set: the attention teacher "
                    "(fmnist_deit_tiny), its distilled FAR student (fmnist_far_tiny) and the pruned FAR student "
                    "(fmnist_far_tiny_pruned). Prints top-1 accuracy, parameters (all, and the token mixers'), CPU "
                    "images/s for every available backend and each backend's agreement with the torch reference; "
                    "writes demo.json and demo.png.",
        epilog="examples:\n  far demo\n  far demo --num-images 2000 --threads 1 --out-dir /tmp/demo")
    p.add_argument("--num-images", type=int, default=10000, metavar="N", help="test images for accuracy")
    p.add_argument("--bench-images", type=int, default=500, metavar="N",
                   help="test images for the reference (torch) backend's speed and agreement runs")
    p.add_argument("--batch-size", type=int, default=250, metavar="B", help="images per batch")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: torch's)")
    p.add_argument("--out-dir", default="far-demo", metavar="DIR", help="where demo.json / demo.png go")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=_Formatter,
        description="FAR engine: ViTs with every self-attention replaced by multi-head BiLSTMs, fused "
                    "kernels, and IMC crossbar emulation.",
        epilog="examples:\n"
               "  far info\n"
               "  far convert fmnist_deit_tiny -o fmnist_tiny.safetensors\n"
               "  far eval fmnist_tiny.safetensors --data fashion-mnist --limit 1000\n"
               "`far COMMAND --help` describes each command.")
    from far.version import __version__

    parser.add_argument("--version", action="version", version=f"far {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_info_parser(sub)
    _add_convert_parser(sub)
    _add_eval_parser(sub)
    _add_demo_parser(sub)
    from far.train.cli import add_parsers as _add_train_parsers

    _add_train_parsers(sub, _Formatter)
    __import__("far.imc.cli", fromlist=["add_parser"]).add_parser(sub)  # far imc-eval (python/far/imc/cli.py)
    return parser


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
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `far info | head`: stop quietly, as other command-line tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except Exception as e:  # noqa: BLE001 - user errors become one line; bugs keep their traceback
        if args.debug or not isinstance(e, _user_errors()):
            raise
        print(f"{PROG}: error: {_fmt_error(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
