"""Crossbar emulation GEMM: the fused Triton kernel vs the PyTorch reference vs a plain GEMM (JSON + PNG).

Cases (y = x @ w.T, x [M, K], w [N, K]): "isaac" M=4096, K=N=768, and a DeiT-small layer set at
M = B*197 tokens: qkv 384->1152, proj 384->384, fc1 384->1536, fc2 1536->384. Config: ISAAC-like
defaults (8-bit weights in 4 two-bit slices, 8-bit inputs in 7 one-bit slices, 128-row tiles, 8-bit
ADC, "max" range), plus read-noise and programming-noise variants on the first case.
Per case and backend: median ms per call (weights programmed once beforehand, as in use), and:
  gemm_bf16 / gemm_fp32   torch.nn.functional.linear at the same shape (what a user would run)
  floor                   S x J integer GEMMs (the bit-sliced work) at the measured int8 GEMM rate
                          (torch._int_mm on the same shape; bf16 rate where int8 is not available),
                          vs the bytes (x, levels, y once) at the measured copy bandwidth; the larger
  ratios                  torch/triton speedup, triton/gemm_bf16 ("emulation overhead"), triton/floor
Correctness (recorded, never asserted): triton == torch bit for bit on fresh random data (noiseless).
Timing: far_kernels.benchmark.time_fn (CUDA events on GPU, perf_counter on CPU; medians), rotating 4
input sets. On CPU the triton backend is skipped (it runs only in the slow interpreter there) and
`--quick` shrinks everything to check the script.
"""
from __future__ import annotations

import argparse
import zlib
from pathlib import Path

import torch

import far_kernels
from far.utils.env import environment, result_filename
from far.utils.fs import write_json
from far.utils.plot import grouped_bars
from far_kernels import CrossbarConfig, crossbar_matmul, program_crossbar
from far_kernels.benchmark import time_fn

RESULTS = Path(__file__).resolve().parent / "results"

DEIT_SMALL = [("qkv", 384, 1152), ("proj", 384, 384), ("fc1", 384, 1536), ("fc2", 1536, 384)]


def bench_ms(fn, device, reps):
    """Median ms of fn() after warm-up (CUDA events on a GPU)."""
    return time_fn(fn, device=device, min_reps=reps, min_time_s=0.5, warmup=1, warmup_s=0.0)["ms"]


def rotating(tensors):
    """A callable returning the next of several input sets (repeated runs must not measure the cache)."""
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % len(tensors)
        return tensors[state["i"]]

    return nxt


def measure_ceilings(device, reps):
    """Copy bandwidth (bytes read + written) and int8 / bf16 GEMM rates, measured once."""
    if device.type != "cuda":
        return {}
    x = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = bench_ms(lambda: y.copy_(x), device, reps)
    out = {"copy_GBps": 2 * x.numel() / (ms * 1e-3) / 1e9}
    n = 8192
    a, b = torch.randn(n, n, device=device, dtype=torch.bfloat16), torch.randn(n, n, device=device, dtype=torch.bfloat16)
    out["mm_bf16_tflops"] = 2 * n ** 3 / (bench_ms(lambda: a @ b, device, reps) * 1e-3) / 1e12
    try:
        ai = torch.randint(-127, 128, (n, n), device=device, dtype=torch.int8)
        bi = torch.randint(-127, 128, (n, n), device=device, dtype=torch.int8)
        out["mm_int8_tops"] = 2 * n ** 3 / (bench_ms(lambda: torch._int_mm(ai, bi), device, reps) * 1e-3) / 1e12
    except (RuntimeError, AttributeError) as e:
        out["mm_int8_error"] = str(e)[:200]
    return out


def int8_gemm_ms(M, K, N, device, reps):
    """ms of one int8 GEMM [M, K] @ [K, N] -> int32 (torch._int_mm), or None where unsupported."""
    try:
        a = torch.randint(-1, 2, (M, K), device=device, dtype=torch.int8)
        b = torch.randint(-3, 4, (K, N), device=device, dtype=torch.int8)
        torch._int_mm(a, b)
        return bench_ms(lambda: torch._int_mm(a, b), device, reps)
    except (RuntimeError, AttributeError):
        return None


