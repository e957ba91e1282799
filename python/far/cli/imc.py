"""`far imc-eval`: accuracy of a model on emulated ReRAM crossbars, swept over one config field.

    far imc-eval fmnist_far_tiny --data fashion-mnist --limit 1000 --sweep adc_bits=4,6,8,10
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from far.cli.evaluate import eval_dataset, eval_workers
from far.cli.options import (BACKEND_CHOICES, FMNIST_NOTE, MODEL_HELP, Formatter, add_common, add_data, add_device,
                             add_model, at_least, note, output_checks, set_threads, warn)
from far.errors import ConfigError
from far.imc import EMULATED_LSTM_MAPPING, LSTM_MAPPINGS


# ---------------------------------------------------------------- config values from the command line
def _crossbar_config():
    import far_kernels

    return far_kernels.CrossbarConfig


def _parse_value(key: str, text: str, opt: str, cls=None):
    """A field value of the dataclass `cls` (default far_kernels.CrossbarConfig) from text, typed by the
    field's default: int, float, str, 'none' for None, a pair 'p0/p1' for tuples (stuck_at)."""
    cls = cls or _crossbar_config()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if key not in fields:
        what = "crossbar" if cls is _crossbar_config() else "hardware"
        raise ConfigError(f"{opt}: unknown {what} setting '{key}'; known: {', '.join(fields)}")
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


def _key_values(items, opt: str, cls=None) -> dict:
    """{key: value} of repeated KEY=VALUE options (--set, --hw); a key given twice is refused (the last one used
    to win silently, while a repeated --sweep key was refused)."""
    values = {}
    for item in items or ():
        key, val = _key_value(item, opt)
        if key in values:
            raise ConfigError(f"{opt} {key} given twice; give it once")
        values[key] = _parse_value(key, val, opt, cls)
    return values


def _make_config(values: dict, what: str, cls=None):
    try:
        return (cls or _crossbar_config())(**values)
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
Z95 = 1.959964  # two-sided 95% normal quantile


def _rate(v: float) -> str:
    """images/s for a table: one decimal, or two significant digits below 0.05 (never a bare 0.0)."""
    return f"{v:.1f}" if v >= 0.05 else f"{v:.2g}"


def _duration(sec: float) -> str:
    sec = int(round(sec))
    return f"{sec // 3600}:{sec // 60 % 60:02d}:{sec % 60:02d}" if sec >= 3600 else f"{sec // 60}:{sec % 60:02d}"


def _layer_summary(names) -> str:
    """Emulated product names, folded: names that differ only in numbers form one entry with a count, whose numbers
    that differ become * ("blocks.*.attn.w_hh.*.* x24"); a number they share stays ("blocks.2.attn.qkv", not
    "blocks.*.attn.qkv", when --include chose block 2 alone)."""
    groups = {}
    for n in names:
        parts = n.split(".")
        key = tuple("#" if i and p.isdigit() else p for i, p in enumerate(parts))
        groups.setdefault(key, []).append(parts)
    out = []
    for key, members in groups.items():
        name = ".".join(k if k != "#" else (col[0] if len(set(col)) == 1 else "*")
                        for k, col in zip(key, zip(*members)))
        out.append(name if len(members) == 1 else f"{name} x{len(members)}")
    return ", ".join(out)


def _warn_batch_dependent(cfgs, batch_size: int) -> None:
    """input_scale=tensor: an emulated image's result depends on its batch (docs/design.md section 7, "Batches")."""
    if any(c.input_scale == "tensor" for c in cfgs):
        warn(f"input_scale=tensor: one input scale per product over each batch, so an image's emulated result "
             f"depends on the other images in its batch and on --batch-size ({batch_size}); input_scale=row "
             "does not")


def _noisy(cfg) -> bool:
    return cfg.prog_noise > 0 or cfg.read_noise > 0 or any(p > 0 for p in cfg.stuck_at)


