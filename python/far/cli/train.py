"""far train-teacher, far distill, far prune, far finetune: thin shells over far.methods. Each runs
under `torchrun --nproc-per-node N -m far.cli COMMAND ...` as well (DDP; --batch-size per process)."""
from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Optional

import torch

from far.cli.options import (HIDDEN_SIZE_HELP, Formatter, add_common, add_device, add_model, add_output,
                             add_teacher_args, at_least, note, output_checks, parse_hidden_size, set_threads, warn)
from far.errors import ConfigError
from far.methods.recipes import POLISH_IMAGES, RECIPES, STAGE1_LR, describe
from far.train import TrainConfig

_LAUNCH = ("multi-process (DDP): torchrun --nproc-per-node 2 -m far.cli {cmd} ...  "
           "(gloo on CPUs, NCCL on GPUs; --batch-size is per process)")


# ---------------------------------------------------------------- options
def add_train_args(p: argparse.ArgumentParser, epochs: float, lr: float, out_dir: str, warmup: float = 1.0,
                   epochs_help: str = "epochs (fractions allowed)", lr_help: str = "peak AdamW learning rate") -> None:
    """The TrainConfig options, with per-command defaults."""
    g = p.add_argument_group("training")
    g.add_argument("--data", default="fashion-mnist", metavar="fashion-mnist|PATH",
                   help="fashion-mnist, or an ImageNet-style folder (one subfolder of images per class)")
    g.add_argument("--val", default=None, metavar="PATH",
                   help="validation folder tested after each epoch (with a folder --data; fashion-mnist uses its "
                        "test split)")
    g.add_argument("--epochs", type=float, default=epochs, metavar="E", help=epochs_help)
    g.add_argument("--batch-size", type=int, default=128, metavar="B", help="images per step per process")
    g.add_argument("--lr", type=float, default=lr, metavar="LR", help=lr_help)
    g.add_argument("--min-lr", type=float, default=1e-5, metavar="LR", help="learning rate at the end of the cosine decay")
    g.add_argument("--weight-decay", type=float, default=0.05, metavar="W", help="AdamW weight decay (matrices only)")
    g.add_argument("--warmup-epochs", type=float, default=warmup, metavar="E", help="linear warm-up length")
    g.add_argument("--label-smoothing", type=float, default=0.1, metavar="S", help="cross-entropy label smoothing")
    g.add_argument("--grad-clip", type=float, default=1.0, metavar="NORM", help="clip the gradient norm (0 = off)")
    g.add_argument("--ema", type=float, default=0.0, metavar="DECAY", help="EMA of the weights (0 = off, e.g. 0.999)")
    g.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the data order, augmentation and dropout")
    g.add_argument("--no-augment", dest="augment", action="store_false",
                   help="turn off the random shift/flip augmentation of Fashion-MNIST (on by default)")
    g.add_argument("--limit", type=int, default=None, metavar="N", help="train on the first N images only")
    g.add_argument("--eval-limit", type=int, default=None, metavar="N", help="test on the first N test images")
    g.add_argument("--eval-batch-size", type=int, default=500, metavar="B", help="images per test batch")
    g.add_argument("--weight-noise", type=float, default=0.0, metavar="ETA",
                   help="noise-aware training for crossbars: every step's forward and backward see the "
                        "--weight-noise-on weights plus Gaussian noise of std ETA x each output row's largest |w| "
                        "(0 = off; e.g. 0.08 roughly halves a FAR model's loss at read noise 0.002, README)")
    g.add_argument("--weight-noise-on", default="w_ih", metavar="PATTERNS",
                   help="comma-separated globs of the weights --weight-noise perturbs: full parameter names, or bare "
                        "names matched in every module (default w_ih: the FAR blocks' input weights, where read "
                        "noise costs FAR most; e.g. w_ih,head_proj_weight,pre_proj.weight; '*weight,w_ih,w_hh' is every "
                        "weight matrix of a FAR model; biases and norms never get noise)")
    g.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"),
                   help="mixed precision (auto = bf16 on GPUs, off on CPUs)")
    add_device(g)
    g.add_argument("--workers", type=int, default=0, metavar="N", help="DataLoader workers for image folders")
    r = p.add_argument_group("checkpoints and logs")
    r.add_argument("--out-dir", default=out_dir, metavar="DIR",
                   help="run folder: last.pt (resumable state), metrics.jsonl, curves.png, summary.json")
    r.add_argument("--ckpt-every", type=int, default=200, metavar="STEPS", help="save the resumable state this often")
    r.add_argument("--log-every", type=int, default=20, metavar="STEPS", help="metrics.jsonl row every STEPS")
    r.add_argument("--resume", action="store_true",
                   help="continue the run saved in --out-dir (a new run there is refused while that run is "
                        "unfinished; -f/--force starts over)")
    r.add_argument("--max-steps", type=int, default=None, metavar="N",
                   help="stop each training stage once it has taken N steps in all (state saved; --resume "
                        "continues, with a larger --max-steps or none)")
    add_output(r, help="where to save the trained model (.safetensors)")
    add_common(r, quiet="no progress bars")


