"""Multi-head bidirectional LSTM scan over precomputed input gates (the recurrent core of FAR)."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from far_kernels.dispatch import Op
from far_kernels.ops.bilstm_scan.naive import bilstm_scan_ref

from far_kernels.ops.bilstm_scan.cpp import bilstm_scan_cpp
from far_kernels.ops.bilstm_scan.cuda import bilstm_scan_cuda

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def bilstm_scan_triton(gx: torch.Tensor, w_hh: torch.Tensor, hidden_sizes: torch.Tensor,
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """triton backend; Triton is imported on first use (far_kernels imports without it, and the
    kernel is built for the mode TRITON_INTERPRET selects at that moment)."""
    from far_kernels.ops.bilstm_scan.triton import bilstm_scan_triton as impl

    return impl(gx, w_hh, hidden_sizes, out)


OP = Op(
    "bilstm_scan",
    {"torch": bilstm_scan_ref, "cpp": bilstm_scan_cpp, "cuda": bilstm_scan_cuda, "triton": bilstm_scan_triton},
)


def _as_hidden(hidden_sizes, H: int, n: int, op: str = "bilstm_scan") -> torch.Tensor:
    hs = torch.as_tensor(hidden_sizes)
    if hs.dtype.is_floating_point or hs.dtype == torch.bool or hs.is_complex():
        raise TypeError(f"{op}: hidden_sizes must be integers, got {hs.dtype}")
    if tuple(hs.shape) != (2, H):
        raise ValueError(f"{op}: hidden_sizes must have shape [2, H] = [2, {H}], got {list(hs.shape)}")
    hs = hs.to(device="cpu", dtype=torch.int64).contiguous()
    if H and (hs.min() < 0 or hs.max() > n):
        raise ValueError(f"{op}: hidden_sizes must lie in [0, n] = [0, {n}], got {hs.tolist()}")
    return hs


def _check_float_tensors(op: str, named) -> None:
    """Every (name, t) in `named` is a torch.Tensor of a supported float dtype (clear errors otherwise)."""
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{op}: {name} must be float32/float16/bfloat16/float64, got {t.dtype}")


def _check_out(op: str, out, shape, dtype, device) -> None:
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(shape) or out.dtype != dtype \
            or out.device != device or not out.is_contiguous():
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{op}: out must be a contiguous {list(shape)} {dtype} tensor on {device}, got {got}")


def check_scan_inputs(gx: torch.Tensor, w_hh: torch.Tensor, hidden_sizes) -> torch.Tensor:
    """Validate the scan's inputs (clear errors) and return hidden_sizes as an int64 CPU tensor."""
    _check_float_tensors("bilstm_scan", (("gx", gx), ("w_hh", w_hh)))
    if gx.dim() != 5 or gx.shape[3] != 2 or gx.shape[4] % 4 != 0:
        raise ValueError(f"bilstm_scan: gx must be [H, B, T, 2, 4n], got {list(gx.shape)}")
    H, n = gx.shape[0], gx.shape[4] // 4
    if tuple(w_hh.shape) != (H, 2, 4 * n, n):
        raise ValueError(f"bilstm_scan: w_hh must be [H, 2, 4n, n] = [{H}, 2, {4 * n}, {n}], got {list(w_hh.shape)}")
    if gx.device != w_hh.device:
        raise ValueError(f"bilstm_scan: gx is on {gx.device} but w_hh is on {w_hh.device}")
    return _as_hidden(hidden_sizes, H, n)


def bilstm_scan(
    gx: torch.Tensor,
    w_hh: torch.Tensor,
    hidden_sizes: Union[torch.Tensor, Sequence[Sequence[int]]],
    *,
    backend: Optional[str] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """H independent bidirectional LSTMs over precomputed input gates, every head and direction in one call.

    Args:
        gx: [H, B, T, 2, 4n] input-gate pre-activations (W_ih x + b_ih + b_hh), gates (i, f, g, o)
            at columns q*n + u, direction 0 = forward, 1 = backward. float32/float16/bfloat16
            (float64 on the torch backend).
        w_hh: [H, 2, 4n, n] recurrent weights, torch.nn.LSTM layout padded to n units.
        hidden_sizes: [2, H] ints in [0, n]: kept units per (direction, head); padded units ignored.
        backend: "torch" | "cpp" | "cuda" | "triton" | "auto"; default env FAR_BACKEND, else auto.
        out: optional [H, B, T, 2, n] contiguous tensor of gx's dtype and device to write into.
    Returns:
        h: [H, B, T, 2, n] in gx.dtype; units >= hidden size are 0.
    Only the torch backend is differentiable: auto picks it when a gradient is required; the
    others raise in that case.

    Example:
        >>> gx = torch.randn(3, 2, 50, 2, 4 * 64); w = torch.randn(3, 2, 256, 64) * 0.1
        >>> h = bilstm_scan(gx, w, [[64, 37, 0], [64, 64, 12]])  # [3, 2, 50, 2, 64]
    """
    hs = check_scan_inputs(gx, w_hh, hidden_sizes)
    if out is not None:
        H, B, T, _, G = gx.shape
        _check_out("bilstm_scan", out, (H, B, T, 2, G // 4), gx.dtype, gx.device)
    needs_grad = torch.is_grad_enabled() and (gx.requires_grad or w_hh.requires_grad)
    return OP.run((gx, w_hh, hs), backend=backend, device=gx.device, dtype=gx.dtype, needs_grad=needs_grad, out=out)


__all__ = ["bilstm_scan", "bilstm_scan_ref", "check_scan_inputs", "OP"]
