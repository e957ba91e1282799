"""What every benchmark script here shares: the run's flags and machine state, GPU timing that excludes
host time, the check of a configuration's output before it is timed, and the attention row.

    flags = run_flags(device)                       # TF32/cuDNN/SDPA switches, FAR_* env, threads, load
    chk = check_output(out, ref64, out_pt, tiny)    # {"ok", "max_abs_err", "bound", ...}, recorded, no assert
    stats = time_variants({"a": fa, "b": fb}, device, rounds=3)   # medians and spread, interleaved rounds
    attn = timm_attention(C, H, device, dtype)      # timm Attention with SDPA (the block FAR replaces)

GPU timing (GpuTimer): warmed up on a side stream, the calls are captured on that stream in a CUDA graph
(when capture fails, e.g. a host copy in the call, they are launched one by one: "events") and timed with
events around k calls, divided by k;
before every timed rep a GPU sleep longer than the host's enqueue time keeps the GPU busy, so no host
time or launch gap is counted. Two figures: "ms" with the caches warm (k back-to-back calls on the same
inputs) and "ms_cold_l2" with the L2 flushed (a buffer of twice its size zeroed) before each single
call. CPU timing is perf_counter per call (far_kernels.benchmark.time_fn).
Rounds: every variant is timed once per round, rounds interleaved, so a change of machine load hits
all variants alike; "ms" is the median over every timed call, "round_ms" the per-round medians, and
"spread" (max - min) / median of those.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from far.utils.env import loadavg
from far_kernels.benchmark import percentile, time_fn
from far_kernels.testing import max_err

ENV_VARS = ("FAR_BACKEND", "FAR_CUDA_SCAN_PATH", "FAR_CUDA_FAST_TANH", "TRITON_INTERPRET", "CUDA_LAUNCH_BLOCKING",
            "NVIDIA_TF32_OVERRIDE", "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
            "CUDA_VISIBLE_DEVICES", "TORCH_CUDNN_V8_API_DISABLED")


def _get(fn, default=None):
    try:
        return fn()
    except Exception:  # a switch this torch does not have
        return default


def run_flags(device="cpu") -> dict:
    """The switches that change what a timed row computes or how fast: TF32 and reduced-precision
    matmul, cuDNN, SDPA backends, deterministic mode, FAR_*/TRITON_*/thread env vars, torch threads,
    machine load."""
    b = torch.backends
    flags = {
        "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
        "logical_cpus": os.cpu_count(), "loadavg": loadavg(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": _get(lambda: b.cuda.matmul.allow_tf32),
        "cuda_matmul_allow_fp16_reduced_precision_reduction": _get(lambda: b.cuda.matmul.allow_fp16_reduced_precision_reduction),
        "cuda_matmul_allow_bf16_reduced_precision_reduction": _get(lambda: b.cuda.matmul.allow_bf16_reduced_precision_reduction),
        "cudnn_enabled": b.cudnn.enabled, "cudnn_allow_tf32": b.cudnn.allow_tf32,
        "cudnn_benchmark": b.cudnn.benchmark, "cudnn_deterministic": b.cudnn.deterministic,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "sdp": {k: _get(getattr(b.cuda, f"{k}_sdp_enabled")) for k in ("flash", "mem_efficient", "math", "cudnn")
                if hasattr(b.cuda, f"{k}_sdp_enabled")},
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    }
    device = torch.device(device)
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        flags["cuda"] = {"device": p.name, "capability": f"{p.major}.{p.minor}", "sm_count": p.multi_processor_count,
                         "memory_GiB": round(p.total_memory / 2 ** 30, 1), "l2_bytes": getattr(p, "L2_cache_size", None),
                         "torch_cuda": torch.version.cuda, "cudnn": b.cudnn.version()}
    return flags


def check_output(out: torch.Tensor, ref64: torch.Tensor, out_pt: torch.Tensor, tiny: float) -> dict:
    """The tests' derived tolerance, recorded instead of asserted: ok when `out` is finite and
    err(out vs ref64) <= 2 * err(out_pt vs ref64) + tiny (out_pt: plain PyTorch, same dtype)."""
    finite = bool(torch.isfinite(out).all())
    err = max_err(out, ref64) if finite else float("inf")
    err_pt = max_err(out_pt, ref64)
    bound = 2 * err_pt + tiny
    return {"ok": finite and err <= bound, "max_abs_err": err if finite else None, "finite": finite,
            "torch_same_dtype_err": err_pt, "bound": bound, "ref_max_abs": float(ref64.abs().max())}


def timm_attention(C: int, H: int, device, dtype) -> torch.nn.Module:
    """timm's ViT Attention(C, H, qkv_bias=True) with F.scaled_dot_product_attention forced on."""
    from timm.layers import Attention

    a = Attention(C, H, qkv_bias=True)
    a.fused_attn = True
    return a.to(device=device, dtype=dtype).eval()