def add_deit_args(p: argparse.ArgumentParser) -> None:
    """DeiT-style regularization options (TrainConfig fields; off by default, --recipe paper sets them)."""
    g = p.add_argument_group("DeiT-style regularization (off unless given or set by a --recipe)")
    g.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA",
                   help="mixup alpha (timm Mixup: soft targets, label smoothing inside them; 0 = off)")
    g.add_argument("--cutmix", type=float, default=0.0, metavar="ALPHA", help="cutmix alpha (0 = off)")
    g.add_argument("--rand-augment", default=None, metavar="SPEC",
                   help="timm RandAugment per image, e.g. rand-m9-mstd0.5-inc1 (none = off; replaces the "
                        "Fashion-MNIST shift/flip)")
    g.add_argument("--reprob", type=float, default=0.0, metavar="P", help="random-erasing probability per image")
    g.add_argument("--repeated-aug", action=argparse.BooleanOptionalAction, default=False,
                   help="repeated augmentation under DDP (timm RepeatAugSampler: each image 3x per epoch, on "
                        "different processes); no effect in one process")
    g.add_argument("--drop-path", type=float, default=0.0, metavar="P",
                   help="stochastic depth on the student's blocks during training (rising linearly to P)")
    g.add_argument("--lr-scale-batch", type=int, default=0, metavar="N",
                   help="scale every LR by (batch size x processes) / N (DeiT: 512; 0 = off)")


def recipe_defaults(p: argparse.ArgumentParser) -> None:
    """Make the options a --recipe preset covers default to "not given" (None), keeping today's defaults as
    the `far` recipe, and say both defaults in their help."""
    from far.methods.recipes import PAPER

    far = {}
    for a in p._actions:
        if a.dest in PAPER:
            far[a.dest] = a.default
            shown = {True: "on", False: "off", None: "none"}.get(a.default, a.default) if isinstance(
                a.default, (bool, type(None))) else a.default
            paper = PAPER[a.dest][0]
            paper = {True: "on", False: "off"}.get(paper, paper) if isinstance(paper, bool) else paper
            a.help = f"{a.help} (default: {shown}; --recipe paper: {paper})"
            a.default = None
    p.set_defaults(far_recipe=far)


