"""The cuda scan kernel's variants side by side (JSON): FMA vs tensor-core (mma.sync) path, accurate vs
tanh.approx activations, the batch-tile choice, for DeiT-tiny/small/base heads (H = 3/6/12, n = 64), T = 197.

bench_bilstm.py compares backends (cuda/triton/cuDNN/attention) as a user calls them; this script calls
far_kernels._C.bilstm_scan_cuda directly with an explicit path so that `auto`'s rule (mma for fp16/bf16
when B >= 16) can be checked against measurements. Per case: median ms over CUDA-event-timed calls after
warm-up, us per step, achieved recurrent TFLOP/s (2 * 2H * B * 4n * n per step), and the relative error
||out - ref|| / ||ref|| against the float64 reference on a slice of fresh random data (recorded, no asserts).
gx for small B fits in L2 (B = 1, H = 12: 4.8 MB fp16); the scan is latency-bound there, so L2 hits hardly
matter; for large B gx is far larger than L2. Needs a GPU: `python bench/bench_cuda_scan.py --quick`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import far_kernels
from far.utils.env import environment, result_filename
from far.utils.fs import write_json
from far_kernels._ext import lib as _C
from far_kernels.benchmark import time_fn

RESULTS = Path(__file__).resolve().parent / "results"

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PATHS = {"fma": 1, "mma": 2}


def time_ms(fn, reps, warmup=5):
    ts = time_fn(fn, device="cuda", reps=reps, warmup=warmup, warmup_s=0.0)["times_ms"]
    return ts[len(ts) // 2], ts[0], ts[-1]


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def run(args):
    dev = torch.device("cuda")
    records = []
    for H in args.H:
        n = 64
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            g = torch.Generator(device=dev).manual_seed(H)
            w = (torch.randn(H, 2, 4 * n, n, device=dev, generator=g) / n ** 0.5).to(dtype).float()
            for kept_name, hs in (("full", torch.full((2, H), n)),
                                  ("pruned", torch.tensor([[64, 37, 0] * (H // 3), [37, 0, 64] * (H // 3)]))):
                if kept_name == "pruned" and not args.pruned:
                    continue
                for B in args.B:
                    T = args.T
                    gx = torch.randn(H, B, T, 2, 4 * n, device=dev, generator=g).to(dtype)
                    out = torch.empty(H, B, T, 2, n, device=dev, dtype=dtype)
                    gs = torch.randn(H, min(B, 4), min(T, 64), 2, 4 * n, device=dev, generator=g).to(dtype)
                    ref = far_kernels.bilstm_scan_ref(gs.double(), w.double(), hs)
                    flops = 2 * 2 * H * B * T * 4 * n * n
                    for path in ("fma", "mma"):
                        if path == "mma" and dtype == torch.float32:
                            continue
                        for fast in (False, True):
                            name = path + ("_fasttanh" if fast else "")
                            rec = {"H": H, "n": n, "T": T, "B": B, "dtype": dname, "kept": kept_name, "variant": name,
                                   "auto_would_pick": (B >= 16 and dtype != torch.float32) == (path == "mma")}
                            try:
                                fn = lambda: _C.bilstm_scan_cuda(gx, w, hs, out, PATHS[path], fast)  # noqa: E731
                                med, lo, hi = time_ms(fn, args.reps)
                                rec.update(ms=med, ms_min=lo, ms_max=hi, us_per_step=1e3 * med / T,
                                           tflops=flops / (med * 1e-3) / 1e12)
                                chk = _C.bilstm_scan_cuda(gs, w, hs, None, PATHS[path], fast)
                                rec["rel_err_vs_fp64"] = rel_err(chk, ref)
                                rec["finite"] = bool(torch.isfinite(chk).all())
                            except Exception as e:  # record, keep going
                                rec["error"] = f"{type(e).__name__}: {e}"[:300]
                            records.append(rec)
                            print(f"H={H:<2d} {dname} {kept_name:6s} B={B:<4d} {name:13s} "
                                  + (f"{rec['ms']:.4f} ms {rec['us_per_step']:.3f} us/step {rec['tflops']:.2f} TFLOP/s "
                                     f"relerr {rec['rel_err_vs_fp64']:.2e}" if "ms" in rec else rec.get("error", "")),
                                  flush=True)
    best = {}
    for r in records:
        if "ms" in r:
            key = f"H{r['H']}-{r['dtype']}-{r['kept']}-B{r['B']}"
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = {"variant": r["variant"], "ms": r["ms"]}
    env = environment()
    env["device_name"] = torch.cuda.get_device_name()
    return {"benchmark": "bench_cuda_scan", "environment": env, "records": records, "fastest_variant": best,
            "note": "ms = median per call of _C.bilstm_scan_cuda (out preallocated, w_hh fp32); "
                    "auto = mma for fp16/bf16 when B >= 16, else fma"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--H", type=lambda s: [int(v) for v in s.split(",")], default=[3, 6, 12],
                   help="heads (multiples of 3), comma-separated; n = 64")
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=["fp16", "bf16", "fp32"])
    p.add_argument("--B", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8, 16, 64, 256])
    p.add_argument("--T", type=int, default=197)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--pruned", action="store_true", help="also time kept sizes 64/37/0 per (dir, head)")
    p.add_argument("--quick", action="store_true", help="H=6, fp16, B=1,64, T=197, 10 reps")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/cuda_scan-<host>-<date>.json)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    if _C is None or not _C.has_cuda():
        p.error("far_kernels._C was built without CUDA kernels; `pip install --no-build-isolation -e .` on a CUDA machine")
    if args.quick:
        args.H, args.dtypes, args.B, args.reps = [6], ["fp16"], [1, 64], 10
    result = run(args)
    out = Path(args.out) if args.out else RESULTS / result_filename("cuda_scan")
    print("wrote", write_json(out, result))


if __name__ == "__main__":
    main()
