"""Command-line front ends of the training commands (registered by far.cli): train-teacher, distill,
prune, finetune. Every one runs under `torchrun --nproc-per-node N -m far.cli ...` as well."""
from __future__ import annotations

import argparse

from far.train.engine import TrainConfig

_LAUNCH = ("multi-process (DDP): torchrun --nproc-per-node 2 -m far.cli {cmd} ...  "
           "(gloo on CPUs, NCCL on GPUs; --batch-size is per process)")


def add_train_args(p: argparse.ArgumentParser, epochs: float, lr: float, out_dir: str, warmup: float = 1.0) -> None:
    """The TrainConfig flags, with per-command defaults."""
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=float, default=epochs, help="epochs (fractions allowed)")
    g.add_argument("--batch-size", type=int, default=128, help="images per step per process")
    g.add_argument("--lr", type=float, default=lr, help="peak AdamW learning rate")
    g.add_argument("--min-lr", type=float, default=1e-5, help="learning rate at the end of the cosine decay")
    g.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (matrices only)")
    g.add_argument("--warmup-epochs", type=float, default=warmup, help="linear warm-up length")
    g.add_argument("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm (0 = off)")
    g.add_argument("--ema", type=float, default=0.0, metavar="DECAY", help="EMA of the weights (0 = off, e.g. 0.999)")
    g.add_argument("--seed", type=int, default=0, help="seed of the data order, augmentation and dropout")
    g.add_argument("--no-augment", dest="augment", action="store_false",
                   help="no random shift/flip (Fashion-MNIST) augmentation")
    g.add_argument("--limit", type=int, default=None, metavar="N", help="train on the first N images only")
    g.add_argument("--eval-limit", type=int, default=None, metavar="N", help="evaluate on the first N test images")
    g.add_argument("--eval-batch-size", type=int, default=500, help="images per evaluation batch")
    g.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"),
                   help="mixed precision (auto = bf16 on GPUs, off on CPUs)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    g.add_argument("--threads", type=int, default=None, help="CPU threads per process (torch.set_num_threads)")
    g.add_argument("--workers", type=int, default=0, help="DataLoader workers for image folders")
    r = p.add_argument_group("checkpoints and logs")
    r.add_argument("--out-dir", default=out_dir, metavar="DIR",
                   help="run folder: last.pt (resumable state), metrics.jsonl, curves.png, summary.json")
    r.add_argument("--ckpt-every", type=int, default=200, metavar="STEPS", help="save the resumable state this often")
    r.add_argument("--log-every", type=int, default=20, metavar="STEPS", help="metrics.jsonl row every STEPS")
    r.add_argument("--resume", action="store_true", help="continue the run saved in --out-dir/last.pt")
    r.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (state saved; --resume continues)")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    r.add_argument("--force", action="store_true", help="overwrite an existing -o file")


def add_data_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--data", required=required, default=None if required else "fashion-mnist",
                   help="fashion-mnist, or an ImageNet-style folder (one subfolder of images per class)")
    p.add_argument("--val", default=None, metavar="PATH",
                   help="validation folder evaluated after each epoch (with a folder --data; "
                        "fashion-mnist uses its test split)")


def config_from_args(args: argparse.Namespace, validate: bool = True) -> TrainConfig:
    """The TrainConfig of the parsed flags; validate=False leaves the checks to the command (distill
    accepts --epochs 0)."""
    from far.train.engine import TrainError

    if args.threads is not None:
        if args.threads < 1:
            raise TrainError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    names = {f for f in TrainConfig.__dataclass_fields__}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    return cfg.validate() if validate else cfg


def _check_output(args) -> None:
    import os

    from far.train.engine import TrainError

    out = getattr(args, "output", None)
    if out and os.path.exists(out) and not args.force:
        raise TrainError(f"{out} exists; pass --force to overwrite it")
    if out and os.path.isdir(out):
        raise TrainError(f"-o {out} is a directory; give a file name such as model.safetensors")


