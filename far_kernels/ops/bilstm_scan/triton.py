"""triton backend of bilstm_scan: one launch for every head, both directions and all batch tiles.

Program (head, direction, batch tile) keeps its W_hh on chip for the whole time loop and carries
h, c in fp32. The recurrent product is done transposed, gates^T = W_hh @ h^T, so the gate dimension
is the MMA's M side and the batch tile (padded to 16) its N side: small batches do not waste the
tensor cores. Units are padded to NP = next power of two of the largest kept size (>= 16); padded
rows and columns of W_hh are masked to 0, and padded units' h is selected to 0 after each step (a zero
row times a NaN or inf h of a kept unit is NaN). A (direction, head) with 0 units only writes zeros.

16-bit inputs (fp16/bf16 gates with W_hh of the same dtype, exact in it): the four gates are stacked
into ONE product per step, [4 NP, 2 NP] @ [2 NP, BB], issued together and waited once (wgmma on
sm_90), with h split into hi + lo of that dtype along K ([W | W] @ [hi; lo]: h to ~2^-16 relative,
fp32 accumulation); the input gates are its accumulator, loaded one step ahead as one [4 NP, BB]
tile. The gates of one unit land in one thread's registers (reshape/permute/split move no data).
fp32 inputs: one [NP, NP] product per gate on the CUDA cores ("ieee"; fp32_precision="tf32x3" puts
it on the tensor cores at ~fp32 accuracy, untimed so far).
Under TRITON_INTERPRET=1 (CPU) the same rounding is applied but the products run in fp32: the
interpreter of triton 3.8 multiplies bf16 bit patterns as integers and truncates fp32 -> bf16,
so bf16 rounding is done by hand there (round to nearest even).
Per-step synchronization, from the sm_90 SASS (bench/triton_scan_resources.py, no GPU needed):
bench/triton_scan_notes.md.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from far_kernels.ops.bilstm_scan.limits import MAX_BATCH_TILES, triton_index_limit


@triton.jit
def _sigmoid(x):
    # 1 / (1 + 2^(-x log2 e)): exp2 -> inf gives 0, -> 0 gives 1; no inf/inf, no NaN for finite x
    return 1.0 / (1.0 + tl.exp2(x * -1.4426950408889634))


@triton.jit
def _tanh(x):
    # 2 sigmoid(2x) - 1: saturates to +-1 (absolute error ~1e-7)
    return 2.0 / (1.0 + tl.exp2(x * -2.8853900817779268)) - 1.0


@triton.jit
def _round(x, DT: tl.constexpr, INTERP: tl.constexpr):
    """x (fp32) rounded to DT, round to nearest even. Compiled: a DT tensor. Interpreted: the
    rounded values as fp32 (bf16 by hand: the interpreter's own fp32 -> bf16 cast truncates)."""
    if INTERP:
        if DT == tl.bfloat16:
            b = x.to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
            return tl.where(x != x, x, b.to(tl.float32, bitcast=True))
        else:
            return x.to(DT).to(tl.float32)
    else:
        return x.to(DT)


@triton.jit
def _cell(a_i, a_f, a_g, a_o, c):
    """One LSTM cell update (fp32). Padded units: gates 0 -> c = 0.5 c = 0, h = 0.5 tanh(0) = 0 exactly."""
    c = _sigmoid(a_f) * c + _sigmoid(a_i) * _tanh(a_g)
    return _sigmoid(a_o) * _tanh(c), c


@triton.jit
def _store_h(h, ptrs, mask, OUT_DT: tl.constexpr, INTERP: tl.constexpr):
    if INTERP and OUT_DT == tl.bfloat16:
        tl.store(ptrs, _round(h, OUT_DT, INTERP), mask=mask)
    else:
        tl.store(ptrs, h.to(OUT_DT), mask=mask)


@triton.jit
def _bilstm_scan_kernel(
    gx_ptr, w_ptr, hs_ptr, out_ptr,
    H, B, T, n,
    s_gh, s_gb, s_gt, s_gd,  # gx [H, B, T, 2, 4n] strides (gate column stride 1)
    s_wh, s_wd,  # w [H, 2, 4n, n] strides (row stride n, column stride 1)
    s_oh, s_ob, s_ot, s_od,  # out [H, B, T, 2, n] strides (unit stride 1)
    NP: tl.constexpr,  # padded units (power of two >= 16, >= every kept size)
    NOUT: tl.constexpr,  # next power of two >= n (zero-only programs)
    NZ: tl.constexpr,  # width of the zero columns [NP, n) when NP < n, else 0
    BB: tl.constexpr,  # batch tile (power of two >= 16)
    OP_DT: tl.constexpr,  # MMA operand dtype: fp32 or the inputs' fp16/bf16
    SPLIT: tl.constexpr,  # 16-bit operands: h = hi + lo in one product (K = 2 NP)
    F32_PREC: tl.constexpr,  # fp32 product: "ieee" (CUDA cores) or "tf32x3" (tensor cores, ~fp32)
    OUT_DT: tl.constexpr,
    INTERP: tl.constexpr,
):
    pid_hd = tl.program_id(0)
    pid_b = tl.program_id(1)
    head = pid_hd // 2
    d = pid_hd % 2
    k = tl.load(hs_ptr + d * H + head)  # kept units of this (direction, head)

    b = pid_b * BB + tl.arange(0, BB)  # batch rows: columns of every tile
    bmask = b < B
    o_cols = out_ptr + head.to(tl.int64) * s_oh + d * s_od + b.to(tl.int64)[None, :] * s_ob  # [1, BB]

    # names assigned in both branches of this runtime `if` must have one type in both (the compiler merges
    # them; the interpreter does not care): the zero-only branch's own names end in 0
    if k == 0:  # pruned away: only zeros to write
        u0 = tl.arange(0, NOUT)
        mask0 = (u0[:, None] < n) & bmask[None, :]
        zeros0 = tl.zeros((NOUT, BB), dtype=OUT_DT)
        ptrs0 = o_cols + u0[:, None]
        for t in range(T):
            tl.store(ptrs0 + t * s_ot, zeros0, mask=mask0)
    else:
        u = tl.arange(0, NP)  # units: rows of h, c and of every gate
        w_base = w_ptr + head.to(tl.int64) * s_wh + d * s_wd
        g_base = gx_ptr + head.to(tl.int64) * s_gh + d * s_gd + b.to(tl.int64)[None, :] * s_gb  # [1, BB]
        o_ptrs = o_cols + u[:, None]
        omask = (u[:, None] < n) & bmask[None, :]  # units in [k, n) are written as 0
        keep = u[:, None] < k  # [NP, 1]: a padded unit's gates are 0 * h, NaN once a kept unit's h is NaN or inf
        if NZ > 0:
            uz = NP + tl.arange(0, NZ)
            zptrs = o_cols + uz[:, None]
            zmask = (uz[:, None] < n) & bmask[None, :]
            zeros = tl.zeros((NZ, BB), dtype=OUT_DT)
        h = tl.zeros((NP, BB), dtype=tl.float32)  # h^T: units x batch
        c = tl.zeros((NP, BB), dtype=tl.float32)
        t = d * (T - 1)  # forward: s; backward: T - 1 - s
        if SPLIT:
            # 16-bit operands. The 4 gates stacked: row r = q NP + u of ONE product per step, issued
            # together and waited once; h = hi + lo in the same product along K: [W | W] (column 2u + s
            # holds W[:, u]) @ [hi; lo] (row 2u + s). W [4 NP, 2 NP] stays on chip for the whole loop.
            r = tl.arange(0, 4 * NP)
            rq = r // NP
            ru = r % NP
            kk = tl.arange(0, 2 * NP) // 2
            w = tl.load(w_base + (rq * n + ru)[:, None] * n + kk[None, :],
                        mask=(ru[:, None] < k) & (kk[None, :] < k), other=0.0)
            w = w.to(tl.float32) if INTERP else w.to(OP_DT)  # exact: W_hh holds OP_DT values
            gmask = (ru[:, None] < k) & bmask[None, :]  # [4 NP, BB]
            g_ptrs = g_base + (rq * n + ru)[:, None]
            x = tl.load(g_ptrs + t.to(tl.int64) * s_gt, mask=gmask, other=0.0)  # [4 NP, BB] in gx's dtype
            for s in range(T):
                t = s + d * (T - 1 - 2 * s)
                # prefetch the next step's input gates (off the dependent chain), kept 16-bit
                tn = t + 1 - 2 * d
                x_next = tl.load(g_ptrs + tn.to(tl.int64) * s_gt, mask=gmask & (s + 1 < T), other=0.0)
                h_hi = _round(h, OP_DT, INTERP)
                h_lo = _round(h - h_hi.to(tl.float32), OP_DT, INTERP)
                hk = tl.reshape(tl.permute(tl.join(h_hi, h_lo), (0, 2, 1)), (2 * NP, BB))  # row 2u + s
                if INTERP:
                    a = tl.dot(w, hk, x.to(tl.float32), input_precision="ieee")
                else:
                    a = tl.dot(w, hk, x.to(tl.float32))  # gates^T = W @ h^T + x^T, fp32 accumulate
                # the 4 gates of a unit sit in one thread's registers: the split moves no data
                a = tl.permute(tl.reshape(a, (2, 2, NP, BB)), (2, 3, 1, 0))  # [NP, BB, q % 2, q // 2]
                a_if, a_go = tl.split(a)
                a_i, a_f = tl.split(a_if)
                a_g, a_o = tl.split(a_go)
                h, c = _cell(a_i, a_f, a_g, a_o, c)
                h = tl.where(keep, h, 0.0)
                _store_h(h, o_ptrs + t * s_ot, omask, OUT_DT, INTERP)
                if NZ > 0:
                    tl.store(zptrs + t * s_ot, zeros, mask=zmask)
                x = x_next
        else:
            # fp32 products on the CUDA cores (or tf32x3): one [NP, NP] tile per gate, no MMA wait
            wmask = (u[:, None] < k) & (u[None, :] < k)
            w_rows = w_base + u[:, None] * n + u[None, :]
            w_i = tl.load(w_rows, mask=wmask, other=0.0).to(tl.float32)
            w_f = tl.load(w_rows + n * n, mask=wmask, other=0.0).to(tl.float32)
            w_g = tl.load(w_rows + 2 * n * n, mask=wmask, other=0.0).to(tl.float32)
            w_o = tl.load(w_rows + 3 * n * n, mask=wmask, other=0.0).to(tl.float32)
            gmask = (u[:, None] < k) & bmask[None, :]  # [NP, BB]
            g_ptrs = g_base + u[:, None]
            p = g_ptrs + t.to(tl.int64) * s_gt
            x_i = tl.load(p, mask=gmask, other=0.0).to(tl.float32)
            x_f = tl.load(p + n, mask=gmask, other=0.0).to(tl.float32)
            x_g = tl.load(p + 2 * n, mask=gmask, other=0.0).to(tl.float32)
            x_o = tl.load(p + 3 * n, mask=gmask, other=0.0).to(tl.float32)
            for s in range(T):
                t = s + d * (T - 1 - 2 * s)
                tn = t + 1 - 2 * d
                pn = g_ptrs + tn.to(tl.int64) * s_gt
                nmask = gmask & (s + 1 < T)
                n_i = tl.load(pn, mask=nmask, other=0.0)
                n_f = tl.load(pn + n, mask=nmask, other=0.0)
                n_g = tl.load(pn + 2 * n, mask=nmask, other=0.0)
                n_o = tl.load(pn + 3 * n, mask=nmask, other=0.0)
                a_i = tl.dot(w_i, h, x_i, input_precision=F32_PREC)
                a_f = tl.dot(w_f, h, x_f, input_precision=F32_PREC)
                a_g = tl.dot(w_g, h, x_g, input_precision=F32_PREC)
                a_o = tl.dot(w_o, h, x_o, input_precision=F32_PREC)
                h, c = _cell(a_i, a_f, a_g, a_o, c)
                h = tl.where(keep, h, 0.0)
                _store_h(h, o_ptrs + t * s_ot, omask, OUT_DT, INTERP)
                if NZ > 0:
                    tl.store(zptrs + t * s_ot, zeros, mask=zmask)
                x_i, x_f, x_g, x_o = n_i.to(tl.float32), n_f.to(tl.float32), n_g.to(tl.float32), n_o.to(tl.float32)


@triton.jit
def _activations_kernel(x_ptr, sig_ptr, tanh_ptr, N: tl.constexpr):
    """sigmoid and tanh of N values exactly as the scan computes them (for tests)."""
    r = tl.arange(0, N)
    x = tl.load(x_ptr + r)
    tl.store(sig_ptr + r, _sigmoid(x))
    tl.store(tanh_ptr + r, _tanh(x))


try:  # which mode triton.jit chose at import (TRITON_INTERPRET=1 then: the interpreter)
    from triton.runtime.interpreter import InterpretedFunction as _Interpreted

    INTERPRETED = isinstance(_bilstm_scan_kernel, _Interpreted)
except ImportError:  # pragma: no cover
    INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_HS_CACHE: dict = {}


def _next_pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def _hidden_on(hidden_sizes: torch.Tensor, device: torch.device) -> torch.Tensor:
    """[2, H] int32 on the device, cached (no host-to-device copy per call; CUDA-graph friendly)."""
    key = (tuple(hidden_sizes.flatten().tolist()), tuple(hidden_sizes.shape), str(device))
    t = _HS_CACHE.get(key)
    if t is None:
        if len(_HS_CACHE) > 256:
            _HS_CACHE.clear()
        t = _HS_CACHE[key] = hidden_sizes.to(device=device, dtype=torch.int32).contiguous()
    return t


def _default_block_b(B: int, H: int, device: torch.device) -> int:
    """Batch tile: 16 (the MMA's smallest N) unless that leaves more than ~2 programs per SM; at most
    32 (sm_90, triton 3.8 ahead-of-time: BB=64 spills even at 8 warps)."""
    bb = 16
    if triton.cdiv(B, bb) > MAX_BATCH_TILES:  # the grid's second axis
        return 32
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        if 2 * H * triton.cdiv(B, bb) > 2 * sms:
            bb = 32
    return bb


def bilstm_scan_triton(gx: torch.Tensor, w_hh: torch.Tensor, hidden_sizes: torch.Tensor,
                       out: Optional[torch.Tensor] = None, *, block_b: Optional[int] = None,
                       num_warps: Optional[int] = None, fp32_precision: str = "ieee") -> torch.Tensor:
    """gx [H, B, T, 2, 4n], w_hh [H, 2, 4n, n], hidden_sizes [2, H] (int64, CPU, validated by the
    caller) -> h [H, B, T, 2, n] in gx.dtype (written into `out` when given).
    Tuning knobs (defaults from sm_90 resource reports, see bench/triton_scan_resources.py): block_b
    (batch tile, power of two >= 16), num_warps (4 for a 16-bit 16-row tile, else 8), fp32_precision
    ("ieee" or "tf32x3") for fp32 products."""
    H, B, T, _, G = gx.shape
    n = G // 4
    if gx.dtype not in _TL:
        raise TypeError(f"bilstm_scan (triton): gx must be float32/float16/bfloat16, got {gx.dtype}")
    BB = block_b or _default_block_b(B, H, gx.device)
    if BB < 16 or BB & (BB - 1):
        raise ValueError(f"bilstm_scan (triton): block_b must be a power of two >= 16, got {BB}")
    why = triton_index_limit(H, B, T, n, BB, 2 * n if out is None else out.stride(2))
    if why is not None:
        raise ValueError(f"bilstm_scan (triton): {why}")
    if out is None:
        out = torch.empty((H, B, T, 2, n), dtype=gx.dtype, device=gx.device)
    if out.numel() == 0:
        return out
    if gx.stride(4) != 1:
        gx = gx.contiguous()
    # fp16/bf16 gates with W_hh of the same dtype: tensor-core products; anything else in fp32
    op_dt = gx.dtype if gx.dtype != torch.float32 and w_hh.dtype == gx.dtype else torch.float32
    w = w_hh.to(op_dt).contiguous()
    hs = _hidden_on(hidden_sizes, gx.device)
    kmax = int(hidden_sizes.max())
    NP = max(16, _next_pow2(kmax))
    NZ = _next_pow2(n - NP) if n > NP else 0
    if num_warps is None:
        num_warps = 4 if op_dt != torch.float32 and BB == 16 else 8
    grid = (2 * H, triton.cdiv(B, BB))
    _bilstm_scan_kernel[grid](
        gx, w, hs, out, H, B, T, n,
        gx.stride(0), gx.stride(1), gx.stride(2), gx.stride(3),
        w.stride(0), w.stride(1),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        NP=NP, NOUT=max(16, _next_pow2(n)), NZ=NZ, BB=BB, OP_DT=_TL[op_dt], SPLIT=op_dt != torch.float32, F32_PREC=fp32_precision, OUT_DT=_TL[out.dtype],
        INTERP=INTERPRETED, num_warps=num_warps,
    )
    return out
