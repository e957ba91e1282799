"""One dispatcher for every far_kernels op.

Backend selection: explicit argument > env ``FAR_BACKEND`` > ``auto`` (the best available backend
for the tensor's device). A backend that is asked for and cannot run raises
:class:`BackendUnavailable` saying why and how to get it; it is never silently replaced.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from far_kernels._ext import EXT_ERROR, INSTALL_HINT, _C, ext_has_cuda

BACKENDS = ("torch", "cpp", "triton", "cuda")
# auto's order of preference per device type (fastest first); "torch" always works.
AUTO_ORDER = {"cpu": ("cpp", "torch"), "cuda": ("cuda", "triton", "torch")}


class BackendUnavailable(RuntimeError):
    """A backend was requested explicitly but cannot run here."""


def _triton_reason(device: torch.device) -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (`pip install triton`)"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton kernels run on CPU tensors only under TRITON_INTERPRET=1 (set it before importing triton)"
    if device.type not in ("cpu", "cuda"):
        return f"Triton does not run on {device.type} tensors"
    return None


def backend_reason(backend: str, device: torch.device | str = "cpu") -> Optional[str]:
    """None if `backend` can run on `device` in this environment, else the reason it cannot."""
    device = torch.device(device)
    if backend not in BACKENDS:
        return f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)} or 'auto'"
    if backend == "torch":
        return None
    if backend == "cpp":
        if _C is None:
            return EXT_ERROR
        return None if device.type == "cpu" else f"the cpp backend runs on CPU tensors, got a {device.type} tensor"
    if backend == "cuda":
        if _C is None:
            return EXT_ERROR
        if not ext_has_cuda():
            return ("far_kernels._C was built without CUDA kernels (no nvcc or a CPU-only torch at build time, "
                    f"or FAR_SKIP_CUDA_BUILD=1); {INSTALL_HINT} on a machine with nvcc and a CUDA build of torch")
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, got a {device.type} tensor"
        return None
    return _triton_reason(device)


def requested_backend(backend: Optional[str] = None) -> str:
    """The backend name in force: the argument, else env FAR_BACKEND, else 'auto'."""
    name = backend if backend is not None else os.environ.get("FAR_BACKEND", "auto")
    name = name.strip().lower()
    if name != "auto" and name not in BACKENDS:
        src = "argument" if backend is not None else "env FAR_BACKEND"
        raise ValueError(f"unknown backend '{name}' ({src}); choose one of {', '.join(BACKENDS)} or 'auto'")
    return name


class Op:
    """A kernel op with one implementation per backend (None = not implemented for that backend)."""

    def __init__(self, name: str, impls: dict[str, Optional[Callable]], missing: dict[str, str] | None = None):
        self.name = name
        self.impls = impls
        self.missing = missing or {}

    def reason(self, backend: str, device: torch.device | str) -> Optional[str]:
        if backend in BACKENDS and self.impls.get(backend) is None:
            return self.missing.get(backend, f"{self.name} has no {backend} implementation")
        return backend_reason(backend, device)

    def resolve(self, backend: Optional[str], device: torch.device | str) -> str:
        name = requested_backend(backend)
        device = torch.device(device)
        if name == "auto":
            for cand in AUTO_ORDER.get(device.type, ("torch",)):
                if self.reason(cand, device) is None:
                    return cand
            return "torch"
        why = self.reason(name, device)
        if why is not None:
            raise BackendUnavailable(f"{self.name}: backend '{name}' is unavailable: {why}")
        return name

    def run(self, args: tuple, *, backend: Optional[str], device: torch.device, dtype: torch.dtype,
            needs_grad: bool, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run the op with the shared rules: only `torch` (the reference, impls["torch"]) is
        differentiable, so auto picks it when a gradient is needed and an explicit other backend
        raises; the fast backends compute in fp32 (float64 only on torch); `out` is written when given.
        Non-torch impls are called as impl(*args, out)."""
        auto = requested_backend(backend) == "auto"
        if auto and needs_grad:  # auto never picks a backend that would refuse: only torch is differentiable
            if out is not None:
                raise ValueError(f"{self.name}: out= cannot be used when a gradient is required")
            return self.impls["torch"](*args)
        name = "torch" if auto and dtype == torch.float64 else self.resolve(backend, device)  # only torch does fp64
        if name == "torch":
            res = self.impls["torch"](*args).to(dtype)
            return res if out is None else out.copy_(res)
        if needs_grad:
            raise RuntimeError(f"{self.name}: the {name} backend is inference-only; run under torch.no_grad() / "
                               "torch.inference_mode(), or use backend='torch' for training")
        if dtype == torch.float64:
            raise TypeError(f"{self.name}: the {name} backend computes in fp32; use backend='torch' for float64")
        return self.impls[name](*args, out)


def backend_report(device: torch.device | str = "cpu") -> dict[str, Optional[str]]:
    """{backend: None if usable on `device` else why not} (generic, op-independent)."""
    return {b: backend_reason(b, device) for b in BACKENDS}