def cmd_train_teacher(args) -> int:
    from far.train.teacher import train_teacher

    _check_output(args)
    cfg = config_from_args(args)
    train_teacher(args.model, args.data, cfg, output=args.output, device=args.device, drop_path=args.drop_path,
                  val=args.val, num_classes=args.num_classes)
    return 0


def add_parsers(sub, formatter) -> None:
    p = sub.add_parser(
        "train-teacher", formatter_class=formatter,
        help="train a DeiT-style ViT teacher (attention) from scratch",
        description="Train a timm ViT (attention; the teacher FAR distils from) with cross-entropy, AdamW, "
                    "warm-up + cosine schedule and label smoothing. Checkpoints every --ckpt-every steps; "
                    "--resume continues a killed run to the same result.",
        epilog="example:\n  far train-teacher fmnist_deit_tiny --data fashion-mnist --epochs 10 "
               "-o teacher.safetensors\n" + _LAUNCH.format(cmd="train-teacher"))
    p.add_argument("model", nargs="?", default="fmnist_deit_tiny", help="timm model name")
    add_data_args(p)
    p.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the model's)")
    p.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate")
    p.add_argument("-o", "--output", default=None, help="where to save the trained teacher (.safetensors)")
    add_train_args(p, epochs=10, lr=1e-3, out_dir="far-runs/teacher")
    p.set_defaults(func=cmd_train_teacher)
    add_more_parsers(sub, formatter)


def cmd_distill(args) -> int:
    from far.train.distill import distill

    _check_output(args)
    cfg = config_from_args(args, validate=False)  # distill validates: --epochs 0 skips stage 1
    hs = args.hidden_size
    distill(args.teacher, args.data, cfg, stage2_epochs=args.stage2_epochs, stage2_lr=args.stage2_lr,
            output=args.output, device=args.device, ce_weight=args.ce_weight, cos_weight=args.cos_weight,
            hidden_sizes=hs, val=args.val, kd_weight=args.kd_weight, kd_temperature=args.kd_temperature,
            student=args.student)
    return 0


def cmd_prune(args) -> int:
    from far.train.prune import prune

    _check_output(args)
    cfg = config_from_args(args)
    ratio = None if args.threshold is not None else args.prune_ratio
    prune(args.student, args.data, cfg, hoyer=args.hoyer, reg_epochs=args.epochs, prune_ratio=ratio,
          threshold=args.threshold, finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr,
          output=args.output, device=args.device, val=args.val)
    return 0


def cmd_finetune(args) -> int:
    from far.train.finetune import finetune

    _check_output(args)
    cfg = config_from_args(args)
    finetune(args.checkpoint, args.data, cfg, output=args.output, device=args.device, val=args.val,
             num_classes=args.num_classes)
    return 0


