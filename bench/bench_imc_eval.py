#!/usr/bin/env python
"""Speed of emulated-IMC inference: images/s on emulated ReRAM crossbars vs the same model digital.

For each model it times, under torch.inference_mode on random inputs (speed does not depend on the data),
the digital forward pass and the emulated one (far.imc.emulate, ISAAC defaults: 8-bit weights in 2-bit
cells, 1-bit DAC, 8-bit ADC, 128-row tiles) on every crossbar backend that runs on --device (CPU: torch,
cpp; CUDA: torch, triton), without and with read noise, and reports images/s, the slowdown vs digital
(emulated time / digital time, same batch, same run) and the seconds a 10k-image test set would take.
Before a backend is timed its noiseless emulated output is checked against the torch backend's on the same
input (they must be bit-identical; a backend that fails has its rows flagged and not timed). The JSON is
rewritten after every row. FAR models are timed with the LSTM mapping(s) of --lstm-mappings (separate: W_ih
over all tokens + W_hh per step; fused: one [W_ih | W_hh] product per step).
Times are medians (CUDA events on a GPU). Models:

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
  python bench/bench_imc_eval.py --device cuda        # on a GPU (batch 1000 for the zoo; the issue's target:
                                                      # a zoo model's 10k test set in <= 30 s per setting)
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
from far.imc import EMULATED_LSTM_MAPPING, LSTM_MAPPINGS, emulate
from far.models import is_far
from far.models import load_model, resolve
from far.utils.env import device_name, environment, loadavg, resolve_device, result_filename
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


def default_batches(quick: bool, device: torch.device) -> tuple:
    """(zoo batch, DeiT-small block batch): a GPU needs large batches to fill it."""
    if quick:
        return 20, 2
    return (1000, 64) if device.type == "cuda" else (100, 8)


def cases(quick: bool, device: torch.device, batch=None, block_batch=None):
    """[(name, model, input [B, ...], dynamic)], on `device`."""
    out = []
    B, Bs = default_batches(quick, device)
    B, Bs = batch or B, block_batch or Bs
    g = torch.Generator().manual_seed(0)
    for name in ZOO:
        model, _ = load_model(resolve(name), device=str(device))
        out.append((name, model.eval(), torch.randn(B, 1, 28, 28, generator=g).to(device), "digital"))
    far_block, attn_block = deit_small_blocks()
    x = torch.randn(Bs, 197, 384, generator=g).to(device)
    out.append(("deit_small_far_block", far_block.to(device), x, "digital"))
    out.append(("deit_small_attention_block", attn_block.to(device), x, "crossbar"))
    return out


def backends(device: torch.device):
    """The crossbar backends this benchmark compares on `device` (those that can run there)."""
    op = far_kernels.ops.crossbar_matmul.GROUP_OP
    names = ("torch", "triton") if device.type == "cuda" else ("torch", "cpp")
    return [b for b in names if op.reason(b, device) is None]


def check_emulated(out: torch.Tensor, ref, reference: bool = False) -> dict:
    """A backend's noiseless emulated output against the torch backend's (`ref`) on the same model and input: without
    noise the crossbar backends compute the same integers and the same fp32 epilogue, so the outputs must be
    bit-identical. reference=True: this is the torch backend itself; only finiteness is checked."""
    finite = bool(torch.isfinite(out).all())
    if reference:
        return {"ok": finite, "finite": finite, "reference": True}
    if ref is None:
        return {"ok": False, "finite": finite, "error": "no finite torch-backend output to compare with"}
    same = bool(torch.equal(out, ref))
    diff = float((out.float() - ref.float()).abs().max()) if finite and out.shape == ref.shape else None
    return {"ok": finite and same, "bit_identical_to_torch": same, "max_abs_diff": diff, "finite": finite}


def run(args) -> dict:
    """Per model: the digital time, then per LSTM mapping and backend the noiseless emulation, checked against the
    torch backend's output (bit for bit) BEFORE it is timed, and the read-noise setting; a backend that fails its
    check has its rows flagged and not timed. The JSON (args.out_partial) is rewritten after every row."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    clean = CrossbarConfig()
    settings = [("no noise", clean)]
    if not args.no_noise:
        settings.append(("read_noise=0.02", CrossbarConfig(read_noise=0.02)))

    def save():
        if args.out_partial is not None:  # a run cut short keeps the rows it finished
            write_json(args.out_partial, _result(args, device, rows, partial=True))

    for name, model, x, dynamic in cases(args.quick, device, args.batch, args.block_batch):
        if args.models and name not in args.models:
            continue
        B = x.shape[0]
        with torch.inference_mode():
            dig = time_fn(lambda: model(x), device=device, min_reps=3, min_time_s=1.0 if not args.quick else 0.2)
        row = {"model": name, "batch": B, "input": list(x.shape), "dynamic": dynamic,
               "digital_ms": dig["ms"], "digital_images_per_s": B / dig["ms"] * 1e3, "emulated": []}
        rows.append(row)
        save()
        print(f"{name}: digital {row['digital_images_per_s']:.1f} images/s (batch {B})", flush=True)
        far_model = is_far(model)
        mappings = args.lstm_mappings if far_model else [None]  # attention: no LSTM to map
        for mapping in mappings:
            torch_out = None  # the torch backend's noiseless output: the others' check
            for be in backends(device):
                check = None
                for label, cfg in settings:
                    e = {"setting": label, "backend": be, "lstm_mapping": mapping}
                    try:
                        emu = emulate(model, cfg, backend=be, dynamic=dynamic,
                                      lstm_mapping=mapping or EMULATED_LSTM_MAPPING).eval()
                    except ValueError as err:  # e.g. nothing emulatable
                        print(f"  skip {be}: {err}")
                        break  # the same for every setting
                    warmup = 1
                    with torch.inference_mode():
                        if check is None:  # the noiseless setting comes first: check, then time
                            out = None
                            try:
                                out = emu(x)
                                check = check_emulated(out, torch_out, reference=be == "torch")
                                if be == "torch" and check["ok"]:
                                    torch_out = out
                                warmup = 0  # that call was the warm-up (compilation included)
                            except Exception as err:  # a backend that cannot run the model: recorded, the run goes on
                                check = {"ok": False, "error": f"{type(err).__name__}: {err}"[:300]}
                            del out
                        e["check"] = check
                        if not check["ok"]:
                            e["failed"] = check.get("error") or (
                                "noiseless output differs from the torch backend's "
                                f"(max abs diff {check.get('max_abs_diff')})"
                                if check.get("finite") else "non-finite output")
                            print(f"  {label:<16} {be:<6} {mapping or '':<8} FAILED {e['failed']}", flush=True)
                        else:
                            st = time_fn(lambda emu=emu: emu(x), device=device, reps=args.reps, min_time_s=0.0,
                                         warmup=warmup, warmup_s=0.0)
                    if check["ok"]:
                        ips = B / st["ms"] * 1e3
                        e.update(ms=st["ms"], ms_p10=st["ms_p10"], ms_p90=st["ms_p90"], runs=st["runs"],
                                 images_per_s=ips, slowdown_vs_digital=st["ms"] / dig["ms"],
                                 seconds_per_10k_images=1e4 / ips, minutes_per_10k_images=1e4 / ips / 60)
                        print(f"  {label:<16} {be:<6} {mapping or '':<8} {ips:8.2f} images/s  "
                              f"{e['slowdown_vs_digital']:7.1f}x digital  {e['seconds_per_10k_images']:8.1f} s / 10k",
                              flush=True)
                    row["emulated"].append(e)
                    save()  # after every row
                    del emu
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    return _result(args, device, rows)


