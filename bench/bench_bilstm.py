"""Per-layer latency of the FAR BiLSTM on a GPU against cuDNN LSTMs and attention (JSON + PNG).

For DeiT-tiny/small/base shapes (C = 192/384/768, H = C/64, d = n = 64), T = 197 by default:
  dense_masked_lstm  the public FAR code's form: one nn.LSTM(C, C, bidirectional) (cuDNN), block-diagonal weights
  per_head_lstm      nn.LSTM(d, n, bidirectional) per head (cuDNN), H calls
  scan_<backend>     far_kernels.bilstm_scan alone (gates precomputed), every available backend
  lstm_<backend>     far_kernels.bilstm_fused_scan: per-head input product + scan, the work of an nn.LSTM call
  block_<backend>    the whole FARAttention block (pre_proj -> input GEMM -> scan -> head_proj -> proj)
  attention_sdpa     timm Attention (qkv -> SDPA -> proj) at the same C, H, T, B: the block FAR replaces
Every row's output is checked on the same shape BEFORE it is timed (bench/common.py check_output: the
error against a float64 reference at most twice that of the same math in plain PyTorch in the row's
dtype, plus a small slack): scan/lstm rows against bilstm_scan_ref, blocks against the float64 block,
attention against a float64 copy. A backend row that fails is marked failed and not timed; baselines
(cuDNN, attention) are timed either way, their check recorded. The run goes on after any failure.
Timing (bench/common.py): CUDA graphs (or launches) between events with the GPU kept busy, so no host
time is counted; "ms" with warm caches, "ms_cold_l2" with the L2 flushed before each call; rounds
interleaved over the rows, medians and spread recorded. TF32 is off unless --tf32 (fp32 rows are fp32).
Floors per step: FLOPs and bytes per step over the measured matmul rate and copy bandwidth
("ceilings", for every dtype the run times), the rate of the unit each backend's product runs on (tensor
cores for the cuda mma path and Triton's 16-bit dot, the fp32 rate with TF32 off for the fma paths: fp32,
and fp16/bf16 at B < 16 on cuda), and the dependent-chain latency (one head at B = 1). The JSON is rewritten after every
configuration (a killed run keeps what it measured); --first puts the headline case first.
Runs on the CPU too (--device cpu --quick) to check the script itself.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import check_attention, check_output, run_flags, time_variants, timm_attention  # noqa: E402

import far  # noqa: E402
import far_kernels  # noqa: E402
from far.utils.env import environment, loadavg, result_filename  # noqa: E402
from far.utils.fs import write_json  # noqa: E402
from far.utils.plot import grouped_bars  # noqa: E402
from far_kernels.ops.bilstm_fused_scan.reference import input_gates_ref  # noqa: E402
from far_kernels.ops.bilstm_scan.cuda import uses_tensor_cores  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

SHAPES = {"tiny": 192, "small": 384, "base": 768}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BASELINES = ("dense_masked_lstm", "per_head_lstm", "attention_sdpa")


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


def scan_paths(dtype, B, backends) -> dict:
    """The unit each GPU backend's recurrent product runs on: "matrix" (tensor cores: the cuda mma path, fp16/bf16
    at B >= 16 under auto or FAR_CUDA_SCAN_PATH=mma; Triton's 16-bit dot) or "fma" (fp32 on the CUDA cores: the
    cuda fma path, fp32 always and 16-bit at small B; Triton's fp32 "ieee" dot). CPU backends: none."""
    half = dtype in (torch.float16, torch.bfloat16)
    out = {}
    for be in backends:
        if be == "cuda":
            out[be] = "matrix" if uses_tensor_cores(dtype, B) else "fma"
        elif be == "triton":
            out[be] = "matrix" if half else "fma"
    return out


