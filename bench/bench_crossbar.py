"""Crossbar emulation GEMM: the fused Triton kernel vs the PyTorch reference vs a plain GEMM (JSON + PNG).

Cases (y = x @ w.T, x [M, K], w [N, K]): "isaac" M=4096, K=N=768, and a DeiT-small layer set at
M = B*197 tokens: qkv 384->1152, proj 384->384, fc1 384->1536, fc2 1536->384. Config: ISAAC-like
defaults (8-bit weights in 4 two-bit slices, 8-bit inputs in 7 one-bit slices, 128-row tiles, 8-bit
ADC, "max" range), plus read-noise and programming-noise variants on the first case.
Per case and backend: median ms per call (weights programmed once beforehand, as in use), and:
  gemm_bf16 / gemm_fp32   torch.nn.functional.linear at the same shape (what a user would run)
  floor                   max(compute, bytes): the S x J integer GEMMs' operations (2 S J M N K) over the
                          measured int8 GEMM rate (torch._int_mm at 8192^3; the fp32 rate with TF32 off for
                          programming-noise levels, which the kernel multiplies in fp32; bf16 where int8 is not
                          available), and the bytes (x, the levels in their own dtype, scales, bias, y once)
                          over the measured copy bandwidth
  ratios                  torch/triton speedup, triton/gemm_bf16 ("emulation overhead"), triton/floor
Checked BEFORE timing, on a fresh input of the case's own shape (recorded, never asserted): every backend
against crossbar_matmul_ref, the oracle: bit for bit without noise; within 1e-5 of its largest output with
programming noise (fp32 levels: the summation order differs); with read noise, the noiseless read of the
same cells bit for bit and the spread of the noise within 10% of the oracle's. A backend that fails is
recorded under "failed" and not timed; the GEMM baselines are checked against float64 and timed either way.
Timing: bench/common.py time_variants (GPU: CUDA graphs, or launches, between events with the GPU kept busy,
so no launch gap or host time is counted; medians over interleaved rounds, warm and L2-cold; CPU:
perf_counter), rotating 4 input sets. The JSON is rewritten after every case (a killed run keeps what it
measured). On CPU the triton backend is skipped unless TRITON_INTERPRET=1 (slow), and `--quick` shrinks
everything to check the script.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_flags, time_variants  # noqa: E402

import far_kernels  # noqa: E402
from far.utils.env import environment, loadavg, result_filename  # noqa: E402
from far.utils.fs import write_json  # noqa: E402
from far.utils.plot import grouped_bars  # noqa: E402
from far_kernels import CrossbarConfig, crossbar_matmul, crossbar_matmul_ref, program_crossbar  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

DEIT_SMALL = [("qkv", 384, 1152), ("proj", 384, 384), ("fc1", 384, 1536), ("fc2", 1536, 384)]
FLOAT_TOL = 1e-5  # programming noise: fp32 levels, another summation order than the oracle's (relative to max |y|)
NOISE_SPREAD_TOL = 0.1  # read noise: the spread of (noisy - noiseless) within 10% of the oracle's


def rotating(tensors):
    """A callable returning the next of several input sets (repeated runs must not measure the cache)."""
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % len(tensors)
        return tensors[state["i"]]

    return nxt


def measure_ceilings(device, args):
    """Copy bandwidth (bytes read + written), and the int8 (torch._int_mm), bf16 and fp32 (TF32 off) GEMM rates
    at 8192^3, measured once with the benchmarks' timing (bench/common.py time_variants)."""
    if device.type != "cuda":
        return {}
    x = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    n = 8192
    a, b = torch.randn(n, n, device=device, dtype=torch.bfloat16), torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a32, b32 = a.float(), b.float()
    ai = torch.randint(-127, 128, (n, n), device=device, dtype=torch.int8)
    bi = torch.randint(-127, 128, (n, n), device=device, dtype=torch.int8)

    def mm_fp32():
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 rate, as the kernel's "ieee" dot computes
        try:
            return a32 @ b32
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev

    fns = {"copy": lambda: y.copy_(x), "bf16": lambda: a @ b, "fp32": mm_fp32, "int8": lambda: torch._int_mm(ai, bi)}
    t = time_variants(fns, device, rounds=1, reps=5, cold_l2=False)
    out = {"method": {k: r.get("method") for k, r in t.items()}}
    if "ms" in t["copy"]:
        out["copy_GBps"] = 2 * x.numel() / (t["copy"]["ms"] * 1e-3) / 1e9
    for k, key in (("bf16", "mm_bf16_tflops"), ("fp32", "mm_fp32_tflops"), ("int8", "mm_int8_tops")):
        if "ms" in t[k]:
            out[key] = 2 * n ** 3 / (t[k]["ms"] * 1e-3) / 1e12
        else:
            out[f"mm_{k}_error"] = t[k].get("error", "not timed")[:200]
    return out


