"""Multi-head bidirectional LSTM scan over precomputed input gates (the recurrent core of FAR)."""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch

from far_kernels import dispatch
from far_kernels.ops._checks import (as_hidden_sizes, check_float_tensors, check_out, check_same_device,
                                     needs_grad)
from far_kernels.ops.bilstm_scan.cpp import bilstm_scan_cpp
from far_kernels.ops.bilstm_scan.cuda import bilstm_scan_cuda
from far_kernels.ops.bilstm_scan.reference import bilstm_scan_ref


def bilstm_scan_triton(gx: torch.Tensor, w_hh: torch.Tensor, hidden_sizes: torch.Tensor,
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """triton backend; Triton is imported on first use (far_kernels imports without it, and the
    kernel is built for the mode TRITON_INTERPRET selects at that moment)."""
    from far_kernels.ops.bilstm_scan.triton import bilstm_scan_triton as impl

    return impl(gx, w_hh, hidden_sizes, out)


TRITON_MAX_UNITS = 64  # kept units per (head, direction) the compiled triton kernel holds on chip


def triton_units_limit(hidden_sizes: torch.Tensor, device: torch.device) -> Optional[str]:
    """None if the compiled triton scan can hold these hidden sizes, else why not. Above 64 units the padded
    W_hh tile outgrows an SM: compiled ahead of time for sm_90 (bench/triton_scan_resources.py), 128 padded
    units ask for 272,384 B (bf16) / 278,528 B (fp32) of dynamic shared memory, an H100 block gets at most
    232,448 B. The interpreter (CPU) has no such limit."""
    if torch.device(device).type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    kmax = int(hidden_sizes.max()) if hidden_sizes.numel() else 0
    if kmax > TRITON_MAX_UNITS:
        return (f"the triton scan holds W_hh on chip for at most {TRITON_MAX_UNITS} units per head and direction "
                f"(this call keeps {kmax}: its tile would need > 227 KiB of shared memory); the cuda backend "
                "takes wider heads")
    return None


INT32 = 2 ** 31
MAX_BATCH_TILES = 65535  # the triton scan's grid is (2H, batch tiles)


def triton_index_limit(H: int, B: int, T: int, n: int, block_b: int = 32,
                       out_step: Optional[int] = None) -> Optional[str]:
    """None if the triton scan's grid and int32 index arithmetic hold a call of these sizes, else why not. Offsets
    that an int64 promotion would cost registers are kept int32 and their sizes refused (compiled for sm_90, int64
    offsets of the 16-bit W_hh tile took the NP = 64 kernel's spill stack from 56 to 344 bytes): a (direction,
    head)'s W_hh [4n, n] below 2^31 elements, step t's offset t * out_step (out's step stride, 2n when
    contiguous) below 2^31, and at most 65535 batch tiles of block_b rows (the grid's second axis on a CUDA GPU;
    the launcher tiles B above 65535 * 16 rows by 32, the default here). Only a huge B, T or n reaches them; the
    other backends take such calls."""
    out_step = 2 * n if out_step is None else out_step
    if 4 * n * n >= INT32:
        return (f"its int32 offsets into W_hh [H, 2, 4n, n] pass 2^31 at n = {n} (4n^2 = {4 * n * n}); "
                "n <= 23170 fits")
    if max(T - 1, 0) * abs(out_step) >= INT32:
        return (f"its int32 offset of the last step into out, (T - 1) * {abs(out_step)} = "
                f"{max(T - 1, 0) * abs(out_step)}, passes 2^31 at T = {T}")
    if -(-B // block_b) > MAX_BATCH_TILES:
        return (f"B = {B} batch rows make more than {MAX_BATCH_TILES} tiles of {block_b} (a CUDA grid's second "
                "axis); split the batch")
    return None


def _triton_limit(gx, w_hh, hidden_sizes, *_) -> Optional[str]:
    H, B, T, _, G = gx.shape
    return triton_units_limit(hidden_sizes, gx.device) or triton_index_limit(H, B, T, G // 4)


CUDA_MAX_HEADS = 256  # kMaxHeads of csrc/cuda/bilstm_cuda.h: the hidden sizes travel in the kernel's parameters


def cuda_size_limit(H: int, B: int, T: int, n: int) -> Optional[str]:
    """None if the cuda scan takes a call of these sizes, else why not: the extension's own checks
    (csrc/cuda/bilstm_cuda.cu, its int sizes and work-item count), asked before it is chosen, so that auto moves on
    to another backend instead of raising."""
    if H > CUDA_MAX_HEADS:
        return f"it takes at most {CUDA_MAX_HEADS} heads, got {H}"
    if n > 65535 or B >= INT32 or T >= INT32 - 1024 or 2 * H * B >= INT32:
        return (f"its sizes must satisfy n <= 65535, B < 2^31, T < 2^31 - 1024, 2 H B < 2^31 "
                f"(H {H}, B {B}, T {T}, n {n})")
    return None


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


__all__ = ["bilstm_scan", "bilstm_scan_ref", "check_scan_inputs", "triton_index_limit", "OP"]
