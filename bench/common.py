"""Shared helpers for the benchmark scripts in bench/: timing, environment, peak matmul rate, JSON.

Plain functions, no framework. CPU and GPU scripts both use them; pass `sync` (e.g.
torch.cuda.synchronize) when timing asynchronous devices.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from far.hardware import cpu_model

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"


# ---- timing ----
def percentile(sorted_xs, q: float) -> float:
    """Linear-interpolated q-quantile (q in [0, 1]) of an already sorted list."""
    if not sorted_xs:
        return float("nan")
    pos = q * (len(sorted_xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def time_fn(fn: Callable[[], object], *, reps: Optional[int] = None, min_reps: int = 5,
            min_time_s: float = 1.0, max_reps: int = 10_000, warmup: int = 2, warmup_s: float = 0.2,
            sync: Optional[Callable[[], None]] = None) -> dict:
    """Time fn() one call at a time with time.perf_counter.

    Warm-up (excluded): at least `warmup` calls and `warmup_s` seconds. Then `reps` timed calls, or,
    when reps is None, enough for max(min_reps, ~min_time_s of work) (at most max_reps), estimated
    from the median warm-up call. `sync` is called before every clock read (needed for CUDA, not for CPU).
    Returns ms: median, p10, p90, min, mean, and the number of timed runs.
    """
    sync = sync or (lambda: None)
    sync()
    warm = []
    while len(warm) < warmup or sum(warm) < warmup_s:
        t0 = time.perf_counter()
        fn()
        sync()
        warm.append(time.perf_counter() - t0)
    n_warm = len(warm)
    if reps is None:
        est = sorted(warm)[n_warm // 2]  # median: robust to a slow first call or a preempted run
        reps = int(min(max_reps, max(min_reps, math.ceil(min_time_s / max(est, 1e-9)))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    ts = sorted(times)
    return {"ms": percentile(ts, 0.5), "ms_p10": percentile(ts, 0.1), "ms_p90": percentile(ts, 0.9),
            "ms_min": ts[0], "ms_mean": sum(ts) / len(ts), "runs": len(ts), "warmup_runs": n_warm}


@torch.inference_mode()
def peak_mm_gflops(size: int = 2048, dtype: torch.dtype = torch.float32, device="cpu", **timing) -> dict:
    """Measured GFLOP/s of one torch.mm of two [size, size] matrices (2*size^3 FLOPs), median run,
    with the current torch thread count. The practical peak that a benchmark's floor divides by."""
    device = torch.device(device)
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    out = torch.empty(size, size, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    t = time_fn(lambda: torch.mm(a, b, out=out), sync=sync, **timing)
    flops = 2.0 * size ** 3
    return {"op": "torch.mm", "size": size, "dtype": str(dtype).replace("torch.", ""), "device": str(device),
            "gflops": flops / (t["ms"] * 1e-3) / 1e9, "gflops_best": flops / (t["ms_min"] * 1e-3) / 1e9, **t}


# ---- environment ----
def _git(*args: str) -> Optional[str]:
    try:
        r = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def hostname_tag() -> str:
    """A filename-safe host name ('cpu' when there is none)."""
    name = socket.gethostname().split(".")[0] or "cpu"
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name) or "cpu"


def loadavg() -> Optional[list]:
    """1/5/15-minute load averages (a busy machine makes CPU timings unreliable), None if unknown."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def environment(threads: Optional[int] = None) -> dict:
    """Where and on what a result was measured: host, CPU, GPU, versions, git commit and dirty flag."""
    import importlib

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("far", "far_kernels", "triton"):
        try:
            versions[mod] = getattr(importlib.import_module(mod), "__version__", "unknown")
        except ImportError:
            versions[mod] = None
    status = _git("status", "--porcelain")
    env = {
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": threads if threads is not None else torch.get_num_threads(),
        "versions": versions,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "loadavg_start": loadavg(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cuda": None,
    }
    if torch.cuda.is_available():
        env["cuda"] = {"device": torch.cuda.get_device_name(), "runtime": torch.version.cuda}
    return env


# ---- output ----
def default_result_path(name: str, ext: str = "json") -> Path:
    """bench/results/<name>-<host>-<YYYYMMDD>.<ext>."""
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d")
    return RESULTS_DIR / f"{name}-{hostname_tag()}-{date}.{ext}"


def _strict(obj):
    """JSON has no NaN/inf: write them as the strings "nan", "inf", "-inf"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def write_json(path, obj) -> Path:
    """Write obj as indented strict JSON atomically (temp file + rename), creating the folder."""
    path = Path(path)
    obj = _strict(obj)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def event_times_ms(fn: Callable[[], object], device, reps: int = 50, warmup: int = 5) -> list:
    """Sorted per-call ms of fn(): CUDA events around each call on a GPU, perf_counter on a CPU
    (warm-up calls excluded)."""
    for _ in range(warmup):
        fn()
    ts = []
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
    return sorted(ts)


def grouped_bars_png(path, xlabels, series: dict, ylabel: str, title: str, width_per_group: float = 0.6,
                     height: float = 4.5, xlabel_size: int = 7):
    """One log-scale grouped bar chart (a bar per series in every group) written to `path`.
    Returns the path, or None when matplotlib is missing. Missing values (None/0) draw no bar."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    n = len(xlabels)
    fig, ax = plt.subplots(figsize=(max(6, n * width_per_group), height))
    width = 0.8 / max(len(series), 1)
    for i, (name, vals) in enumerate(series.items()):
        ax.bar([j + i * width for j in range(n)], [v or 0 for v in vals], width, label=name)
    ax.set_xticks([j + 0.4 for j in range(n)])
    ax.set_xticklabels(xlabels, fontsize=xlabel_size)
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)