def _settings(args, base_values: dict) -> tuple:
    """[(label, {key: value}, cfg, dynamic)] for the grid of every --sweep and --dynamic mode; the keys swept."""
    import itertools

    from far.imc import DYNAMIC_MODES

    modes = [m.strip() for m in args.dynamic.split(",")]
    if any(m not in DYNAMIC_MODES for m in modes) or len(set(modes)) != len(modes):
        raise ConfigError(f"--dynamic takes digital, crossbar or digital,crossbar; got {args.dynamic!r}")
    axes = []  # (key, [(text, value)])
    for item in args.sweep or ():
        key, vals = _key_value(item, "--sweep")
        if key in base_values:
            raise ConfigError(f"--sweep {key} and --set {key} conflict; drop one")
        if key in (k for k, _ in axes):
            raise ConfigError(f"--sweep {key} given twice; list every value in one --sweep")
        texts = vals.split(",")
        if any(not t.strip() for t in texts):
            raise ConfigError(f"--sweep {item!r}: empty value in the list")
        parsed = [(t.strip(), _parse_value(key, t, "--sweep")) for t in texts]
        if len({_fmt(v) for _, v in parsed}) != len(parsed):
            raise ConfigError(f"--sweep {item!r}: repeated value")
        axes.append((key, parsed))
    settings = []
    for combo in itertools.product(*[vals for _, vals in axes]):
        values = {k: v for (k, _), (_, v) in zip(axes, combo)}
        where = " ".join(f"--sweep {k}={t}" for (k, _), (t, _) in zip(axes, combo))
        cfg = _make_config({**base_values, **values}, where or "--set")
        for m in modes:
            label = " ".join(f"{k}={_fmt(v)}" for k, v in values.items()) or "crossbar"
            if len(modes) > 1 or m != "digital":
                label += f" attn:{m}"
            settings.append((label, values, cfg, m))
    return settings, [k for k, _ in axes]


def wilson95(p: float, n: int) -> tuple[float, float]:
    """The 95% Wilson score interval (low, high) of a proportion p observed over n trials: unlike the normal
    approximation p ± z·sqrt(p(1-p)/n) it stays inside [0, 1] and is not empty at p = 0 or 1; (p, p) for n = 0."""
    if n <= 0:
        return p, p
    z2n = Z95 * Z95 / n
    centre = (p + z2n / 2) / (1 + z2n)
    half = Z95 / (1 + z2n) * (p * (1 - p) / n + z2n / (4 * n)) ** 0.5
    return max(0.0, centre - half), min(1.0, centre + half)


def _summary(runs: list, n_images: int) -> dict:
    """Mean, sample std over seeds, and the 95% interval of the accuracy's sampling error over n_images
    test images (Wilson score interval: ci95_low/ci95_high, and ci95_images, its half-width) for one
    setting's runs."""
    import statistics

    accs = [r["accuracy"] for r in runs]
    mean = statistics.fmean(accs)
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    lo, hi = wilson95(mean, n_images)
    return {"accuracy": mean, "accuracy_std": std, "ci95_images": (hi - lo) / 2, "ci95_low": lo, "ci95_high": hi,
            "seeds": [r["seed"] for r in runs],
            "accuracies": accs, "images_per_s": statistics.fmean(r["images_per_s"] for r in runs),
            "seconds": sum(r["seconds"] for r in runs), "num_images": n_images}


