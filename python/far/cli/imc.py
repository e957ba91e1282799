"""`far imc-eval`: accuracy of a model on emulated ReRAM crossbars, swept over one config field.

    far imc-eval fmnist_far_tiny --data fashion-mnist --limit 1000 --sweep adc_bits=4,6,8,10
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Optional

from far.cli.evaluate import eval_dataset, eval_workers
from far.cli.options import (BACKEND_CHOICES, FMNIST_NOTE, Formatter, add_common, add_data, add_device, add_model,
                             at_least, note, output_checks, set_threads, warn)
from far.errors import ConfigError


# ---------------------------------------------------------------- config values from the command line
def _config_fields() -> dict:
    import far_kernels

    return {f.name: f for f in dataclasses.fields(far_kernels.CrossbarConfig)}


def _parse_value(key: str, text: str, opt: str):
    """A CrossbarConfig field value from text, typed by the field's default: int, float, str,
    'none' for None, a pair 'p0/p1' for tuples (stuck_at)."""
    fields = _config_fields()
    if key not in fields:
        raise ConfigError(f"{opt}: unknown crossbar setting '{key}'; known: {', '.join(fields)}")
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
        raise ConfigError(f"{opt}: {key}={text!r} is not {kind}") from None


def _key_value(item: str, opt: str) -> tuple:
    key, sep, val = item.partition("=")
    if not sep or not key.strip() or not val.strip():
        raise ConfigError(f"{opt} takes KEY=VALUE{'S' if opt == '--sweep' else ''}, got {item!r}")
    return key.strip(), val


def _make_config(values: dict, what: str):
    import far_kernels

    try:
        return far_kernels.CrossbarConfig(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{what}: {' '.join(str(e).split())}") from None


def _fmt(v) -> str:
    if v is None:
        return "none"
    if isinstance(v, tuple):
        return "/".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def _config_line(cfg) -> str:
    return " ".join(f"{f.name}={_fmt(getattr(cfg, f.name))}" for f in dataclasses.fields(cfg))


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

    import far_kernels
    from far.data import is_fashion_mnist, iterate_batches, make_dataset
    from far.evaluate import evaluate
    from far.imc import calibrate, emulate, select_targets
    from far.models import data_config, load_model, resolve
    from far.utils.env import device_name, resolve_device
    from far.utils.fs import write_json
    from far.version import __version__

    at_least(args, 1, "batch_size", "limit", "calib_images")
    at_least(args, 0, "workers")
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
            raise ConfigError(f"--sweep {sweep_key} and --set {sweep_key} conflict; drop one")
        texts = [t for t in vals.split(",")]
        if any(not t.strip() for t in texts):
            raise ConfigError(f"--sweep {args.sweep!r}: empty value in the list")
        for t in texts:
            v = _parse_value(sweep_key, t, "--sweep")
            settings.append((f"{sweep_key}={_fmt(v)}", v,
                             _make_config({**base_values, sweep_key: v}, f"--sweep {sweep_key}={t.strip()}")))
        if len({s[0] for s in settings}) != len(settings):
            raise ConfigError(f"--sweep {args.sweep!r}: repeated value")
    else:
        settings.append(("crossbar", None, base))
    ref = resolve(args.model)
    output_checks(args, [ref.path], "json", "plot")
    if args.plot:
        from far.utils.plot import pyplot

        if pyplot() is None:
            raise ConfigError("--plot needs matplotlib (pip install matplotlib)")
    needs_calib = any(c.adc_range == "calibrated" for _, _, c in settings)
    if not needs_calib and (args.calib_data or args.calib_per_slice or args.calib_images is not None):
        warn("--calib-images / --calib-data / --calib-per-slice have no effect without adc_range=calibrated")
    if ref.kind != "timm" and args.no_far:
        raise ConfigError("--no-far applies to timm model names; a checkpoint is evaluated as saved")
    set_threads(args)
    device = resolve_device(args.device, "--device")
    if args.backend is not None:  # unavailable: the reason, before any work
        far_kernels.dispatch.select(far_kernels.ops.crossbar_matmul.OP, args.backend, device)

    model, _ = load_model(ref, device=str(device), far=not args.no_far)
    model_label = str(ref.path) if ref.kind == "file" else ref.name
    origin = "random init" if ref.kind == "timm" else ref.origin
    inc, exc = args.include or None, args.exclude or None
    select_targets(model, inc, exc)  # a pattern that matches nothing: error before any evaluation
    dataset = eval_dataset(args, model)
    calib_set = None
    if needs_calib:
        calib_set = make_dataset(args.calib_data or args.data, "train", data_config(model),
                                 limit=args.calib_images or 256, train=False)
    progress = not args.quiet and sys.stderr.isatty()
    workers = eval_workers(args)

    note(args, f"digital baseline ({len(dataset)} images) ...")
    rows = [{"setting": "digital", "value": None, "config": None,
             **evaluate(model, dataset, batch_size=args.batch_size, device=device, workers=workers, progress=progress)}]
    n_xbar = 0
    for i, (label, value, cfg) in enumerate(settings, 1):
        note(args, f"[{i}/{len(settings)}] {label}: programming crossbars ...")
        emu = emulate(model, cfg, include=inc, exclude=exc, backend=args.backend)
        emu.eval()
        calib_n = 0
        if cfg.adc_range == "calibrated":
            note(args, f"[{i}/{len(settings)}] {label}: calibrating ADC ranges on {len(calib_set)} images ...")
            calibrate(emu, (x for x, _ in iterate_batches(calib_set, args.batch_size, device=device,
                                                          num_workers=workers)),
                      per_slice=args.calib_per_slice, progress=progress)
            calib_n = len(calib_set)
        res = evaluate(emu, dataset, batch_size=args.batch_size, device=device, workers=workers, progress=progress)
        rows.append({"setting": label, "value": value, "config": dataclasses.asdict(cfg),
                     "calibration_images": calib_n, **res})
        n_xbar = sum(r[1] == "crossbar" for r in emu.imc_emulation.rows)
        del emu
    digital = rows[0]["accuracy"]
    where = f"{args.data} {args.split}" if is_fashion_mnist(args.data) else str(args.data)
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
        "checkpoint_sha256": _sha256(ref.path) if ref.path is not None else None,  # which weights, exactly
        "data": str(args.data), "split": args.split,
        "num_images": rows[0]["num_images"], "device": str(device),
        "device_name": device_name(device), "threads": torch.get_num_threads(),
        "batch_size": args.batch_size, "base_config": dataclasses.asdict(base),
        "sweep": {"key": sweep_key, "values": [s[1] for s in settings]} if sweep_key else None,
        "include": inc, "exclude": exc, "calibration_data": (args.calib_data or str(args.data)) if needs_calib else None,
        "results": rows, "far_version": __version__, "torch_version": torch.__version__,
    }
    if args.json:
        write_json(args.json, result, force=args.force, inputs=[ref.path])
        note(args, f"wrote {args.json}")
    if args.plot:
        _plot(result, Path(args.plot), force=args.force)
        note(args, f"wrote {args.plot}")
    return 0


def _plot(result: dict, path: Path, force: bool) -> None:
    from far.utils.plot import pyplot, save_figure

    plt = pyplot()

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
    save_figure(fig, path, dpi=120, force=force)


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "imc-eval", formatter_class=Formatter,
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
               "  far imc-eval fmnist_far_tiny --data fashion-mnist --limit 500 --sweep adc_bits=4,6,8,10 --plot adc.png\n"
               "  far imc-eval fmnist_deit_tiny --data fashion-mnist --limit 500 --sweep adc_range=max,granular,calibrated\n"
               "  far imc-eval model.safetensors --data fashion-mnist --set adc_bits=6 --set adc_range=calibrated \\\n"
               "      --sweep read_noise=0,0.01,0.02 --exclude head --json noise.json\n\n"
               "A timm name (e.g. fmnist_deit_small) builds a randomly initialised FAR model (--no-far: the "
               "attention model); a zoo name (fmnist_far_tiny) is the bundled trained checkpoint. " + FMNIST_NOTE)
    add_model(p)
    add_data(p)
    p.add_argument("--batch-size", type=int, default=100, metavar="B", help="images per batch")
    p.add_argument("--sweep", metavar="KEY=V1,V2,...",
                   help="one crossbar setting and the values to evaluate (default: just the --set config)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a crossbar setting for every run (repeatable), e.g. --set adc_range=calibrated")
    p.add_argument("--include", action="append", metavar="GLOB",
                   help="emulate only layers whose name matches (repeatable; e.g. '*.w_hh.*', 'blocks.0.*')")
    p.add_argument("--exclude", action="append", metavar="GLOB",
                   help="keep layers whose name matches digital (repeatable; e.g. head)")
    p.add_argument("--calib-images", type=int, default=None, metavar="N",
                   help="images for adc_range=calibrated, from the training split (default: 256)")
    p.add_argument("--calib-data", metavar="fashion-mnist|PATH",
                   help="calibration data (default: --data; for an image folder give a separate one)")
    p.add_argument("--calib-per-slice", action="store_true", help="one calibrated ADC range per weight slice")
    p.add_argument("--no-far", action="store_true", help="timm names: keep attention (no FAR conversion)")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default=None,
                   help="crossbar_matmul backend (default: env FAR_BACKEND, else auto); an unavailable one is an error")
    add_device(p)
    p.add_argument("--json", metavar="FILE", help="also write every result to this JSON file")
    p.add_argument("--plot", metavar="PNG", help="write accuracy vs the swept setting to this image")
    add_common(p, quiet="no progress output")
    p.set_defaults(func=cmd_imc_eval)
