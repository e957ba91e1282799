"""The one place a backend is chosen for every far_kernels op.

Selection: explicit argument > env ``FAR_BACKEND`` > ``auto``. ``auto`` picks the fastest backend
that can run the call (device, extension, per-call limits), and the ``torch`` reference when a
gradient is needed or the data is float64. A backend that is asked for and cannot run raises
:class:`BackendUnavailable` saying why (and how to get it); it is never silently replaced.

    op = Op("my_op", {"torch": ref, "cpp": cpp_impl, "cuda": None, "triton": None})
    name = select(op, backend, device, dtype, needs_grad)     # a backend name, or BackendUnavailable
    y = run(op, args, backend=..., device=..., dtype=..., needs_grad=..., out=None)
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from far_kernels._ext import EXT_ERROR, INSTALL_HINT, ext_has_cuda, lib

BACKENDS = ("torch", "cpp", "triton", "cuda")
# auto's order of preference per device type (fastest first); "torch" always works.
AUTO_ORDER = {"cpu": ("cpp", "torch"), "cuda": ("cuda", "triton", "torch")}


class BackendUnavailable(RuntimeError):
    """A backend was requested explicitly but cannot run this call here (missing extension or
    Triton, wrong device, inference-only backend asked for a gradient, float64 on an fp32 kernel,
    a config beyond the kernel's limits)."""


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
    """None if `backend` can run on `device` in this environment (op-independent), else why not."""
    device = torch.device(device)
    if backend not in BACKENDS:
        return f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)} or 'auto'"
    if backend == "torch":
        return None
    if backend == "cpp":
        if lib is None:
            return EXT_ERROR
        return None if device.type == "cpu" else f"the cpp backend runs on CPU tensors, got a {device.type} tensor"
    if backend == "cuda":
        if lib is None:
            return EXT_ERROR
        if not ext_has_cuda():
            return ("far_kernels._C was built without CUDA kernels (no nvcc or a CPU-only torch at build time, "
                    f"or FAR_SKIP_CUDA_BUILD=1); {INSTALL_HINT} on a machine with nvcc and a CUDA build of torch")
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, got a {device.type} tensor"
        return None
    return _triton_reason(device)


def requested_backend(backend: Optional[str] = None) -> str:
    """The backend name in force: the argument, else env FAR_BACKEND, else 'auto'. ValueError for a
    name that is not a backend. An empty FAR_BACKEND counts as unset, as shells spell unset (`FAR_BACKEND= cmd`)."""
    name = backend if backend is not None else (os.environ.get("FAR_BACKEND", "").strip() or "auto")
    name = name.strip().lower()
    if name != "auto" and name not in BACKENDS:
        src = "argument" if backend is not None else "env FAR_BACKEND"
        raise ValueError(f"unknown backend '{name}' ({src}); choose one of {', '.join(BACKENDS)} or 'auto'")
    return name


class Op:
    """A kernel op: one implementation per backend (None = not implemented there).

    impls["torch"] is the reference (plain PyTorch). grad_impl (default: the reference) is the
    differentiable implementation used whenever a gradient is required. limits: {backend:
    fn(*args) -> None or why this call is beyond that backend} for per-call limits. fp32_only: the
    non-torch backends compute in fp32 (float64 data then goes to torch under auto, and is an error
    for an explicit fast backend). Non-torch impls are called as impl(*args, out)."""

    def __init__(self, name: str, impls: dict[str, Optional[Callable]], missing: Optional[dict[str, str]] = None,
                 grad_impl: Optional[Callable] = None, limits: Optional[dict[str, Callable]] = None,
                 fp32_only: bool = True):
        self.name = name
        self.impls = impls
        self.missing = missing or {}
        self.grad_impl = grad_impl or impls["torch"]
        self.limits = limits or {}
        self.fp32_only = fp32_only

    def reason(self, backend: str, device: torch.device | str, args: Optional[tuple] = None) -> Optional[str]:
        """None if this op can run on `backend` and `device` (and, given `args`, this very call), else why not."""
        if backend in BACKENDS and self.impls.get(backend) is None:
            return self.missing.get(backend, f"{self.name} has no {backend} implementation")
        why = backend_reason(backend, device)
        if why is None and args is not None and backend in self.limits:
            why = self.limits[backend](*args)
        return why

    def __repr__(self) -> str:
        return f"Op({self.name!r}, backends={[b for b in BACKENDS if self.impls.get(b) is not None]})"


def select(op: Op, backend: Optional[str], device: torch.device | str, dtype: torch.dtype = torch.float32,
           needs_grad: bool = False, args: Optional[tuple] = None) -> str:
    """The backend that runs `op` for this call: explicit `backend` > env FAR_BACKEND > auto.

    auto: the torch reference when a gradient is needed or (fp32_only ops) the data is float64, else
    the first backend of AUTO_ORDER[device type] that can run the call. An explicit backend that
    cannot run it raises BackendUnavailable with the reason."""
    device = torch.device(device)
    name = requested_backend(backend)
    fp64 = op.fp32_only and dtype == torch.float64
    if name == "auto":
        if needs_grad or fp64:
            return "torch"
        for cand in AUTO_ORDER.get(device.type, ("torch",)):
            if op.reason(cand, device, args) is None:
                return cand
        return "torch"
    why = op.reason(name, device, args)
    if why is None and name != "torch":
        if needs_grad:
            why = ("it is inference-only; run under torch.no_grad() / torch.inference_mode(), or use "
                   "backend='torch' for training")
        elif fp64:
            why = "it computes in fp32; use backend='torch' for float64"
    if why is not None:
        raise BackendUnavailable(f"{op.name}: backend '{name}' is unavailable: {why}")
    return name


def run(op: Op, args: tuple, *, backend: Optional[str], device: torch.device, dtype: torch.dtype,
        needs_grad: bool, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """select() a backend and call it: grad_impl when a gradient is needed, the reference (cast to
    `dtype`, copied into `out` when given) on torch, impl(*args, out) elsewhere."""
    name = select(op, backend, device, dtype, needs_grad, args)
    if name == "torch":
        if needs_grad:
            if out is not None:
                raise ValueError(f"{op.name}: out= cannot be used when a gradient is required")
            return op.grad_impl(*args)
        res = op.impls["torch"](*args).to(dtype)
        return res if out is None else out.copy_(res)
    return op.impls[name](*args, out)


def extension_status() -> dict:
    """The compiled extension far_kernels._C: {"loaded": bool, "cuda": whether it has the CUDA kernels,
    "error": why it could not be imported (None when loaded)}."""
    return {"loaded": lib is not None, "cuda": ext_has_cuda(), "error": EXT_ERROR}


def backend_report(device: torch.device | str = "cpu") -> dict[str, Optional[str]]:
    """{backend: None if usable on `device` else why not} (generic, op-independent)."""
    return {b: backend_reason(b, device) for b in BACKENDS}