def cmd_imc_eval(args: argparse.Namespace) -> int:
    import time

    import torch

    import far_kernels
    from far.data import is_fashion_mnist, iterate_batches, make_dataset
    from far.evaluate import evaluate
    from far.imc import calibrate, crossbar_products, emulate, emulation_targets, select_targets, unemulated_products
    from far.models import data_config, load_model, resolve
    from far.utils.env import device_name, environment, resolve_device
    from far.utils.fs import write_json
    from far.version import __version__

    at_least(args, 1, "batch_size", "limit", "calib_images", "seeds")
    at_least(args, 0, "workers")
    base_values = _key_values(args.set, "--set")
    base = _make_config(base_values, "--set")
    settings, sweep_keys = _settings(args, base_values)
    if "seed" in sweep_keys and args.seeds > 1:
        raise ConfigError("--sweep seed and --seeds both choose seeds; drop one")
    ref = resolve(args.model)
    output_checks(args, [ref.path], "json", "plot")
    if args.plot:
        from far.utils.plot import pyplot

        if pyplot() is None:
            raise ConfigError("--plot needs matplotlib (pip install matplotlib)")
    needs_calib = any(c.adc_range == "calibrated" for _, _, c, _ in settings)
    if not needs_calib and (args.calib_data or args.calib_per_slice or args.calib_images is not None):
        warn("--calib-images / --calib-data / --calib-per-slice have no effect without adc_range=calibrated")
    _warn_batch_dependent([c for _, _, c, _ in settings], args.batch_size)
    if args.seeds > 1 and not any(_noisy(c) for _, _, c, _ in settings):
        warn("--seeds repeats noisy settings only; no setting has prog_noise, read_noise or stuck_at, so each runs once")
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
    select_targets(model, inc, exc, args.lstm_mapping)  # a pattern that matches nothing: error before any evaluation
    if any(m == "crossbar" for *_, m in settings) and not any(
            k == "digital-quantized" for _, k in emulation_targets(model)):
        warn("--dynamic crossbar: the model has no attention (a FAR model?), so it changes nothing")
    dataset = eval_dataset(args, model)
    calib_set = None
    if needs_calib:
        if not args.calib_data and not is_fashion_mnist(args.data):  # a folder has no training split
            warn(f"adc_range=calibrated without --calib-data: the ADC ranges come from the first "
                 f"{args.calib_images or 256} images of {args.data}, the folder it then evaluates; give --calib-data "
                 "with other images for a figure not fitted to its own test images")
        calib_set = make_dataset(args.calib_data or args.data, "train", data_config(model),
                                 limit=args.calib_images or 256, train=False)
    progress = not args.quiet and sys.stderr.isatty()
    workers = eval_workers(args)
    where = f"{args.data} {args.split}" if is_fashion_mnist(args.data) else str(args.data)
    result = {
        "model": model_label, "origin": origin,
        "checkpoint_sha256": _sha256(ref.path) if ref.path is not None else None,  # which weights, exactly
        "data": str(args.data), "split": args.split if is_fashion_mnist(args.data) else None,  # a folder has none
        "num_images": len(dataset), "device": str(device),
        "device_name": device_name(device), "threads": torch.get_num_threads(),
        "batch_size": args.batch_size, "base_config": dataclasses.asdict(base),
        "sweeps": [{"key": k, "values": list(dict.fromkeys(v[k] for _, v, _, _ in settings))} for k in sweep_keys],
        "dynamic": args.dynamic.split(","), "seeds": args.seeds,
        "include": inc, "exclude": exc, "lstm_mapping": args.lstm_mapping, "calibration_data": (args.calib_data or str(args.data)) if needs_calib else None,
        "emulated": None, "emulated_attention": None, "not_emulated": [n for n, _ in unemulated_products(model)],
        "results": [], "complete": False, "far_version": __version__,
        "torch_version": torch.__version__,
        "environment": environment(),  # commit, dirty flag, date, host: which code measured this
    }

    def save(final: bool = False) -> None:
        """Rewritten after every setting: a run cut short keeps what it measured ("complete": false)."""
        if args.json:
            result["complete"] = final
            write_json(args.json, result, force=args.force or bool(result["results"][1:]) or final,
                       inputs=[ref.path])

    note(args, f"digital baseline ({len(dataset)} images) ...")
    dig = evaluate(model, dataset, batch_size=args.batch_size, device=device, workers=workers, progress=progress,
                   desc="digital")
    result["results"].append({"setting": "digital", "values": None, "dynamic": None, "config": None,
                              **_summary([{**dig, "seed": None}], dig["num_images"])})
    save()
    jobs = sum(args.seeds if _noisy(c) else 1 for _, _, c, _ in settings)
    done, t_start = 0, time.perf_counter()
    for i, (label, values, cfg, dyn) in enumerate(settings, 1):
        seeds = [cfg.seed + s for s in range(args.seeds)] if _noisy(cfg) else [cfg.seed]
        runs, calib_n = [], 0
        for seed in seeds:
            c = cfg.replace(seed=seed)
            tag = f"[{i}/{len(settings)}] {label}" + (f" seed {seed}" if len(seeds) > 1 else "")
            emu = emulate(model, c, include=inc, exclude=exc, backend=args.backend, dynamic=dyn,
                          lstm_mapping=args.lstm_mapping)
            emu.eval()
            if result["emulated"] is None:
                result["emulated"] = crossbar_products(emu)
                # attentions whose q@k^T and attn@v are emulated (digital at input_bits, or K/V on crossbars: the
                # setting's "dynamic"); an excluded one stays in full precision
                result["emulated_attention"] = [n for n, k, _ in emu.imc_emulation.rows if k != "crossbar"]
            if c.adc_range == "calibrated":
                note(args, f"{tag}: calibrating ADC ranges on {len(calib_set)} images ...")
                calibrate(emu, (x for x, _ in iterate_batches(calib_set, args.batch_size, device=device,
                                                              num_workers=workers)),
                          per_slice=args.calib_per_slice, progress=progress)
                calib_n = len(calib_set)
            res = evaluate(emu, dataset, batch_size=args.batch_size, device=device, workers=workers,
                           progress=progress, desc=tag)
            runs.append({**res, "seed": seed})
            done += 1
            elapsed = time.perf_counter() - t_start
            note(args, f"{tag}: {100 * res['accuracy']:.2f}% at {_rate(res['images_per_s'])} images/s; "
                       f"{_duration(elapsed)} elapsed, ~{_duration(elapsed / done * (jobs - done))} left")
            del emu
        result["results"].append({"setting": label, "values": values, "dynamic": dyn,
                                  "config": dataclasses.asdict(cfg), "calibration_images": calib_n,
                                  **_summary(runs, len(dataset))})
        save()
    save(final=True)
    rows = result["results"]
    digital = rows[0]["accuracy"]
    print(f"IMC emulation: {model_label} ({origin}) on {where}, {len(dataset)} images, device {device}")
    print(f"crossbar config: {_config_line(base)}" + (f"; sweep {', '.join(sweep_keys)}" if sweep_keys else ""))
    names = result["emulated"] or []
    print(f"emulated: {len(names)} crossbar products" + (f", include {inc}" if inc else "")
          + (f", exclude {exc}" if exc else "") + (f": {_layer_summary(names)}" if names else ""))
    attns = result["emulated_attention"] or []
    left = [n for n, k in emulation_targets(model) if k == "digital-quantized" and n not in attns]
    if attns or left:
        print(f"emulated attention q@k^T and attn@v ({args.dynamic}): {_layer_summary(attns) if attns else 'none'}"
              + (f"; full precision: {', '.join(left)}" if left else ""))
    if result["not_emulated"]:
        print(f"not emulated (digital, full precision): q@k^T and attn@v of the attention pool(s) "
              f"{', '.join(result['not_emulated'])}")
    multi = any(len(r["seeds"]) > 1 for r in rows[1:])
    if multi:
        print(f"noisy settings: mean over {args.seeds} seeds ± their std")
    print(f"95% CI: sampling error of the accuracy over {len(dataset)} test images (Wilson interval's half-width)")
    w = max(len(r["setting"]) for r in rows)
    print(f"{'setting':<{w}}  {'accuracy':>8}  {'± std':>6}  {'95% CI':>7}  {'vs digital':>10}  {'images/s':>9}")
    for r in rows:
        delta = "-" if r["setting"] == "digital" else f"{100 * (r['accuracy'] - digital):+.2f}"
        std = f"{100 * r['accuracy_std']:.2f}" if len(r["seeds"]) > 1 else "-"
        print(f"{r['setting']:<{w}}  {100 * r['accuracy']:>7.2f}%  {std:>6}  ±{100 * r['ci95_images']:>5.2f}  "
              f"{delta:>10}  {_rate(r['images_per_s']):>9}")
    if args.json:
        note(args, f"wrote {args.json}")
    if args.plot:
        _plot(result, Path(args.plot), force=args.force)
        note(args, f"wrote {args.plot}")
    return 0