def scan_floor(H, B, T, n, dtype_bytes, ceilings=None, dtype_name="fp32", paths=None):
    """FLOPs and bytes of the scan (gates read once, h written once, W_hh read once), in total and per
    time step, and the time floors per step from the measured ceilings when given: one per unit the
    product can run on ("matrix": the dtype's torch.mm rate, fp16/bf16 only; "fma": the fp32 rate with TF32
    off), each max(flops term, bytes term). `paths` (scan_paths) says which unit each backend uses;
    floor.us_per_step is the cuda backend's (else the first backend's), named by floor.us_per_step_path."""
    flops = 2 * 2 * H * B * T * 4 * n * n  # recurrent products (the input product is a GEMM before the scan)
    bytes_ = H * B * T * 2 * (4 * n + n) * dtype_bytes + H * 2 * 4 * n * n * dtype_bytes
    rec = {"dependent_steps": T, "scan_flops": flops, "scan_bytes": bytes_,
           "flops_per_step": flops / T, "bytes_per_step": bytes_ / T}
    if ceilings:
        rates = {"fma": ceilings.get("fma_gflops")}
        if dtype_name != "fp32":
            rates["matrix"] = (ceilings.get("mm_gflops") or {}).get(dtype_name)
        gbps = ceilings.get("copy_GBps")
        fl = {}
        if gbps:
            fl["bytes_us_per_step"] = bytes_ / T / (gbps * 1e3)
        for unit, gflops in rates.items():
            if gflops:
                fl[f"flops_us_per_step_{unit}"] = flops / T / (gflops * 1e3)
                fl[f"us_per_step_{unit}"] = max(fl[f"flops_us_per_step_{unit}"], fl.get("bytes_us_per_step", 0.0))
        fl["path"] = dict(paths or {})
        main = fl["path"].get("cuda") or next(iter(fl["path"].values()), None)
        if main is not None and f"us_per_step_{main}" in fl:
            fl["us_per_step"], fl["us_per_step_path"] = fl[f"us_per_step_{main}"], main
        elif "bytes_us_per_step" in fl and not any(k.startswith("flops_") for k in fl):
            fl["us_per_step"], fl["us_per_step_path"] = fl["bytes_us_per_step"], "bytes only"
        rec["floor"] = fl
    return rec


def backend_floor(floor: dict, backend: str):
    """The floor (us per step) of `backend`'s own path, None when not measured."""
    unit = (floor or {}).get("path", {}).get(backend)
    return (floor or {}).get(f"us_per_step_{unit}") if unit else None


