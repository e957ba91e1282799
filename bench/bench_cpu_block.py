#!/usr/bin/env python
"""CPU benchmark of the whole FAR attention-replacement block (pre_proj -> BiLSTM mixing -> head_proj -> proj).

For DeiT-tiny / DeiT-small block shapes (d = n = 64), fp32, under torch.inference_mode, it times four
implementations of the same function (same parameters, every output checked before timing against the
float64 block, FARAttention.forward_reference, with the tests' derived tolerance: recorded, no asserts)
and the attention block FAR replaces:

  per_head_lstm      torch.nn.LSTM(d, n, bidirectional=True) called once per head, per-head
                     head_proj Linear, concat, proj: the natural way to write FAR in PyTorch.
  dense_masked_lstm  the public FAR code's form: one dense nn.LSTM(H*d, H*n, bidirectional=True)
                     whose W_ih / W_hh are block-diagonal (masked once, before timing, so no
                     per-call masking cost is counted), then one dense block-structured
                     Linear(2*H*n, H*d) as head_proj, then proj.
  far_torch          far.FARAttention(x, backend="torch"): batched GEMMs + the reference scan.
  far_cpp            far.FARAttention(x, backend="cpp"): batched GEMMs + the C++ scan.
  attention_sdpa     timm Attention(C, H, qkv_bias=True) with SDPA at the same shape (checked against
                     its float64 copy).

Timing: the variants are timed in --rounds interleaved rounds (a change of machine load hits all of
them alike); per variant the median over every timed call, p10/p90, the per-round medians and their
spread; the load average is recorded per case and the thread count in the environment.

Reported per case: median ms (p10/p90 in the JSON), GFLOP/s of the FAR block's *useful* FLOPs
(the same count for every variant, so the dense variant's masked-out work counts as waste), the
floor ms = FLOPs / peak with peak = measured GFLOP/s of a large fp32 torch.mm at the same thread
count, and the cpp speed-ups over the two PyTorch baselines. Writes JSON and a PNG plot.

On a shared machine use fewer threads than idle cores (e.g. --threads 1): when other processes
take the cores, OpenMP/oneDNN barriers wait for descheduled threads and times inflate 10-100x.

Examples:
  python bench/bench_cpu_block.py --quick                       # smoke run, writes to a temp dir
  python bench/bench_cpu_block.py --shapes tiny --T 50 --B 1,8
  python bench/bench_cpu_block.py                               # full grid: run on a quiet machine
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import check_attention, check_output, run_flags, time_variants, timm_attention  # noqa: E402

import far  # noqa: E402
import far_kernels  # noqa: E402
from far.utils.env import environment, loadavg, result_filename  # noqa: E402
from far.utils.fs import write_json  # noqa: E402
from far.utils.plot import pyplot, save_figure  # noqa: E402
from far_kernels.benchmark import peak_mm_gflops  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

SHAPES = {"tiny": (192, 3), "small": (384, 6)}  # name -> (C, H); d = n = C / H = 64
VARIANTS = ("per_head_lstm", "dense_masked_lstm", "far_torch", "far_cpp", "attention_sdpa")
FAR_VARIANTS = VARIANTS[:4]
SLOW = 32 * 197  # --skip-slow skips timing far_torch at B*T >= this


def block_flops(C: int, H: int, d: int, n: int, tokens: int) -> int:
    """Useful FLOPs of one FAR block (DESIGN.md "Cost"): per token pre_proj 2C^2, block-diagonal
    input GEMM 2*2H*4n*d, recurrent 2*2H*4n*n, head_proj 2*H*d*2n, proj 2C^2 (C = H*d here)."""
    per_token = 2 * C * C + 2 * (2 * H * 4 * n * d) + 2 * (2 * H * 4 * n * n) + 2 * (H * d * 2 * n) + 2 * C * C
    return per_token * tokens


def _uniform_width(m: far.FARAttention) -> int:
    n = m.width
    if not bool((m.hidden_sizes == n).all()):
        raise ValueError("the nn.LSTM baselines need the same hidden size for every (direction, head)")
    return n


class PerHeadLSTM(nn.Module):
    """H torch.nn.LSTM(d, n, bidirectional=True) and H Linear(2n, d), parameters copied from m."""

    def __init__(self, m: far.FARAttention) -> None:
        super().__init__()
        H, d, n = m.num_heads, m.head_dim, _uniform_width(m)
        self.head_dim = d
        self.pre_proj, self.proj = m.pre_proj, m.proj  # shared, not copied
        self.lstms = nn.ModuleList(nn.LSTM(d, n, bidirectional=True, batch_first=True) for _ in range(H))
        self.head_projs = nn.ModuleList(nn.Linear(2 * n, d) for _ in range(H))
        with torch.no_grad():
            for h, (lstm, hp) in enumerate(zip(self.lstms, self.head_projs)):
                for direction, sfx in ((0, ""), (1, "_reverse")):
                    for name, t in zip(("weight_ih", "weight_hh", "bias_ih", "bias_hh"), m.lstm_params(direction, h)):
                        getattr(lstm, f"{name}_l0{sfx}").copy_(t)
                w, b = m.head_proj_params(h)
                hp.weight.copy_(w)
                hp.bias.copy_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xh = self.pre_proj(x)
        d = self.head_dim
        outs = [hp(lstm(xh[..., h * d:(h + 1) * d])[0]) for h, (lstm, hp) in enumerate(zip(self.lstms, self.head_projs))]
        return self.proj(torch.cat(outs, dim=-1))


class DenseMaskedLSTM(nn.Module):
    """One dense nn.LSTM(H*d, H*n, bidirectional=True) with block-diagonal weights and one dense
    block-structured Linear(2*H*n, H*d): the same function as m, computed with H x the LSTM FLOPs."""

    def __init__(self, m: far.FARAttention) -> None:
        super().__init__()
        H, d, n = m.num_heads, m.head_dim, _uniform_width(m)
        self.pre_proj, self.proj = m.pre_proj, m.proj
        self.lstm = nn.LSTM(H * d, H * n, bidirectional=True, batch_first=True)
        self.head_proj = nn.Linear(2 * H * n, H * d)
        with torch.no_grad():
            for p in self.lstm.parameters():
                p.zero_()
            self.head_proj.weight.zero_()
            for direction, sfx in ((0, ""), (1, "_reverse")):
                w_ih = getattr(self.lstm, f"weight_ih_l0{sfx}").view(4, H, n, H, d)  # rows (gate, head, unit)
                w_hh = getattr(self.lstm, f"weight_hh_l0{sfx}").view(4, H, n, H, n)
                b_ih = getattr(self.lstm, f"bias_ih_l0{sfx}").view(4, H, n)
                b_hh = getattr(self.lstm, f"bias_hh_l0{sfx}").view(4, H, n)
                for h in range(H):
                    wi, wh, bi, bh = m.lstm_params(direction, h)
                    w_ih[:, h, :, h, :] = wi.view(4, n, d)
                    w_hh[:, h, :, h, :] = wh.view(4, n, n)
                    b_ih[:, h] = bi.view(4, n)
                    b_hh[:, h] = bh.view(4, n)
            hp = self.head_proj.weight.view(H, d, 2, H, n)  # input = [fwd (head, unit) | bwd (head, unit)]
            for h in range(H):
                w, b = m.head_proj_params(h)
                hp[h, :, :, h, :] = w.view(d, 2, n)
                self.head_proj.bias[h * d:(h + 1) * d] = b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.head_proj(self.lstm(self.pre_proj(x))[0]))


def _ints(s: str):
    return [int(v) for v in s.split(",") if v]


def _names(s: str, allowed):
    out = [v for v in s.split(",") if v]
    bad = [v for v in out if v not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {list(allowed)}")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--shapes", type=lambda s: _names(s, SHAPES), default=None,
                   help="comma list of block shapes: tiny (C=192, H=3), small (C=384, H=6); default tiny,small")
    p.add_argument("--T", type=_ints, default=None, help="comma list of sequence lengths; default 197,50")
    p.add_argument("--B", type=_ints, default=None, help="comma list of batch sizes; default 1,8,32")
    p.add_argument("--variants", type=lambda s: _names(s, VARIANTS), default=list(VARIANTS),
                   help=f"comma list of variants to time; default {','.join(VARIANTS)}")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch (and OpenMP scan) threads; default torch's (%(default)s here)")
    p.add_argument("--reps", type=int, default=None,
                   help="timed runs per (case, variant, round); default adaptive: >= 3 runs and ~--min-time/--rounds s")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds per case (default 3; --quick 1)")
    p.add_argument("--min-reps", type=int, default=None, help="the peak measurement: at least this many runs (default 5)")
    p.add_argument("--min-time", type=float, default=None, help="adaptive mode: ~seconds of timed runs (default 1.0)")
    p.add_argument("--warmup-s", type=float, default=None, help="warm-up per (case, variant): >= 2 runs and this many s (default 0.2)")
    p.add_argument("--peak-size", type=int, default=None, help="size of the square fp32 torch.mm that measures the peak (default 2048)")
    p.add_argument("--skip-slow", action="store_true", help=f"do not time far_torch where B*T >= {SLOW} (its output is still checked)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path; default bench/results/cpu_block-<host>-<YYYYMMDD>.json (--quick: a temp dir)")
    p.add_argument("--plot", type=Path, default=None, help="PNG path; default the JSON path with .png")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny, T=50, B=1,2, 3 short runs, 512^3 peak; output to a temp dir unless --out")
    a = p.parse_args(argv)
    quick = {"shapes": ["tiny"], "T": [50], "B": [1, 2], "min_reps": 3, "min_time": 0.02, "warmup_s": 0.0, "peak_size": 512,
             "rounds": 1}
    full = {"shapes": ["tiny", "small"], "T": [197, 50], "B": [1, 8, 32], "min_reps": 5, "min_time": 1.0, "warmup_s": 0.2,
            "peak_size": 2048, "rounds": 3}
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.out is None:
        a.out = (Path(tempfile.gettempdir()) / "far_bench" / result_filename("cpu_block-quick")
                 if a.quick else RESULTS / result_filename("cpu_block"))
    if a.plot is None:
        a.plot = a.out.with_suffix(".png")
    return a


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def run_case(name: str, T: int, B: int, args, peak_gflops: float) -> dict:
    C, H = SHAPES[name]
    torch.manual_seed(args.seed)
    m = far.FARAttention(C, H).eval()
    d, n = m.head_dim, m.width
    x = torch.randn(B, T, C)
    mods = {"per_head_lstm": PerHeadLSTM(m).eval(), "dense_masked_lstm": DenseMaskedLSTM(m).eval()}
    attn = timm_attention(C, H, "cpu", torch.float32)
    fns = {
        "per_head_lstm": lambda: mods["per_head_lstm"](x),
        "dense_masked_lstm": lambda: mods["dense_masked_lstm"](x),
        "far_torch": lambda: m(x, backend="torch"),
        "far_cpp": lambda: m(x, backend="cpp"),
        "attention_sdpa": lambda: attn(x),
    }
    flops = block_flops(C, H, d, n, B * T)
    rec = {"shape": name, "C": C, "H": H, "d": d, "n": n, "T": T, "B": B, "dtype": "float32",
           "flops": flops, "floor_ms": flops / (peak_gflops * 1e9) * 1e3, "variants": {}, "loadavg": loadavg()}

    # correctness on this shape, before timing: every FAR variant against the float64 block (rounded to
    # fp32), within twice the error of far_torch (the same math in plain PyTorch) + 1e-5; attention
    # against its float64 copy
    outs = {v: fns[v]() for v in FAR_VARIANTS}
    ref = m.forward_reference(x)
    rec["out_max_abs"] = float(ref.abs().max())
    rec["checks"] = {v: check_output(outs[v], ref, outs["far_torch"], 1e-5) for v in FAR_VARIANTS}
    rec["checks"]["attention_sdpa"] = check_attention(attn, x)
    rec["max_abs_diff"] = {f"{v}_vs_far_torch": _max_diff(outs[v], outs["far_torch"]) for v in FAR_VARIANTS if v != "far_torch"}
    rec["max_abs_diff"]["per_head_lstm_vs_far_cpp"] = _max_diff(outs["per_head_lstm"], outs["far_cpp"])
    rec["max_abs_diff"]["dense_masked_lstm_vs_per_head_lstm"] = _max_diff(outs["dense_masked_lstm"], outs["per_head_lstm"])
    del outs, ref

    timed = {}
    for v in args.variants:
        if v == "far_torch" and args.skip_slow and B * T >= SLOW:
            rec["variants"][v] = {"skipped": "--skip-slow"}
        elif v != "attention_sdpa" and not rec["checks"][v]["ok"]:
            rec["variants"][v] = {"failed": f"output check: {rec['checks'][v]}"}
        else:
            timed[v] = fns[v]
    res = time_variants(timed, "cpu", rounds=args.rounds, reps=args.reps, min_time_s=args.min_time / args.rounds,
                        warmup_s=args.warmup_s)
    for v, t in res.items():
        if "ms" in t:
            t["gflops"] = flops / (t["ms"] * 1e-3) / 1e9
            t["x_floor"] = t["ms"] / rec["floor_ms"]
        rec["variants"][v] = t

    def ms(v):
        r = rec["variants"].get(v, {})
        return r.get("ms")

    rec["speedup_far_cpp"] = {base: (ms(base) / ms("far_cpp") if ms(base) and ms("far_cpp") else None)
                              for base in ("per_head_lstm", "dense_masked_lstm", "far_torch", "attention_sdpa")}
    return rec


def print_header(variants) -> None:
    cols = "".join(f"{v:>19}" for v in variants)
    print(f"{'case':<18}{cols}{'floor':>9}{'cpp GF/s':>10}{'a/d':>7}{'b/d':>7}{'e/d':>7}{'max|diff|':>11}")
    print(f"{'':<18}{'ms'.rjust(19) * len(variants)}{'ms':>9}")


def print_row(rec, variants) -> None:
    case = f"{rec['shape']} T{rec['T']} B{rec['B']}"
    cells = ""
    for v in variants:
        r = rec["variants"].get(v, {})
        cells += f"{('failed' if 'failed' in r else 'skipped'):>19}" if "ms" not in r else f"{r['ms']:>19.3f}"
    cpp = rec["variants"].get("far_cpp", {}).get("gflops")
    sp = rec["speedup_far_cpp"]
    f = lambda x, w, p: f"{x:>{w}.{p}f}" if x is not None else f"{'-':>{w}}"  # noqa: E731
    diff = max(rec["max_abs_diff"].values())
    print(f"{case:<18}{cells}{rec['floor_ms']:>9.3f}{f(cpp, 10, 1)}{f(sp['per_head_lstm'], 7, 2)}"
          f"{f(sp['dense_masked_lstm'], 7, 2)}{f(sp['attention_sdpa'], 7, 2)}{diff:>11.1e}", flush=True)


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    recs = result["cases"]
    variants = [v for v in VARIANTS if any("ms" in r["variants"].get(v, {}) for r in recs)]
    width = 0.8 / max(len(variants), 1)
    fig, ax = plt.subplots(figsize=(max(8.0, 1.3 * len(recs) + 4), 4.5))
    for i, v in enumerate(variants):
        xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(recs))]
        ts = [r["variants"].get(v, {}) for r in recs]
        ys = [t.get("ms", float("nan")) for t in ts]
        err = [[y - t.get("ms_p10", y) for y, t in zip(ys, ts)], [t.get("ms_p90", y) - y for y, t in zip(ys, ts)]]
        ax.bar(xs, ys, width, yerr=err, capsize=2, error_kw={"elinewidth": 0.8}, label=v)
    ax.hlines([r["floor_ms"] for r in recs], [j - 0.42 for j in range(len(recs))], [j + 0.42 for j in range(len(recs))],
              colors="k", linewidth=2, label=f"floor = FLOPs / {result['peak']['gflops']:.0f} GFLOP/s (measured fp32 mm)")
    ax.set_xticks(range(len(recs)))
    ax.set_xticklabels([f"{r['shape']}\nT={r['T']} B={r['B']}" for r in recs], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms per block forward (median, p10-p90)")
    env = result["environment"]
    ax.set_title(f"FAR block, CPU fp32, threads={env['threads']} - {env['cpu_model']}", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", which="both", alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment(threads=torch.get_num_threads())
    env["flags"] = run_flags("cpu")
    env["far_kernels_backends"] = far_kernels.backend_report("cpu")  # backend -> None or why unavailable
    if env["far_kernels_backends"]["cpp"] is not None:
        sys.exit(f"bench_cpu_block: the cpp backend is unavailable: {env['far_kernels_backends']['cpp']}")
    print(f"# {env['cpu_model']}, {env['threads']} threads, torch {env['versions']['torch']}, "
          f"commit {str(env['git_commit'])[:10]}{' (dirty)' if env['git_dirty'] else ''}, load {env['loadavg_start']}")
    with torch.inference_mode():
        peak = peak_mm_gflops(args.peak_size, min_reps=args.min_reps, min_time_s=args.min_time,
                                     warmup_s=args.warmup_s)
        print(f"# peak: fp32 torch.mm {args.peak_size}^3 = {peak['gflops']:.1f} GFLOP/s (median; best "
              f"{peak['gflops_best']:.1f})")
        print("# a = per_head_lstm, b = dense_masked_lstm, d = far_cpp, e = attention_sdpa; a/d, b/d, e/d = time "
              "ratios (> 1: far_cpp faster); GF/s = useful FAR FLOPs / time; ms = median over rounds")
        print_header(args.variants)
        cases = []
        for name in args.shapes:
            for T in args.T:
                for B in args.B:
                    rec = run_case(name, T, B, args, peak["gflops"])
                    cases.append(rec)
                    print_row(rec, args.variants)
    env["loadavg_end"] = loadavg()
    result = {"benchmark": "cpu_block", "description": __doc__.split("\n\n")[0].strip(),
              "flops_formula": "per token 2C^2 + 2*2H*4n*d + 2*2H*4n*n + 2*H*d*2n + 2C^2",
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "environment": env, "peak": peak, "cases": cases}
    out = write_json(args.out, result)
    print(f"# load average at the end: {env['loadavg_end']}; wrote {out}")
    if not args.no_plot:
        plot(result, args.plot)
        print(f"# wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
