"""The one timer of the project: CPU wall clock or CUDA events, medians over many runs.

    stats = time_fn(lambda: op(x), device="cuda")      # {"ms", "ms_p10", "ms_p90", "ms_min", ...}
    with Stopwatch(device) as sw: model(x)              # one timed region (synchronized); sw.seconds

Warm-up and compilation are excluded; CUDA work is timed with events recorded on the device's current stream,
one call at a time: each call starts on an idle stream (the previous call's end event was waited for), so its time
includes the host's launch time, as a user's single call would (replaying a captured CUDA graph leaves
it out); on the CPU, perf_counter. No asserts: speed goals are read from results."""
from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch


def percentile(sorted_xs, q: float) -> float:
    """Linear-interpolated q-quantile (q in [0, 1]) of an already sorted list."""
    if not sorted_xs:
        return float("nan")
    pos = q * (len(sorted_xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def synchronize(device) -> None:
    """Wait for `device`'s queued work (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Times one region: synchronizes `device` before and after, adds the wall time to .seconds.
    Reusable: every `with` adds to the total."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.seconds = 0.0
        self._t0 = 0.0

    def __enter__(self) -> "Stopwatch":
        synchronize(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.seconds += time.perf_counter() - self._t0


def _one_call_ms(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        stream = torch.cuda.current_stream(device)  # `device`'s: record() alone uses the current device's
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_fn(fn: Callable[[], object], *, device="cpu", reps: Optional[int] = None, min_reps: int = 5,
            min_time_s: float = 1.0, max_reps: int = 10_000, warmup: int = 2, warmup_s: float = 0.2) -> dict:
    """Time fn() one call at a time: CUDA events on a CUDA `device`, perf_counter on the CPU.

    Warm-up (excluded): at least `warmup` calls and `warmup_s` seconds. Then `reps` timed calls, or,
    when reps is None, enough for max(min_reps, ~min_time_s of work) (at most max_reps), estimated
    from the median warm-up call (then at least one warm-up call is made). Returns ms: median ("ms"), p10,
    p90, min, mean, the number of timed runs and every time sorted ("times_ms"). ValueError when that
    leaves no timed call (reps, or max_reps, below 1; min_reps and min_time_s both 0)."""
    if (reps < 1) if reps is not None else (max_reps < 1 or (min_reps < 1 and min_time_s <= 0)):
        raise ValueError(f"time_fn: no call would be timed (reps={reps}, min_reps={min_reps}, max_reps={max_reps}, "
                         f"min_time_s={min_time_s}); at least one is needed")
    device = torch.device(device)
    synchronize(device)
    warm, warm_ms = [], 0.0  # a running total: summing the list per call made a fast fn's warm-up quadratic
    while len(warm) < max(warmup, reps is None) or warm_ms < warmup_s * 1e3:
        warm.append(_one_call_ms(fn, device))
        warm_ms += warm[-1]
    n_warm = len(warm)
    if reps is None:
        est = sorted(warm)[n_warm // 2]  # median: robust to a slow first call or a preempted run
        reps = int(min(max_reps, max(min_reps, math.ceil(min_time_s * 1e3 / max(est, 1e-6)))))
    ts = sorted(_one_call_ms(fn, device) for _ in range(reps))
    return {"ms": percentile(ts, 0.5), "ms_p10": percentile(ts, 0.1), "ms_p90": percentile(ts, 0.9),
            "ms_min": ts[0], "ms_mean": sum(ts) / len(ts), "runs": len(ts), "warmup_runs": n_warm, "times_ms": ts}


@torch.inference_mode()
def peak_mm_gflops(size: int = 2048, dtype: torch.dtype = torch.float32, device="cpu", **timing) -> dict:
    """Measured GFLOP/s of one torch.mm of two [size, size] matrices (2*size^3 FLOPs), median run,
    with the current torch thread count: the practical peak that a benchmark's floor divides by."""
    device = torch.device(device)
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    out = torch.empty(size, size, dtype=dtype, device=device)
    t = time_fn(lambda: torch.mm(a, b, out=out), device=device, **timing)
    flops = 2.0 * size ** 3
    t.pop("times_ms")
    return {"op": "torch.mm", "size": size, "dtype": str(dtype).replace("torch.", ""), "device": str(device),
            "gflops": flops / (t["ms"] * 1e-3) / 1e9, "gflops_best": flops / (t["ms_min"] * 1e-3) / 1e9, **t}