def crossbar_floor(M, K, N, prog, ceilings, bias=True) -> dict:
    """max(compute, bytes) in ms: the S x J slice GEMMs' operations (2 S J M N K) over the measured rate of the
    unit the kernel uses (int8 levels: the int8 GEMM rate; fp32 levels, i.e. programming noise: the fp32 rate with
    TF32 off; the bf16 rate where the one needed was not measured), and the bytes moved once (x fp32, the levels
    in their own dtype, the weight scales, the bias, y fp32) over the measured copy bandwidth."""
    cfg = prog.cfg
    SJ = cfg.n_weight_slices * cfg.n_input_slices
    levels = prog.levels
    bytes_ = (M * K * 4 + levels.numel() * levels.element_size() + prog.w_scale.numel() * 4 + (N * 4 if bias else 0)
              + M * N * 4)
    fl = {"int_gemms": SJ, "int_ops": 2 * SJ * M * N * K, "bytes": bytes_,
          "level_dtype": str(levels.dtype).replace("torch.", "")}
    unit, rate = ("int8", ceilings.get("mm_int8_tops")) if not levels.is_floating_point() else \
        ("fp32", ceilings.get("mm_fp32_tflops"))
    if not rate and ceilings.get("mm_bf16_tflops"):
        unit, rate = f"bf16 (the {unit} rate was not measured)", ceilings["mm_bf16_tflops"]
    if rate:
        fl["compute_ms"], fl["compute_rate"] = fl["int_ops"] / (rate * 1e12) * 1e3, unit
    if ceilings.get("copy_GBps"):
        fl["bytes_ms"] = bytes_ / (ceilings["copy_GBps"] * 1e9) * 1e3
    terms = {k: fl[k] for k in ("compute_ms", "bytes_ms") if k in fl}
    fl["ms"] = max(terms.values()) if terms else None
    fl["bound_by"] = max(terms, key=terms.get)[:-3] if terms else None
    return fl


def check_backend(be, xf, prog, bias, variant) -> dict:
    """`be`'s output on xf against crossbar_matmul_ref (see the module docstring); {"ok", ...}."""
    cfg = prog.cfg
    try:
        if cfg.read_noise > 0:
            clean = cfg.replace(read_noise=0.0)
            y0 = crossbar_matmul(xf, prog, clean, bias=bias, backend=be)
            r0 = crossbar_matmul_ref(xf, prog, clean, bias=bias)
            y, r = crossbar_matmul(xf, prog, bias=bias, backend=be), crossbar_matmul_ref(xf, prog, bias=bias)
            finite = bool(torch.isfinite(y).all())
            spread, spread_ref = float((y - y0).double().std()), float((r - r0).double().std())
            tol = NOISE_SPREAD_TOL + 6 / math.sqrt(2 * y.numel())
            return {"ok": finite and torch.equal(y0, r0) and abs(spread / spread_ref - 1) <= tol,
                    "noiseless_read_equal": bool(torch.equal(y0, r0)), "finite": finite,
                    "noise_spread": spread, "noise_spread_ref": spread_ref, "spread_tol": tol}
        y, r = crossbar_matmul(xf, prog, bias=bias, backend=be), crossbar_matmul_ref(xf, prog, bias=bias)
        finite = bool(torch.isfinite(y).all())
        diff = float((y - r).abs().max()) if finite else None
        if prog.noisy:  # fp32 levels
            bound = FLOAT_TOL * float(r.abs().max())
            return {"ok": finite and diff <= bound, "max_abs_diff": diff, "bound": bound, "finite": finite}
        return {"ok": finite and bool(torch.equal(y, r)), "bit_identical": bool(torch.equal(y, r)),
                "max_abs_diff": diff, "finite": finite}
    except Exception as e:  # a backend that cannot run this case: recorded, the run goes on
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}


