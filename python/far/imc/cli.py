"""`far imc-eval`: accuracy of a model on emulated ReRAM crossbars, swept over one config field.

    far imc-eval fmnist_far_tiny.safetensors --data fashion-mnist --limit 1000 --sweep adc_bits=4,6,8,10

Hooked into far.cli.build_parser by add_parser(sub); reuses far.cli's evaluation loop, device
resolution and error conventions (CLIError -> one `far: error:` line).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Optional

from far.cli import BACKEND_CHOICES, CLIError, _device, _evaluate, _Formatter


# ---------------------------------------------------------------- config values from the command line
def _config_fields() -> dict:
    import far_kernels

    return {f.name: f for f in dataclasses.fields(far_kernels.CrossbarConfig)}


def _parse_value(key: str, text: str, opt: str):
    """A CrossbarConfig field value from text, typed by the field's default: int, float, str,
    'none' for None, a pair 'p0/p1' for tuples (stuck_at)."""
    fields = _config_fields()
    if key not in fields:
        raise CLIError(f"{opt}: unknown crossbar setting '{key}'; known: {', '.join(fields)}")
    f = fields[key]
    default = f.default if f.default is not dataclasses.MISSING else None
    t = text.strip()
    if t.lower() == "none":
        return None
    try:
        if isinstance(default, bool):
            if t.lower() not in ("true", "false", "1", "0"):
                raise ValueError(t)
            return t.lower() in ("true", "1")
        if isinstance(default, tuple):
            parts = t.split("/")
            if len(parts) != len(default):
                raise ValueError(t)
            return tuple(type(d)(p) if d is not None else float(p) for d, p in zip(default, parts))
        if isinstance(default, int):
            return int(t)
        if isinstance(default, float):
            return float(t)
        if isinstance(default, str):
            return t
        for conv in (int, float):  # default None: the first type that reads it
            try:
                return conv(t)
            except ValueError:
                pass
        return t
    except ValueError:
        kind = ("a pair like 0.01/0.02" if isinstance(default, tuple) else
                type(default).__name__ if default is not None else "a value")
        raise CLIError(f"{opt}: {key}={text!r} is not {kind}") from None


def _key_value(item: str, opt: str) -> tuple:
    key, sep, val = item.partition("=")
    if not sep or not key.strip() or not val.strip():
        raise CLIError(f"{opt} takes KEY=VALUE{'S' if opt == '--sweep' else ''}, got {item!r}")
    return key.strip(), val


def _make_config(values: dict, what: str):
    import far_kernels

    try:
        return far_kernels.CrossbarConfig(**values)
    except (TypeError, ValueError) as e:
        raise CLIError(f"{what}: {' '.join(str(e).split())}") from None


def _fmt(v) -> str:
    if v is None:
        return "none"
    if isinstance(v, tuple):
        return "/".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def _config_line(cfg) -> str:
    return " ".join(f"{f.name}={_fmt(getattr(cfg, f.name))}" for f in dataclasses.fields(cfg))


# ---------------------------------------------------------------- model
def _load_model(spec: str, device, no_far: bool):
    """A checkpoint path (far.load), a zoo name (the bundled trained checkpoint), or a registry / timm
    name (far.create_model, random init). Returns (model, label, origin, checkpoint file or None)."""
    import timm

    import far

    path = Path(spec)
    if path.exists():
        if path.is_dir():
            raise CLIError(f"{spec}: is a folder; give a checkpoint file or a model name")
        if no_far:
            raise CLIError("--no-far applies to model names; a checkpoint is evaluated as saved")
        return far.load(str(path), device=str(device)), str(path), "checkpoint", path
    from far.models.zoo import ZOO, zoo_path

    if spec in ZOO:  # the bundled, trained checkpoint (offline), evaluated as saved
        if no_far:
            raise CLIError("--no-far applies to untrained model names; a zoo model is evaluated as saved")
        file = zoo_path(spec)
        return far.load(str(file), device=str(device)), spec, "zoo checkpoint", file
    if timm.is_model(spec):
        model = far.create_model(spec, pretrained=False, far=not no_far)
        return model.to(device).eval(), spec, "random init", None
    raise CLIError(f"{spec}: no such checkpoint, and not a model name (e.g. fmnist_deit_tiny, deit_tiny_patch16_224)")


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- command
def cmd_imc_eval(args: argparse.Namespace) -> int:
    import torch

    threads = torch.get_num_threads()
    try:
        return _imc_eval(args)
    finally:
        torch.set_num_threads(threads)


def _check_out(path: Optional[str], opt: str) -> None:
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise CLIError(f"{opt} {path}: is a folder; give a file name")
    if not p.resolve().parent.is_dir():
        raise CLIError(f"{p.parent}: no such folder for {opt}")


def _imc_eval(args: argparse.Namespace) -> int:
    import torch

    import far
    from far.data import iterate_batches, make_dataset
    from far.hardware import device_name
    from far.imc import calibrate, emulate
    from far.imc.emulate import select_targets

    for opt, v, lo in (("--batch-size", args.batch_size, 1), ("--limit", args.limit, 1),
                       ("--threads", args.threads, 1), ("--calib-images", args.calib_images, 1)):
        if v is not None and v < lo:
            raise CLIError(f"{opt} must be >= {lo}, got {v}")
    base_values = {}
    for item in args.set or ():
        key, val = _key_value(item, "--set")
        base_values[key] = _parse_value(key, val, "--set")
    base = _make_config(base_values, "--set")
    settings = []  # (label, value, cfg)
    sweep_key = None
    if args.sweep:
        sweep_key, vals = _key_value(args.sweep, "--sweep")
        if sweep_key in base_values:
            raise CLIError(f"--sweep {sweep_key} and --set {sweep_key} conflict; drop one")
        texts = [t for t in vals.split(",")]
        if any(not t.strip() for t in texts):
            raise CLIError(f"--sweep {args.sweep!r}: empty value in the list")
        for t in texts:
            v = _parse_value(sweep_key, t, "--sweep")
            settings.append((f"{sweep_key}={_fmt(v)}", v,
                             _make_config({**base_values, sweep_key: v}, f"--sweep {sweep_key}={t.strip()}")))
        if len({s[0] for s in settings}) != len(settings):
            raise CLIError(f"--sweep {args.sweep!r}: repeated value")
    else:
        settings.append(("crossbar", None, base))
    _check_out(args.json, "--json")
    _check_out(args.plot, "--plot")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CLIError("--plot needs matplotlib (pip install matplotlib)") from None
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    if args.backend is not None:
        import far_kernels

        far_kernels.ops.crossbar_matmul.OP.resolve(args.backend, device)  # unavailable: error before any work

    model, model_label, origin, ckpt_file = _load_model(args.model, device, args.no_far)
    model.eval()
    inc, exc = args.include or None, args.exclude or None
    select_targets(model, inc, exc)  # a pattern that matches nothing: error before any evaluation
    dataset = make_dataset(args.data, args.split, model, limit=args.limit, train=False)
    needs_calib = any(c.adc_range == "calibrated" for _, _, c in settings)
    calib_set = None
    if needs_calib:
        calib_spec = args.calib_data or args.data
        calib_set = make_dataset(calib_spec, "train", model, limit=args.calib_images, train=False)
    progress = not args.quiet and sys.stderr.isatty()
    workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1)

    def note(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    note(f"digital baseline ({len(dataset)} images) ...")
    rows = [{"setting": "digital", "value": None, "config": None,
             **_evaluate(model, dataset, args.batch_size, device, workers, progress)}]
    for i, (label, value, cfg) in enumerate(settings, 1):
        note(f"[{i}/{len(settings)}] {label}: programming crossbars ...")
        emu = emulate(model, cfg, include=inc, exclude=exc, backend=args.backend)
        emu.eval()
        calib_n = 0
        if cfg.adc_range == "calibrated":
            note(f"[{i}/{len(settings)}] {label}: calibrating ADC ranges on {len(calib_set)} images ...")
            calibrate(emu, (x for x, _ in iterate_batches(calib_set, args.batch_size, device=device,
                                                          num_workers=workers)),
                      per_slice=args.calib_per_slice, progress=progress)
            calib_n = len(calib_set)
        res = _evaluate(emu, dataset, args.batch_size, device, workers, progress)
        rows.append({"setting": label, "value": value, "config": dataclasses.asdict(cfg),
                     "calibration_images": calib_n, **res})
        n_xbar = sum(r[1] == "crossbar" for r in emu.imc_emulation.rows)
        del emu
    digital = rows[0]["accuracy"]
    where = f"{args.data} {args.split}" if str(args.data).lower() in ("fashion-mnist", "fashion_mnist", "fmnist") \
        else str(args.data)
    print(f"IMC emulation: {model_label} ({origin}) on {where}, {rows[0]['num_images']} images, device {device}")
    print(f"crossbar config: {_config_line(base)}" + (f"; sweep {sweep_key}" if sweep_key else ""))
    print(f"emulated: {n_xbar} crossbar products" + (f", include {inc}" if inc else "") + (f", exclude {exc}" if exc else ""))
    w = max(len(r["setting"]) for r in rows)
    print(f"{'setting':<{w}}  {'accuracy':>8}  {'vs digital':>10}  {'images/s':>9}")
    for r in rows:
        delta = "-" if r["value"] is None and r["setting"] == "digital" else f"{100 * (r['accuracy'] - digital):+.2f}"
        print(f"{r['setting']:<{w}}  {100 * r['accuracy']:>7.2f}%  {delta:>10}  {r['images_per_s']:>9.1f}")
    result = {
        "model": model_label, "origin": origin,
        "checkpoint_sha256": _sha256(ckpt_file) if ckpt_file is not None else None,  # which weights, exactly
        "data": str(args.data), "split": args.split,
        "num_images": rows[0]["num_images"], "device": str(device),
        "device_name": device_name(device), "threads": torch.get_num_threads(),
        "batch_size": args.batch_size, "base_config": dataclasses.asdict(base),
        "sweep": {"key": sweep_key, "values": [s[1] for s in settings]} if sweep_key else None,
        "include": inc, "exclude": exc, "calibration_data": (args.calib_data or str(args.data)) if needs_calib else None,
        "results": rows, "far_version": far.__version__, "torch_version": torch.__version__,
    }
    if args.json:
        out = Path(args.json)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
        os.replace(tmp, out)
        note(f"wrote {out}")
    if args.plot:
        _plot(result, Path(args.plot))
        note(f"wrote {args.plot}")
    return 0


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    digital, emulated = rows[0], rows[1:]
    key = (result["sweep"] or {}).get("key")
    values = [r["value"] for r in emulated]
    numeric = key is not None and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    xs = values if numeric else list(range(len(emulated)))
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(xs, [100 * r["accuracy"] for r in emulated], "o-", color="#2a7", label="crossbar emulation")
    ax.axhline(100 * digital["accuracy"], color="#555", ls="--", label=f"digital ({100 * digital['accuracy']:.2f}%)")
    if numeric:
        ax.set_xticks(xs)
    else:
        ax.set_xticks(xs, [r["setting"].split("=", 1)[-1] for r in emulated])
    ax.set_xlabel(key or "setting")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{Path(result['model']).name} on {result['data']} ({result['num_images']} images)", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "imc-eval", formatter_class=_Formatter,
        help="accuracy on emulated ReRAM crossbars, swept over one setting (table + plot)",
        description="Evaluate a model digitally and then with its weight products on emulated ReRAM "
                    "in-memory-computing crossbars (far.imc.emulate: bit-sliced weights and inputs, "
                    "tiles, ADC, noise, as far_kernels.crossbar_matmul), once per value of --sweep, and "
                    "print top-1 accuracy per setting next to the digital baseline. Crossbars: every "
                    "nn.Linear, and in FAR blocks the LSTMs' W_ih, the recurrent W_hh (per time step) "
                    "and head_proj. Digital: attention's q@k^T and attn@v (quantized to input_bits), "
                    "nonlinearities, norms, biases, the patch embedding.\n\n"
                    "Settings are far_kernels.CrossbarConfig fields: weight_bits, cell_bits, input_bits, "
                    "dac_bits, adc_bits (none = no ADC), adc_range (max|granular|calibrated), tile_rows, "
                    "encoding (differential|offset), weight_scale (channel|tensor), input_scale "
                    "(row|tensor), prog_noise, read_noise, stuck_at (p0/p1), seed. With "
                    "adc_range=calibrated the ADC ranges come from --calib-images training images first.",
        epilog="examples:\n"
               "  far imc-eval fmnist_far_tiny.safetensors --data fashion-mnist --sweep adc_bits=4,6,8,10 --plot adc.png\n"
               "  far imc-eval fmnist_deit_tiny --data fashion-mnist --limit 500 --sweep adc_range=max,granular,calibrated\n"
               "  far imc-eval model.safetensors --data fashion-mnist --set adc_bits=6 --set adc_range=calibrated \\\n"
               "      --sweep read_noise=0,0.01,0.02 --exclude head --json noise.json\n\n"
               "A model name (fmnist_deit_tiny, a timm ViT) builds a randomly initialised FAR model "
               "(--no-far: the attention model). Fashion-MNIST: apt-get install -y dataset-fashion-mnist.")
    p.add_argument("model", metavar="CKPT|MODEL", help="FAR/teacher checkpoint (far.save), or a model name")
    p.add_argument("--data", required=True, metavar="fashion-mnist|PATH",
                   help="'fashion-mnist' or an image folder with one subfolder per class")
    p.add_argument("--split", choices=("train", "test"), default="test", help="Fashion-MNIST split to evaluate")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate the first N images only")
    p.add_argument("--batch-size", type=int, default=100, metavar="B", help="images per batch")
    p.add_argument("--sweep", metavar="KEY=V1,V2,...",
                   help="one crossbar setting and the values to evaluate (default: just the --set config)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a crossbar setting for every run (repeatable), e.g. --set adc_range=calibrated")
    p.add_argument("--include", action="append", metavar="GLOB",
                   help="emulate only layers whose name matches (repeatable; e.g. '*.w_hh.*', 'blocks.0.*')")
    p.add_argument("--exclude", action="append", metavar="GLOB",
                   help="keep layers whose name matches digital (repeatable; e.g. head)")
    p.add_argument("--calib-images", type=int, default=256, metavar="N",
                   help="images for adc_range=calibrated (from the training split)")
    p.add_argument("--calib-data", metavar="fashion-mnist|PATH",
                   help="calibration data (default: --data; for an image folder give a separate one)")
    p.add_argument("--calib-per-slice", action="store_true", help="one calibrated ADC range per weight slice")
    p.add_argument("--no-far", action="store_true", help="with a model name: keep attention (no FAR conversion)")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default=None,
                   help="crossbar_matmul backend (default: env FAR_BACKEND, else auto); unavailable = error")
    p.add_argument("--device", metavar="cpu|cuda", default=None, help="device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: torch's)")
    p.add_argument("--workers", type=int, metavar="N", help="DataLoader workers for image folders")
    p.add_argument("--json", metavar="OUT", help="also write every result to this JSON file")
    p.add_argument("--plot", metavar="PNG", help="write accuracy vs the swept setting to this image")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_imc_eval)
