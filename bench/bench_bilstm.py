"""Per-layer latency of the FAR BiLSTM on a GPU against cuDNN LSTMs and attention (JSON + PNG).

For DeiT-tiny/small/base shapes (C = 192/384/768, H = C/64, d = n = 64), T = 197 by default:
  dense_masked_lstm  the public FAR code's form: one nn.LSTM(C, C, bidirectional) (cuDNN), block-diagonal weights
  per_head_lstm      nn.LSTM(d, n, bidirectional) per head (cuDNN), H calls
  scan_<backend>     far_kernels.bilstm_scan alone (gates precomputed), every available GPU backend and torch
  lstm_<backend>     per-head input GEMM + scan: the same work as an nn.LSTM call (input product included)
  block_<backend>    the whole FARAttention block (pre_proj -> input GEMM -> scan -> head_proj -> proj)
  attention_sdpa     timm Attention (qkv -> SDPA -> proj) at the same C, H, T, B
Timing: CUDA events around each call, median of many calls after warm-up. Correctness of every
scan backend is checked on fresh random data against the float64 reference (recorded, no asserts).
Floors per case, per time step (the recurrence cannot be parallel in time, so a layer costs at
least T dependent steps): the scan's FLOPs and bytes per step over the measured matmul rate and
copy bandwidth of the device (measured once per run: "ceilings"), and the dependent-chain latency
per step, measured as the scan of one head at B = 1 (one program per direction: pure chain, no
throughput limit). us_per_step = scan ms / T; ratios: speedups over the cuDNN LSTMs (lstm_<backend>
vs dense/per-head nn.LSTM, both with the input product), block vs attention, us_per_step over floor.
Runs on the CPU too (--device cpu --quick) to check the script itself.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn as nn

import far
import far_kernels
from far.utils.env import environment, result_filename
from far.utils.fs import write_json
from far.utils.plot import grouped_bars
from far_kernels.benchmark import time_fn

RESULTS = Path(__file__).resolve().parent / "results"

SHAPES = {"tiny": 192, "small": 384, "base": 768}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def time_ms(fn, device, reps=50, warmup=5):
    """Median ms of fn(): CUDA events on GPU, perf_counter on CPU."""
    return time_fn(fn, device=device, reps=reps, warmup=warmup, warmup_s=0.0)["ms"]


def build_lstms(m, C, H, d, device, dtype):
    """(dense masked nn.LSTM(C, C, bidir), [per-head nn.LSTM(d, d, bidir)]) holding m's weights."""
    dense = nn.LSTM(C, C, bidirectional=True, batch_first=True)
    heads = []
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            for sfx in ("_l0", "_l0_reverse"):
                getattr(dense, name + sfx).zero_()
        for h in range(H):
            lstm = nn.LSTM(d, d, bidirectional=True, batch_first=True)
            for dr, sfx in ((0, "_l0"), (1, "_l0_reverse")):
                w_ih, w_hh, b_ih, b_hh = m.lstm_params(dr, h)
                for name, t in (("weight_ih", w_ih), ("weight_hh", w_hh), ("bias_ih", b_ih), ("bias_hh", b_hh)):
                    getattr(lstm, name + sfx).copy_(t)
                # dense: gate q of unit u of head h at row q*C + h*d + u; inputs/hidden of head h at cols h*d..
                for q in range(4):
                    rows = slice(q * C + h * d, q * C + (h + 1) * d)
                    getattr(dense, "weight_ih" + sfx)[rows, h * d:(h + 1) * d] = w_ih[q * d:(q + 1) * d]
                    getattr(dense, "weight_hh" + sfx)[rows, h * d:(h + 1) * d] = w_hh[q * d:(q + 1) * d]
                    getattr(dense, "bias_ih" + sfx)[rows] = b_ih[q * d:(q + 1) * d]
                    getattr(dense, "bias_hh" + sfx)[rows] = b_hh[q * d:(q + 1) * d]
            heads.append(lstm.to(device=device, dtype=dtype))
    return dense.to(device=device, dtype=dtype), heads