def resolve_recipe(args: argparse.Namespace) -> list:
    """Fill the options left unset from --recipe (far: today's defaults); returns the names given explicitly."""
    from far.methods.recipes import preset

    given = sorted(k for k in args.far_recipe if getattr(args, k) is not None)
    values = {**args.far_recipe, **preset(args.recipe)}
    for k in args.far_recipe:
        if getattr(args, k) is None:
            setattr(args, k, values[k])
    if isinstance(args.rand_augment, str) and args.rand_augment.lower() == "none":
        args.rand_augment = None
    return given


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of the parsed options (validated by the method; -f/--force also lets a new run start
    over in an --out-dir that holds an unfinished run, which is refused here, before any work, otherwise)."""
    from far.train.loop import check_fresh_run

    set_threads(args)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["progress"] = not args.quiet
    cfg = TrainConfig(**values)
    check_fresh_run(cfg)
    return cfg


def _warn_before_training(args: argparse.Namespace, cfg: TrainConfig) -> None:
    """Options that would go unnoticed until the run ends, said when the first training stage starts, once the
    method's own checks have passed (a refused run prints its one error line only), by the first process of a
    torchrun only."""
    from far.train.loop import before_first_run

    if os.environ.get("RANK", "0") != "0":
        return
    notes = []
    if not getattr(args, "output", None):
        notes.append(f"no -o/--output: the trained model will not be saved as a checkpoint (only the resumable "
                     f"training state in --out-dir {cfg.out_dir} is written); give -o FILE to keep it")
    if 0 < cfg.epochs <= cfg.warmup_epochs:
        notes.append(f"--warmup-epochs {cfg.warmup_epochs:g} is not below --epochs {cfg.epochs:g}: the learning "
                     f"rate rises for the whole run and never reaches --lr {cfg.lr:g}")
    if notes:
        before_first_run(lambda: [warn(n) for n in notes])


def datasets(args: argparse.Namespace, model, cfg: TrainConfig, num_classes: Optional[int] = None,
             labels: bool = True):
    """(train set, test set or None) for --data / --val, checked against the model (with num_classes
    classes, when it is going to get a new classifier); labels=False: any folder of images for training.
    The last step before a training command starts: it also warns of options without effect."""
    from far.data import is_fashion_mnist, make_dataset
    from far.models import data_config

    _warn_before_training(args, cfg)
    dcfg = data_config(model)
    if num_classes is not None:
        dcfg["num_classes"] = num_classes
    train_set = make_dataset(args.data, "train", dcfg, limit=cfg.limit, labels=labels)
    if dcfg.get("num_classes") == 0:  # a backbone without a classifier: no top-1 to test
        if args.val is not None:
            warn("--val has no effect: the model has no classifier (num_classes 0), so there is no top-1 to test")
        return train_set, None
    if is_fashion_mnist(args.data):
        if args.val is not None:
            warn("--val has no effect with --data fashion-mnist: its test split is used")
        if args.workers:
            warn("--workers has no effect on fashion-mnist (it is read in memory, no DataLoader)")
        return train_set, make_dataset(args.data, "test", dcfg, limit=cfg.eval_limit)
    if args.val is not None:
        return train_set, make_dataset(args.val, "test", dcfg, limit=cfg.eval_limit, train=False)
    return train_set, None


def _abs(ref) -> str:
    """A resolved MODEL as recorded in a run: the absolute path of a file, else the name."""
    return os.path.abspath(ref.path) if ref.kind == "file" else ref.name


def _summary_table(rows) -> str:
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(w)}  {v}" for k, v in rows)


def finish(args: argparse.Namespace, model, title: str) -> int:
    """After a method: on rank 0, save -o, write summary.json and curves.png into --out-dir, print
    the summary table. A run stopped by --max-steps says how to resume and saves nothing."""
    import torch.distributed as dist

    from far.models import save
    from far.train import plot_history
    from far.utils.fs import write_json

    run = model.far_run
    if dist.is_initialized() and dist.get_rank() != 0:
        return 0
    if not run.completed:
        print(f"stopped after step {run.steps} (--max-steps); resume with --resume --out-dir {args.out_dir} and a "
              "larger --max-steps or none (it counts each stage's steps from the stage's start, not the steps of "
              "this call)", flush=True)
        return 0
    if args.output:
        save(model, args.output, force=args.force)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    why = plot_history(run.history, out / "curves.png", title)
    summary = {"command": run.command, "completed": run.completed, "steps": run.steps,
               "seconds": round(run.seconds, 1), "test_accuracy": run.accuracy, "output": args.output,
               **dict(run.rows)}
    kept = getattr(model, "far_pruned_from", None)
    if kept is not None:
        from far.methods.prune import kept_table

        summary["kept_units"] = kept_table(model)
    write_json(out / "summary.json", summary)
    table = [("test top-1", f"{100 * run.accuracy:.2f}%" if run.accuracy is not None else "n/a"),
             ("steps", str(run.steps)), ("time", f"{run.seconds:.0f} s"), *run.rows,
             ("checkpoint", args.output or "(not saved: no -o)"),
             ("metrics", ", ".join(os.fspath(f) for f in sorted(out.rglob("metrics.jsonl"))) or "none written"),
             ("curves", os.fspath(out / "curves.png") if why is None else f"not written: {why}")]
    print(f"\n{title}\n" + _summary_table(table), flush=True)
    if kept is not None:
        from far.cli.pruning import format_kept, plot_kept

        print("\nkept units per block (kept/before):\n" + format_kept(model, kept))
        why = plot_kept(model, out / "kept_units.png", kept,
                        title=f"kept LSTM units (threshold {model.far_metadata['pruning']['threshold']:.3g})")
        print(f"  plot: {out / 'kept_units.png'}" if why is None else f"  plot not written: {why}")
    return 0


# ---------------------------------------------------------------- commands
def cmd_train_teacher(args) -> int:
    import far

    output_checks(args, (), "output")
    cfg = dataclasses.replace(train_config(args), drop_path=0.0)  # the model is built with it (below)
    if not 0 <= args.drop_path < 1:
        raise ConfigError(f"--drop-path must be in [0, 1), got {args.drop_path}")
    at_least(args, 1, "num_classes")
    kw = {} if args.num_classes is None else {"num_classes": args.num_classes}
    torch.manual_seed(cfg.seed)  # the initialization is part of the run
    model = far.create_model(args.model, far=False, drop_path_rate=args.drop_path, **kw)
    model.far_arch = {"timm_name": args.model, "kwargs": kw}  # drop_path is training-only
    train_set, eval_set = datasets(args, model, cfg)
    model = far.train_classifier(model, train_set, eval_data=eval_set, config=cfg, device=args.device,
                                 identity={"model": args.model, "data": str(args.data), "drop_path": args.drop_path},
                                 command="train-teacher", inplace=True)
    return finish(args, model, f"teacher {args.model} on {args.data}")


def load_teacher(args: argparse.Namespace, ref):
    """The attention teacher of far distill / far convert: a checkpoint as saved, or a timm architecture
    (--model-kwargs) with --teacher-weights FILE (no network) or else timm's pretrained weights."""
    from far.cli.options import model_kwargs
    from far.models import load_model

    kwargs = model_kwargs(args)
    weights = getattr(args, "teacher_weights", None)
    if ref.kind != "timm":
        if weights or kwargs:
            raise ConfigError(f"{ref.name} is a {ref.origin}: --teacher-weights and --model-kwargs go with a timm "
                              "architecture (timm:NAME)")
        return load_model(ref, far=False)[0]
    if weights:
        return load_model(ref, far=False, weights=weights, model_kwargs=kwargs)[0]
    try:
        return load_model(ref, far=False, pretrained=True, model_kwargs=kwargs)[0]
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"teacher '{ref.name}': loading its pretrained weights failed: "
                          f"{type(e).__name__}: {' '.join(str(e).split())} (no network? give a local file with "
                          "--teacher-weights FILE)") from e