def _plot(result: dict, path: Path, force: bool) -> None:
    """Accuracy vs the first swept setting (one line per combination of the others and per dynamic mode),
    error bars = std over seeds where there are several, else the images' 95% CI."""
    from far.utils.plot import pyplot, save_figure

    plt = pyplot()
    rows = result["results"]
    digital, emulated = rows[0], rows[1:]
    keys = [s["key"] for s in result["sweeps"]]
    x_key = keys[0] if keys else None
    xs_all = [r["values"].get(x_key) if x_key else None for r in emulated]
    numeric = x_key is not None and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xs_all)
    ticks = list(dict.fromkeys(_fmt(v) for v in xs_all))
    lines = {}
    for r, xv in zip(emulated, xs_all):
        rest = " ".join(f"{k}={_fmt(r['values'][k])}" for k in keys[1:])
        name = (rest + (f" attn:{r['dynamic']}" if len(result["dynamic"]) > 1 else "")).strip() or "crossbar emulation"
        lines.setdefault(name, []).append((xv if numeric else ticks.index(_fmt(xv)), r))
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for name, pts in lines.items():
        # std over seeds (symmetric), else the images' Wilson interval (asymmetric near 0 and 100%)
        err = [[100 * (r["accuracy_std"] if len(r["seeds"]) > 1 else r["accuracy"] - r["ci95_low"]) for _, r in pts],
               [100 * (r["accuracy_std"] if len(r["seeds"]) > 1 else r["ci95_high"] - r["accuracy"]) for _, r in pts]]
        ax.errorbar([x for x, _ in pts], [100 * r["accuracy"] for _, r in pts], yerr=err, marker="o", capsize=3,
                    label=name)
    ax.axhline(100 * digital["accuracy"], color="#555", ls="--", label=f"digital ({100 * digital['accuracy']:.2f}%)")
    if numeric:
        ax.set_xticks(sorted(set(xs_all)))
    else:
        ax.set_xticks(range(len(ticks)), ticks)
    ax.set_xlabel(x_key or "setting")
    ax.set_ylabel("top-1 accuracy (%)")
    lo = min([100 * r["accuracy"] for r in rows])
    ax.set_ylim(max(0.0, lo - 10), 100)
    seeds = max(len(r["seeds"]) for r in rows)
    bars = f"error bars: std over {seeds} seeds" if seeds > 1 else "error bars: 95% CI over the images"
    ax.set_title(f"{Path(result['model']).name} on {result['data']} ({result['num_images']} images); {bars}",
                 fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    save_figure(fig, path, dpi=120, force=force)


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "imc-eval", formatter_class=Formatter,
        help="accuracy on emulated ReRAM crossbars, swept over settings and seeds (table + plot)",
        description="Evaluate a model digitally and then with its weight products on emulated ReRAM "
                    "in-memory-computing crossbars (far.imc.emulate: bit-sliced weights and inputs, "
                    "tiles, ADC, noise, as far_kernels.crossbar_matmul), once per combination of the --sweep "
                    "values (and --dynamic modes), each noisy one with --seeds seeds, and print top-1 accuracy "
                    "per setting next to the digital baseline, with the 95% confidence interval the number of "
                    "test images allows. Crossbars: every nn.Linear, and in FAR blocks the LSTMs' W_ih, the "
                    "recurrent W_hh (every time step, all heads and directions in one grouped read) and "
                    "head_proj. Attention's q@k^T and attn@v: digital (quantized to input_bits) or, with "
                    "--dynamic crossbar, K and V written into crossbars for every image. Digital: "
                    "nonlinearities, norms, biases, the patch embedding.\n\n"
                    "Settings are far_kernels.CrossbarConfig fields: weight_bits, cell_bits, input_bits, "
                    "dac_bits, adc_bits (none = no ADC), adc_range (max|granular|calibrated), tile_rows, "
                    "encoding (differential|offset), weight_scale (channel|tensor), input_scale "
                    "(row|tensor), prog_noise, read_noise, stuck_at (p0/p1), seed. With "
                    "adc_range=calibrated the ADC ranges come from --calib-images training images first.",
        epilog="examples:\n"
               "  far imc-eval fmnist_far_tiny --data fashion-mnist --limit 500 --sweep adc_bits=4,6,8,10 --plot adc.png\n"
               "  far imc-eval fmnist_deit_tiny --data fashion-mnist --limit 500 --sweep adc_range=max,granular,calibrated\n"
               "  far imc-eval fmnist_far_tiny_pruned --data fashion-mnist --sweep adc_bits=6,8 \\\n"
               "      --sweep read_noise=0.01,0.02 --seeds 3 --json grid.json --plot grid.png\n"
               "  far imc-eval fmnist_deit_tiny --data fashion-mnist --limit 500 --dynamic digital,crossbar \\\n"
               "      --set prog_noise=0.02\n"
               "  far imc-eval model.safetensors --data fashion-mnist --set adc_bits=6 --set adc_range=calibrated \\\n"
               "      --sweep read_noise=0,0.01,0.02 --exclude head --json noise.json\n\n"
               "A timm name (e.g. fmnist_deit_small) builds a randomly initialised FAR model (--no-far: the "
               "attention model); a zoo name (fmnist_far_tiny) is the bundled trained checkpoint. " + FMNIST_NOTE)
    add_model(p)
    add_data(p)
    p.add_argument("--batch-size", type=int, default=100, metavar="B", help="images per batch")
    p.add_argument("--sweep", action="append", metavar="KEY=V1,V2,...",
                   help="a crossbar setting and the values to evaluate (repeatable: several form a grid; default: "
                        "just the --set config)")
    p.add_argument("--dynamic", default="digital", metavar="MODE",
                   help="attention's q@k^T and attn@v: digital (quantized, on a digital unit), crossbar (K and V "
                        "written into crossbars for every image, with the config's noise), or digital,crossbar to "
                        "compare (default: digital; FAR models have no such products)")
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="run every noisy setting with N seeds (seed, seed+1, ...): mean ± std in the table, error "
                        "bars in the plot")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a crossbar setting for every run (repeatable), e.g. --set adc_range=calibrated")
    p.add_argument("--lstm-mapping", choices=LSTM_MAPPINGS, default=EMULATED_LSTM_MAPPING,
                   help="how a FAR block's LSTMs sit on crossbars: separate (W_ih over all tokens, then W_hh at every "
                        "step, each its own ADC conversions; names *.w_ih.*, *.w_hh.*) or fused (one [W_ih | W_hh] "
                        "product per step on [x_t; h_t-1], the cost model's default; names *.lstm.*) "
                        "(default: %(default)s)")
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
    p.add_argument("--json", metavar="FILE",
                   help="also write every result to this JSON file, rewritten as each setting finishes (a run cut "
                        "short keeps what it measured; \"complete\": true once all are done)")
    p.add_argument("--plot", metavar="PNG", help="write accuracy vs the (first) swept setting to this image")
    add_common(p, quiet="no progress output")
    p.set_defaults(func=cmd_imc_eval)
    _add_cost_parser(sub)


