"""Multi-head bidirectional LSTM scan over precomputed input gates (the recurrent core of FAR)."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from far_kernels import dispatch
from far_kernels.ops._checks import (as_hidden_sizes, check_float_tensors, check_out, check_same_device,
                                     needs_grad)
from far_kernels.ops.bilstm_scan.cpp import bilstm_scan_cpp
from far_kernels.ops.bilstm_scan.cuda import bilstm_scan_cuda
from far_kernels.ops.bilstm_scan.limits import (CUDA_MAX_HEADS, INT32, MAX_BATCH_TILES, TRITON_MAX_UNITS,
                                                cuda_size_limit, triton_index_limit, triton_units_limit)
from far_kernels.ops.bilstm_scan.reference import bilstm_scan_ref


def bilstm_scan_triton(gx: torch.Tensor, w_hh: torch.Tensor, hidden_sizes: torch.Tensor,
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """triton backend; Triton is imported on first use (far_kernels imports without it, and the
    kernel is built for the mode TRITON_INTERPRET selects at that moment)."""
    from far_kernels.ops.bilstm_scan.triton import bilstm_scan_triton as impl

    return impl(gx, w_hh, hidden_sizes, out)


def _triton_limit(gx, w_hh, hidden_sizes, *_) -> Optional[str]:
    H, B, T, _, G = gx.shape
    return triton_units_limit(hidden_sizes, gx.device) or triton_index_limit(H, B, T, G // 4)


OP = dispatch.Op(
    "bilstm_scan",
    {"torch": bilstm_scan_ref, "cpp": bilstm_scan_cpp, "cuda": bilstm_scan_cuda, "triton": bilstm_scan_triton},
    limits={"triton": _triton_limit,
            "cuda": lambda gx, w_hh, hidden_sizes, *_: cuda_size_limit(*gx.shape[:3], gx.shape[4] // 4)},
)


def check_scan_inputs(gx: torch.Tensor, w_hh: torch.Tensor, hidden_sizes) -> torch.Tensor:
    """Validate the scan's inputs (clear errors) and return hidden_sizes as an int64 CPU tensor."""
    check_float_tensors("bilstm_scan", (("gx", gx), ("w_hh", w_hh)))
    if gx.dim() != 5 or gx.shape[3] != 2 or gx.shape[4] % 4 != 0:
        raise ValueError(f"bilstm_scan: gx must be [H, B, T, 2, 4n], got {list(gx.shape)}")
    H, n = gx.shape[0], gx.shape[4] // 4
    if tuple(w_hh.shape) != (H, 2, 4 * n, n):
        raise ValueError(f"bilstm_scan: w_hh must be [H, 2, 4n, n] = [{H}, 2, {4 * n}, {n}], got {list(w_hh.shape)}")
    check_same_device("bilstm_scan", "gx", gx, (("w_hh", w_hh),))
    return as_hidden_sizes(hidden_sizes, H, n, "bilstm_scan")


def _span(t: torch.Tensor) -> tuple:
    """(first, last + 1) byte address any element of `t` can occupy (empty tensors occupy none)."""
    if t.numel() == 0:
        return (0, 0)
    lo = hi = t.data_ptr()
    for size, stride in zip(t.shape, t.stride()):
        reach = (size - 1) * stride * t.element_size()
        lo, hi = (lo + reach, hi) if reach < 0 else (lo, hi + reach)
    return (lo, hi + t.element_size())


def check_no_overlap(op: str, out: torch.Tensor, named) -> None:
    """ValueError when `out` may share memory with any (name, input): every backend writes `out` while it
    still reads its inputs, so an aliased out= gives garbage (the C++ backend checks again)."""
    a = _span(out)
    for name, t in named:
        if isinstance(t, torch.Tensor) and t.device == out.device:
            b = _span(t)
            if a[0] < b[1] and b[0] < a[1]:
                raise ValueError(f"{op}: out shares memory with {name}; pass a separate output tensor")


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
        out: optional [H, B, T, 2, n] contiguous tensor of gx's dtype and device to write into; it
            must not share memory with gx, w_hh or hidden_sizes (ValueError).
    Returns:
        h: [H, B, T, 2, n] in gx.dtype; units >= hidden size are 0.
    Only the torch backend is differentiable: auto picks it when a gradient is required (grad mode and
    an input that requires grad, or a forward-mode AD tangent); the others raise in that case.

    Example:
        >>> gx = torch.randn(3, 2, 50, 2, 4 * 64); w = torch.randn(3, 2, 256, 64) * 0.1
        >>> h = bilstm_scan(gx, w, [[64, 37, 0], [64, 64, 12]])  # [3, 2, 50, 2, 64]
    """
    hs = check_scan_inputs(gx, w_hh, hidden_sizes).clone()  # owned: kernels read it without the GIL
    if out is not None:
        H, B, T, _, G = gx.shape
        check_out("bilstm_scan", out, (H, B, T, 2, G // 4), gx.dtype, gx.device)
        check_no_overlap("bilstm_scan", out, (("gx", gx), ("w_hh", w_hh), ("hidden_sizes", hidden_sizes)))
    return dispatch.run(OP, (gx, w_hh, hs), backend=backend, device=gx.device, dtype=gx.dtype,
                        needs_grad=needs_grad((gx, w_hh)), out=out)


__all__ = ["bilstm_scan", "bilstm_scan_ref", "check_scan_inputs", "cuda_size_limit", "triton_index_limit",
           "triton_units_limit", "CUDA_MAX_HEADS", "INT32", "MAX_BATCH_TILES", "TRITON_MAX_UNITS", "OP"]
