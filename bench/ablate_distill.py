"""What each distillation choice buys, per minute of training: block fidelity and accuracy curves (JSON + PNG).

Every configuration distils the same teacher (default: the zoo's fmnist_deit_tiny) from the same
initial student (seed 0) on Fashion-MNIST. Stage 1 runs in --chunks pieces (the training loop's
max_steps + resume, so the schedule is the one of an uninterrupted run); after each piece, and after
stage 2, far.fidelity.block_fidelity measures on --test-images held-out test images: per-block cosine
(along tokens per channel) isolated and in the model, relative MSE, top-1 agreement with the teacher and
accuracy. Training minutes exclude the measurements.

    python bench/ablate_distill.py                       # every configuration (about 2 h on 2 CPU cores)
    python bench/ablate_distill.py --configs iso-cos+mse --stage1-epochs 1 --stage2-epochs 0 --train-images 4096
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import far
from far.data import fashion_mnist
from far.errors import ConfigError
from far.fidelity import block_fidelity
from far.utils.env import environment, result_filename
from far.utils.fs import read_json, write_json
from far.utils.plot import pyplot, save_figure

RESULTS = Path(__file__).resolve().parent / "results"
# name -> (far.distill keyword arguments of stage 1, of stage 2); every weight spelled out, so a change of
# far.distill's defaults does not change what a configuration means
_OFF = dict(kd_weight=0.0, stage2_block_weight=0.0)
_KD = dict(kd_weight=1.0, kd_temperature=2.0)
CONFIGS = {
    "joint-cos (paper)": (dict(stage1="joint", block_loss="cos", **_OFF), dict(**_OFF)),
    "joint-cos+kd (zoo 2026-12)": (dict(stage1="joint", block_loss="cos", **_KD, stage2_block_weight=0.0),
                                   dict(**_KD, stage2_block_weight=0.0)),
    "iso-cos": (dict(stage1="isolated", block_loss="cos", **_OFF), dict(**_KD, stage2_block_weight=0.0)),
    "iso-mse": (dict(stage1="isolated", block_loss="mse", **_OFF), dict(**_KD, stage2_block_weight=0.0)),
    "iso-cos+mse": (dict(stage1="isolated", block_loss="cos+mse", **_OFF), dict(**_KD, stage2_block_weight=0.0)),
    "iso-cos+mse+reg": (dict(stage1="isolated", block_loss="cos+mse", **_OFF),
                        dict(**_KD, stage2_block_weight=1.0)),
    "iso-cos+mse+reg-noCE": (dict(stage1="isolated", block_loss="cos+mse", **_OFF),
                             dict(**_KD, stage2_block_weight=1.0, ce_weight=0.0)),
}


def measure(teacher, student, test, minutes: float, stage: str, epochs: float) -> dict:
    r = block_fidelity(teacher, student, test, batch_size=500)
    row = {"stage": stage, "epochs": epochs, "minutes": minutes, "agreement": r["agreement"],
           "accuracy": r["student_accuracy"], "teacher_accuracy": r["teacher_accuracy"],
           "iso_cos": [b["isolated"]["cos"] for b in r["blocks"]], "in_cos": [b["in_model"]["cos"] for b in r["blocks"]],
           "iso_rel_mse": [b["isolated"]["rel_mse"] for b in r["blocks"]],
           "in_rel_mse": [b["in_model"]["rel_mse"] for b in r["blocks"]]}
    print(f"  {stage:7} ep {epochs:5.2f}  {minutes:6.1f} min  iso cos "
          + " ".join(f"{v:.3f}" for v in row["iso_cos"]) + "  in cos " + " ".join(f"{v:.3f}" for v in row["in_cos"])
          + f"  agree {100 * row['agreement']:.1f}%  acc {100 * row['accuracy']:.2f}%", flush=True)
    return row


def run_config(name, s1_kw, s2_kw, teacher, train, test, args, work: Path) -> dict:
    print(f"== {name}", flush=True)
    base = far.TrainConfig(epochs=args.stage1_epochs, batch_size=args.batch_size, lr=args.lr, warmup_epochs=0.1,
                           progress=False, log_every=50, seed=0, out_dir=str(work))
    steps = max(1, len(train) // args.batch_size)
    total = max(1, round(args.stage1_epochs * steps))
    rows, minutes, student = [], 0.0, None
    for c in range(1, args.chunks + 1):
        stop = math.ceil(c * total / args.chunks)
        cfg = far.TrainConfig(**{**base.__dict__, "max_steps": stop, "resume": c > 1})
        t0 = time.perf_counter()
        student = far.distill(teacher, train, config=cfg, stage2_epochs=0, **s1_kw)
        minutes += (time.perf_counter() - t0) / 60
        rows.append(measure(teacher, student, test, minutes, "stage1", stop / steps))
    if args.stage2_epochs > 0:
        cfg = far.TrainConfig(**{**base.__dict__, "epochs": 0, "out_dir": str(work / "s2")})
        t0 = time.perf_counter()
        student = far.distill(teacher, train, student=student, config=cfg, stage2_epochs=args.stage2_epochs,
                              stage2_lr=args.stage2_lr, **s2_kw)
        minutes += (time.perf_counter() - t0) / 60
        rows.append(measure(teacher, student, test, minutes, "stage2", args.stage1_epochs + args.stage2_epochs))
    return {"name": name, "stage1": s1_kw, "stage2": s2_kw, "curve": rows}


def plot(result: dict, path: Path):
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, cfg in enumerate(result["configs"]):
        color = f"C{i}"
        xs = [r["minutes"] for r in cfg["curve"]]
        mean = lambda k: [sum(r[k]) / len(r[k]) for r in cfg["curve"]]  # noqa: E731
        axes[0].plot(xs, mean("iso_cos"), "o-", color=color, label=cfg["name"])
        axes[0].plot(xs, mean("in_cos"), "s--", color=color, alpha=0.6)
        axes[1].plot(xs, [100 * r["agreement"] for r in cfg["curve"]], "o-", color=color)
        axes[2].plot(xs, [100 * r["accuracy"] for r in cfg["curve"]], "o-", color=color)
    t_acc = result["configs"][0]["curve"][0]["teacher_accuracy"]
    axes[2].axhline(100 * t_acc, color="k", ls=":", label="teacher")
    axes[0].axhline(0.95, color="gray", ls=":")
    axes[0].set_ylabel("mean block cosine to the teacher\n(solid: isolated, dashed: in the model)")
    axes[1].set_ylabel("top-1 agreement with the teacher (%)")
    axes[2].set_ylabel("test top-1 (%)")
    runs = result.get("runs", [result["environment"]])
    threads = sorted({r["threads"] for r in runs})
    xlabel = (f"training minutes ({threads[0]} CPU threads)" if len(runs) == 1 else
              f"training minutes ({len(runs)} runs, {'/'.join(map(str, threads))} CPU threads, shared CPU: rough)")
    for ax in axes:
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    fig.suptitle(f"distillation choices on {result['teacher']}: fidelity per minute "
                 f"({result['args']['test_images']} test images)")
    save_figure(fig, path, dpi=110)
    return str(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="fmnist_deit_tiny")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names of CONFIGS")
    p.add_argument("--train-images", type=int, default=None, help="default: all 60k")
    p.add_argument("--test-images", type=int, default=1000)
    p.add_argument("--stage1-epochs", type=float, default=3.0)
    p.add_argument("--stage2-epochs", type=float, default=1.0)
    p.add_argument("--chunks", type=int, default=3, help="fidelity measurements during stage 1")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--stage2-lr", type=float, default=2e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--append", action="store_true",
                   help="--out exists: keep its configurations and run only the missing ones (same settings)")
    args = p.parse_args(argv)
    if args.append and args.out is None:
        p.error("--append needs --out: the file whose configurations to keep")
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        sys.exit(f"unknown configs {unknown}; known: {list(CONFIGS)}")
    old = None
    if args.append and args.out.exists():  # before any work: it must be this benchmark's result
        try:
            old = read_json(args.out, "--append file")
        except ConfigError as e:
            sys.exit(str(e))
        if not (isinstance(old, dict) and old.get("benchmark") == "distill_ablation"
                and isinstance(old.get("configs"), list) and isinstance(old.get("args"), dict)):
            sys.exit(f"{args.out}: not a result of this benchmark (distill_ablation) to append to")
    torch.set_num_threads(args.threads)
    out = args.out or RESULTS / result_filename("distill_ablation")
    teacher = far.create_model(args.teacher, pretrained=True)
    train, test = fashion_mnist("train", limit=args.train_images), fashion_mnist("test", limit=args.test_images)
    result = {"benchmark": "distill_ablation", "teacher": args.teacher, "description": __doc__.split("\n\n")[0],
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "environment": environment(threads=args.threads), "configs": []}
    if old is not None:
        keys = ("teacher", "train_images", "test_images", "stage1_epochs", "stage2_epochs", "chunks", "batch_size",
                "lr", "stage2_lr")
        differ = [k for k in keys if old["args"].get(k) != result["args"].get(k)]
        if differ:
            sys.exit(f"--append: {args.out} was measured with other settings ({', '.join(differ)})")
        result["configs"] = old["configs"]
        result["runs"] = old.get("runs", [old["environment"]]) + [result["environment"]]
        done = {c["name"] for c in old["configs"]}
        names = [n for n in names if n not in done]
        print(f"appending to {args.out}: kept {sorted(done)}, running {names}", flush=True)
    for name in names:
        work = Path(tempfile.mkdtemp(prefix="far_ablate_"))
        try:
            result["configs"].append(run_config(name, *CONFIGS[name], teacher, train, test, args, work))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        write_json(out, result)  # after every configuration: a run cut short keeps what it measured
    print("wrote", out, plot(result, out.with_suffix(".png")) or "(no plot: matplotlib missing)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