def _add_cost_parser(sub) -> None:
    p = sub.add_parser(
        "imc-cost", formatter_class=Formatter,
        help="energy, latency, area, EDAP of models on an ISAAC-like ReRAM chip, side by side",
        description="Count what one image through each MODEL costs on an ISAAC-like ReRAM in-memory-computing "
                    "chip (far.imc.cost: crossbar arrays, ADC conversions, DAC activations, cell writes, digital "
                    "ops and buffer traffic, layer by layer; energy, latency, area, EDAP, TOPS/W, TOPS/mm2), for "
                    "each way of doing attention's dynamic products (--dynamic write: K and V written into crossbars "
                    "every image; digital: an int8 MAC unit), with ratios to the first model. With --data, the "
                    "digital top-1 too (and, with --emulate, the top-1 on the crossbar emulator). A timm name is "
                    "costed as its FAR conversion; NAME:attention keeps its attention. Weights do not matter for "
                    "the cost, so timm names need no download.",
        epilog="examples:\n"
               "  far imc-cost fmnist_deit_tiny fmnist_far_tiny fmnist_far_tiny_pruned --data fashion-mnist --limit 1000\n"
               "  far imc-cost deit_small_patch16_224:attention deit_small_patch16_224 --dynamic write,digital "
               "--json deit_s.json --plot deit_s.png\n"
               "  far imc-cost fmnist_far_tiny --set adc_bits=6 --hw cols_per_adc=64 --constants my_chip.yaml\n\n"
               "Constants and their sources: python/far/imc/cost_constants.json (override with --constants FILE, "
               "JSON or YAML: {name: {field: value}}).")
    p.add_argument("model", metavar="MODEL", nargs="+", help=MODEL_HELP + " (NAME:attention: a timm name unconverted)")
    p.add_argument("--dynamic", default="write,digital", metavar="MODE",
                   help="how attention's QK^T and S.V run: write (K, V written into crossbars every image), digital "
                        "(an int8 MAC unit), or both comma-separated, each with its own table (default: write,digital)")
    add_chip_args(p)
    p.add_argument("--data", default=None, metavar="fashion-mnist|PATH", help="measure top-1 on this data too")
    p.add_argument("--split", choices=("train", "test"), default="test", help="Fashion-MNIST split to evaluate")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate the first N images only")
    p.add_argument("--workers", type=int, metavar="N",
                   help="DataLoader workers for image folders (default: min(8, CPU cores) to evaluate, 0 to train)")
    p.add_argument("--batch-size", type=int, default=100, metavar="B", help="images per batch")
    p.add_argument("--emulate", action="store_true",
                   help="with --data: also the top-1 on the crossbar emulator (write mode: attention's K and V on "
                        "crossbars too, far imc-eval --dynamic crossbar)")
    add_device(p)
    p.add_argument("--json", metavar="FILE", help="also write every figure to this JSON file")
    p.add_argument("--plot", metavar="PNG", help="energy by component (and top-1 vs EDAP) as an image")
    add_common(p, quiet="no progress output")
    p.set_defaults(func=cmd_imc_cost)


