#!/usr/bin/env python
"""Speed of emulated-IMC inference: images/s on emulated ReRAM crossbars vs the same model digital.

For each model it times, under torch.inference_mode on random inputs (speed does not depend on the data),
the digital forward pass and the emulated one (far.imc.emulate, ISAAC defaults: 8-bit weights in 2-bit
cells, 1-bit DAC, 8-bit ADC, 128-row tiles) on every crossbar backend available here, without and with
read noise, and reports images/s and the slowdown vs digital (emulated time / digital time, same batch,
same run). Models:

  fmnist_deit_tiny, fmnist_far_tiny, fmnist_far_tiny_pruned   the bundled zoo (28x28 Fashion-MNIST)
  deit_small_far_block                                          one DeiT-small-shaped FAR block (C=384,
                                                                6 heads, 64 units, 197 tokens), random init
  deit_small_attention_block                                    a timm DeiT-small attention block, K and V
                                                                written into crossbars (dynamic="crossbar")

The question it answers (issue: "emulated-IMC accuracy at full-test-set speed"): can a 10k-image test set be
emulated in minutes, and how far is the emulator from the digital model (a floor of ~(weight slices x input
slices) integer products per weight product, see docs/design.md). Writes JSON + a PNG under bench/results/.

Examples:
  python bench/bench_imc_eval.py --quick              # smoke run (small batch), temp dir
  python bench/bench_imc_eval.py                      # full run: on a quiet machine
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

import far
import far_kernels
from far.imc import emulate
from far.models import load_model, resolve
from far.utils.env import environment, loadavg, result_filename
from far.utils.fs import write_json
from far.utils.plot import pyplot, save_figure
from far_kernels import CrossbarConfig
from far_kernels.benchmark import time_fn

RESULTS = Path(__file__).resolve().parent / "results"
ZOO = ("fmnist_deit_tiny", "fmnist_far_tiny", "fmnist_far_tiny_pruned")


class Block(nn.Module):
    """A token mixer alone, x [B, N, C] -> [B, N, C] (the unit the emulator replaces)."""

    def __init__(self, mixer: nn.Module):
        super().__init__()
        self.attn = mixer

    def forward(self, x):
        return self.attn(x)


def deit_small_blocks():
    from timm.models.vision_transformer import Attention

    torch.manual_seed(0)
    far_block = Block(far.FARAttention(384, num_heads=6, hidden_sizes=64)).eval()
    attn_block = Block(Attention(384, num_heads=6, qkv_bias=True)).eval()
    return far_block, attn_block


def cases(quick: bool):
    """[(name, model, input [B, ...], dynamic)]."""
    out = []
    B = 20 if quick else 100
    for name in ZOO:
        model, _ = load_model(resolve(name))
        out.append((name, model.eval(), torch.randn(B, 1, 28, 28), "digital"))
    far_block, attn_block = deit_small_blocks()
    Bs = 2 if quick else 8
    x = torch.randn(Bs, 197, 384)
    out.append(("deit_small_far_block", far_block, x, "digital"))
    out.append(("deit_small_attention_block", attn_block, x, "crossbar"))
    return out


def backends():
    op = far_kernels.ops.crossbar_matmul.GROUP_OP
    return [b for b in ("torch", "cpp") if op.reason(b, "cpu") is None]


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    rows = []
    settings = [("no noise", CrossbarConfig())]
    if not args.no_noise:
        settings.append(("read_noise=0.02", CrossbarConfig(read_noise=0.02)))
    for name, model, x, dynamic in cases(args.quick):
        if args.models and name not in args.models:
            continue
        B = x.shape[0]
        with torch.inference_mode():
            dig = time_fn(lambda: model(x), min_reps=3, min_time_s=1.0 if not args.quick else 0.2)
        row = {"model": name, "batch": B, "input": list(x.shape), "dynamic": dynamic,
               "digital_ms": dig["ms"], "digital_images_per_s": B / dig["ms"] * 1e3, "emulated": []}
        print(f"{name}: digital {row['digital_images_per_s']:.1f} images/s (batch {B})", flush=True)
        for label, cfg in settings:
            for be in backends():
                try:
                    emu = emulate(model, cfg, backend=be, dynamic=dynamic).eval()
                except ValueError as e:  # e.g. nothing emulatable
                    print(f"  skip {label} {be}: {e}")
                    continue
                with torch.inference_mode():
                    st = time_fn(lambda: emu(x), min_reps=args.reps, min_time_s=0.0, warmup=1, warmup_s=0.0)
                ips = B / st["ms"] * 1e3
                e = {"setting": label, "backend": be, "ms": st["ms"], "ms_p10": st["ms_p10"], "ms_p90": st["ms_p90"],
                     "runs": st["runs"], "images_per_s": ips, "slowdown_vs_digital": st["ms"] / dig["ms"],
                     "minutes_per_10k_images": 1e4 / ips / 60}
                row["emulated"].append(e)
                print(f"  {label:<16} {be:<6} {ips:8.2f} images/s  {e['slowdown_vs_digital']:7.1f}x digital  "
                      f"{e['minutes_per_10k_images']:6.1f} min / 10k", flush=True)
                del emu
        rows.append(row)
    return {"benchmark": "imc_eval_speed", "threads": args.threads, "quick": args.quick,
            "crossbar_config": "ISAAC defaults (CrossbarConfig())", "loadavg_after": loadavg(),
            "environment": environment(args.threads), "results": rows}


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        print("matplotlib missing: no plot", file=sys.stderr)
        return
    rows = result["results"]
    labels = sorted({(e["setting"], e["backend"]) for r in rows for e in r["emulated"]})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(1, len(labels))
    for k, (setting, be) in enumerate(labels):
        xs, ips, slow = [], [], []
        for i, r in enumerate(rows):
            e = next((e for e in r["emulated"] if (e["setting"], e["backend"]) == (setting, be)), None)
            if e is not None:
                xs.append(i + (k - (len(labels) - 1) / 2) * width)
                ips.append(e["images_per_s"])
                slow.append(e["slowdown_vs_digital"])
        axes[0].bar(xs, ips, width, label=f"{be}, {setting}")
        axes[1].bar(xs, slow, width, label=f"{be}, {setting}")
    for ax in axes:
        ax.set_xticks(range(len(rows)), [r["model"] for r in rows], rotation=20, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("emulated images/s (log)")
    axes[1].set_ylabel("emulated time / digital time (log)")
    axes[1].axhline(40, color="#a33", ls="--", lw=1, label="40x (target, zoo models)")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    env = result["environment"]
    fig.suptitle(f"crossbar emulation speed, {result['threads']} threads, {env.get('cpu_model', '')}, "
                 f"commit {str(env.get('git_commit', ''))[:8]}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    ap.add_argument("--reps", type=int, default=3, help="timed emulated batches per case (median reported)")
    ap.add_argument("--models", nargs="*", help=f"only these cases ({', '.join(ZOO)}, deit_small_far_block, "
                                                "deit_small_attention_block)")
    ap.add_argument("--no-noise", action="store_true", help="skip the read-noise setting")
    ap.add_argument("--quick", action="store_true", help="small batches, written to a temporary folder")
    ap.add_argument("--out", type=Path, help="JSON path (default bench/results/imc_eval_speed-<host>-<date>.json)")
    args = ap.parse_args(argv)
    out = args.out or (Path(tempfile.mkdtemp()) / "imc_eval_speed.json" if args.quick
                       else RESULTS / result_filename("imc_eval_speed"))
    result = run(args)
    write_json(out, result)
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
