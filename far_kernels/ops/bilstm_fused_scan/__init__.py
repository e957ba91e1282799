"""Multi-head bidirectional LSTM over inputs: the per-head input product and the scan in one op.

The cpp backend fuses the input product into the scan (no gate tensor in memory); on cuda and triton
the op is the batched input GEMM followed by that backend's bilstm_scan. Training (a gradient
required) runs one torch.lstm per head."""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

from far_kernels import dispatch
from far_kernels.ops import bilstm_scan as _scan
from far_kernels.ops._checks import (as_hidden_sizes, check_float_tensors, check_out, check_same_device,
                                     needs_grad)
from far_kernels.ops.bilstm_fused_scan.cpp import bilstm_fused_scan_cpp
from far_kernels.ops.bilstm_fused_scan.reference import (bilstm_fused_scan_autograd, bilstm_fused_scan_ref,
                                                         input_gates_ref)

_NAME = "bilstm_fused_scan"


def _gates_then(backend: str) -> Callable:
    """This op on `backend` as the batched input GEMM followed by bilstm_scan's `backend` implementation."""
    def impl(x, w_ih, bias, w_hh, hidden_sizes, out=None):
        gx = input_gates_ref(x, w_ih, bias)  # under autocast: autocast's dtype, not x's
        if gx.dtype == x.dtype:
            return _scan.OP.impls[backend](gx, w_hh, hidden_sizes, out)
        h = _scan.OP.impls[backend](gx, w_hh, hidden_sizes, None)  # the scan's out= must have gx's dtype
        return h.to(x.dtype) if out is None else out.copy_(h)  # the result is x's dtype on every backend
    return impl


OP = dispatch.Op(
    _NAME,
    {"torch": bilstm_fused_scan_ref, "cpp": bilstm_fused_scan_cpp,
     "cuda": _gates_then("cuda"), "triton": _gates_then("triton")},
    grad_impl=bilstm_fused_scan_autograd,
    limits={"triton": lambda x, w_ih, bias, w_hh, hidden_sizes, *_: (
        _scan.triton_units_limit(hidden_sizes, x.device)
        or _scan.triton_index_limit(w_ih.shape[0], x.shape[0], x.shape[1], w_ih.shape[2] // 4)),
        "cuda": lambda x, w_ih, *_: _scan.cuda_size_limit(w_ih.shape[0], x.shape[0], x.shape[1], w_ih.shape[2] // 4)},
)


def check_fused_scan_inputs(x, w_ih, bias, w_hh, hidden_sizes) -> torch.Tensor:
    """Validate the fused scan's inputs (clear errors) and return hidden_sizes as an int64 CPU tensor."""
    check_float_tensors(_NAME, (("x", x), ("w_ih", w_ih), ("bias", bias), ("w_hh", w_hh)))
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
    check_same_device(_NAME, "x", x, (("w_ih", w_ih), ("bias", bias), ("w_hh", w_hh)))
    return as_hidden_sizes(hidden_sizes, H, n, _NAME)


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
    """bilstm_scan(x_h W_ih^T + bias, w_hh, hidden_sizes) for every head h (no gate tensor in memory on cpp).

    Args:
        x: [B, T, H*d] inputs (e.g. FAR's pre_proj output); head h reads columns h*d .. h*d+d-1.
            float32/float16/bfloat16 (float64 on the torch backend). Weights of another float dtype are
            cast to x's (outside autocast). Under autocast the input product is autocast's (its dtype on torch,
            triton and cuda; cpp keeps the whole product in fp32, the more accurate, ~2e-3 from bf16's), fp32
            for training; the output has x's dtype.
        w_ih: [H, 2, 4n, d] input weights, torch.nn.LSTM layout padded to n units, gates (i, f, g, o)
            at rows q*n + u, direction 0 = forward, 1 = backward.
        bias: [H, 2, 4n] = b_ih + b_hh.
        w_hh: [H, 2, 4n, n] recurrent weights.
        hidden_sizes: [2, H] ints in [0, n]: kept units per (direction, head); padded units ignored
            (whatever their weights and biases hold; with a gradient required, they get a gradient of 0).
        backend: "torch" | "cpp" | "cuda" | "triton" | "auto"; default env FAR_BACKEND, else auto.
        out: optional [H, B, T, 2, n] contiguous tensor of x's dtype and device to write into.
    Returns:
        h: [H, B, T, 2, n] in x.dtype; units >= hidden size are 0.
    Differentiable on the torch backend (auto picks it when a gradient is required: one torch.lstm
    per head; with a forward-mode AD tangent, which torch.lstm lacks, the reference); the other backends
    raise BackendUnavailable in that case.

    Example:
        >>> x = torch.randn(2, 50, 3 * 64); w_ih = torch.randn(3, 2, 256, 64) * 0.1
        >>> h = bilstm_fused_scan(x, w_ih, torch.zeros(3, 2, 256), torch.randn(3, 2, 256, 64) * 0.1,
        ...                       [[64, 37, 0], [64, 64, 12]])  # [3, 2, 50, 2, 64]
    """
    hs = check_fused_scan_inputs(x, w_ih, bias, w_hh, hidden_sizes)
    B, T, _ = x.shape
    H, _, G, _ = w_ih.shape
    if out is not None:
        check_out(_NAME, out, (H, B, T, 2, G // 4), x.dtype, x.device)
        _scan.check_no_overlap(_NAME, out, (("x", x), ("w_ih", w_ih), ("bias", bias), ("w_hh", w_hh),
                                            ("hidden_sizes", hidden_sizes)))
    if any(t.dtype != x.dtype for t in (w_ih, bias, w_hh)) and not torch.is_autocast_enabled(x.device.type):
        # one rule on every backend (they disagreed: cpp widened all to fp32, torch and triton raised)
        w_ih, bias, w_hh = (t.to(x.dtype) for t in (w_ih, bias, w_hh))
    return dispatch.run(OP, (x, w_ih, bias, w_hh, hs), backend=backend, device=x.device, dtype=x.dtype,
                        needs_grad=needs_grad((x, w_ih, bias, w_hh)), out=out)


__all__ = ["bilstm_fused_scan", "bilstm_fused_scan_ref", "bilstm_fused_scan_autograd", "check_fused_scan_inputs",
           "input_gates_ref", "OP"]