def _result(args, device: torch.device, rows: list, partial: bool = False) -> dict:
    return {"benchmark": "imc_eval_speed", "device": str(device), "device_name": device_name(device),
            "threads": args.threads, "quick": args.quick, "partial": partial,
            "crossbar_config": "ISAAC defaults (CrossbarConfig())", "loadavg_after": loadavg(),
            "note": "every (model, LSTM mapping, backend) is checked before it is timed: its noiseless emulated output "
                    "equals the torch backend's bit for bit (check per row; a failing backend's rows are flagged "
                    "'failed' and not timed); ms = median of --reps timed batches; the JSON is rewritten per row",
            "environment": environment(args.threads), "results": rows}


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        print("matplotlib missing: no plot", file=sys.stderr)
        return
    rows = result["results"]
    labels = sorted({(e["setting"], e["backend"], e.get("lstm_mapping") or "") for r in rows for e in r["emulated"]})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(1, len(labels))
    for k, (setting, be, mapping) in enumerate(labels):
        xs, ips, slow = [], [], []
        for i, r in enumerate(rows):
            e = next((e for e in r["emulated"] if (e["setting"], e["backend"], e.get("lstm_mapping") or "")
                      == (setting, be, mapping)), None)
            if e is not None and "images_per_s" in e:  # a row that failed its check has no time
                xs.append(i + (k - (len(labels) - 1) / 2) * width)
                ips.append(e["images_per_s"])
                slow.append(e["slowdown_vs_digital"])
        tag = f"{be}, {setting}" + (f", {mapping} LSTM" if mapping else "")
        axes[0].bar(xs, ips, width, label=tag)
        axes[1].bar(xs, slow, width, label=tag)
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
    where = (result.get("device_name") if str(result.get("device", "cpu")).startswith("cuda")
             else f"{result['threads']} threads, {env.get('cpu_model', '')}")
    fig.suptitle(f"crossbar emulation speed, {where}, commit {str(env.get('git_commit', ''))[:8]}", fontsize=9)
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
    ap.add_argument("--lstm-mappings", default=EMULATED_LSTM_MAPPING, metavar="M[,M]",
                    help=f"FAR models' LSTM mappings to time, comma-separated ({', '.join(LSTM_MAPPINGS)}; "
                         "default %(default)s)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    ap.add_argument("--batch", type=int, help="zoo models' batch (default 100 on a CPU, 1000 on a GPU, 20 quick)")
    ap.add_argument("--block-batch", type=int, help="DeiT-small block cases' batch (default 8 CPU, 64 GPU, 2 quick)")
    ap.add_argument("--out", type=Path, help="JSON path (default bench/results/imc_eval_speed-<host>-<date>.json); "
                                             "rewritten after each row")
    args = ap.parse_args(argv)
    try:
        device = resolve_device(args.device, "--device")
    except ValueError as e:
        ap.error(str(e))
    for flag, v in (("--batch", args.batch), ("--block-batch", args.block_batch), ("--reps", args.reps),
                    ("--threads", args.threads)):
        if v is not None and v < 1:
            ap.error(f"{flag} must be >= 1, got {v}")
    known = [*ZOO, "deit_small_far_block", "deit_small_attention_block"]
    if args.models is not None and (not args.models or any(m not in known for m in args.models)):
        ap.error(f"--models: choose from {', '.join(known)}, got {' '.join(args.models) or 'none'}")
    args.lstm_mappings = [m.strip() for m in args.lstm_mappings.split(",") if m.strip()]
    if not args.lstm_mappings or any(m not in LSTM_MAPPINGS for m in args.lstm_mappings):
        ap.error(f"--lstm-mappings takes a comma-separated list of {', '.join(LSTM_MAPPINGS)}")
    args.device = str(device)
    out = args.out or (Path(tempfile.mkdtemp()) / "imc_eval_speed.json" if args.quick
                       else RESULTS / result_filename("imc_eval_speed"))
    args.out_partial = out
    result = run(args)
    write_json(out, result)
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