def measure_ceilings(device, dtypes, args):
    """Device-to-device copy bandwidth (bytes read + written), the torch.mm rate of every dtype of the run
    ("mm_gflops"; fp32 as the run's TF32 setting has it) and the fp32 rate with TF32 off ("fma_gflops": the
    CUDA cores, the unit of the scans' fma paths), measured."""
    if device.type != "cuda":
        return {}
    x = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device=device)  # 256 MiB
    y = torch.empty_like(x)
    fns = {"copy": lambda: y.copy_(x)}
    mats = {d: (torch.randn(8192, 8192, device=device, dtype=DTYPES[d]),
                torch.randn(8192, 8192, device=device, dtype=DTYPES[d])) for d in dict.fromkeys(dtypes + ["fp32"])}
    for d, (a, b) in mats.items():
        if d in dtypes:
            fns[f"mm_{d}"] = lambda a=a, b=b: torch.mm(a, b)

    def mm_fma(a=mats["fp32"][0], b=mats["fp32"][1]):
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # read when cuBLAS is called: also under graph capture
        try:
            return torch.mm(a, b)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev

    fns["mm_fp32_fma"] = mm_fma
    t = time_variants(fns, device, rounds=1, reps=5, cold_l2=False, graphs=not args.no_graphs)
    out = {"copy_bytes": x.numel(), "mm_gflops": {}, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    if "ms" in t["copy"]:
        out["copy_GBps"] = 2 * x.numel() / (t["copy"]["ms"] * 1e-3) / 1e9
    for d in dtypes:
        if "ms" in t[f"mm_{d}"]:
            out["mm_gflops"][d] = 2 * 8192 ** 3 / (t[f"mm_{d}"]["ms"] * 1e-3) / 1e9
    if "ms" in t["mm_fp32_fma"]:
        out["fma_gflops"] = 2 * 8192 ** 3 / (t["mm_fp32_fma"]["ms"] * 1e-3) / 1e9
    return out


def run_dtypes(args) -> list:
    """The dtypes of the cases this run times (--only-first empties the grid: its --first cases' dtypes)."""
    return list(dict.fromkeys(d for _, d, _ in case_list(args)))


def case_list(args):
    """(shape, dtype, B) in the order to run: --first cases, then the grid (shape-major), less --skip."""
    grid = [(s, d, B) for d in args.dtypes for s in args.shapes for B in args.B]
    first = [c for c in args.first if c in grid or args.first_outside_grid]
    rest = [c for c in grid if c not in first and c not in args.skip]
    return [c for c in first if c not in args.skip] + rest


def scan_tiny(dtype) -> float:
    """Slack for activations: ex2/rcp-based (~1e-7 each, accumulated) or tanh.approx (2^-11 each)."""
    fast = os.environ.get("FAR_CUDA_FAST_TANH", "0").lower() in ("1", "true")
    return 8 * 2.0 ** -11 if fast else 1e-5


class Group:
    """The modules of one (shape, dtype): FAR block, its float64 copy, the cuDNN LSTMs, attention."""

    def __init__(self, shape, dname, device, T, backends, args):
        C = SHAPES[shape]
        self.C, self.H, self.d = C, C // 64, 64
        self.dtype = DTYPES[dname]
        torch.manual_seed(0)
        m = far.FARAttention(C, self.H).eval()
        self.dense, self.heads = build_lstms(m, C, self.H, self.d, device, self.dtype)
        self.m64 = copy.deepcopy(m).to(device=device, dtype=torch.float64)
        self.m = m.to(device=device, dtype=self.dtype)
        self.attn = timm_attention(C, self.H, device, self.dtype)
        self.chain = {}  # dependent-chain latency per step: one head, B = 1, per backend
        g1 = torch.randn(1, 1, T, 2, 4 * self.d, device=device, dtype=self.dtype)
        w1, hs1 = self.m.w_hh[:1].detach().clone(), self.m.hidden_sizes[:, :1].clone()  # one tensor: wrapper caches hit
        fns = {be: (lambda be=be: far_kernels.bilstm_scan(g1, w1, hs1, backend=be)) for be in backends}
        with torch.inference_mode():
            t = time_variants(fns, device, rounds=1, reps=args.reps, cold_l2=False, graphs=not args.no_graphs)
        for be, r in t.items():
            self.chain[be] = 1e3 * r["ms"] / T if "ms" in r else r.get("error")


def run_case(g: Group, shape, dname, B, T, device, backends, ceilings, args):
    m, H, d, C, dtype = g.m, g.H, g.d, g.C, g.dtype
    hs = m.hidden_sizes
    half = None if dtype == torch.float32 else dtype
    rec = {"shape": shape, "C": C, "H": H, "n": d, "T": T, "B": B, "dtype": dname, "ms": {}, "checks": {},
           **scan_floor(H, B, T, d, torch.finfo(dtype).bits // 8, ceilings, dname, scan_paths(dtype, B, backends)),
           "chain_us_per_step": g.chain, "loadavg": loadavg()}
    torch.manual_seed(B)
    x = torch.randn(B, T, C, device=device, dtype=dtype)
    gx = torch.randn(H, B, T, 2, 4 * d, device=device, dtype=dtype)
    bias = m.b_ih + m.b_hh
    fns = {}
    with torch.inference_mode():
        # references on this very shape
        # "the same math in torch": fp32 products, or for the cuda mma path and the cuDNN baselines (16-bit
        # tensor cores) h and W_hh rounded to the dtype before every recurrent product
        scan64 = far_kernels.bilstm_scan_ref(gx.double(), m.w_hh.double(), hs)
        lstm64 = far_kernels.bilstm_fused_scan_ref(x.double(), g.m64.w_ih, g.m64.b_ih + g.m64.b_hh, g.m64.w_hh, hs)
        gates = input_gates_ref(x, m.w_ih, bias)
        scan_pt = {pd: far_kernels.bilstm_scan_ref(gx, m.w_hh, hs, product_dtype=pd) for pd in {None, half}}
        lstm_pt = {pd: far_kernels.bilstm_scan_ref(gates, m.w_hh, hs, product_dtype=pd) for pd in {None, half}}
        del gates
        block64 = g.m64(x.double(), backend="torch")
        block_pt = m(x, backend="torch")
        block_tiny = 1e-4 if dtype == torch.float32 else 1e-2 * float(block64.abs().max())
        variants = {
            "dense_masked_lstm": (lambda: g.dense(x),
                                  lambda o: o[0].view(B, T, 2, H, d).permute(3, 0, 1, 2, 4), lstm64, lstm_pt[half], None),
            "per_head_lstm": (lambda: [lstm(x[..., h * d:(h + 1) * d]) for h, lstm in enumerate(g.heads)],
                              lambda o: torch.stack([oh[0].view(B, T, 2, d) for oh in o]), lstm64, lstm_pt[half], None),
        }
        names = backends + (["torch"] if B * T <= args.max_torch_tokens else [])
        for be in names:
            pd = half if be == "cuda" and uses_tensor_cores(dtype, B) else None
            variants[f"scan_{be}"] = (lambda be=be: far_kernels.bilstm_scan(gx, m.w_hh, hs, backend=be), None,
                                      scan64, scan_pt[pd], None)
            variants[f"lstm_{be}"] = (lambda be=be: far_kernels.bilstm_fused_scan(x, m.w_ih, bias, m.w_hh, hs, backend=be),
                                      None, lstm64, lstm_pt[pd], None)
            variants[f"block_{be}"] = (lambda be=be: m(x, backend=be), None, block64, block_pt, block_tiny)
        for name, (fn, view, ref64, out_pt, tiny) in variants.items():
            try:
                out = fn()
                out = view(out) if view else out
                chk = check_output(out, ref64, out_pt, tiny if tiny is not None else scan_tiny(dtype))
            except Exception as e:  # a backend that cannot run this case: recorded, the run goes on
                chk = {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
            rec["checks"][name] = chk
            if chk["ok"] or (name in BASELINES and "error" not in chk):
                fns[name] = fn
            else:
                rec.setdefault("failed", {})[name] = chk.get("error") or (
                    f"error {chk.get('max_abs_err')} > bound {chk['bound']:.3g}" if chk.get("finite") else "non-finite output")
                rec["ms"][name] = None
        rec["checks"]["attention_sdpa"] = check_attention(g.attn, x)
        fns["attention_sdpa"] = lambda: g.attn(x)
        del scan64, scan_pt, lstm64, lstm_pt, block64, block_pt
        t = time_variants(fns, device, rounds=args.rounds, reps=args.reps, min_time_s=args.min_time,
                          graphs=not args.no_graphs)
    rec["timing"] = t
    for name, r in t.items():
        rec["ms"][name] = r.get("ms")
        if "error" in r:
            rec.setdefault("errors", {})[name] = r["error"]
        if "ms_cold_l2" in r:
            rec.setdefault("ms_cold_l2", {})[name] = r["ms_cold_l2"]
    ms = rec["ms"]
    for be in names:
        if ms.get(f"scan_{be}"):
            us = rec.setdefault("us_per_step", {})[be] = 1e3 * ms[f"scan_{be}"] / T
            if backend_floor(rec.get("floor"), be):
                rec.setdefault("over_floor", {})[be] = us / backend_floor(rec["floor"], be)
            if isinstance(g.chain.get(be), float):
                rec.setdefault("over_chain", {})[be] = us / g.chain[be]
        for base in ("dense_masked_lstm", "per_head_lstm"):
            if ms.get(base) and ms.get(f"lstm_{be}"):
                rec.setdefault("speedup", {})[f"lstm_{be}_vs_{base}"] = ms[base] / ms[f"lstm_{be}"]
        if ms.get(f"block_{be}") and ms.get("attention_sdpa"):
            rec.setdefault("block_vs_attention", {})[be] = ms[f"block_{be}"] / ms["attention_sdpa"]
    for base in ("dense_masked_lstm", "per_head_lstm", "attention_sdpa"):
        if ms.get(base):
            rec.setdefault("us_per_step", {})[base] = 1e3 * ms[base] / T  # per token step, for the comparison
    return rec


def run(args, out: Path):
    device = torch.device(args.device)
    if not args.tf32:  # fp32 rows compute in fp32 (cuDNN and cuBLAS default to TF32 on Ampere+ otherwise)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    avail = {b: far_kernels.ops.bilstm_scan.OP.reason(b, device) for b in far_kernels.BACKENDS}
    wanted = ("cuda", "triton") if device.type == "cuda" else ("cpp",)
    backends = [b for b in wanted if avail.get(b) is None]
    env = environment()
    result = {"benchmark": "bench_bilstm", "device": str(device), "environment": env, "flags": run_flags(device),
              "backends": {b: avail.get(b) for b in wanted}, "args": {k: v for k, v in vars(args).items() if k != "out"},
              "note": "ms = median per call over rounds x reps (warm caches; ms_cold_l2: L2 flushed before each call); "
                      "LSTM baselines and lstm_* include the input projection, scan_* does not; checks: output vs "
                      "float64 reference on the same shape before timing; floor.us_per_step_<unit> = max(flops, "
                      "bytes) per step over the measured ceilings, unit matrix (mm_gflops of the dtype) or fma "
                      "(fma_gflops: fp32, TF32 off); floor.path = each backend's unit, over_floor against its own; "
                      "16-bit W_hh: the cuda wrapper's fp32 copy is made in the warm-up (cached per stream, graphs "
                      "captured on the warm-up stream), not in the timed calls; chain_us_per_step = one head at B=1",
              "complete": False, "records": []}
    write_json(out, result)
    result["ceilings"] = measure_ceilings(device, run_dtypes(args), args)
    group, key = None, None
    for shape, dname, B in case_list(args):
        if (shape, dname) != key:
            group, key = None, (shape, dname)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            group = Group(shape, dname, device, args.T, backends, args)
        rec = run_case(group, shape, dname, B, args.T, device, backends, result["ceilings"], args)
        result["records"].append(rec)
        write_json(out, result)
        ms = rec["ms"]
        print(f"{shape:5s} {dname} B={B:<4d} " + "  ".join(f"{k}={v:.3f}" for k, v in ms.items() if v is not None)
              + (f"  FAILED {sorted(rec['failed'])}" if rec.get("failed") else ""), flush=True)
        steps = "  ".join(f"{k}={v:.3f}" for k, v in rec.get("us_per_step", {}).items())
        chains = "  ".join(f"{be}={v:.3f}" for be, v in group.chain.items() if isinstance(v, float))
        print(f"      us/step: {steps}  | floor {rec.get('floor', {}).get('us_per_step', float('nan')):.4f}"
              f"  | chain (H1 B1) {chains}", flush=True)
    result["complete"] = True
    result["flags_end"] = {"loadavg": loadavg()}
    write_json(out, result)
    return result


def plot(result, path):
    recs = result["records"]
    names = sorted({k for r in recs for k, v in r["ms"].items() if v})
    return grouped_bars(path, [f"{r['shape']}\n{r['dtype']} B{r['B']}" for r in recs],
                        {name: [r["ms"].get(name) for r in recs] for name in names}, "ms per layer (median)",
                        f"FAR BiLSTM vs cuDNN LSTM vs attention, T={recs[0]['T'] if recs else '?'}",
                        width_per_group=0.6, height=4)


def _cases(s):
    out = []
    for c in s.split(","):
        if c:
            shape, dname, B = c.split(":")
            out.append((shape, dname, int(B)))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", type=lambda s: s.split(","), default=["small", "tiny", "base"])
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=["fp16", "bf16", "fp32"])
    p.add_argument("--B", type=lambda s: [int(v) for v in s.split(",")], default=[64, 1, 8, 256])
    p.add_argument("--T", type=int, default=197)
    p.add_argument("--first", type=_cases, default=[("small", "fp16", 64)],
                   help="shape:dtype:B cases to run before the grid (default small:fp16:64, the headline)")
    p.add_argument("--skip", type=_cases, default=[], help="shape:dtype:B cases to leave out")
    p.add_argument("--only-first", action="store_true", help="run the --first cases only")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per case")
    p.add_argument("--reps", type=int, default=None, help="timed reps per round (GPU default 20; CPU adaptive)")
    p.add_argument("--min-time", type=float, default=0.3, help="CPU: ~seconds of timed calls per round")
    p.add_argument("--no-graphs", action="store_true", help="time launches between events, not CUDA graphs")
    p.add_argument("--tf32", action="store_true", help="leave TF32 on for fp32 matmuls and cuDNN")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--max-torch-tokens", type=int, default=8 * 197, help="time the torch reference only up to B*T tokens")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: tiny shape, fp32, B=1,2, T=20, 1 round")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/bilstm-<host>-<date>.json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.shapes, args.dtypes, args.B, args.T, args.rounds = ["tiny"], ["fp32"], [1, 2], 20, 1
        args.first, args.reps = [], args.reps or 3
    args.first_outside_grid = args.only_first
    if args.only_first:
        args.shapes, args.dtypes, args.B = [], [], []
    out = Path(args.out) if args.out else RESULTS / result_filename("bilstm")
    result = run(args, out)
    if not args.no_plot and result["records"]:
        result["plot"] = plot(result, out.with_suffix(".png"))
        write_json(out, result)
    print("wrote", out)


if __name__ == "__main__":
    main()