# ---------------------------------------------------------------- far imc-cost
def add_chip_args(p, sizes: str = "each model's") -> None:
    """--set (crossbar), --hw (chip), --constants, --input-size: the chip the cost model counts on."""
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a crossbar setting (far_kernels.CrossbarConfig field), e.g. adc_bits=6")
    p.add_argument("--hw", action="append", metavar="KEY=VALUE",
                   help="a chip setting (far.imc.cost.HardwareSpec field), e.g. cols_per_adc=64, write_verify=4, "
                        "packing=diagonal")
    p.add_argument("--constants", metavar="FILE", help="JSON/YAML file overriding entries of the constants table")
    p.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                   help=f"image size (default: {sizes} own: its patch embedding's img_size and in_chans)")


def chip_settings(args) -> tuple:
    """(far_kernels.CrossbarConfig, {HardwareSpec field: value}) from add_chip_args' options."""
    from far.imc.cost import HardwareSpec

    cfg = _make_config(_key_values(args.set, "--set"), "--set")
    hw_values = _key_values(args.hw, "--hw", HardwareSpec)
    if args.constants:
        hw_values["constants"] = args.constants
    return cfg, hw_values


def chip_spec(hw_values: dict):
    from far.imc.cost import HardwareSpec

    return _make_config(hw_values, "--hw", HardwareSpec)


