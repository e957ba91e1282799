"""One FAR block distilled alone: its isolated cosine to the attention block per stage-1 LR, epochs or width (JSON + PNG).

Each point distils one block of the teacher (default: block 2 of the zoo's fmnist_deit_tiny, the hardest
to reproduce) alone — an isolated stage 1 with far.distill(blocks=[b], stage2_epochs=0), the other blocks
keep their attention — then measures that block's isolated cosine and relative MSE to the teacher on
--test-images held-out images (far.fidelity.block_fidelity). One setting varies (--vary), the others stay
at --lr, --epochs and --hidden-size (AdamW, warm-up 0.1 epoch, cosine decay, batch 64, seed 0, the training
defaults otherwise); every point starts from a new student of the same seed.

  --vary lr      how large a step an isolated block takes (far distill's isolated default, 1e-2, is not the
                 most faithful point: what a larger step does to the recurrent weights shows on a crossbar,
                 README "Faithful, but not on the crossbar")
  --vary epochs  whether training longer closes the gap to the target (0.95)
  --vary hidden  how many LSTM units per head and direction the block needs (the method's is n = head_dim)

    python bench/sweep_block_distill.py                                   # 6 LRs x 1 epoch: ~12 min on 1 thread
    python bench/sweep_block_distill.py --vary epochs --values 1,2,4,8,16 --threads 2
    python bench/sweep_block_distill.py --vary hidden --values 32,40,48,64 --epochs 4 --threads 2
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import far
from far.data import fashion_mnist
from far.fidelity import block_fidelity
from far.methods.recipes import STAGE1_LR
from far.nn import token_mixers
from far.utils.env import environment, result_filename
from far.utils.fs import write_json
from far.utils.plot import pyplot, save_figure

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_result_args, redraw  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
#: what each --vary sweeps by default, how its values parse, and the axis label of the plot
VARY = {
    "lr": ("3e-3,6e-3,1e-2,2e-2,4e-2,8e-2", float, "stage-1 peak learning rate (AdamW, cosine decay)"),
    "epochs": ("1,2,4,8,16", float, "stage-1 epochs (cosine decay over the run)"),
    "hidden": ("32,40,48,64", int, "LSTM units per head and direction"),
}
LSTM_PARAMS = ("w_ih", "w_hh", "b_ih", "b_hh", "lstm.")  # a FAR block's LSTM weights (padded or ragged storage)


def run_point(teacher, train, test, value, args) -> dict:
    lr = value if args.vary == "lr" else args.lr
    epochs = value if args.vary == "epochs" else args.epochs
    hidden = value if args.vary == "hidden" else args.hidden_size
    cfg = far.TrainConfig(epochs=epochs, lr=lr, batch_size=args.batch_size, warmup_epochs=0.1, seed=0, progress=False)
    t0 = time.perf_counter()
    student = far.distill(teacher, train, config=cfg, stage2_epochs=0, blocks=[args.block], hidden_sizes=hidden)
    minutes = (time.perf_counter() - t0) / 60
    block = token_mixers(student)[args.block]
    iso = block_fidelity(teacher, student, test, batch_size=500)["blocks"][args.block]["isolated"]
    w_hh = block.padded_params()[2].detach()
    row = {"value": value, "lr": lr, "epochs": epochs, "hidden_size": hidden if hidden is not None else block.head_dim,
           "lstm_params": sum(p.numel() for n, p in block.named_parameters() if n.startswith(LSTM_PARAMS)),
           "w_hh_rms": float(w_hh.square().mean().sqrt()), "minutes": minutes,
           "cos": iso["cos"], "rel_mse": iso["rel_mse"], "scale": iso["scale"]}
    print(f"  {args.vary} {value:<8g} {minutes:5.1f} min  isolated cos {iso['cos']:.4f}  rel mse {iso['rel_mse']:.4f}  "
          f"W_hh rms {row['w_hh_rms']:.3f}", flush=True)
    return row


def plot(result: dict, path: Path):
    plt = pyplot()
    if plt is None:
        return None
    a = result["args"]
    vary = a.get("vary", "lr")  # results written before --vary existed swept the LR
    points = result["points"]
    xs = [p.get("value", p["lr"]) for p in points]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    line = ax.semilogx if vary == "lr" else ax.plot
    if vary == "epochs":
        ax.set_xscale("log", base=2)
    line(xs, [p["cos"] for p in points], "o-", label="isolated cosine")
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.minorticks_off()
    ax.axhline(0.95, color="gray", ls=":", label="target 0.95")
    for x, p in zip(xs, points):
        ax.annotate(f"{p['cos']:.3f}", (x, p["cos"]), textcoords="offset points", xytext=(0, 6), ha="center",
                    fontsize=7)
    ax.set_xlabel(VARY[vary][2])
    ax.set_ylabel(f"block {a['block']} cosine to its attention block")
    fixed = [f"{a['epochs']:g} epoch(s)" if vary != "epochs" else None,
             f"LR {a.get('lr') or STAGE1_LR['isolated']:g}" if vary != "lr" else None,
             f"hidden {a['hidden_size']}" if vary != "hidden" and a.get("hidden_size") else None]
    ax.set_title(f"{a['teacher']} block {a['block']} alone, " + ", ".join(f for f in fixed if f)
                 + f", batch {a['batch_size']}\n({a['test_images']} test images)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=110)
    return str(path)


def parse_values(text: str, vary: str) -> list:
    kind = VARY[vary][1]
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        sys.exit(f"--values for --vary {vary} must be comma-separated {'integers' if kind is int else 'numbers'}, "
                 f"got {text!r}")
    if not values or any(not v > 0 for v in values):
        sys.exit(f"--values must be positive, got {text!r}")
    return sorted(set(values))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--teacher", default="fmnist_deit_tiny")
    p.add_argument("--block", type=int, default=2, help="the block distilled alone")
    p.add_argument("--vary", choices=tuple(VARY), default="lr", help="the setting swept (default: lr)")
    p.add_argument("--values", default=None,
                   help="comma-separated values of --vary (defaults: " + "; ".join(f"{k} {v[0]}" for k, v in VARY.items())
                   + ")")
    p.add_argument("--lrs", default=None, help="the same as --vary lr --values LRS (the script's former option)")
    p.add_argument("--lr", type=float, default=STAGE1_LR["isolated"],
                   help="peak LR when it is not varied (default: far distill's isolated stage 1, %(default)g)")
    p.add_argument("--epochs", type=float, default=1.0, help="stage-1 epochs when they are not varied")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hidden-size", type=int, default=None,
                   help="LSTM units per head and direction when not varied (default head_dim)")
    p.add_argument("--train-images", type=int, default=None, help="default: all 60k")
    p.add_argument("--test-images", type=int, default=1000)
    add_result_args(p)
    args = p.parse_args(argv)
    if redraw(args, plot) is not None:
        return 0
    if args.lrs is not None:
        if args.vary != "lr" or args.values is not None:
            sys.exit("--lrs is --vary lr --values LRS: give one or the other")
        args.values = args.lrs
    values = parse_values(args.values or VARY[args.vary][0], args.vary)
    for name in ("lr", "epochs"):
        if not getattr(args, name) > 0:
            sys.exit(f"--{name} must be positive, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    teacher = far.create_model(args.teacher, pretrained=True)
    depth = len(teacher.blocks)
    if not 0 <= args.block < depth:
        sys.exit(f"--block {args.block}: the teacher has blocks 0-{depth - 1}")
    train, test = fashion_mnist("train", limit=args.train_images), fashion_mnist("test", limit=args.test_images)
    name = {"lr": "distill_lr", "epochs": "distill_epochs", "hidden": "distill_width"}[args.vary]
    out = args.out or RESULTS / result_filename(name)
    result = {"benchmark": name, "description": __doc__.split("\n\n")[0],
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "environment": environment(threads=args.threads), "points": []}
    print(f"block {args.block} of {args.teacher}, {args.vary} = {', '.join(f'{v:g}' for v in values)}", flush=True)
    for value in values:
        result["points"].append(run_point(teacher, train, test, value, args))
        write_json(out, result)  # after every point: a run cut short keeps what it measured
    best = max(result["points"], key=lambda q: q["cos"])
    result["best"] = {"value": best["value"], "cos": best["cos"]}
    if args.vary == "lr":
        result["best_lr"] = best["lr"]
    reached = [q for q in result["points"] if q["cos"] >= 0.95]
    result["first_at_target"] = reached[0]["value"] if reached else None
    write_json(out, result)
    print(f"best: {args.vary} {best['value']:g} (isolated cos {best['cos']:.4f}); "
          + (f"0.95 first reached at {args.vary} {reached[0]['value']:g}" if reached else "0.95 not reached"))
    print("wrote", out, plot(result, out.with_suffix(".png")) or "(no plot: matplotlib missing)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
