"""Multi-head bidirectional LSTM scan with the per-head input product fused in (no gate tensor in memory)."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from far_kernels.dispatch import Op
from far_kernels.ops.bilstm_fused_scan.cpp import bilstm_fused_scan_cpp
from far_kernels.ops.bilstm_fused_scan.naive import bilstm_fused_scan_ref
from far_kernels.ops.bilstm_scan import _as_hidden, _check_float_tensors, _check_out

_NAME = "bilstm_fused_scan"
OP = Op(
    _NAME,
    {"torch": bilstm_fused_scan_ref, "cpp": bilstm_fused_scan_cpp, "cuda": None, "triton": None},
    missing={
        "cuda": "the fused CUDA kernel is not implemented; use bilstm_scan (cuda) over precomputed input gates",
        "triton": "the fused Triton kernel is not implemented; use bilstm_scan over precomputed input gates",
    },
)


def check_fused_scan_inputs(x, w_ih, bias, w_hh, hidden_sizes) -> torch.Tensor:
    """Validate the fused scan's inputs (clear errors) and return hidden_sizes as an int64 CPU tensor."""
    _check_float_tensors(_NAME, (("x", x), ("w_ih", w_ih), ("bias", bias), ("w_hh", w_hh)))
    if w_ih.dim() != 4 or w_ih.shape[1] != 2 or w_ih.shape[2] % 4 != 0:
        raise ValueError(f"{_NAME}: w_ih must be [H, 2, 4n, d], got {list(w_ih.shape)}")
    H, _, G, d = w_ih.shape
    n = G // 4
    if x.dim() != 3 or x.shape[2] != H * d:
        raise ValueError(f"{_NAME}: x must be [B, T, H*d] = [B, T, {H * d}], got {list(x.shape)}")
    if tuple(bias.shape) != (H, 2, G):
        raise ValueError(f"{_NAME}: bias must be [H, 2, 4n] = [{H}, 2, {G}], got {list(bias.shape)}")
    if tuple(w_hh.shape) != (H, 2, G, n):
        raise ValueError(f"{_NAME}: w_hh must be [H, 2, 4n, n] = [{H}, 2, {G}, {n}], got {list(w_hh.shape)}")
    for name, t in (("w_ih", w_ih), ("bias", bias), ("w_hh", w_hh)):
        if t.device != x.device:
            raise ValueError(f"{_NAME}: x is on {x.device} but {name} is on {t.device}")
    return _as_hidden(hidden_sizes, H, n, _NAME)


def bilstm_fused_scan(
    x: torch.Tensor,
    w_ih: torch.Tensor,
    bias: torch.Tensor,
    w_hh: torch.Tensor,
    hidden_sizes: Union[torch.Tensor, Sequence[Sequence[int]]],
    *,
    backend: Optional[str] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """bilstm_scan(x_h W_ih^T + bias, w_hh, hidden_sizes) for every head h without materializing the gates.

    Args:
        x: [B, T, H*d] inputs (e.g. FAR's pre_proj output); head h reads columns h*d .. h*d+d-1.
            float32/float16/bfloat16 (float64 on the torch backend).
        w_ih: [H, 2, 4n, d] input weights, torch.nn.LSTM layout padded to n units, gates (i, f, g, o)
            at rows q*n + u, direction 0 = forward, 1 = backward.
        bias: [H, 2, 4n] = b_ih + b_hh.
        w_hh: [H, 2, 4n, n] recurrent weights.
        hidden_sizes: [2, H] ints in [0, n]: kept units per (direction, head); padded units ignored.
        backend: "torch" | "cpp" | "auto" (cuda/triton: not implemented); default env FAR_BACKEND, else auto.
        out: optional [H, B, T, 2, n] contiguous tensor of x's dtype and device to write into.
    Returns:
        h: [H, B, T, 2, n] in x.dtype; units >= hidden size are 0.
    Only the torch backend is differentiable: auto picks it when a gradient is required; the
    others raise in that case.

    Example:
        >>> x = torch.randn(2, 50, 3 * 64); w_ih = torch.randn(3, 2, 256, 64) * 0.1
        >>> h = bilstm_fused_scan(x, w_ih, torch.zeros(3, 2, 256), torch.randn(3, 2, 256, 64) * 0.1,
        ...                       [[64, 37, 0], [64, 64, 12]])  # [3, 2, 50, 2, 64]
    """
    hs = check_fused_scan_inputs(x, w_ih, bias, w_hh, hidden_sizes)
    B, T, _ = x.shape
    H, _, G, _ = w_ih.shape
    if out is not None:
        _check_out(_NAME, out, (H, B, T, 2, G // 4), x.dtype, x.device)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, w_ih, bias, w_hh))
    return OP.run((x, w_ih, bias, w_hh, hs), backend=backend, device=x.device, dtype=x.dtype,
                  needs_grad=needs_grad, out=out)


__all__ = ["bilstm_fused_scan", "bilstm_fused_scan_ref", "check_fused_scan_inputs", "OP"]
