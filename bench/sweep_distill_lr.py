"""Stage 1's learning rate: how well one FAR block learns its attention block, per peak LR (JSON + PNG).

Each point distils one block of the teacher (default: block 2 of the zoo's fmnist_deit_tiny, the hardest
to reproduce) alone — an isolated stage 1 with far.distill(blocks=[b], stage2_epochs=0), the other blocks
keep their attention — for --epochs at one peak LR (AdamW, warm-up 0.1 epoch, cosine decay, batch 64,
the training defaults otherwise, seed 0), then measures that block's isolated cosine and relative MSE to
the teacher on --test-images held-out images (far.fidelity.block_fidelity). Every LR starts from the same
student. A larger step buys fidelity fast, but what it does to the recurrent weights shows on a crossbar
(README "Faithful, but not on the crossbar"): `far distill`'s isolated default is 1e-2, not the best point.

    python bench/sweep_distill_lr.py                                  # 6 LRs x 1 epoch: ~12 min on 1 CPU thread
    python bench/sweep_distill_lr.py --lrs 1e-3,4e-2 --epochs 0.25 --train-images 8192 --test-images 200
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import far
from far.data import fashion_mnist
from far.fidelity import block_fidelity
from far.utils.env import environment, result_filename
from far.utils.fs import write_json
from far.utils.plot import pyplot, save_figure

RESULTS = Path(__file__).resolve().parent / "results"


def run_point(teacher, train, test, lr: float, args) -> dict:
    cfg = far.TrainConfig(epochs=args.epochs, lr=lr, batch_size=args.batch_size, warmup_epochs=0.1, seed=0,
                          progress=False)
    t0 = time.perf_counter()
    student = far.distill(teacher, train, config=cfg, stage2_epochs=0, blocks=[args.block],
                          hidden_sizes=args.hidden_size)
    minutes = (time.perf_counter() - t0) / 60
    iso = block_fidelity(teacher, student, test, batch_size=500)["blocks"][args.block]["isolated"]
    row = {"lr": lr, "minutes": minutes, "cos": iso["cos"], "rel_mse": iso["rel_mse"], "scale": iso["scale"]}
    print(f"  lr {lr:8.1e}  {minutes:5.1f} min  isolated cos {iso['cos']:.4f}  rel mse {iso['rel_mse']:.4f}",
          flush=True)
    return row


def plot(result: dict, path: Path):
    plt = pyplot()
    if plt is None:
        return None
    a = result["args"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lrs = [p["lr"] for p in result["points"]]
    ax.semilogx(lrs, [p["cos"] for p in result["points"]], "o-", label="isolated cosine")
    ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
    ax.minorticks_off()
    ax.axhline(0.95, color="gray", ls=":", label="target 0.95")
    best = max(result["points"], key=lambda p: p["cos"])
    ax.annotate(f"{best['cos']:.3f}", (best["lr"], best["cos"]), textcoords="offset points", xytext=(0, 6),
                ha="center", fontsize=8)
    ax.set_xlabel("stage-1 peak learning rate (AdamW, cosine decay)")
    ax.set_ylabel(f"block {a['block']} cosine to its attention block")
    ax.set_title(f"{a['teacher']} block {a['block']} alone, {a['epochs']:g} epoch(s), batch {a['batch_size']}\n"
                 f"({a['test_images']} test images)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=110)
    return str(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="fmnist_deit_tiny")
    p.add_argument("--block", type=int, default=2, help="the block distilled alone")
    p.add_argument("--lrs", default="3e-3,6e-3,1e-2,2e-2,4e-2,8e-2", help="comma-separated peak LRs")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hidden-size", type=int, default=None, help="LSTM units per head and direction (default head_dim)")
    p.add_argument("--train-images", type=int, default=None, help="default: all 60k")
    p.add_argument("--test-images", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--plot-only", action="store_true", help="redraw the PNG of an existing --out JSON")
    args = p.parse_args(argv)
    if args.plot_only:
        if args.out is None or not args.out.is_file():
            sys.exit("--plot-only needs --out, an existing result JSON")
        print("wrote", plot(json.loads(args.out.read_text()), args.out.with_suffix(".png")))
        return 0
    try:
        lrs = [float(v) for v in args.lrs.split(",") if v.strip()]
    except ValueError:
        sys.exit(f"--lrs must be comma-separated numbers, got {args.lrs!r}")
    if not lrs or any(not lr > 0 for lr in lrs):
        sys.exit(f"--lrs must be positive numbers, got {args.lrs!r}")
    torch.set_num_threads(args.threads)
    teacher = far.create_model(args.teacher, pretrained=True)
    depth = len(teacher.blocks)
    if not 0 <= args.block < depth:
        sys.exit(f"--block {args.block}: the teacher has blocks 0-{depth - 1}")
    train, test = fashion_mnist("train", limit=args.train_images), fashion_mnist("test", limit=args.test_images)
    out = args.out or RESULTS / result_filename("distill_lr")
    result = {"benchmark": "distill_lr", "description": __doc__.split("\n\n")[0],
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "environment": environment(threads=args.threads), "points": []}
    print(f"block {args.block} of {args.teacher}, {args.epochs:g} epoch(s) per LR", flush=True)
    for lr in sorted(lrs):
        result["points"].append(run_point(teacher, train, test, lr, args))
        write_json(out, result)  # after every point: a run cut short keeps what it measured
    best = max(result["points"], key=lambda q: q["cos"])
    result["best_lr"] = best["lr"]
    write_json(out, result)
    print(f"best: lr {best['lr']:g} (isolated cos {best['cos']:.4f})")
    print("wrote", out, plot(result, out.with_suffix(".png")) or "(no plot: matplotlib missing)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