def cmd_distill(args) -> int:
    import far
    from far.cli.options import teacher_spec
    from far.models import resolve

    teacher_ref = resolve(teacher_spec(args))
    student_ref = resolve(args.student) if args.student else None
    output_checks(args, [r.path for r in (teacher_ref, student_ref) if r is not None], "output")
    explicit = resolve_recipe(args)
    if args.recipe == "far" and "lr" not in explicit:
        args.lr = STAGE1_LR[args.stage1]
    cfg = train_config(args)
    args.hidden_size = parse_hidden_size(args.hidden_size)
    if student_ref is not None and args.hidden_size is not None:
        raise ConfigError("--hidden-size sizes a new student; an existing --student keeps its own sizes")
    if student_ref is not None and args.replace is not None:
        raise ConfigError("--replace chooses the blocks of a new student; an existing --student keeps its own")
    from far.models import load_model
    from far.models.convert import parse_blocks

    blocks = parse_blocks(args.replace) if args.replace is not None else None
    teacher = load_teacher(args, teacher_ref)
    student = None
    identity = {"teacher": _abs(teacher_ref), "data": str(args.data)}
    if args.teacher_weights:
        identity["teacher_weights"] = os.path.abspath(args.teacher_weights)
    if args.model_kwargs:
        identity["model_kwargs"] = args.model_kwargs
    labels = not args.no_labels
    if labels and getattr(teacher, "num_classes", None) == 0:
        note(args, "the teacher has no classifier (num_classes 0): distilling without labels, logit "
                   "distillation on its pooled features")
        labels = False
    if student_ref is not None:
        if student_ref.kind == "timm":
            raise ConfigError(f"--student {args.student}: a timm name; pass a FAR checkpoint (file or zoo name)")
        student, _ = load_model(student_ref)
        identity["student"] = _abs(student_ref)
    train_set, eval_set = datasets(args, teacher, cfg, labels=labels)
    model = far.distill(teacher, train_set, student=student, eval_data=eval_set, config=cfg, stage1=args.stage1,
                        block_loss=args.block_loss, joint_epochs=args.joint_epochs, stage2_epochs=args.stage2_epochs,
                        stage2_lr=args.stage2_lr, ce_weight=args.ce_weight, block_weight=args.block_weight,
                        kd_weight=args.kd_weight, kd_temperature=args.kd_temperature,
                        stage2_block_weight=args.stage2_block_weight, labels=labels, blocks=blocks,
                        pre_proj_init=args.pre_proj_init, joint_lr=args.joint_lr,
                        clean_block_loss=args.clean_block_loss, polish_iters=args.polish_iters,
                        polish_images=args.polish_images, hidden_sizes=args.hidden_size, device=args.device,
                        identity=identity, recipe=args.recipe, explicit=explicit)
    return finish(args, model, f"FAR student of {teacher_spec(args)}")


def cmd_prune(args) -> int:
    import far
    from far.models import load_model, resolve

    ref = resolve(args.model)
    if ref.kind == "timm":
        raise ConfigError(f"{args.model}: a timm name; prune a trained FAR checkpoint (file or zoo name)")
    output_checks(args, [ref.path], "output")
    cfg = train_config(args)
    if sum(v is not None for v in (args.threshold, args.prune_ratio, args.budget)) > 1:
        raise ConfigError("give one of --prune-ratio, --threshold and --budget")
    ratio = None if args.threshold is not None or args.budget else (0.3 if args.prune_ratio is None else args.prune_ratio)
    budget, align = None, 1
    if args.budget:
        from far.cli.imc import chip_settings, chip_spec
        from far.methods.prune import Budget, array_units

        xcfg, hw_values = chip_settings(args)
        budget = Budget.parse(args.budget, cfg=xcfg, hw=chip_spec(hw_values),
                              input_size=tuple(args.input_size) if args.input_size else None)
        if args.align == "arrays":
            align = array_units(budget)
    elif args.set or args.hw or args.constants or args.input_size:
        raise ConfigError("--set, --hw, --constants and --input-size describe the chip of a --budget; give --budget")
    if args.align not in (None, "arrays"):
        try:
            align = int(args.align)
        except ValueError:
            raise ConfigError(f"--align takes a number of units or 'arrays', got {args.align!r}") from None
        if align < 1:
            raise ConfigError(f"--align must be >= 1, got {align}")
    from far.methods.prune import check_min_units

    check_min_units(args.min_units, align, names=("--min-units", "--align"))
    if (args.align is not None or args.balance) and budget is None:
        raise ConfigError("--align and --balance shape what a --budget keeps; give --budget")
    model, _ = load_model(ref)
    train_set, eval_set = datasets(args, model, cfg)
    model = far.prune(model, train_set, eval_data=eval_set, config=cfg, hoyer=args.hoyer, prune_ratio=ratio,
                      threshold=args.threshold, budget=budget, align=align, balance=args.balance, rounds=args.rounds,
                      hoyer_scope=args.hoyer_scope, groups="public" if args.public_groups else "far",
                      min_units=args.min_units, keep_heads=args.keep_heads, finetune_epochs=args.finetune_epochs,
                      finetune_lr=args.finetune_lr,
                      device=args.device, identity={"student": _abs(ref), "data": str(args.data)}, inplace=True)
    if not args.balance:  # one global threshold can all but empty a block whose weights are small overall
        before = getattr(model, "far_pruned_from", {})
        from far.models import far_modules

        for name, m in far_modules(model):
            full = int(before[name].sum()) if name in before else 0
            if full and int(m.hidden_sizes.sum()) < 0.1 * full:
                warn(f"{name} keeps {int(m.hidden_sizes.sum())} of its {full} units: it can barely reproduce its "
                     "attention block; --balance ranks units within their block")
    return finish(args, model, f"pruned FAR student of {args.model}")