def add_more_parsers(sub, formatter) -> None:
    p = sub.add_parser(
        "distill", formatter_class=formatter,
        help="distil an attention teacher into a FAR student (block-wise, two stages)",
        description="Replace every attention of the teacher by a multi-head BiLSTM (FAR) and train it. Stage 1 "
                    "(--epochs, --lr) trains only the new modules (pre_proj, LSTMs, head_proj; W_O frozen) with "
                    "CE + sum over blocks of (1 - cosine along tokens, per channel) between each FAR module's output "
                    "after head_proj and the teacher attention's output before W_O. Stage 2 (--stage2-epochs, "
                    "--stage2-lr) fine-tunes the whole student with CE. --kd-weight adds, in both stages, logit distillation "
                    "(T^2 KL between the teacher's and the student's softmax at temperature --kd-temperature). "
                    "Losses are logged per block. --student continues from an existing FAR student instead of "
                    "converting the teacher; --epochs 0 skips stage 1.",
        epilog="examples:\n  far distill teacher.safetensors --data fashion-mnist --epochs 2 --stage2-epochs 1 "
               "-o far.safetensors\n  far distill teacher.safetensors --student far.safetensors --epochs 0 "
               "--stage2-epochs 4 --kd-weight 1 -o far2.safetensors   # more stage-2 epochs\n"
               + _LAUNCH.format(cmd="distill"))
    p.add_argument("teacher", help="teacher checkpoint (far train-teacher), zoo name, or timm name (pretrained)")
    add_data_args(p)
    p.add_argument("--stage2-epochs", type=float, default=1.0, help="CE fine-tune epochs after stage 1 (0 = none)")
    p.add_argument("--stage2-lr", type=float, default=2e-4, help="stage 2 peak learning rate")
    p.add_argument("--ce-weight", type=float, default=1.0, help="weight of CE in stage 1")
    p.add_argument("--cos-weight", type=float, default=1.0, help="weight of the summed cosine losses in stage 1")
    p.add_argument("--kd-weight", type=float, default=0.0,
                   help="weight of logit distillation (teacher soft labels) in both stages (0 = off)")
    p.add_argument("--kd-temperature", type=float, default=1.0, help="softmax temperature T of --kd-weight")
    p.add_argument("--hidden-size", type=int, default=None, help="LSTM units per head and direction (default head_dim)")
    p.add_argument("--student", default=None,
                   help="start from this FAR checkpoint (or zoo name) instead of converting the teacher")
    p.add_argument("-o", "--output", default=None, help="where to save the FAR student (.safetensors)")
    add_train_args(p, epochs=2, lr=1e-3, out_dir="far-runs/distill", warmup=0.2)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser(
        "prune", formatter_class=formatter,
        help="structured pruning of a FAR student (Hoyer-square, global threshold, compaction)",
        description="Group = one hidden unit of one (block, head, direction): its W_ih/W_hh rows, W_hh column, "
                    "biases and head_proj column. Trains with CE + --hoyer x Hoyer-square of the group norms "
                    "(--epochs), removes every group whose L2 norm is below one global threshold (--threshold, or "
                    "the one that removes --prune-ratio of all groups), fine-tunes the masked model "
                    "(--finetune-epochs), then compacts it: the checkpoint stores kept units only. Prints and plots "
                    "(kept_units.png in --out-dir) the kept units per block, direction and head.",
        epilog="example:\n  far prune far.safetensors --data fashion-mnist --hoyer 1e-3 --prune-ratio 0.3 "
               "-o far_pruned.safetensors\n" + _LAUNCH.format(cmd="prune"))
    p.add_argument("student", help="FAR checkpoint to prune")
    add_data_args(p)
    p.add_argument("--hoyer", type=float, default=1e-3, help="weight of the Hoyer-square regularizer")
    p.add_argument("--prune-ratio", type=float, default=0.3, help="fraction of all groups to remove")
    p.add_argument("--threshold", type=float, default=None, help="explicit global group-norm threshold "
                                                                 "(instead of --prune-ratio)")
    p.add_argument("--finetune-epochs", type=float, default=1.0, help="masked fine-tune epochs (0 = none)")
    p.add_argument("--finetune-lr", type=float, default=2e-4, help="masked fine-tune peak learning rate")
    p.add_argument("-o", "--output", default=None, help="where to save the compacted model (.safetensors)")
    add_train_args(p, epochs=1, lr=2e-4, out_dir="far-runs/prune", warmup=0.1)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser(
        "finetune", formatter_class=formatter,
        help="fine-tune a checkpoint on another dataset (transfer learning)",
        description="Fine-tune every parameter of a FAR (or attention) checkpoint with CE on an ImageNet-style "
                    "folder (or fashion-mnist). A new classifier is created when the data has another number of "
                    "classes; the images must have the model's input size (resized by the transforms).",
        epilog="example:\n  far finetune far.safetensors --data ./flowers/train --val ./flowers/val --epochs 5 "
               "-o far_flowers.safetensors\n" + _LAUNCH.format(cmd="finetune"))
    p.add_argument("checkpoint", help="checkpoint to start from (far.load)")
    add_data_args(p, required=True)
    p.add_argument("--num-classes", type=int, default=None, help="classes (default: the number of class folders)")
    p.add_argument("-o", "--output", default=None, help="where to save the fine-tuned model (.safetensors)")
    add_train_args(p, epochs=5, lr=3e-4, out_dir="far-runs/finetune", warmup=0.5)
    p.set_defaults(func=cmd_finetune)