ATTENTION_SUFFIX = ":attention"


def _cost_models(args, device):
    """[(label, model, resolved spec)] of the MODEL arguments; NAME:attention keeps a timm name's attention."""
    from far.models import load_model, resolve

    out = []
    for spec in args.model:
        keep = spec.endswith(ATTENTION_SUFFIX)
        name = spec[:-len(ATTENTION_SUFFIX)] if keep else spec
        ref = resolve(name)
        if keep and ref.kind != "timm":
            raise ConfigError(f"{spec}: '{ATTENTION_SUFFIX}' applies to timm names; a checkpoint is costed as saved")
        model, _ = load_model(ref, device=str(device), far=False if keep else None)
        out.append((spec, model, ref))
    labels = [label for label, _, _ in out]
    if len(set(labels)) != len(labels):
        raise ConfigError("a model is listed twice")
    return out


def _kind(model) -> str:
    from far.models import is_far
    from far.nn import reuse_plan

    return "FAR" if is_far(model) else "reuse" if reuse_plan(model) else "attention"


def cmd_imc_cost(args: argparse.Namespace) -> int:
    import torch

    from far.evaluate import evaluate
    from far.imc import emulate, emulation_targets, unemulated_products
    from far.imc.cost import DYNAMIC_MODES, HardwareSpec, model_cost
    from far.models import stored_tensors
    from far.utils.env import environment, resolve_device
    from far.utils.fs import write_json

    at_least(args, 1, "batch_size", "limit")
    if args.limit is not None and not args.data:
        warn(f"--limit {args.limit} has no effect without --data (nothing is evaluated)")
    cfg, hw_values = chip_settings(args)
    modes = [m.strip() for m in args.dynamic.split(",") if m.strip()]
    if not modes or any(m not in DYNAMIC_MODES for m in modes) or len(set(modes)) != len(modes):
        raise ConfigError(f"--dynamic takes a comma-separated list of {', '.join(DYNAMIC_MODES)}, got {args.dynamic!r}")
    if "dynamic" in hw_values:
        raise ConfigError("give the dynamic mode with --dynamic, not --hw dynamic=")
    specs = {m: _make_config({**hw_values, "dynamic": m}, "--hw", HardwareSpec) for m in modes}
    mapping = next(iter(specs.values())).lstm_mapping  # the emulator maps the LSTMs as the costs do
    if args.emulate and not args.data:
        raise ConfigError("--emulate measures accuracy: give --data")
    if args.emulate:
        _warn_batch_dependent([cfg], args.batch_size)
    models = _cost_models(args, torch.device("cpu") if args.device is None else resolve_device(args.device, "--device"))
    output_checks(args, [r.path for _, _, r in models], "json", "plot")
    set_threads(args)
    device = resolve_device(args.device, "--device")
    rows = []
    for label, model, ref in models:
        row = {"model": label, "kind": _kind(model), "origin": ref.origin,
               "params": sum(t.numel() for t in stored_tensors(model).values()), "cost": {}}
        for m, hw in specs.items():
            row["cost"][m] = model_cost(model, cfg, hw, input_size=args.input_size).as_dict()
        if args.data:
            data = eval_dataset(args, model)
            note(args, f"{label}: digital accuracy on {len(data)} images ...")
            row["top1"] = evaluate(model.to(device), data, batch_size=args.batch_size, device=device,
                                   workers=eval_workers(args), progress=not args.quiet)["accuracy"]
            if args.emulate:  # write mode: K and V on crossbars too (dynamic="crossbar"); digital: on the MAC unit
                has_attention = any(k == "digital-quantized" for _, k in emulation_targets(model))
                pools = [n for n, _ in unemulated_products(model)]
                if pools:
                    warn(f"{label}: the emulator leaves the q@k^T and attn@v of the attention pool(s) "
                         f"{', '.join(pools)} digital in full precision (the costs count them)")
                row["top1_emulated"] = {}
                for m in (modes if has_attention else modes[:1]):
                    dyn = "crossbar" if m == "write" else "digital"
                    what = f", attention products {dyn}" if has_attention else ""
                    note(args, f"{label}: emulated accuracy (crossbars, this config{what}) ...")
                    emu = emulate(model, cfg, dynamic=dyn, lstm_mapping=mapping).eval()
                    row["top1_emulated"][m] = evaluate(emu, data, batch_size=args.batch_size, device=device,
                                                       workers=eval_workers(args), progress=not args.quiet)["accuracy"]
                for m in modes:  # a FAR model has no dynamic products: one figure serves every mode
                    row["top1_emulated"].setdefault(m, row["top1_emulated"][modes[0]])
        rows.append(row)
    base = rows[0]
    print(f"IMC cost per image (batch 1): crossbar {_config_line(cfg)}")
    for m in modes:
        print(f"\n-- attention's dynamic products: {m}" + (" (written into crossbars every image)" if m == "write"
                                                           else " (digital int8 MAC unit)"))
        w = max([28] + [len(r["model"]) for r in rows])  # long names (timm:NAME:attention) keep the columns
        head = (f"{'model':<{w}} {'kind':<9} {'params':>9} {'arrays':>7} {'energy uJ':>10} {'latency us':>10} "
                f"{'area mm2':>8} {'EDAP':>9} {'TOPS/W':>7} {'TOPS/mm2':>8} {'E/E0':>5} {'L/L0':>5} {'EDAP/0':>6}"
                + (f" {'top-1':>7}" if args.data else "") + (f" {'emulated':>8}" if args.emulate else ""))
        print(head)
        b = base["cost"][m]["totals"]
        for r in rows:
            t = r["cost"][m]["totals"]
            line = (f"{r['model']:<{w}} {r['kind']:<9} {r['params']:>9,} {t['arrays'] + t['dynamic_arrays']:>7} "
                    f"{t['energy_uj']:>10.3f} {t['latency_us']:>10.1f} {t['area_mm2']:>8.3f} {t['edap']:>9.3g} "
                    f"{t['tops_per_w']:>7.2f} {t['tops_per_mm2']:>8.3f} {t['energy_uj'] / b['energy_uj']:>5.2f} "
                    f"{t['latency_us'] / b['latency_us']:>5.2f} {t['edap'] / b['edap']:>6.2f}")
            if args.data:
                line += f" {100 * r['top1']:>6.2f}%"
            if args.emulate:
                line += f" {100 * r['top1_emulated'][m]:>7.2f}%"
            print(line)
    if args.emulate and any(r["kind"] == "FAR" for r in rows):
        print(f"\nFAR blocks emulated and costed with the same LSTM mapping: {mapping} (--hw lstm_mapping=)")
    result = {"benchmark": "imc_cost", "crossbar_config": dataclasses.asdict(cfg),
              "hardware": {m: dataclasses.asdict(h) for m, h in specs.items()}, "data": args.data,
              "limit": args.limit, "environment": environment(), "models": rows,
              **({"emulated_lstm_mapping": mapping} if args.emulate else {})}
    if args.json:
        write_json(args.json, result, force=args.force, inputs=[r.path for _, _, r in models])
        note(args, f"wrote {args.json}")
    if args.plot:
        cost_plot(result, Path(args.plot), force=args.force)
        note(args, f"wrote {args.plot}")
    return 0