def _plan(text: str) -> dict:
    """'2:1,3:1' -> {2: 1, 3: 1}."""
    plan = {}
    for item in text.split(","):
        a, sep, b = item.partition(":")
        if not sep or not a.strip().isdigit() or not b.strip().isdigit():
            raise ConfigError(f"--plan takes BLOCK:SOURCE pairs like 2:1,3:1, got {item!r}")
        if int(a) in plan:
            raise ConfigError(f"--plan lists block {int(a)} twice ({a.strip()}:{plan[int(a)]} and {item.strip()}): "
                              "a block reuses one source")
        plan[int(a)] = int(b)
    return plan


def cmd_reuse(args) -> int:
    import far
    from far.imc.cost import HardwareSpec
    from far.models import load_model, resolve

    ref = resolve(args.model)
    output_checks(args, [ref.path], "output")
    cfg = train_config(args)
    if (args.plan is None) == (args.latency_budget is None):
        raise ConfigError("give exactly one of --latency-budget and --plan")
    plan = _plan(args.plan) if args.plan is not None else None  # before loading anything
    teacher, _ = load_model(ref, far=False, pretrained=True)
    train_set, eval_set = datasets(args, teacher, cfg)
    model = far.reuse(teacher, train_set, plan=plan,
                      latency_budget_us=args.latency_budget, eval_data=eval_set, config=cfg,
                      stage2_epochs=args.stage2_epochs, stage2_lr=args.stage2_lr, ce_weight=args.ce_weight,
                      kd_weight=args.kd_weight, kd_temperature=args.kd_temperature, transform=args.transform,
                      hardware=HardwareSpec(dynamic=args.dynamic), device=args.device, ridge=args.ridge,
                      identity={"teacher": _abs(ref), "data": str(args.data)})
    return finish(args, model, f"attention reuse (TReX-style) of {args.model}")


def _folder_classes(path: str) -> int:
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"{path}: no such image folder")
    # as far.data's image folder counts classes: hidden folders (.ipynb_checkpoints, .thumbnails) are not classes
    n = sum(1 for c in p.iterdir() if c.is_dir() and not c.name.startswith("."))
    if n < 2:
        raise ConfigError(f"{path}: needs at least 2 class subfolders, found {n}")
    return n