def check_gemm(out, ref64, dtype) -> dict:
    """A baseline GEMM against float64: relative error ||out - ref|| / ||ref|| under 1e-3 (fp32, TF32 or not)
    or 1e-2 (bf16)."""
    rel = float((out.double() - ref64).norm() / ref64.norm().clamp_min(1e-30))
    bound = 1e-3 if dtype == torch.float32 else 1e-2
    return {"ok": math.isfinite(rel) and rel <= bound, "rel_err": rel, "bound": bound}


def run_case(name, M, K, N, cfg, device, backends, args, ceilings, variant="noiseless"):
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}-{M}-{K}-{N}".encode()))
    xs = [torch.randn(M, K, generator=g).to(device) for _ in range(4)]
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(device)
    bias = torch.randn(N, generator=g).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    prog = program_crossbar(w, cfg)
    sync()
    rec = {"case": name, "variant": variant, "M": M, "K": K, "N": N, "S": cfg.n_weight_slices,
           "J": cfg.n_input_slices, "tiles": -(-K // cfg.tile_rows), "program_ms": (time.perf_counter() - t0) * 1e3,
           "ms": {}, "skipped": {}, "checks": {}, "loadavg": loadavg()}
    xf = torch.randn(M, K, generator=g).to(device)  # the checks' input: fresh, the case's own shape
    fns = {}
    with torch.inference_mode():
        for be in backends:
            why = far_kernels.ops.crossbar_matmul.OP.reason(be, device)
            if why is None and be == "torch" and M * K > args.max_torch_mk:
                why = f"M*K > --max-torch-mk ({args.max_torch_mk})"
            if why is not None:
                rec["skipped"][be] = why
                continue
            chk = rec["checks"][be] = check_backend(be, xf, prog, bias, variant)
            if chk["ok"]:
                nxt = rotating(xs)
                fns[be] = lambda be=be, nxt=nxt: crossbar_matmul(nxt(), prog, bias=bias, backend=be)
            else:
                rec.setdefault("failed", {})[be] = chk.get("error") or {k: v for k, v in chk.items() if k != "ok"}
                rec["ms"][be] = None
        ref64 = torch.nn.functional.linear(xf.double(), w.double(), bias.double())
        for dname, dt in (("gemm_fp32", torch.float32), ("gemm_bf16", torch.bfloat16)):
            if device.type == "cpu" and dt == torch.bfloat16 and M * K * N > 2 ** 30:
                continue
            xd, wd, bd = [t.to(dt) for t in xs], w.to(dt), bias.to(dt)
            rec["checks"][dname] = check_gemm(torch.nn.functional.linear(xf.to(dt), wd, bd), ref64, dt)
            nxt = rotating(xd)
            fns[dname] = lambda nxt=nxt, wd=wd, bd=bd: torch.nn.functional.linear(nxt(), wd, bd)
        del ref64
        t = time_variants(fns, device, rounds=args.rounds, reps=args.reps, min_time_s=args.min_time)
    rec["timing"] = t
    for k, r in t.items():
        rec["ms"][k] = r.get("ms")
        if "error" in r:
            rec.setdefault("errors", {})[k] = r["error"]
    fl = rec["floor"] = crossbar_floor(M, K, N, prog, ceilings)
    ms = rec["ms"]
    ratios = {}
    if ms.get("triton"):
        if ms.get("torch"):
            ratios["torch_over_triton"] = ms["torch"] / ms["triton"]
        if ms.get("gemm_bf16"):
            ratios["triton_over_gemm_bf16"] = ms["triton"] / ms["gemm_bf16"]
        if fl.get("ms"):
            ratios["triton_over_floor"] = ms["triton"] / fl["ms"]
    if ms.get("torch") and ms.get("gemm_bf16"):
        ratios["torch_over_gemm_bf16"] = ms["torch"] / ms["gemm_bf16"]
    rec["ratios"] = ratios
    line = "  ".join(f"{k}={v:.3f}ms" for k, v in ms.items() if v is not None)
    print(f"{name:>10} {variant:>10} M={M:<6} K={K:<5} N={N:<5} {line}  floor={fl.get('ms') or float('nan'):.3f}ms "
          + "  ".join(f"{k}={v:.2f}" for k, v in ratios.items())
          + (f"  FAILED {sorted(rec['failed'])}" if rec.get("failed") else ""), flush=True)
    return rec


def case_list(args, cfg):
    """(name, M, K, N, cfg, variant) in the order to run: the ISAAC case and its noise variants, then DeiT-S."""
    out = [("isaac", args.M, args.KN, args.KN, cfg, "noiseless")]
    if not args.no_noise:
        out += [("isaac", args.M, args.KN, args.KN, cfg.replace(read_noise=0.01), "read_noise"),
                ("isaac", args.M, args.KN, args.KN, cfg.replace(prog_noise=0.02), "prog_noise")]
    for B in args.B:
        out += [(f"deit-s-{n}-B{B}", B * args.T, k, nn, cfg, "noiseless") for n, k, nn in DEIT_SMALL]
    return out


def run(args, out: Path):
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = CrossbarConfig()
    backends = args.backends
    result = {"benchmark": "bench_crossbar", "device": str(device), "environment": environment(),
              "flags": run_flags(device), "args": {k: v for k, v in vars(args).items() if k != "out"},
              "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
              "note": "ms = median per call with weights programmed beforehand (bench/common.py time_variants: CUDA "
                      "graphs or launches between events, interleaved rounds; timing.* has spread, method, L2-cold); "
                      "checks: every backend vs crossbar_matmul_ref on a fresh input of the case's shape BEFORE "
                      "timing (bit for bit without noise), a failing backend is not timed; floor.ms = max(2 S J M N K "
                      "over the measured int8 rate (fp32 rate for fp32 levels), bytes with the levels' own dtype "
                      "over the copy bandwidth)",
              "complete": False, "records": []}
    write_json(out, result)
    result["ceilings"] = measure_ceilings(device, args)
    write_json(out, result)
    for name, M, K, N, c, variant in case_list(args, cfg):
        result["records"].append(run_case(name, M, K, N, c, device, backends, args, result["ceilings"], variant))
        write_json(out, result)  # after every case: a run cut short keeps what it measured
    result.update(complete=True, loadavg_end=loadavg())
    write_json(out, result)
    return result


def plot(result, path):
    recs = result["records"]
    names = ["triton", "torch", "gemm_bf16", "gemm_fp32", "floor"]
    series = {name: [r["floor"].get("ms") if name == "floor" else r["ms"].get(name) for r in recs] for name in names}
    return grouped_bars(path, [f"{r['case']}\n{r['variant']}\n{r['M']}x{r['K']}x{r['N']}" for r in recs], series,
                        "ms per call (median)", f"crossbar emulation GEMM on {result['device']} (ISAAC-like config)",
                        width_per_group=0.9, xlabel_size=6)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--M", type=int, default=4096, help="rows of the ISAAC case")
    p.add_argument("--KN", type=int, default=768, help="K = N of the ISAAC case")
    p.add_argument("--B", type=lambda s: [int(v) for v in s.split(",") if v], default=[8, 64],
                   help="DeiT-small batch sizes (M = B * T)")
    p.add_argument("--T", type=int, default=197, help="tokens per image")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per case")
    p.add_argument("--reps", type=int, default=None, help="timed reps per round (GPU default 20; CPU adaptive)")
    p.add_argument("--min-time", type=float, default=0.3, help="CPU: ~seconds of timed calls per round")
    p.add_argument("--backends", type=lambda s: [b for b in s.split(",") if b], default=["triton", "torch"],
                   help="crossbar backends to check and time (default triton,torch; one that cannot run is skipped)")
    p.add_argument("--max-torch-mk", type=int, default=2 ** 26, help="time the torch reference only up to M*K")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-noise", action="store_true", help="skip the read/programming-noise variants")
    p.add_argument("--quick", action="store_true",
                   help="small smoke run (M=256, K=N=192, B=1, T=20, 1 round of 3 reps)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/crossbar-<host>-<date>.json)")
    args = p.parse_args(argv)
    if args.quick:  # smaller defaults; sizes given explicitly stay
        for name, small in (("M", 256), ("KN", 192), ("B", [1]), ("T", 20), ("rounds", 1), ("reps", 3)):
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, small)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else RESULTS / result_filename("crossbar")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = run(args, out)
    if not args.no_plot and result["records"]:
        result["plot"] = plot(result, out.with_suffix(".png"))
        write_json(out, result)
    print("wrote", out)


if __name__ == "__main__":
    main()