def scan_floor(H, B, T, n, dtype_bytes, ceilings=None, dtype_name="fp32"):
    """FLOPs and bytes of the scan (gates read once, h written once, W_hh read once), in total and per
    time step, and the time floors per step from the measured ceilings when given."""
    flops = 2 * 2 * H * B * T * 4 * n * n  # recurrent products (the input product is a GEMM before the scan)
    bytes_ = H * B * T * 2 * (4 * n + n) * dtype_bytes + H * 2 * 4 * n * n * dtype_bytes
    rec = {"dependent_steps": T, "scan_flops": flops, "scan_bytes": bytes_,
           "flops_per_step": flops / T, "bytes_per_step": bytes_ / T}
    if ceilings:
        gflops = (ceilings.get("mm_gflops") or {}).get(dtype_name)
        gbps = ceilings.get("copy_GBps")
        fl = {}
        if gflops:
            fl["flops_us_per_step"] = flops / T / (gflops * 1e3)
        if gbps:
            fl["bytes_us_per_step"] = bytes_ / T / (gbps * 1e3)
        if fl:
            fl["us_per_step"] = max(fl.values())
        rec["floor"] = fl
    return rec


def measure_ceilings(device, dtypes, reps):
    """Device-to-device copy bandwidth (bytes read + written) and torch.mm rate per dtype, measured."""
    if device.type != "cuda":
        return {}
    x = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device=device)  # 256 MiB
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), device, reps=reps)
    out = {"copy_GBps": 2 * x.numel() / (ms * 1e-3) / 1e9, "copy_bytes": x.numel(), "mm_gflops": {}}
    for dname in dtypes:
        a = torch.randn(8192, 8192, device=device, dtype=DTYPES[dname])
        b = torch.randn(8192, 8192, device=device, dtype=DTYPES[dname])
        ms = time_ms(lambda: torch.mm(a, b), device, reps=max(5, reps // 3))
        out["mm_gflops"][dname] = 2 * 8192 ** 3 / (ms * 1e-3) / 1e9
    out["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return out


def run(args):
    device = torch.device(args.device)
    from timm.layers import Attention

    backends = [b for b in ("cuda", "triton") if far_kernels.ops.bilstm_scan.OP.reason(b, device) is None]
    if device.type == "cpu":
        backends = [b for b in ("cpp",) if far_kernels.ops.bilstm_scan.OP.reason(b, device) is None]
    ceilings = measure_ceilings(device, args.dtypes, args.reps)
    records = []
    for shape in args.shapes:
        C = SHAPES[shape]
        H, d = C // 64, 64
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            torch.manual_seed(0)
            m = far.FARAttention(C, H).to(device=device, dtype=dtype).eval()
            dense, heads = build_lstms(m.float().cpu(), C, H, d, device, dtype)
            m = m.to(device=device, dtype=dtype)
            attn = Attention(C, H, qkv_bias=True).to(device=device, dtype=dtype).eval()
            chain = {}  # dependent-chain latency per step: one head, B = 1, per backend
            with torch.inference_mode():
                g1 = torch.randn(1, 1, args.T, 2, 4 * d, device=device, dtype=dtype)
                for be in backends:
                    try:
                        ms1 = time_ms(lambda be=be: far_kernels.bilstm_scan(g1, m.w_hh[:1], m.hidden_sizes[:, :1],
                                                                            backend=be), device, reps=args.reps)
                        chain[be] = 1e3 * ms1 / args.T
                    except Exception as e:  # recorded below as missing
                        chain[be] = f"{type(e).__name__}: {e}"[:200]
            for B in args.B:
                T = args.T
                rec = {"shape": shape, "C": C, "H": H, "n": d, "T": T, "B": B, "dtype": dname, "ms": {},
                       **scan_floor(H, B, T, d, torch.finfo(dtype).bits // 8, ceilings, dname),
                       "chain_us_per_step": chain}
                x = torch.randn(B, T, C, device=device, dtype=dtype)
                gx = torch.randn(H, B, T, 2, 4 * d, device=device, dtype=dtype)
                with torch.inference_mode():
                    xs = [x[..., h * d:(h + 1) * d].contiguous() for h in range(H)]
                    variants = {
                        "dense_masked_lstm": lambda: dense(x),
                        "per_head_lstm": lambda: [lstm(xh) for lstm, xh in zip(heads, xs)],
                        "attention_sdpa": lambda: attn(x),
                    }
                    for be in backends + (["torch"] if B * T <= args.max_torch_tokens else []):
                        variants[f"scan_{be}"] = lambda be=be: far_kernels.bilstm_scan(gx, m.w_hh, m.hidden_sizes, backend=be)
                        variants[f"lstm_{be}"] = lambda be=be: far_kernels.bilstm_scan(
                            m.input_gates(x), m.w_hh, m.hidden_sizes, backend=be)
                        variants[f"block_{be}"] = lambda be=be: m(x, backend=be)
                    for name, fn in variants.items():
                        try:
                            rec["ms"][name] = time_ms(fn, device, reps=args.reps)
                        except Exception as e:  # record, keep going (e.g. cuDNN without bf16 RNNs)
                            rec["ms"][name] = None
                            rec.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"[:300]
                    # correctness on fresh random data, small slice to keep the fp64 reference cheap
                    g = torch.randn(H, min(B, 2), min(T, 50), 2, 4 * d, device=device, dtype=dtype)
                    ref = far_kernels.bilstm_scan_ref(g.double(), m.w_hh.double(), m.hidden_sizes)
                    rec["max_abs_err_vs_fp64"] = {be: (far_kernels.bilstm_scan(g, m.w_hh, m.hidden_sizes, backend=be)
                                                       .double() - ref).abs().max().item() for be in backends}
                ms = rec["ms"]
                for be in backends:
                    if ms.get(f"scan_{be}"):
                        us = rec.setdefault("us_per_step", {})[be] = 1e3 * ms[f"scan_{be}"] / T
                        if rec.get("floor", {}).get("us_per_step"):
                            rec.setdefault("over_floor", {})[be] = us / rec["floor"]["us_per_step"]
                        if isinstance(chain.get(be), float):
                            rec.setdefault("over_chain", {})[be] = us / chain[be]
                    for base in ("dense_masked_lstm", "per_head_lstm"):
                        for kind in ("lstm", "scan"):
                            if ms.get(base) and ms.get(f"{kind}_{be}"):
                                rec.setdefault("speedup", {})[f"{kind}_{be}_vs_{base}"] = ms[base] / ms[f"{kind}_{be}"]
                    if ms.get(f"block_{be}") and ms.get("attention_sdpa"):
                        rec.setdefault("block_vs_attention", {})[be] = ms[f"block_{be}"] / ms["attention_sdpa"]
                records.append(rec)
                print(f"{shape:5s} {dname} B={B:<4d} " + "  ".join(
                    f"{k}={v:.3f}" for k, v in ms.items() if v is not None), flush=True)
                steps = "  ".join(f"{be}={v:.3f}" for be, v in rec.get("us_per_step", {}).items())
                chains = "  ".join(f"{be}={v:.3f}" for be, v in chain.items() if isinstance(v, float))
                print(f"      us/step: {steps}  | floor {rec.get('floor', {}).get('us_per_step', float('nan')):.4f}"
                      f"  | chain (H1 B1) {chains}", flush=True)
    env = environment()
    if device.type == "cuda":
        env["cudnn"] = torch.backends.cudnn.version()
    return {"benchmark": "bench_bilstm", "device": str(device), "environment": env, "ceilings": ceilings,
            "note": "ms = median per call; LSTM baselines and lstm_* include the input projection, scan_* "
                    "does not; floor.us_per_step = max(flops, bytes) per step over the measured ceilings; "
                    "chain_us_per_step = one head at B=1 (dependent-chain latency of that backend)",
            "records": records}


def plot(result, path):
    recs = result["records"]
    names = sorted({k for r in recs for k, v in r["ms"].items() if v})
    return grouped_bars(path, [f"{r['shape']}\n{r['dtype']} B{r['B']}" for r in recs],
                            {name: [r["ms"].get(name) for r in recs] for name in names}, "ms per layer (median)",
                            f"FAR BiLSTM vs cuDNN LSTM vs attention, T={recs[0]['T'] if recs else '?'}",
                            width_per_group=0.6, height=4)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", type=lambda s: s.split(","), default=["tiny", "small", "base"])
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=["fp16", "bf16", "fp32"])
    p.add_argument("--B", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8, 64, 256])
    p.add_argument("--T", type=int, default=197)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--max-torch-tokens", type=int, default=8 * 197, help="time the torch reference only up to B*T tokens")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: tiny shape, fp32, B=1,2, T=20")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/bilstm-<host>-<date>.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.dtypes, args.B, args.T, args.reps = ["tiny"], ["fp32"], [1, 2], 20, 3
    result = run(args)
    out = Path(args.out) if args.out else RESULTS / result_filename("bilstm")
    result["plot"] = plot(result, out.with_suffix(".png"))
    print("wrote", write_json(out, result))


if __name__ == "__main__":
    main()
