"""far analyze: a FAR student against its attention teacher (far.analysis)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from far.cli.options import (FMNIST_NOTE, MODEL_HELP, Formatter, add_common, add_data, add_device, at_least, note,
                             output_checks, set_threads, warn)
from far.errors import ConfigError


def cmd_analyze(args: argparse.Namespace) -> int:
    import torch

    from far.analysis import MAPS_FILE, PLOTS, analyze, format_analysis, format_json, plot_analysis, save_maps
    from far.cli.evaluate import eval_dataset
    from far.data import is_fashion_mnist
    from far.models import data_config, is_far, load_model, resolve
    from far.utils.env import device_name, environment, resolve_device
    from far.utils.fs import check_folder, check_output, write_json
    from far.utils.plot import pyplot
    from far.version import __version__

    at_least(args, 1, "batch_size", "limit")
    at_least(args, 0, "workers", "map_images", "map_image", "map_head")
    _check_map_image(args, args.map_images, "")
    if args.limit is not None:  # the maps are of the first images read: no more than --limit
        _check_map_image(args, min(args.map_images, args.limit), f" (--limit {args.limit})")
    set_threads(args)
    device = resolve_device(args.device, "--device")
    t_ref, s_ref = resolve(args.teacher), resolve(args.student)
    inputs = [t_ref.path, s_ref.path]
    out_dir = Path(args.out_dir) if args.out_dir else None
    names = ["analysis.json", *PLOTS, MAPS_FILE] if out_dir is not None else []  # those not written are removed
    output_checks(args, inputs, "json", also=[("--out-dir", out_dir / name) for name in names])
    if out_dir is not None:
        check_folder(out_dir, "--out-dir")  # a folder, or one that can be created: before the work, not after
        if out_dir.is_dir():
            for name in names:
                check_output(out_dir / name, force=args.force, inputs=inputs, what="--out-dir file")
    teacher, _ = load_model(t_ref, device=str(device), far=False)
    student, _ = load_model(s_ref, device=str(device))
    if is_far(teacher):
        raise ConfigError(f"TEACHER {args.teacher} has FAR blocks; give the attention model first, then the student")
    if not is_far(student):
        warn(f"STUDENT {args.student} has no FAR blocks: the isolated per-block columns stay empty")
    heads = getattr(teacher.blocks[0].attn, "num_heads", None) if len(getattr(teacher, "blocks", [])) else None
    if args.map_images and heads is not None and args.map_head >= heads:
        raise ConfigError(f"--map-head {args.map_head}: the teacher has {heads} heads (0..{heads - 1})")
    t_cfg, s_cfg = data_config(teacher), data_config(student)
    for key in ("input_size", "num_classes"):
        a, b = t_cfg.get(key), s_cfg.get(key)
        if a is not None and b is not None and _ints(a) != _ints(b):
            raise ConfigError(f"teacher and student differ in {key} ({t_cfg[key]} vs {s_cfg[key]}); the student must "
                              "be a conversion of the teacher")
    if args.workers is not None and not is_fashion_mnist(args.data):
        warn("--workers has no effect: far analyze reads the images in its own process")
    dataset = eval_dataset(args, teacher)
    if len(dataset):  # an empty one is analyze's error
        _check_map_image(args, min(args.map_images, len(dataset)), f" (the data has {len(dataset)} images)")
    progress = not args.quiet
    report = analyze(teacher, student, dataset, batch_size=args.batch_size, device=device,
                     map_images=args.map_images, progress=progress)
    report = {"teacher": args.teacher, "student": args.student, "data": str(args.data),
              "split": args.split if is_fashion_mnist(args.data) else None, "limit": args.limit,
              "map_images": args.map_images, **report,
              "device": str(device), "device_name": device_name(device), "threads": torch.get_num_threads(),
              "batch_size": args.batch_size, "far_version": __version__, "torch_version": torch.__version__,
              "environment": environment()}  # commit, dirty flag, date, host: which code measured this
    print(format_analysis(report))
    data = format_json(report)
    written = []
    if args.json:
        write_json(args.json, data, force=args.force, inputs=inputs)
        written.append(args.json)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        written.append(str(write_json(out_dir / "analysis.json", data, force=args.force, inputs=inputs)))
        maps = save_maps(report, out_dir / MAPS_FILE, force=args.force)
        if maps is not None:
            written.append(str(maps))
        if pyplot() is None:
            warn("matplotlib is not installed: no PNG plots (pip install matplotlib); the JSON has every value")
        else:
            written += plot_analysis(report, out_dir, image=args.map_image, head=args.map_head,
                                     force=args.force)
        done = {os.path.abspath(w) for w in written}
        for name in names:  # an earlier run's token maps (or figures) would not match this analysis.json
            stale = out_dir / name
            if os.path.abspath(stale) not in done and stale.is_file():
                stale.unlink()
                note(args, f"removed {stale}, an earlier run's (this one has none)")
    if written:
        note(args, "wrote " + ", ".join(written))
    return 0


def _check_map_image(args: argparse.Namespace, images: int, why: str) -> None:
    """ConfigError unless --map-image is one of the `images` map images (`why`: what limits them), before any work."""
    if args.map_images and args.map_image >= images:
        raise ConfigError(f"--map-image {args.map_image} is not one of the {images} map images{why} "
                          f"(0..{images - 1}); "
                          + ("raise --map-images or lower --map-image" if images == args.map_images else
                             "lower --map-image"))


def _ints(v) -> tuple:
    return tuple(int(x) for x in (v if isinstance(v, (list, tuple)) else [v]))


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "analyze", formatter_class=Formatter,
        help="how faithfully a FAR student reproduces its teacher: per block, over depth, token maps",
        description="Compare a FAR student with its attention teacher on held-out images. (1) Per block, on the "
                    "teacher's own block input and in the student's own forward pass: the cosine of the block "
                    "outputs (before W_O) along tokens per channel (the paper's) and along channels per token, "
                    "relative MSE, the scale ratio ||student|| / ||teacher|| and the first cosine per attention "
                    "head (over its channels alone). (2) Error accumulation: for k = "
                    "0..L-1 the teacher with blocks 0..k replaced by the student's (token mixers only, and whole "
                    "blocks): cosine of the final (pre-logits) features with the teacher's, top-1 agreement, "
                    "accuracy. (3) The same for the full student. (4) Per block and head, the attention "
                    "probabilities A vs the row-normalised Jacobian norms ||d out_i / d x_j|| of the FAR head and "
                    "of the attention head on the first --map-images images (row cosine, Pearson). Prints the "
                    "tables; --json writes every value; --out-dir writes analysis.json, token_maps.npz and the "
                    "PNG plots block_cosine.png, error_accumulation.png, token_maps.png (plots need matplotlib).",
        epilog="examples:\n"
               "  far analyze fmnist_deit_tiny fmnist_far_tiny --data fashion-mnist --limit 1000 --out-dir analysis\n"
               "  far analyze teacher.safetensors student.safetensors --data ~/val --json analysis.json\n"
               "  far analyze fmnist_deit_tiny fmnist_far_tiny_pruned --data fashion-mnist --map-images 0\n\n"
               + FMNIST_NOTE)
    p.add_argument("teacher", metavar="TEACHER", help="the attention model: " + MODEL_HELP)
    p.add_argument("student", metavar="STUDENT", help="its FAR student: " + MODEL_HELP)
    add_data(p)
    p.add_argument("--batch-size", type=int, default=256, metavar="B", help="images per batch")
    p.add_argument("--map-images", type=int, default=4, metavar="N",
                   help="images (the first of the data) for the token maps; 0 = no maps (the Jacobians cost "
                        "tokens x channels backward passes per block and image)")
    p.add_argument("--map-image", type=int, default=0, metavar="I", help="which map image token_maps.png shows")
    p.add_argument("--map-head", type=int, default=0, metavar="H", help="which head token_maps.png shows")
    add_device(p)
    p.add_argument("--out-dir", default=None, metavar="DIR",
                   help="write analysis.json, token_maps.npz and the PNG plots here (created if missing)")
    p.add_argument("--json", metavar="FILE", help="also write every value to this JSON file")
    add_common(p, quiet="no progress bar or notes")
    p.set_defaults(func=cmd_analyze)
