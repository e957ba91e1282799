"""The machine a result comes from: CPU and device names, the torch device to use, and the record
(host, versions, commit, load) that every benchmark or evaluation JSON carries."""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Optional

import torch

from far.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[3]  # a source checkout: python/far/utils/env.py


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (e.g. 'AMD EPYC'), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device) -> str:
    """'NVIDIA H100 80GB HBM3' for a CUDA device; 'cpu (AMD EPYC, 2 cores)' for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_model()}, {os.cpu_count()} cores)"


def resolve_device(name: Optional[str] = None, what: str = "device") -> torch.device:
    """The torch.device for a user's device string (None or 'auto': cuda if available, else cpu);
    ConfigError (its message starting with `what`, e.g. '--device') if it cannot be used here."""
    dev_name = name if name not in (None, "auto") else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(dev_name)
    except RuntimeError as e:
        raise ConfigError(f"{what} {dev_name}: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{what} {dev_name}: no CUDA device is available "
                              + ("(CPU build of torch)" if torch.version.cuda is None else "(no GPU visible)"))
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            raise ConfigError(f"{what} {dev_name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type != "cpu":
        raise ConfigError(f"{what} must be cpu or cuda[:N], got {dev_name}")
    return device


def as_device(device) -> torch.device:
    """An API caller's device (a string, torch.device or index) as a torch.device this machine can use;
    ConfigError otherwise (as the CLI's --device)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device {device!r}: {e}") from None
    return resolve_device(str(dev), "device")


def param_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype a model's inputs are cast to: its first parameter's when floating (e.g. bfloat16), else float32."""
    p = next(model.parameters(), None)
    return p.dtype if p is not None and p.is_floating_point() else torch.float32


def model_device(model: torch.nn.Module, device=None) -> torch.device:
    """`device` checked by as_device, or (None) where the model's first parameter lives (CPU for a model
    without parameters)."""
    if device is None:
        p = next(model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")
    return as_device(device)


def check_on_device(model: torch.nn.Module, device: torch.device, name: str = "the model") -> None:
    """ConfigError unless `model` (its first parameter) is on `device`, where its inputs go: a model elsewhere
    would fail deep inside its first layer with torch's device-mismatch error; nothing is moved."""
    where = model_device(model)
    if where.type != device.type or (where.index is not None and device.index is not None
                                     and where.index != device.index):
        raise ConfigError(f"{name} is on {where} but the images go to {device}: move it there "
                          f"(model.to('{device}')) or pass device='{where}'")


@contextlib.contextmanager
def seeded_rngs(seed: int):
    """Python's, numpy's and torch's (CPU) global RNGs seeded from `seed` inside, each restored afterwards: random
    transforms that draw from them (timm's, torchvision's) give the same draws for the same seed, whatever ran
    before, in any DataLoader worker."""
    import random

    import numpy as np

    py, npy = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)


@contextlib.contextmanager
def eval_mode(*models: torch.nn.Module):
    """Every module of `models` in eval mode inside; afterwards each module back in its own mode (a model
    training with some parts frozen in eval mode keeps them so; model.train(was) would set them all)."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield models[0] if len(models) == 1 else models
    finally:
        for m, training in saved:
            m.training = training


def loadavg() -> Optional[list]:
    """1/5/15-minute load averages (a busy machine makes CPU timings unreliable), None if unknown."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def host_tag() -> str:
    """A filename-safe host name ('cpu' when there is none)."""
    name = socket.gethostname().split(".")[0] or "cpu"
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name) or "cpu"


def result_filename(name: str, ext: str = "json") -> str:
    """'<name>-<host>-<YYYYMMDD>.<ext>': the conventional name of a result file."""
    return f"{name}-{host_tag()}-{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%d')}.{ext}"


def _git(*args: str) -> Optional[str]:
    """git's output in the source checkout far runs from (None for an installed copy, or no git)."""
    if not (REPO_ROOT / ".git").exists():
        return None
    try:
        r = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


GIT_ENV = ("FAR_GIT_COMMIT", "FAR_GIT_DIRTY")  # the commit of a copy without .git (e.g. a device machine's)


def git_state() -> dict:
    """{"git_commit", "git_dirty", "git_source"}: from git in the source checkout, else (a copy without .git,
    e.g. the working tree sent to a device machine) from env FAR_GIT_COMMIT / FAR_GIT_DIRTY (0/1, true/false)
    as the sender recorded them (`FAR_GIT_COMMIT=$(git rev-parse HEAD)`), else None."""
    commit = _git("rev-parse", "HEAD")
    if commit is not None:
        status = _git("status", "--porcelain")
        return {"git_commit": commit, "git_dirty": None if status is None else bool(status), "git_source": "git"}
    commit = os.environ.get("FAR_GIT_COMMIT", "").strip() or None
    dirty = os.environ.get("FAR_GIT_DIRTY", "").strip().lower()
    return {"git_commit": commit,
            "git_dirty": {"1": True, "true": True, "0": False, "false": False}.get(dirty) if commit else None,
            "git_source": "env FAR_GIT_COMMIT" if commit else None}


def environment(threads: Optional[int] = None) -> dict:
    """Where and on what a result was measured: host, CPU, GPU, versions, git commit and dirty flag (and
    where they came from: git_state), load average, UTC date."""
    import importlib

    from far.version import __version__

    versions = {"python": platform.python_version(), "torch": torch.__version__, "far": __version__}
    for mod in ("triton", "timm"):
        try:
            versions[mod] = getattr(importlib.import_module(mod), "__version__", "unknown")
        except ImportError:
            versions[mod] = None
    return {
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": threads if threads is not None else torch.get_num_threads(),
        "versions": versions,
        **git_state(),
        "loadavg_start": loadavg(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cuda": {"device": torch.cuda.get_device_name(), "runtime": torch.version.cuda}
        if torch.cuda.is_available() else None,
    }
