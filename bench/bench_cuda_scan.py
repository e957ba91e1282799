"""The cuda scan kernel's variants side by side (JSON): FMA vs tensor-core (mma.sync) path, accurate vs
tanh.approx activations, for DeiT-tiny/small/base heads (H = 3/6/12, n = 64), T = 197, with timm's SDPA
attention at the same shape (C = 64 H) as a row.

bench_bilstm.py compares backends (cuda/triton/cuDNN/attention) as a user calls them; this script calls
far_kernels._C.bilstm_scan_cuda directly with an explicit path so that `auto`'s rule (mma for fp16/bf16
when B >= 16) can be checked against measurements. Per case, BEFORE timing: every variant's output on
that very shape against the float64 reference (bench/common.py check_output: at most twice the error of
the same math in plain PyTorch, h and W_hh rounded to the dtype for the mma path, plus the activations'
slack); a variant that fails is marked failed and not timed, the run goes on. Then the variants and
attention are timed in interleaved rounds (CUDA graphs between events, no host time; warm and L2-cold):
median ms, spread, us per step, recurrent TFLOP/s (2 * B * 4k^2 per step and (direction, head) of k kept
units: a pruned case counts what it computes). Per case, fastest_exact_variant (accurate activations: what
auto runs, held against auto's rule in auto_is_fastest_exact) and fastest_any_variant (the opt-in
tanh.approx variants too). The JSON is rewritten after every case. Needs a GPU; --device cpu runs the
script itself with the reference standing in for the kernel (the suite's dry run).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import check_attention, check_output, run_flags, time_variants, timm_attention  # noqa: E402

import far_kernels  # noqa: E402
from far.utils.env import environment, loadavg, result_filename  # noqa: E402
from far.utils.fs import write_json  # noqa: E402
from far_kernels._ext import lib as _C  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PATHS = {"fma": 1, "mma": 2}
TANH_APPROX_SLACK = 8 * 2.0 ** -11  # tanh.approx: <= 2^-11 per activation, 8 of them
ACT_SLACK = 1e-5  # ex2.approx/rcp.approx activations, accumulated over the steps


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def scan_flops(hs, B: int, T: int) -> int:
    """Recurrent FLOPs the kernel does: 2 * B * T * 4 k^2 per (direction, head) of k kept units (pruned units are
    never computed; a (direction, head) with none does no product)."""
    return 2 * B * T * 4 * int((torch.as_tensor(hs).long() ** 2).sum())


def fastest(records) -> dict:
    """Per case (H, dtype, kept, B): the fastest exact variant ("exact": accurate activations, what auto runs; the
    one to hold auto's rule against) and the fastest of all ("any": the opt-in tanh.approx variants too), each
    {"variant", "ms"}; "auto_is_fastest_exact": whether auto's pick is the fastest exact one."""
    best = {}
    for r in records:
        if "ms" not in r or r["variant"] == "attention_sdpa":
            continue
        key = f"H{r['H']}-{r['dtype']}-{r['kept']}-B{r['B']}"
        b = best.setdefault(key, {})
        kinds = ("any",) if r["variant"].endswith("_fasttanh") else ("any", "exact")
        for kind in kinds:
            if kind not in b or r["ms"] < b[kind]["ms"]:
                b[kind] = {"variant": r["variant"], "ms": r["ms"]}
        if r.get("auto_would_pick") and not r["variant"].endswith("_fasttanh"):
            b["auto"] = r["variant"]
    for b in best.values():
        if "exact" in b and "auto" in b:
            b["auto_is_fastest_exact"] = b["exact"]["variant"] == b["auto"]
    return best


def kernel(device, gx, w, hs, out, path, fast):
    """The variant's call: the cuda kernel, or on the CPU (dry run) the reference with its rounding."""
    if device.type == "cuda":
        return lambda: _C.bilstm_scan_cuda(gx, w, hs, out, PATHS[path], fast)
    pd = gx.dtype if path == "mma" else None
    return lambda: out.copy_(far_kernels.bilstm_scan_ref(gx, w, hs, product_dtype=pd))


def run_case(H, dname, kept_name, hs, B, args, device, w):
    dtype, n, T = DTYPES[dname], 64, args.T
    g = torch.Generator(device=device).manual_seed(H * 1000 + B)
    gx = torch.randn(H, B, T, 2, 4 * n, device=device, generator=g).to(dtype)
    out = torch.empty(H, B, T, 2, n, device=device, dtype=dtype)
    flops = scan_flops(hs, B, T)  # from the kept sizes: a pruned case does fewer
    base = {"H": H, "n": n, "T": T, "B": B, "dtype": dname, "kept": kept_name, "kept_sizes": hs.tolist(),
            "flops": flops, "loadavg": loadavg()}
    ref64 = far_kernels.bilstm_scan_ref(gx.double(), w.double(), hs)
    pts = {"fma": far_kernels.bilstm_scan_ref(gx, w, hs)}
    if dtype != torch.float32:
        pts["mma"] = far_kernels.bilstm_scan_ref(gx, w, hs, product_dtype=dtype)
    recs, fns = [], {}
    for path in pts:
        for fast in (False, True):
            name = path + ("_fasttanh" if fast else "")
            rec = {**base, "variant": name, "stand_in": device.type != "cuda",
                   "auto_would_pick": (B >= 16 and dtype != torch.float32) == (path == "mma")}
            fn = kernel(device, gx, w, hs, out, path, fast)
            try:
                out.fill_(float("nan"))
                res = fn()
                rec["check"] = check_output(res, ref64, pts[path], TANH_APPROX_SLACK if fast else ACT_SLACK)
                rec["rel_err_vs_fp64"] = rel_err(res, ref64)
            except Exception as e:  # record, keep going
                rec["check"] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
            if rec["check"]["ok"]:
                fns[name] = fn
            else:
                rec["failed"] = rec["check"].get("error") or f"error {rec['check'].get('max_abs_err')} > bound"
            recs.append(rec)
    del ref64, pts
    attn = timm_attention(64 * H, H, device, dtype)
    x = torch.randn(B, T, 64 * H, device=device, dtype=dtype, generator=g)
    attn_rec = {**base, "variant": "attention_sdpa", "C": 64 * H, "check": check_attention(attn, x)}
    fns["attention_sdpa"] = lambda: attn(x)
    with torch.inference_mode():
        t = time_variants(fns, device, rounds=args.rounds, reps=args.reps, graphs=not args.no_graphs)
    for rec in recs + [attn_rec]:
        r = t.get(rec["variant"])
        if r is None:
            continue
        rec["timing"] = r
        if "ms" in r:
            rec.update(ms=r["ms"], us_per_step=1e3 * r["ms"] / T)
            if rec["variant"] != "attention_sdpa":
                rec["tflops"] = flops / (r["ms"] * 1e-3) / 1e12
        else:
            rec["error"] = r.get("error")
    for rec in recs + [attn_rec]:
        print(f"H={H:<2d} {dname} {kept_name:6s} B={B:<4d} {rec['variant']:15s} "
              + (f"{rec['ms']:.4f} ms {rec['us_per_step']:.3f} us/step" if "ms" in rec
                 else f"FAILED {rec.get('failed') or rec.get('error')}")
              + (f" {rec['tflops']:.2f} TFLOP/s relerr {rec['rel_err_vs_fp64']:.2e}" if "tflops" in rec else ""),
              flush=True)
    return recs + [attn_rec]


def run(args, out_path: Path):
    device = torch.device(args.device)
    env = environment()
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name()
    result = {"benchmark": "bench_cuda_scan", "environment": env, "flags": run_flags(device), "complete": False,
              "args": {k: v for k, v in vars(args).items() if k != "out"}, "records": [],
              "note": "ms = median per call of _C.bilstm_scan_cuda (out preallocated, w_hh fp32) over rounds x reps, "
                      "CUDA graphs between events; check = output vs float64 reference on the same shape before "
                      "timing; attention_sdpa = timm Attention at C = 64 H; auto = mma for fp16/bf16 when B >= 16; "
                      "tflops from the kept sizes (flops per record); fastest_exact_variant excludes the opt-in "
                      "fast-tanh variants (auto never runs them), fastest_any_variant includes them"
                      + ("; DRY RUN: the torch reference stands in for the kernel" if device.type != "cuda" else "")}
    write_json(out_path, result)
    n = 64
    for B in args.B:  # B outermost: the B = 64 headline rows come first with the default order
        for H in args.H:
            for dname in args.dtypes:
                g = torch.Generator(device=device).manual_seed(H)
                w = (torch.randn(H, 2, 4 * n, n, device=device, generator=g) / n ** 0.5).to(DTYPES[dname]).float()
                for kept_name, hs in (("full", torch.full((2, H), n)),
                                      ("pruned", torch.tensor([[64, 37, 0] * (H // 3), [37, 0, 64] * (H // 3)]))):
                    if kept_name == "pruned" and not args.pruned:
                        continue
                    result["records"] += run_case(H, dname, kept_name, hs, B, args, device, w)
                    write_json(out_path, result)
    best = fastest(result["records"])
    result.update(fastest_exact_variant={k: b["exact"] for k, b in best.items() if "exact" in b},
                  fastest_any_variant={k: b["any"] for k, b in best.items()},
                  auto_is_fastest_exact={k: b["auto_is_fastest_exact"] for k, b in best.items()
                                         if "auto_is_fastest_exact" in b}, complete=True)
    write_json(out_path, result)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--H", type=lambda s: [int(v) for v in s.split(",")], default=[6, 3, 12],
                   help="heads (multiples of 3), comma-separated; n = 64")
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=["fp16", "bf16", "fp32"])
    p.add_argument("--B", type=lambda s: [int(v) for v in s.split(",")], default=[64, 1, 8, 16, 256])
    p.add_argument("--T", type=int, default=197)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=None, help="timed reps per round (GPU default 20)")
    p.add_argument("--no-graphs", action="store_true", help="time launches between events, not CUDA graphs")
    p.add_argument("--pruned", action="store_true", help="also time kept sizes 64/37/0 per (dir, head)")
    p.add_argument("--quick", action="store_true", help="H=6, fp16, B=64,1, T=197, 2 rounds of 10 reps")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/cuda_scan-<host>-<date>.json)")
    args = p.parse_args(argv)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            p.error("needs a CUDA device (--device cpu: a dry run of the script with the reference as the kernel)")
        if _C is None or not _C.has_cuda():
            p.error("far_kernels._C was built without CUDA kernels; `pip install --no-build-isolation -e .` on a CUDA machine")
    if args.quick:
        args.H, args.dtypes, args.B, args.rounds, args.reps = [6], ["fp16"], [64, 1], 2, args.reps or 10
    if args.device == "cpu" and args.quick:
        args.H, args.B, args.T, args.rounds, args.reps = [3], [2], 12, 1, 1
    out = Path(args.out) if args.out else RESULTS / result_filename("cuda_scan")
    run(args, out)
    print("wrote", out)


if __name__ == "__main__":
    main()
