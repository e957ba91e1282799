"""A trained FAR student's blocks polished by full-batch L-BFGS: isolated cosine per round and minute (JSON + PNG).

For each --blocks block of --student (default: the zoo's fmnist_far_tiny, blocks 0-3), the polish of
`far distill --polish-iters` (far.methods.polish.polish_block) runs on the teacher's block inputs and outputs
for the first --images training images, in rounds of --every iterations; after each round the block's isolated
cosine to its attention block (far.fidelity's "cos": along tokens per channel, averaged) is measured on the first
--test-images test images, with the round's wall time (the test pass not counted). What it answers: how much
fidelity a second-order finish adds to a stage 1 that Adam has levelled off, per CPU-minute, and whether it moves
the recurrent weights (W_hh RMS, which matters on a crossbar: README "Faithful, but not on the crossbar").

    python bench/polish_curve.py --threads 2                               # 4 blocks x 100 iterations: ~40 min
    python bench/polish_curve.py --blocks 2 --iters 200 --every 20 --threads 2
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from far.data import fashion_mnist
from far.fidelity import BlockStats
from far.methods.polish import block_problem, full_batch_loss, polish_block
from far.models import load_model
from far.nn import FARAttention, token_mixers
from far.utils.env import environment, result_filename
from far.utils.fs import write_json
from far.utils.plot import pyplot, save_figure

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_result_args, redraw  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def isolated_cos(mix: FARAttention, inputs: torch.Tensor, targets: torch.Tensor, chunk: int = 500) -> float:
    stats = BlockStats(mix.num_heads)
    with torch.no_grad():
        for i in range(0, len(inputs), chunk):
            stats.add(mix.token_mix(inputs[i:i + chunk]), targets[i:i + chunk])
    return stats.result()["cos"]


def w_hh_rms(mix: FARAttention) -> float:
    w = mix.padded_params()[1].detach()
    kept = w != 0  # padded units are exactly zero
    return float(w[kept].square().mean().sqrt()) if kept.any() else 0.0


def run_block(teacher, student, train, test, b: int, args) -> dict:
    mix = token_mixers(student)[b]
    x, t = block_problem(teacher, train, b, args.images, 500, "cpu")
    tx, tt = block_problem(teacher, test, b, args.test_images, 500, "cpu")
    start = {"test_cos": isolated_cos(mix, tx, tt), "loss": full_batch_loss(mix, x, t, args.kind, 500)["loss"],
             "w_hh_rms": w_hh_rms(mix)}
    points = []
    clock = {"seconds": 0.0, "t0": time.perf_counter()}

    def on_round(iters: int, loss: float) -> None:
        clock["seconds"] += time.perf_counter() - clock["t0"]
        cos = isolated_cos(mix, tx, tt)
        points.append({"iters": iters, "seconds": round(clock["seconds"], 2), "loss": loss, "test_cos": cos})
        print(f"  block {b}  {iters:4d} iterations  {clock['seconds'] / 60:5.1f} min  loss {loss:.5f}  "
              f"isolated cos {cos:.4f}", flush=True)
        clock["t0"] = time.perf_counter()

    r = polish_block(mix, x, t, args.iters, args.kind, chunk=500, every=args.every, on_round=on_round)
    end = {"test_cos": isolated_cos(mix, tx, tt), "loss": r["loss"], "w_hh_rms": w_hh_rms(mix), "evals": r["evals"],
           "iters": r["iters"], "kept": r["kept"], "seconds": round(clock["seconds"], 2)}
    print(f"block {b}: isolated cos {start['test_cos']:.4f} -> {end['test_cos']:.4f} in {end['seconds'] / 60:.1f} min "
          f"({r['iters']} iterations, {r['evals']} evaluations); W_hh RMS {start['w_hh_rms']:.3f} -> "
          f"{end['w_hh_rms']:.3f}", flush=True)
    return {"block": b, "start": start, "points": points, "end": end}


def plot(result: dict, path: Path):
    plt = pyplot()
    if plt is None:
        return None
    a = result["args"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for blk in result["blocks"]:
        xs = [0.0] + [p["seconds"] / 60 for p in blk["points"]]
        ys = [blk["start"]["test_cos"]] + [p["test_cos"] for p in blk["points"]]
        ax.plot(xs, ys, "o-", ms=3, label=f"block {blk['block']}: {ys[0]:.3f} -> {ys[-1]:.3f}")
    ax.axhline(0.95, color="gray", ls=":", label="target 0.95")
    ax.set_xlabel(f"minutes of L-BFGS ({result['environment'].get('threads', '?')} threads; test passes not counted)")
    ax.set_ylabel("isolated cosine to the attention block")
    ax.set_title(f"{a['student']} polished: {a['images']} training images cached per block, {a['kind']}\n"
                 f"(isolated cosine on {a['test_images']} test images, every {a['every']} iterations)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=110)
    return str(path)


def parse_blocks(text: str, depth: int) -> list:
    try:
        blocks = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        sys.exit(f"--blocks must be comma-separated block numbers, got {text!r}")
    if not blocks or any(not 0 <= b < depth for b in blocks):
        sys.exit(f"--blocks {text!r}: the student has blocks 0-{depth - 1}")
    return blocks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--teacher", default="fmnist_deit_tiny", help="the attention teacher (zoo name or checkpoint)")
    p.add_argument("--student", default="fmnist_far_tiny", help="a FAR model (zoo name or checkpoint)")
    p.add_argument("--blocks", default=None, help="comma-separated FAR blocks (default: every one)")
    p.add_argument("--iters", type=int, default=100, help="L-BFGS iterations per block")
    p.add_argument("--every", type=int, default=10, help="iterations between measurements")
    p.add_argument("--images", type=int, default=10_000, help="training images cached per block")
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--kind", choices=("cos", "mse", "cos+mse"), default="cos+mse", help="the block loss polished")
    add_result_args(p)
    args = p.parse_args(argv)
    if redraw(args, plot) is not None:
        return 0
    for name in ("iters", "every", "images", "test_images", "threads"):
        if getattr(args, name) < 1:
            sys.exit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    teacher, _ = load_model(args.teacher)
    student, _ = load_model(args.student)
    mixers = token_mixers(student)
    far_blocks = [i for i, m in enumerate(mixers) if isinstance(m, FARAttention)]
    blocks = parse_blocks(args.blocks, len(mixers)) if args.blocks else far_blocks
    if not set(blocks) <= set(far_blocks):
        sys.exit(f"--blocks: {sorted(set(blocks) - set(far_blocks))} are not FAR blocks of {args.student}")
    train, test = fashion_mnist("train"), fashion_mnist("test")
    out = args.out or RESULTS / result_filename("polish_curve")
    result = {"benchmark": "polish_curve", "description": __doc__.split("\n\n")[0],
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "environment": environment(threads=args.threads), "blocks": []}
    for b in blocks:
        result["blocks"].append(run_block(teacher, student, train, test, b, args))
        write_json(out, result)  # after every block: a run cut short keeps what it measured
    print("wrote", out, plot(result, out.with_suffix(".png")) or "(no plot: matplotlib missing)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