def cost_plot(result: dict, path: Path, force: bool = True) -> None:
    """Energy per image by component, stacked, one bar per (model, dynamic mode); with accuracies, a
    second panel of top-1 against EDAP."""
    from far.imc.cost import COMPONENTS
    from far.utils.plot import pyplot, save_figure

    plt = pyplot()
    rows = result["models"]
    modes = list(result["hardware"])
    acc = all("top1" in r for r in rows)
    fig, axes = plt.subplots(1, 2 if acc else 1, figsize=(13 if acc else 8, 4.5), squeeze=False)
    ax = axes[0][0]
    labels = []
    x = 0
    for r in rows:
        for m in modes:
            by = r["cost"][m]["totals"]["energy_uj_by_component"]
            bottom = 0.0
            for i, comp in enumerate(COMPONENTS):
                ax.bar(x, by[comp], bottom=bottom, color=f"C{i}", label=comp if x == 0 else None)
                bottom += by[comp]
            labels.append(f"{r['model']}\n{m}")
            x += 1
    ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("energy per image (uJ)")
    ax.set_title("energy by component (dynamic products: " + " / ".join(modes) + ")", fontsize=9)
    ax.legend(fontsize=7)
    if acc:
        ax2 = axes[0][1]
        for k, m in enumerate(modes):
            for r in rows:
                ed = r["cost"][m]["totals"]["edap"]
                ax2.scatter(ed, 100 * r["top1"], marker="os^"[k % 3], color=f"C{rows.index(r)}",
                            label=f"{r['model']} ({m})")
                if "top1_emulated" in r:
                    ax2.scatter(ed, 100 * r["top1_emulated"][m], marker="x", color=f"C{rows.index(r)}")
        ax2.set_xscale("log")
        ax2.set_xlabel("EDAP per image (J s mm2, lower is better)")
        ax2.set_ylabel("top-1 (%)  (x: emulated on crossbars)")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=6)
    save_figure(fig, path, dpi=120, force=force)