def run_case(name, M, K, N, cfg, device, backends, reps, max_torch_mk, ceilings, variant="noiseless"):
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}-{M}-{K}-{N}".encode()))
    xs = [torch.randn(M, K, generator=g).to(device) for _ in range(4)]
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(device)
    bias = torch.randn(N, generator=g).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    import time

    t0 = time.perf_counter()
    prog = program_crossbar(w, cfg)
    sync()
    rec = {"case": name, "variant": variant, "M": M, "K": K, "N": N, "S": cfg.n_weight_slices,
           "J": cfg.n_input_slices, "tiles": -(-K // cfg.tile_rows), "program_ms": (time.perf_counter() - t0) * 1e3,
           "ms": {}, "skipped": {}}
    for be in backends:
        why = far_kernels.ops.crossbar_matmul.OP.reason(be, device)
        if why is None and be == "torch" and M * K > max_torch_mk:
            why = f"M*K > --max-torch-mk ({max_torch_mk})"
        if why is not None:
            rec["skipped"][be] = why
            continue
        nxt = rotating(xs)
        with torch.inference_mode():
            rec["ms"][be] = bench_ms(lambda: crossbar_matmul(nxt(), prog, bias=bias, backend=be), device, reps)
    # correctness on fresh data (noiseless only: with noise the backends draw different random numbers)
    if variant == "noiseless" and "triton" in rec["ms"] and "torch" in rec["ms"]:
        xf = torch.randn(M, K, device=device)
        a = crossbar_matmul(xf, prog, bias=bias, backend="triton")
        b = crossbar_matmul(xf, prog, bias=bias, backend="torch")
        rec["triton_equals_torch"] = bool(torch.equal(a, b))
        rec["triton_max_abs_diff"] = float((a - b).abs().max())
    # baselines: the plain GEMM a user would run
    with torch.inference_mode():
        for dname, dt in (("gemm_fp32", torch.float32), ("gemm_bf16", torch.bfloat16)):
            if device.type == "cpu" and dt == torch.bfloat16 and M * K * N > 2 ** 30:
                continue
            xd, wd, bd = [t.to(dt) for t in xs], w.to(dt), bias.to(dt)
            nxt = rotating(xd)
            rec["ms"][dname] = bench_ms(lambda: torch.nn.functional.linear(nxt(), wd, bd), device, reps)
    # floor: S x J integer GEMMs (and the bytes, once)
    SJ = cfg.n_weight_slices * cfg.n_input_slices
    int8_ms = int8_gemm_ms(M, K, N, device, reps)
    fl = {"int_gemms": SJ, "int_ops": 2 * SJ * M * N * K}
    if int8_ms is not None:
        fl["int8_gemm_ms"] = int8_ms
        fl["compute_ms"] = SJ * int8_ms
    elif "gemm_bf16" in rec["ms"]:
        fl["compute_ms"] = SJ * rec["ms"]["gemm_bf16"]
        fl["compute_note"] = "int8 GEMM unavailable: bf16 GEMM time per slice pair"
    bytes_ = M * K * 4 + cfg.n_weight_slices * N * K + M * N * 4
    fl["bytes"] = bytes_
    if ceilings.get("copy_GBps"):
        fl["bytes_ms"] = bytes_ / (ceilings["copy_GBps"] * 1e9) * 1e3
    fl["ms"] = max(v for k, v in fl.items() if k in ("compute_ms", "bytes_ms")) if "compute_ms" in fl else None
    rec["floor"] = fl
    ms = rec["ms"]
    ratios = {}
    if "triton" in ms:
        if "torch" in ms:
            ratios["torch_over_triton"] = ms["torch"] / ms["triton"]
        if "gemm_bf16" in ms:
            ratios["triton_over_gemm_bf16"] = ms["triton"] / ms["gemm_bf16"]
        if fl.get("ms"):
            ratios["triton_over_floor"] = ms["triton"] / fl["ms"]
    if "torch" in ms and "gemm_bf16" in ms:
        ratios["torch_over_gemm_bf16"] = ms["torch"] / ms["gemm_bf16"]
    rec["ratios"] = ratios
    line = "  ".join(f"{k}={v:.3f}ms" for k, v in ms.items())
    print(f"{name:>10} {variant:>10} M={M:<6} K={K:<5} N={N:<5} {line}  floor={fl.get('ms') or float('nan'):.3f}ms "
          + "  ".join(f"{k}={v:.2f}" for k, v in ratios.items()), flush=True)
    return rec


def run(args):
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = CrossbarConfig()
    backends = ["triton", "torch"]
    ceilings = measure_ceilings(device, args.reps)
    cases = [("isaac", args.M, args.KN, args.KN)]
    for B in args.B:
        cases += [(f"deit-s-{n}-B{B}", B * args.T, k, nn) for n, k, nn in DEIT_SMALL]
    records = []
    for i, (name, M, K, N) in enumerate(cases):
        records.append(run_case(name, M, K, N, cfg, device, backends, args.reps, args.max_torch_mk, ceilings))
        if i == 0 and not args.no_noise:
            records.append(run_case(name, M, K, N, cfg.replace(read_noise=0.01), device, backends, args.reps,
                                    args.max_torch_mk, ceilings, variant="read_noise"))
            records.append(run_case(name, M, K, N, cfg.replace(prog_noise=0.02), device, backends, args.reps,
                                    args.max_torch_mk, ceilings, variant="prog_noise"))
    env = environment()
    return {"benchmark": "bench_crossbar", "device": str(device), "environment": env, "ceilings": ceilings,
            "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
            "note": "ms = median per call with weights programmed beforehand; floor.ms = max(S*J int8 GEMMs at "
                    "the measured torch._int_mm time, bytes over copy bandwidth); bit-identity recorded, not asserted",
            "records": records}


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
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--max-torch-mk", type=int, default=2 ** 26, help="time the torch reference only up to M*K")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-noise", action="store_true", help="skip the read/programming-noise variants")
    p.add_argument("--quick", action="store_true", help="small smoke run (M=256, K=N=192, B=1, T=20, few reps)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/crossbar-<host>-<date>.json)")
    args = p.parse_args(argv)
    if args.quick:  # smaller defaults; sizes given explicitly stay
        for name, small in (("M", 256), ("KN", 192), ("B", [1]), ("T", 20), ("reps", 3)):
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, small)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    out = Path(args.out) if args.out else RESULTS / result_filename("crossbar")
    out.parent.mkdir(parents=True, exist_ok=True)
    result["plot"] = plot(result, out.with_suffix(".png"))
    print("wrote", write_json(out, result))


if __name__ == "__main__":
    main()