def cmd_finetune(args) -> int:
    import far
    from far.data import is_fashion_mnist
    from far.models import load_model, resolve

    ref = resolve(args.model)
    output_checks(args, [ref.path], "output")
    cfg = train_config(args)
    at_least(args, 2, "num_classes")
    model, _ = load_model(ref, far=False, pretrained=args.pretrained)
    if ref.kind != "timm" and args.pretrained:
        warn(f"--pretrained has no effect: {args.model} is a {ref.origin} (it has its own weights); it applies to "
             "timm names")
    k = args.num_classes if args.num_classes is not None else (10 if is_fashion_mnist(args.data)
                                                               else _folder_classes(args.data))
    train_set, eval_set = datasets(args, model, cfg, num_classes=k)
    if isinstance(cfg.rand_augment, str) and cfg.rand_augment.lower() == "none":
        cfg = dataclasses.replace(cfg, rand_augment=None)
    model = far.finetune(model, train_set, num_classes=k, eval_data=eval_set, config=cfg, device=args.device,
                         identity={"checkpoint": _abs(ref), "data": str(args.data)}, inplace=True, mode=args.mode)
    return finish(args, model, f"{args.model} fine-tuned on {args.data}")


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "train-teacher", formatter_class=Formatter,
        help="train a DeiT-style ViT teacher (attention) from scratch",
        description="Train the timm ViT MODEL (attention; the teacher FAR distils from) with cross-entropy, "
                    "AdamW, warm-up + cosine schedule and label smoothing. Checkpoints every --ckpt-every steps; "
                    "--resume continues a killed run to the same result.",
        epilog="example:\n  far train-teacher fmnist_deit_tiny --data fashion-mnist --epochs 10 "
               "-o teacher.safetensors\n" + _LAUNCH.format(cmd="train-teacher"))
    add_model(p, optional=True, default="fmnist_deit_tiny", help="timm model name (default: fmnist_deit_tiny)")
    p.add_argument("--num-classes", type=int, default=None, metavar="K", help="classifier size (default: the model's)")
    p.add_argument("--drop-path", type=float, default=0.0, metavar="P", help="stochastic depth rate")
    add_train_args(p, epochs=10, lr=1e-3, out_dir="far-runs/teacher")
    p.set_defaults(func=cmd_train_teacher)

    p = sub.add_parser(
        "distill", formatter_class=Formatter,
        help="distil an attention teacher into a FAR student (block-wise)",
        description="Replace every attention of the teacher MODEL by a multi-head BiLSTM (FAR) and train it to "
                    "reproduce each attention block: every FAR block's output before W_O against the teacher "
                    "attention's output before W_O, compared by --block-loss (cos: 1 - cosine along tokens per "
                    "channel, the paper's; mse: relative squared error, which sees magnitude; cos+mse). "
                    "Stage 1 (--epochs, --lr): --stage1 isolated trains every FAR block on the teacher's own block "
                    "input (independent problems, no labels needed); --stage1 joint trains all blocks inside the "
                    "student at once with CE + the block losses. --joint-epochs adds an in-model phase of block "
                    "losses after stage 1. Stage 2 (--stage2-epochs, --stage2-lr) fine-tunes every parameter with "
                    "CE, logit distillation (--kd-weight: T^2 KL at --kd-temperature) and the block losses as a "
                    "regularizer (--stage2-block-weight). --no-labels trains without labels (any folder of "
                    "images). At the end the per-block fidelity (cosine isolated and in the model, top-1 "
                    "agreement) on the test data is printed and stored in the checkpoint (`far info`). "
                    "--student continues from an existing FAR student instead of converting the teacher; "
                    "--epochs 0 skips stage 1. The defaults are the best recipe of bench/ablate_distill.py (README).",
        epilog="examples:\n  far distill fmnist_deit_tiny --data fashion-mnist --epochs 2 --stage2-epochs 1 "
               "-o far.safetensors\n  far distill teacher.safetensors --student far.safetensors "
               "--epochs 0 --stage2-epochs 4 -o far2.safetensors   # more stage-2 epochs\n"
               "  far distill vit.safetensors --data ./photos --no-labels --epochs 3 --stage2-epochs 1 "
               "-o far.safetensors\n"
               "  far distill fmnist_deit_tiny --recipe paper --epochs 20 --stage2-epochs 10 -o paper.safetensors"
               "   # the public code's recipe, shorter\n"
               "  far distill deit_flowers.safetensors --student far.safetensors --data ./flowers/train "
               "-o far_flowers.safetensors   # downstream: the student takes the fine-tuned teacher's classifier\n"
               "  far distill fmnist_deit_tiny --student fmnist_far_tiny --epochs 0 --stage2-lr 1e-4 "
               "--weight-noise 0.08 -o far_nr.safetensors   # noise-aware: robust to crossbar read noise\n"
               "  far distill fmnist_deit_tiny --student fmnist_far_tiny --epochs 0 --stage2-epochs 3 --stage2-lr 1e-4 "
               "--weight-noise 0.06 --weight-noise-on '*weight,w_ih,w_hh' --clean-block-loss -o far_nrc.safetensors"
               "   # noise-aware, blocks kept faithful\n"
               + _LAUNCH.format(cmd="distill"))
    add_model(p, optional=True, help="the attention teacher: a checkpoint file, zoo name, or timm name (timm's "
                                     "pretrained weights, or --teacher-weights FILE); or give --teacher")
    p.add_argument("--stage1", choices=("isolated", "joint"), default="isolated",
                   help="stage 1: every block on the teacher's inputs (isolated) or all blocks in the student (joint)")
    p.add_argument("--block-loss", choices=("cos", "mse", "cos+mse"), default="cos+mse",
                   help="how a FAR block's output is compared with its attention block's")
    p.add_argument("--joint-epochs", type=float, default=0.0, metavar="E",
                   help="in-model block-loss epochs after stage 1 (0 = none)")
    p.add_argument("--joint-lr", type=float, default=None, metavar="LR",
                   help="peak learning rate of the --joint-epochs phase (default: 1e-3)")
    p.add_argument("--stage2-epochs", type=float, default=1.0, metavar="E", help="fine-tune epochs after stage 1 (0 = none)")
    p.add_argument("--stage2-lr", type=float, default=2e-4, metavar="LR", help="stage 2 peak learning rate")
    p.add_argument("--ce-weight", type=float, default=1.0, metavar="W", help="weight of cross-entropy (joint stages, stage 2)")
    p.add_argument("--block-weight", "--cos-weight", dest="block_weight", type=float, default=1.0, metavar="W",
                   help="weight of the summed block losses in a joint stage 1 and the joint phase")
    p.add_argument("--stage2-block-weight", type=float, default=1.0, metavar="W",
                   help="weight of the block losses in stage 2 (a fidelity regularizer; 0 = off)")
    p.add_argument("--clean-block-loss", action="store_true",
                   help="with --weight-noise: take the block losses at the clean weights (a second forward and "
                        "backward per step, ~1.7x the time) and only CE and logit distillation at the noisy ones; "
                        "the blocks stay faithful, the classifier still learns to tolerate the noise (an isolated "
                        "stage 1 then trains without noise)")
    p.add_argument("--polish-iters", type=int, default=0, metavar="N",
                   help="after stage 1, polish every FAR block alone with up to N full-batch L-BFGS iterations on its "
                        "block loss (each about one pass over --polish-images images for that block; README \"A "
                        "second-order polish\"); with --epochs 0, the --student as given (0 = none)")
    p.add_argument("--polish-images", type=int, default=POLISH_IMAGES, metavar="M",
                   help="training images whose teacher block inputs and outputs --polish-iters caches, one block at "
                        "a time (2 x M x tokens x channels floats)")
    p.add_argument("--kd-weight", type=float, default=1.0, metavar="W",
                   help="weight of logit distillation (teacher soft labels) in the joint stages and stage 2 (0 = off)")
    p.add_argument("--kd-temperature", type=float, default=2.0, metavar="T", help="softmax temperature T of --kd-weight")
    p.add_argument("--no-labels", action="store_true",
                   help="train without labels: --data may be any folder of images; no cross-entropy")
    p.add_argument("--hidden-size", default=None, metavar="N[,N...]",
                   help=HIDDEN_SIZE_HELP + "; default head_dim, the method's")
    p.add_argument("--student", default=None, metavar="MODEL",
                   help="start from this FAR checkpoint (file or zoo name) instead of converting the teacher")
    add_teacher_args(p)
    p.add_argument("--recipe", choices=RECIPES, default="far",
                   help="preset of the training options: far (this engine's defaults) or paper (the FAR authors' "
                        "public code: DeiT augmentation, drop-path, EMA, LR x global batch / 512, joint stage 1, "
                        "CE-only stage 2; the table below). Options given explicitly override the preset")
    add_train_args(p, epochs=2, lr=STAGE1_LR["isolated"], out_dir="far-runs/distill", warmup=0.2,
                   epochs_help="stage 1 epochs (fractions allowed; 0 = skip stage 1)",
                   lr_help=f"stage 1 peak AdamW learning rate (an isolated block takes a larger step; --stage1 "
                           f"joint: {STAGE1_LR['joint']:g} unless given)")
    add_deit_args(p)
    recipe_defaults(p)
    p.epilog += "\n\n" + describe()
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser(
        "prune", formatter_class=Formatter,
        help="structured pruning of a FAR student (Hoyer-square, global threshold, compaction)",
        description="Group = one hidden unit of one (block, head, direction): its W_ih/W_hh rows, W_hh column, "
                    "biases and head_proj column. Trains MODEL with CE + --hoyer x Hoyer-square of the group norms "
                    "(--epochs), removes every group whose L2 norm is below one global threshold (--threshold, or "
                    "the one that removes --prune-ratio of all groups, 0.3 by default), fine-tunes the masked model "
                    "(--finetune-epochs), then compacts it: the checkpoint stores kept units only. Prints and plots "
                    "(kept_units.png in --out-dir) the kept units per block, direction and head. "
                    "With --budget KIND=VALUE the threshold is the weakest that meets the budget: params (whole "
                    "model) or mixer-params (token mixers), kept units counted; arrays or mixer-arrays (crossbar "
                    "arrays on the chip of --set/--hw, far imc-cost's model), latency (ns per image) or energy (pJ "
                    "per image); the report gives budget vs achieved, and an impossible budget is an error before "
                    "any training, saying by how much it misses and why. --rounds N prunes gradually (N rounds, "
                    "budgets shrinking geometrically).",
        epilog="examples:\n  far prune far.safetensors --data fashion-mnist --hoyer 1e-3 --prune-ratio 0.3 "
               "-o far_pruned.safetensors\n"
               "  far prune fmnist_far_tiny --data fashion-mnist --budget mixer-params=116k --rounds 3 -o xs.safetensors\n"
               "  far prune fmnist_far_tiny --data fashion-mnist --budget mixer-arrays=160 --align arrays "
               "--hw packing=diagonal -o a160.safetensors\n" + _LAUNCH.format(cmd="prune"))
    add_model(p, help="the FAR model to prune: a checkpoint file or zoo name")
    p.add_argument("--hoyer", type=float, default=1e-3, metavar="W", help="weight of the Hoyer-square regularizer")
    p.add_argument("--prune-ratio", type=float, default=None, metavar="R", help="fraction of all groups to remove (default 0.3)")
    p.add_argument("--threshold", type=float, default=None, metavar="X",
                   help="explicit global group-norm threshold (instead of --prune-ratio)")
    from far.cli.pruning import Once

    p.add_argument("--budget", default=None, metavar="KIND=VALUE", action=Once,
                   help="prune to a budget instead of a ratio: params, mixer-params, arrays, mixer-arrays, latency "
                        "(ns), energy (pJ); VALUE may end in k/M/G, e.g. mixer-params=116k")
    p.add_argument("--align", default=None, metavar="N|arrays",
                   help="with --budget: keep a multiple of N units per (head, direction); 'arrays' = the units that "
                        "fill one crossbar column block (4 at the default config), so no array is left part-used")
    p.add_argument("--balance", action="store_true",
                   help="with --budget: rank each group by its norm relative to its block's (RMS), so that no "
                        "block is emptied because its weights are small overall")
    p.add_argument("--min-units", type=int, default=0, metavar="K",
                   help="every (head, direction) that keeps a unit keeps at least K, its strongest (a budget is "
                        "still met by removing more elsewhere): no crossbar product of one or two rows, which a "
                        "full-range ADC resolves to a few levels; with --align, a multiple of it (default 0: no floor)")
    p.add_argument("--keep-heads", action="store_true",
                   help="remove no head outright: a head the threshold would empty keeps its strongest max(K, align) "
                        "units (at least 1) in the direction of its strongest unit; a removed head's channels carry "
                        "head_proj's bias alone, so its block can no longer reproduce that attention head")
    p.add_argument("--rounds", type=int, default=1, metavar="N",
                   help="gradual pruning: N rounds of Hoyer training, pruning and masked fine-tune, the budget (or "
                        "ratio) shrinking geometrically to the target; --epochs and --finetune-epochs are per round")
    p.add_argument("--hoyer-scope", choices=("block", "head-direction"), default="block",
                   help="Hoyer-square per block (this implementation) or per (head, direction), summed (the "
                        "authors' public code)")
    p.add_argument("--public-groups", action="store_true",
                   help="groups without biases and head_proj columns (the public code's groups)")
    from far.cli.imc import add_chip_args

    add_chip_args(p, sizes="the model's")
    p.add_argument("--finetune-epochs", type=float, default=1.0, metavar="E", help="masked fine-tune epochs (0 = none)")
    p.add_argument("--finetune-lr", type=float, default=2e-4, metavar="LR", help="masked fine-tune peak learning rate")
    add_train_args(p, epochs=1, lr=2e-4, out_dir="far-runs/prune", warmup=0.1,
                   epochs_help="Hoyer-regularized epochs (fractions allowed; 0 = threshold the model as it is)")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser(
        "reuse", formatter_class=Formatter,
        help="TReX-style attention reuse under an IMC latency budget (the rival method, for comparison)",
        description="Make later encoders of the attention model MODEL reuse an earlier encoder's attention output "
                    "through a transformation block (LayerNorm -> Linear -> GELU), TReX-style (re-implemented from "
                    "the paper's abstract: see the README). --latency-budget picks the reusing encoders with the IMC "
                    "cost model (far imc-cost; --dynamic says how attention's dynamic products run) at the least "
                    "expected accuracy loss (the most similar attention outputs first); --plan gives them. Stage 1 "
                    "(--epochs) trains the transformation blocks on the teacher's activations; stage 2 "
                    "(--stage2-epochs) fine-tunes everything with CE + logit distillation.",
        epilog="examples:\n  far reuse fmnist_deit_tiny --latency-budget 800 --epochs 1 --stage2-epochs 2 "
               "-o fmnist_trex_tiny.safetensors\n  far reuse fmnist_deit_tiny --plan 3:2 --epochs 0.5 --stage2-epochs 1 "
               "-o trex.safetensors\n" + _LAUNCH.format(cmd="reuse"))
    add_model(p, help="the attention model: a checkpoint file, zoo name, or timm name (its pretrained weights)")
    p.add_argument("--latency-budget", type=float, default=None, metavar="US",
                   help="cost-model latency per image to meet, in microseconds")
    p.add_argument("--plan", default=None, metavar="BLOCK:SOURCE,...", help="the reusing blocks and their sources")
    p.add_argument("--transform", choices=("ln-linear-gelu", "ln-linear"), default="ln-linear-gelu",
                   help="the transformation block")
    p.add_argument("--ridge", type=float, default=1e-3, metavar="A",
                   help="ridge penalty of the transformation blocks' least-squares warm start, relative to the mean "
                        "diagonal of the Gram matrix (0 = plain minimum-norm least squares, whose weights can be "
                        "too large for a crossbar's ADC)")
    p.add_argument("--dynamic", choices=("write", "digital"), default="write", metavar="MODE",
                   help="cost model: attention's QK^T and S.V written into crossbars (write) or on a digital MAC "
                        "unit (digital) (default: write)")
    p.add_argument("--stage2-epochs", type=float, default=1.0, metavar="E", help="fine-tune epochs (0 = none)")
    p.add_argument("--stage2-lr", type=float, default=2e-4, metavar="LR", help="stage 2 peak learning rate")
    p.add_argument("--ce-weight", type=float, default=1.0, metavar="W", help="weight of cross-entropy in stage 2")
    p.add_argument("--kd-weight", type=float, default=1.0, metavar="W", help="weight of logit distillation in stage 2")
    p.add_argument("--kd-temperature", type=float, default=2.0, metavar="T", help="softmax temperature of --kd-weight")
    add_train_args(p, epochs=1, lr=1e-3, out_dir="far-runs/reuse", warmup=0.1,
                   epochs_help="stage 1 epochs: the transformation blocks alone (0 = least-squares start only)")
    p.set_defaults(func=cmd_reuse)

    p = sub.add_parser(
        "finetune", formatter_class=Formatter,
        help="fine-tune a model on another dataset (transfer learning)",
        description="Fine-tune MODEL (FAR or attention) with CE on an ImageNet-style folder (or fashion-mnist). "
                    "A new classifier is created when the data has another number of classes; the images must "
                    "have the model's input size (resized by the transforms). --mode says what trains, as the "
                    "FAR authors' public code (modeling/architectures.py set_requires_grad) defines it: full = "
                    "every parameter; fc = every block's MLP (fc1, fc2) and the classifier; fc+head = the same "
                    "as fc (the public code's FC+head branch is identical to FC); head = the classifier only. "
                    "Frozen parameters keep their values exactly.",
        epilog="examples:\n  far finetune far.safetensors --data ./flowers/train --val ./flowers/val --epochs 5 "
               "-o far_flowers.safetensors\n"
               "  far finetune deit.safetensors --data ./flowers/train --mode fc -o deit_flowers.safetensors\n"
               "downstream distillation (two steps): fine-tune the attention teacher on the new data, then\n"
               "distil its FAR student on the same data (the student takes the teacher's classifier):\n"
               "  far finetune deit.safetensors --data ./flowers/train -o deit_flowers.safetensors\n"
               "  far distill deit_flowers.safetensors --student far.safetensors --data ./flowers/train "
               "-o far_flowers.safetensors\n" + _LAUNCH.format(cmd="finetune"))
    add_model(p)
    p.add_argument("--mode", choices=("full", "fc", "fc+head", "head"), default="full",
                   help="which parameters train: full (all), fc (every block's MLP + classifier), fc+head (as fc, "
                        "the public code's alias), head (the classifier only)")
    p.add_argument("--num-classes", type=int, default=None, metavar="K", help="classes (default: the number of class folders)")
    p.add_argument("--pretrained", action="store_true", help="timm names: start from timm's pretrained weights")
    add_train_args(p, epochs=5, lr=3e-4, out_dir="far-runs/finetune", warmup=0.5)
    add_deit_args(p)
    p.set_defaults(func=cmd_finetune)
