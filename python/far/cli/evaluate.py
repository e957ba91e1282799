"""far eval, far predict, far demo."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from far.cli.options import (BACKEND_CHOICES, FMNIST_NOTE, Formatter, add_common, add_data, add_device, add_model,
                             at_least, note, output_checks, set_threads, warn)


def eval_dataset(args: argparse.Namespace, model):
    """The --data set for `model` (checked against it), with warnings for options that do not apply."""
    from far.data import is_fashion_mnist, make_dataset
    from far.models import data_config

    if is_fashion_mnist(args.data):
        if args.workers is not None:
            warn("--workers has no effect on fashion-mnist (it is read in memory, no DataLoader)")
    elif args.split != "test":
        warn("--split has no effect on an image folder (it is evaluated as it is)")
    return make_dataset(args.data, args.split, data_config(model), limit=args.limit, train=False)


def eval_workers(args: argparse.Namespace) -> int:
    return args.workers if args.workers is not None else min(8, os.cpu_count() or 1)


def load_inference_model(args: argparse.Namespace, ref, device, far=None):
    """(model, the backend its FAR blocks run) for eval and predict: --backend's availability checked before
    loading (an unavailable one says why), the model loaded with --backend and --storage, a warning for each
    that has no effect (no FAR blocks)."""
    import far_kernels
    from far.models import far_modules, is_far, load_model

    op = far_kernels.ops.bilstm_fused_scan.OP
    far_kernels.dispatch.select(op, args.backend, device)  # unavailable: the reason, before loading
    model, _ = load_model(ref, device=str(device), backend=args.backend, far=far, storage=args.storage)
    if not is_far(model):
        if args.backend is not None:
            warn(f"--backend {args.backend} has no effect: {args.model} has no FAR blocks")
        if args.storage != "padded":
            warn(f"--storage {args.storage} has no effect: {args.model} has no FAR blocks")
        return model, "none (the model has no FAR blocks)"
    # the blocks compute in the model's dtype: auto runs the torch reference for float64, not the float32 pick
    return model, far_kernels.dispatch.select(op, args.backend, device,
                                              far_modules(model)[0][1].pre_proj.weight.dtype)


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from far.data import is_fashion_mnist
    from far.evaluate import evaluate
    from far.models import param_counts, resolve
    from far.utils.env import device_name, resolve_device
    from far.utils.fs import write_json
    from far.version import __version__

    at_least(args, 1, "batch_size", "limit")
    at_least(args, 0, "workers")
    set_threads(args)
    device = resolve_device(args.device, "--device")
    ref = resolve(args.model)
    if ref.kind != "timm" and args.no_far:
        warn(f"--no-far has no effect: {args.model} is a checkpoint (the option keeps a timm name's attention)")
    output_checks(args, [ref.path], "json")
    model, used = load_inference_model(args, ref, device, far=False if args.no_far else None)
    dataset = eval_dataset(args, model)
    progress = not args.quiet and sys.stderr.isatty()
    res = evaluate(model, dataset, batch_size=args.batch_size, device=device, workers=eval_workers(args),
                   progress=progress)
    res = {
        "model": args.model, "origin": ref.origin, "checkpoint": str(ref.path) if ref.path else None,
        "architecture": getattr(model, "far_arch", {}).get("timm_name")
        or (getattr(model, "pretrained_cfg", None) or {}).get("architecture"),
        "data": str(args.data), "split": args.split if is_fashion_mnist(args.data) else None,
        **res, "backend": used, "storage": args.storage, "parameters": param_counts(model),
        "device": str(device), "device_name": device_name(device),
        "threads": torch.get_num_threads(), "batch_size": args.batch_size, "far_version": __version__,
        "torch_version": torch.__version__,
    }
    where = f"{args.data} {res['split']}" if res["split"] else str(args.data)
    print(f"accuracy {100 * res['accuracy']:.2f}% ({res['correct']}/{res['num_images']}) on {where}")
    warm = "first batch excluded as warm-up" if res["warmup_excluded"] else "one batch: warm-up included"
    print(f"throughput {res['images_per_s']:.1f} images/s (model, {warm}; end-to-end "
          f"{res['end_to_end_images_per_s']:.1f})  backend {used}  device {device}  threads {res['threads']}  "
          f"batch {args.batch_size}")
    counts = res["parameters"]
    print(f"parameters {counts['kept']:,} kept, {counts['stored']:,} in memory (storage {args.storage})")
    if args.json:
        write_json(args.json, res, force=args.force, inputs=[ref.path])
        note(args, f"wrote {args.json}")
    return 0


def class_names(args: argparse.Namespace, ref, model) -> list:
    """--class-names FILE (one name per line), else the Fashion-MNIST names for the bundled fmnist_* models, else
    the class indices as text (a checkpoint stores no class names)."""
    from far.data import FASHION_MNIST_CLASSES
    from far.errors import ConfigError
    from far.utils.fs import read_text

    k = getattr(model, "num_classes", None)
    if args.class_names:
        names = [line.strip() for line in read_text(args.class_names, "class-names file").splitlines() if line.strip()]
        if k is not None and len(names) != k:
            raise ConfigError(f"--class-names {args.class_names}: {len(names)} names for a model of {k} classes")
        return names
    if ref.kind == "zoo" and ref.name.startswith("fmnist_") and k == len(FASHION_MNIST_CLASSES):
        return list(FASHION_MNIST_CLASSES)
    return [str(i) for i in range(k or 0)]


def cmd_predict(args: argparse.Namespace) -> int:
    import csv
    import io

    from far.data import image_files
    from far.evaluate import predict
    from far.models import data_config, resolve
    from far.utils.env import resolve_device
    from far.utils.fs import atomic_write, write_json

    at_least(args, 1, "batch_size", "top_k")
    at_least(args, 0, "workers")
    set_threads(args)
    device = resolve_device(args.device, "--device")
    ref = resolve(args.model)
    fmt = None
    if args.output:
        fmt = {".csv": "csv", ".json": "json"}.get(Path(args.output).suffix.lower())
        if fmt is None:
            from far.errors import ConfigError

            raise ConfigError(f"-o {args.output}: give a .csv or .json file")
    output_checks(args, [ref.path] if ref.path else [], *(("output",) if args.output else ()),
                  output_kind="a JSON report" if fmt == "json" else "a CSV table")
    model, _ = load_inference_model(args, ref, device)
    classes = getattr(model, "num_classes", None)
    if classes and args.top_k > classes:  # the option's name, not predict()'s argument
        from far.errors import ConfigError

        raise ConfigError(f"--top-k {args.top_k}: the model has {classes} classes")
    names = class_names(args, ref, model)
    data = image_files(args.images, data_config(model))
    res = predict(model, data, batch_size=args.batch_size, device=device, workers=eval_workers(args),
                  top_k=args.top_k, progress=not args.quiet and sys.stderr.isatty())
    rows = []
    for path, cs, ps in zip(data.files, res["classes"].tolist(), res["probs"].tolist()):
        rows.append({"image": str(path), "top": [{"class": c, "name": names[c] if 0 <= c < len(names) else None,
                                                  "prob": p} for c, p in zip(cs, ps)]})
    if fmt == "json":
        report = {"model": args.model, "num_images": len(rows), "top_k": args.top_k, "predictions": rows}
        write_json(args.output, report, force=args.force, indent=1)  # strict JSON: a NaN probability is "nan"
    elif fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["image"] + [f"{k}{j + 1}" for j in range(args.top_k) for k in ("class", "name", "prob")])
        for r in rows:
            w.writerow([r["image"]] + [v for t in r["top"] for v in (t["class"], t["name"], f"{t['prob']:.6g}")])
        atomic_write(args.output, buf.getvalue(), force=args.force)
    if not args.output or not args.quiet:
        shown = rows if not args.output else rows[:10]
        width = max((len(r["image"]) for r in shown), default=5)
        for r in shown:
            top = "  ".join(f"{t['name']} {100 * t['prob']:.1f}%" for t in r["top"])
            print(f"{r['image']:<{width}}  {top}")
        if args.output and len(rows) > len(shown):
            print(f"... {len(rows) - len(shown)} more in {args.output}")
    if args.output:
        note(args, f"wrote {len(rows)} predictions to {args.output} ({res['images_per_s']:.1f} images/s)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from far.utils.fs import check_folder, check_output

    at_least(args, 1, "num_images", "bench_images", "batch_size")
    check_folder(args.out_dir, "--out-dir")  # before the models run, not after
    if os.path.isdir(args.out_dir):
        for name in ("demo.json",) + (() if args.no_plot else ("demo.png",)):
            check_output(os.path.join(args.out_dir, name), what="--out-dir file")
    set_threads(args)
    from far.cli.demo import format_table, run_demo

    t0 = time.perf_counter()
    result = run_demo(num_images=args.num_images, bench_images=args.bench_images, batch_size=args.batch_size,
                      out_dir=args.out_dir, plot=not args.no_plot, progress=not args.quiet)
    print(f"FAR demo on the bundled zoo: {result['num_images']} Fashion-MNIST test images (accuracy), "
          f"{result['bench_images']} for speed, batch {result['batch_size']}, {result['threads']} CPU threads")
    print(format_table(result))
    print(f"wrote {args.out_dir}/demo.json" + (f" and {result['plot']}" if result.get("plot") else "")
          + f" in {time.perf_counter() - t0:.0f} s"
          + (f" (removed {result['removed']}: an older run's figure)" if result.get("removed") else ""))
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "eval", formatter_class=Formatter, help="top-1 accuracy and throughput of a model on a dataset",
        description="Load MODEL and measure its top-1 accuracy on a dataset under torch.inference_mode, with "
                    "the images/s of the model (first batch excluded as warm-up; CUDA synchronized) and end to "
                    "end, and the kernel backend actually used. The dataset must fit the model (image size, "
                    "channels, number of classes). A timm name builds a randomly initialised FAR model "
                    "(--no-far: the attention model).",
        epilog="examples:\n"
               "  far eval fmnist_far_tiny --data fashion-mnist\n"
               "  far eval fmnist_tiny.safetensors --data fashion-mnist --limit 1000 --backend torch --threads 2\n"
               "  far eval deit.safetensors --data ~/imagenet/val --device cuda --batch-size 512 --json res.json\n\n"
               + FMNIST_NOTE)
    add_model(p)
    add_data(p)
    p.add_argument("--batch-size", type=int, default=256, metavar="B", help="images per batch")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default=None,
                   help="BiLSTM backend of the FAR blocks (default: env FAR_BACKEND, else auto); an unavailable "
                        "one is an error")
    p.add_argument("--no-far", action="store_true", help="timm names: keep attention (no FAR conversion)")
    p.add_argument("--storage", choices=("padded", "ragged"), default="padded",
                   help="FAR blocks in memory: padded (each block's (head, direction) tensors padded to its widest "
                        "one, zero-filled) or ragged (kept units only; each forward gathers the padded operands); "
                        "same outputs: bench/bench_padding.py measures the memory and time of each")
    add_device(p)
    p.add_argument("--json", metavar="FILE", help="also write the results to this JSON file")
    add_common(p, quiet="no progress bar or notes")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "predict", formatter_class=Formatter, help="the top classes of image files or folders, per image",
        description="Load MODEL and classify every image given: image files as they are, folders walked at any "
                    "depth in sorted order (hidden names skipped), with the eval transforms of the model's own "
                    "data config (size, crop, mean/std, channels), under torch.inference_mode. Prints one line per "
                    "image, or writes every prediction to -o FILE (.csv: image, class1, name1, prob1, ...; .json). "
                    "Class names: --class-names FILE, the Fashion-MNIST names for the bundled fmnist_* models, "
                    "else the class index (a checkpoint stores no names).",
        epilog="examples:\n"
               "  far predict fmnist_far_tiny_pruned shirt.png boots/\n"
               "  far predict model.safetensors ~/photos --top-k 3 -o predictions.csv --class-names classes.txt")
    add_model(p)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files and/or folders of images")
    p.add_argument("-o", "--output", metavar="FILE", help="write every prediction here (.csv or .json)")
    p.add_argument("--top-k", type=int, default=1, metavar="K", help="classes per image, most probable first")
    p.add_argument("--class-names", metavar="FILE", help="one class name per line, in class-index order")
    p.add_argument("--batch-size", type=int, default=256, metavar="B", help="images per batch")
    p.add_argument("--workers", type=int, metavar="N", help="DataLoader workers (default: min(8, CPU cores))")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default=None,
                   help="BiLSTM backend of the FAR blocks (default: env FAR_BACKEND, else auto)")
    p.add_argument("--storage", choices=("padded", "ragged"), default="padded",
                   help="FAR blocks in memory: padded or ragged (kept units only); same outputs")
    add_device(p)
    add_common(p, quiet="no progress bar; with -o, no table on stdout")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "demo", formatter_class=Formatter,
        help="the main job: zoo teacher vs FAR vs pruned FAR vs TReX on Fashion-MNIST, every backend",
        description="Evaluate the bundled zoo on the Fashion-MNIST test set: the attention teacher "
                    "(fmnist_deit_tiny), its distilled FAR student (fmnist_far_tiny), the pruned FAR student "
                    "(fmnist_far_tiny_pruned), the FAR student pruned to a budget below the teacher attention's size "
                    "(fmnist_far_tiny_xs) and the TReX-style attention-reuse model (fmnist_trex_tiny). Prints "
                    "top-1 accuracy, parameters (all, and the token mixers'), the cost of one image on the IMC chip "
                    "of `far imc-cost` (energy, latency, EDAP relative to the teacher), CPU images/s for every "
                    "available backend and each backend's agreement with the torch reference; "
                    "writes demo.json and demo.png into --out-dir (replacing the previous demo's).",
        epilog="examples:\n  far demo\n  far demo --num-images 2000 --threads 1 --out-dir /tmp/demo")
    p.add_argument("--num-images", type=int, default=10000, metavar="N", help="test images for accuracy")
    p.add_argument("--bench-images", type=int, default=500, metavar="N",
                   help="test images for the reference (torch) backend's speed and agreement runs")
    p.add_argument("--batch-size", type=int, default=250, metavar="B", help="images per batch")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch (at most the CPU cores; default: torch's)")
    p.add_argument("--out-dir", default="far-demo", metavar="DIR", help="where demo.json / demo.png go")
    p.add_argument("--no-plot", action="store_true",
                   help="skip the PNG (an older demo.png in --out-dir is removed: it would not match demo.json)")
    add_common(p, force=False, quiet="no progress bar")
    p.set_defaults(func=cmd_demo)