def check_attention(attn: torch.nn.Module, x: torch.Tensor) -> dict:
    """attn(x) (SDPA) against a float64 copy; 'the same math in torch' is the unfused softmax path."""
    import copy

    ref = copy.deepcopy(attn).double()
    plain = copy.deepcopy(attn)
    plain.fused_attn = False
    with torch.inference_mode():
        out, ref64, out_pt = attn(x), ref(x.double()), plain(x)
    tiny = 1e-5 if x.dtype == torch.float32 else 1e-3 * float(ref64.abs().max())
    return check_output(out, ref64, out_pt, tiny)


# ---------------------------------------------------------------- GPU timing
_CYCLES_PER_MS: Dict[int, float] = {}
_FLUSH: Dict[int, torch.Tensor] = {}


def _cycles_per_ms(device: torch.device) -> float:
    """Clock cycles of torch.cuda._sleep per ms, measured once per device."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _CYCLES_PER_MS:
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1_000_000)
        s.record()
        torch.cuda._sleep(10_000_000)
        e.record()
        e.synchronize()
        _CYCLES_PER_MS[idx] = 10_000_000 / max(s.elapsed_time(e), 1e-3)
    return _CYCLES_PER_MS[idx]


def _flush_buffer(device: torch.device) -> torch.Tensor:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _FLUSH:
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0
        _FLUSH[idx] = torch.empty(max(2 * l2, 64 * 2 ** 20), dtype=torch.uint8, device=device)
    return _FLUSH[idx]


def _capture(fn: Callable[[], object], k: int, stream: torch.cuda.Stream) -> Optional[torch.cuda.CUDAGraph]:
    """fn() k times in one CUDA graph captured on `stream` (the one fn was warmed up on), or None when the
    calls cannot be captured."""
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g, stream=stream):
            for _ in range(k):
                fn()
    except Exception:  # e.g. a synchronizing or host copy inside fn: time launches instead
        torch.cuda.synchronize()
        return None
    torch.cuda.synchronize()
    return g


def _events(run: Callable[[], None], reps: int, pre: Callable[[], None]) -> list:
    """GPU ms of run(), reps times, each after pre() (which keeps the GPU busy while the host enqueues)."""
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in pairs:
        pre()
        s.record()
        run()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in pairs]


class GpuTimer:
    """Times one callable on the GPU (see the module docstring); graphs are captured once and reused
    across rounds. target_ms: the GPU time one warm rep aims at (k = calls per rep).

    Warm-up runs on a side stream and the graphs are captured on that same stream (torch's recommended
    pattern): a wrapper that caches per stream and stores nothing while capturing (the cuda scan's fp32 copy
    of a 16-bit W_hh, far_kernels/ops/bilstm_scan/cuda.py) then hits its cache during capture, so a replay
    holds the kernel alone, not the conversion. torch.cuda.graph's default is its own capture stream, which
    no warm-up had run on: every replay of a fp16/bf16 cuda scan converted W_hh again. The current stream
    is warmed too (it runs the calls when capture fails, "events")."""

    def __init__(self, fn: Callable[[], object], device, target_ms: float = 2.0, max_k: int = 20,
                 graphs: bool = True):
        self.fn, self.device = fn, torch.device(device)
        cur = torch.cuda.current_stream(self.device)
        self.stream = torch.cuda.Stream(self.device)  # warm-up and capture stream
        self.stream.wait_stream(cur)
        with torch.cuda.stream(self.stream):
            for _ in range(3):  # warm-up: compilation, autotuning, caches of the wrappers
                fn()
        cur.wait_stream(self.stream)
        fn()  # the current stream's caches (the events fallback and the estimate below run there)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(3):
            fn()
        e.record()
        self.host_ms = (time.perf_counter() - t0) * 1e3 / 3  # enqueue time per call (an upper bound)
        e.synchronize()
        est = max(s.elapsed_time(e) / 3, 1e-3)
        self.k = int(min(max_k, max(1, math.ceil(target_ms / est))))
        self.graph = _capture(fn, self.k, self.stream) if graphs else None
        self.graph1 = (self.graph if self.k == 1 else _capture(fn, 1, self.stream)) if self.graph is not None else None
        self.method = "cuda_graph" if self.graph is not None else "events"
        self.cpms = _cycles_per_ms(self.device)
        self.flush = _flush_buffer(self.device)

    def _sleep(self, calls: int):
        host = 0.02 if self.graph is not None else self.host_ms * calls
        cycles = int(self.cpms * (1.5 * host + 0.03))
        return lambda: torch.cuda._sleep(cycles)

    def warm(self, reps: int) -> list:
        run = self.graph.replay if self.graph is not None else (lambda: [self.fn() for _ in range(self.k)])
        return [t / self.k for t in _events(run, reps, self._sleep(self.k))]

    def cold(self, reps: int) -> list:
        run = self.graph1.replay if self.graph1 is not None else self.fn
        sleep = self._sleep(1)

        def pre():
            self.flush.zero_()
            sleep()  # the flush alone may be shorter than the host's enqueue time

        return _events(run, reps, pre)


def _stats(ts: list) -> dict:
    ts = sorted(ts)
    return {"ms": percentile(ts, 0.5), "ms_p10": percentile(ts, 0.1), "ms_p90": percentile(ts, 0.9),
            "ms_min": ts[0], "runs": len(ts)}


def time_variants(fns: Dict[str, Callable[[], object]], device="cpu", rounds: int = 3, reps: Optional[int] = None,
                  min_time_s: float = 0.3, cold_l2: bool = True, graphs: bool = True,
                  warmup_s: float = 0.0) -> Dict[str, dict]:
    """Time every fn of `fns` in `rounds` interleaved rounds. GPU: `reps` (default 20) timed reps per
    round, warm and L2-cold; CPU: `reps` calls per round, or adaptive (>= 3 calls, ~min_time_s), after a
    warm-up of 2 calls and at least `warmup_s` seconds in the first round (1 call in the later ones).
    A variant whose call raises gets {"error": ...} and is left out of later rounds.
    Returns name -> {"ms", "ms_p10", "ms_p90", "ms_min", "runs", "round_ms", "spread", "method", ...}."""
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index != torch.cuda.current_device():  # GpuTimer's events, sleeps and streams: the current device's
            with torch.cuda.device(device):
                return time_variants(fns, device, rounds, reps, min_time_s, cold_l2, graphs, warmup_s)
    res: Dict[str, dict] = {name: {} for name in fns}
    samples = {name: [] for name in fns}
    cold = {name: [] for name in fns}
    timers = {}
    for r in range(rounds):
        for name, fn in fns.items():
            if "error" in res[name]:
                continue
            try:
                if device.type == "cuda":
                    if name not in timers:
                        timers[name] = GpuTimer(fn, device, graphs=graphs)
                    t = timers[name]
                    ts = t.warm(reps or 20)
                    if cold_l2:
                        cold[name].append(t.cold(reps or 20))
                else:
                    ts = time_fn(fn, device=device, reps=reps, min_reps=3, min_time_s=min_time_s,
                                 warmup=2 if r == 0 else 1, warmup_s=warmup_s if r == 0 else 0.0)["times_ms"]
            except Exception as e:  # record, keep the others going
                res[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
                timers.pop(name, None)
                continue
            samples[name].append(ts)
    for name in fns:
        if "error" in res[name] or not samples[name]:
            continue
        rounds_ms = [statistics.median(ts) for ts in samples[name]]
        out = _stats([t for ts in samples[name] for t in ts])
        med = statistics.median(rounds_ms)
        out.update(round_ms=rounds_ms, spread=(max(rounds_ms) - min(rounds_ms)) / med if med > 0 else None)
        if name in timers:
            t = timers[name]
            out.update(method=t.method, calls_per_rep=t.k, host_enqueue_ms=t.host_ms)
            if cold[name]:
                c = _stats([x for ts in cold[name] for x in ts])
                out.update(ms_cold_l2=c["ms"], ms_cold_l2_p10=c["ms_p10"], ms_cold_l2_p90=c["ms_p90"])
        else:
            out["method"] = "perf_counter"
        res[name] = out
    timers.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # graph pools of this configuration
    return res


def add_result_args(p: argparse.ArgumentParser) -> None:
    """--threads, --out (the result JSON; its PNG beside it) and --plot-only, as the sweep scripts take them."""
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--plot-only", action="store_true", help="redraw the PNG of an existing --out JSON")


def redraw(args: argparse.Namespace, plot: Callable[[dict, Path], Optional[str]]) -> Optional[int]:
    """With --plot-only: redraw --out's PNG with `plot` and return 0 (exit with a message without an existing --out);
    None otherwise (the script measures)."""
    if not args.plot_only:
        return None
    if args.out is None or not args.out.is_file():
        sys.exit("--plot-only needs --out, an existing result JSON")
    print("wrote", plot(json.loads(args.out.read_text()), args.out.with_suffix(".png")))
    return 0
