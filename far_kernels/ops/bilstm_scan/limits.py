"""The bilstm scan's size limits per backend, asked before a backend is chosen (dispatch limits) and by the
Triton launcher itself: a module of its own, so that the launcher imports it without importing the op."""
from __future__ import annotations

import os
from typing import Optional

import torch

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
