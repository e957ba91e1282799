"""Fused Triton kernel of the bit-sliced crossbar GEMM (one pass; bit-identical to the reference
without noise).

Per program: a [BM, BN] block of y. For every crossbar tile t (tile_rows rows, cut into NSUB chunks
of BK), weight slice i and input slice j: x is quantized on load (IEEE division by s_x, round half to
even, clip) and sliced (sign-magnitude, dac_bits), the weight slice is read as int8 levels, one integer
tl.dot gives the partial sums p, the ADC runs in the epilogue of that tile, and the codes are shifted
and added into int32 registers. Scales, offset correction and bias are applied once at the end, in
the reference's fp32 order (the kernel is compiled without fp fusion so no FMA changes a rounding).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from triton.runtime.errors import OutOfResources

from far_kernels.dispatch import BackendUnavailable
from far_kernels.ops.crossbar_matmul.program import INT32, CrossbarCall, input_scales, triton_unsupported

_MODES = {"none": 0, "granular": 1, "max": 2, "calibrated": 3}
GPU_STAGES = (3, 2, 1)  # pipelining depths a GPU launch tries, deepest first, until its shared memory fits
_STAGES: dict = {}  # (device type, index, constexprs) -> the depth that fit


@triton.jit
def _rhe_clamp(v, LIM: tl.constexpr):
    """round-half-even(v) clipped to [-LIM, LIM], as int32 (NaN -> 0). Exact: |v| is capped at LIM + 1
    first, then floor and the fraction are exact in fp32."""
    a = tl.where(v == v, tl.abs(v), 0.0)
    a = tl.minimum(a, LIM + 1.0)
    r = tl.floor(a)
    d = a - r
    ri = r.to(tl.int32)
    up = (d > 0.5) | ((d == 0.5) & ((ri & 1) == 1))
    q = tl.minimum(ri + up.to(tl.int32), LIM)
    return tl.where(v < 0, -q, q)


@triton.jit
def _load_xq(x_ptr, stride_xm, rm, kk, kmask, M, sdiv, XQMAX: tl.constexpr):
    """Quantized inputs x_q [BM, BK] int32 of rows rm, columns kk (masked columns give 0)."""
    x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=(rm[:, None] < M) & kmask[None, :], other=0.0)
    return _rhe_clamp(tl.math.div_rn(x.to(tl.float32), sdiv[:, None]), XQMAX)


@triton.jit
def _input_slice(xq, j, DB: tl.constexpr, DMAX: tl.constexpr, DT: tl.constexpr):
    mag = (tl.abs(xq) >> (j * DB)) & DMAX
    return tl.where(xq < 0, -mag, mag).to(DT)


@triton.jit
def _adc(p, i, steps_ptr, step_max, MODE: tl.constexpr, L: tl.constexpr, PMAX: tl.constexpr,
         WIDE: tl.constexpr, FLOAT_P: tl.constexpr):
    """ADC codes of partial sums p [BM, BN] (int32 exact integers, or fp32 with noise): int32, or fp32
    for MODE 0 (no ADC) on the float path."""
    if FLOAT_P:
        if MODE == 0:
            c = p
        elif MODE == 1:
            c = _rhe_clamp(p, L)
        elif MODE == 2:
            c = _rhe_clamp(tl.math.div_rn(p, step_max), L)
        else:
            c = _rhe_clamp(tl.math.div_rn(p, tl.load(steps_ptr + i)), L)
    else:
        if MODE == 0:
            c = p
        elif MODE == 1:
            c = tl.minimum(tl.maximum(p, -L), L)
        elif MODE == 2:  # round-half-even of the rational |p|·L / p_max in integers
            if WIDE:
                a = tl.abs(p).to(tl.int64) * L
            else:
                a = tl.abs(p) * L
            q = a // PMAX
            r2 = 2 * (a - q * PMAX)
            up = (r2 > PMAX) | ((r2 == PMAX) & ((q & 1) == 1))
            q = tl.minimum(q + up.to(q.dtype), L).to(tl.int32)
            c = tl.where(p < 0, -q, q)
        else:
            c = _rhe_clamp(tl.math.div_rn(p.to(tl.float32), tl.load(steps_ptr + i)), L)
    return c


@triton.jit
def _crossbar_kernel(
    x_ptr, sdiv_ptr, sx_ptr, lev_ptr, sw_ptr, bias_ptr, steps_ptr, mults_ptr, y_ptr,
    M, N, K, T, stride_xm, stride_ls, stride_ln, stride_ym,
    step_max, sigma, seed,
    TILE_ROWS: tl.constexpr, S: tl.constexpr, J: tl.constexpr, CB: tl.constexpr, DB: tl.constexpr,
    DMAX: tl.constexpr, XQMAX: tl.constexpr, L: tl.constexpr, PMAX: tl.constexpr, OFFSET: tl.constexpr,
    MODE: tl.constexpr, WIDE: tl.constexpr, FLOAT_LEV: tl.constexpr, READ_NOISE: tl.constexpr,
    HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NSUB: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    nmask = rn < N
    sdiv = tl.load(sdiv_ptr + rm, mask=rm < M, other=1.0)
    FLOAT_P: tl.constexpr = FLOAT_LEV or READ_NOISE
    FLOAT_ACC: tl.constexpr = FLOAT_P and MODE == 0
    SLICE_ACC: tl.constexpr = MODE == 3  # calibrated: one accumulator per weight slice, weight slice loop outermost
    XDT: tl.constexpr = tl.float32 if FLOAT_LEV else tl.int8
    I_OUT: tl.constexpr = S if SLICE_ACC else 1
    I_IN: tl.constexpr = 1 if SLICE_ACC else S
    vf = tl.zeros((BM, BN), dtype=tl.float32)
    if FLOAT_ACC:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.int32)
    noise_offs = rm[:, None] * N + rn[None, :]
    for i0 in range(I_OUT):
        if SLICE_ACC:
            acc = tl.zeros((BM, BN), dtype=tl.int32)
        for t in range(T):
            k_end = tl.minimum((t + 1) * TILE_ROWS, K)
            if NSUB == 1:  # the whole tile in one chunk: quantize x once per tile
                kk = t * TILE_ROWS + rk
                kmask = kk < k_end
                xq = _load_xq(x_ptr, stride_xm, rm, kk, kmask, M, sdiv, XQMAX)
            for i1 in range(I_IN):
                i = i0 + i1
                if NSUB == 1:
                    wl = tl.load(lev_ptr + i * stride_ls + rn[None, :] * stride_ln + kk[:, None],
                                 mask=kmask[:, None] & nmask[None, :], other=0)  # [BK, BN]
                for j in range(J):
                    if NSUB == 1:
                        if FLOAT_LEV:
                            p = tl.dot(_input_slice(xq, j, DB, DMAX, XDT), wl, input_precision="ieee")
                        else:
                            p = tl.dot(_input_slice(xq, j, DB, DMAX, XDT), wl, out_dtype=tl.int32)
                    else:
                        if FLOAT_LEV:
                            p = tl.zeros((BM, BN), dtype=tl.float32)
                        else:
                            p = tl.zeros((BM, BN), dtype=tl.int32)
                        for sub in range(NSUB):
                            kk2 = t * TILE_ROWS + sub * BK + rk
                            kmask2 = kk2 < k_end
                            xq2 = _load_xq(x_ptr, stride_xm, rm, kk2, kmask2, M, sdiv, XQMAX)
                            wl2 = tl.load(lev_ptr + i * stride_ls + rn[None, :] * stride_ln + kk2[:, None],
                                          mask=kmask2[:, None] & nmask[None, :], other=0)
                            if FLOAT_LEV:
                                p += tl.dot(_input_slice(xq2, j, DB, DMAX, XDT), wl2, input_precision="ieee")
                            else:
                                p += tl.dot(_input_slice(xq2, j, DB, DMAX, XDT), wl2, out_dtype=tl.int32)
                    if READ_NOISE:
                        tij = (t * S + i) * J + j
                        p = p.to(tl.float32) + tl.randn(seed + tij, noise_offs) * sigma
                    c = _adc(p, i, steps_ptr, step_max, MODE, L, PMAX, WIDE, FLOAT_P)
                    if SLICE_ACC:
                        acc += c << (j * DB)
                    elif FLOAT_ACC:
                        acc += c * (1 << (i * CB + j * DB)).to(tl.float32)
                    else:
                        acc += c << (i * CB + j * DB)
        if SLICE_ACC:
            vf = vf + acc.to(tl.float32) * tl.load(mults_ptr + i0)
    # digital offset correction: OFFSET * Σ_k x_q[m, k]
    xsum = tl.zeros((BM,), dtype=tl.int32)
    if OFFSET != 0:
        for k0 in range(0, K, BK):
            kk3 = k0 + rk
            xsum += tl.sum(_load_xq(x_ptr, stride_xm, rm, kk3, kk3 < K, M, sdiv, XQMAX), axis=1)
    off = xsum * OFFSET
    if SLICE_ACC:
        v = vf - off.to(tl.float32)[:, None]
    elif FLOAT_ACC:
        v = acc - off.to(tl.float32)[:, None]
    elif MODE == 2:
        v = acc.to(tl.float32) * step_max - off.to(tl.float32)[:, None]
    else:
        v = (acc - off[:, None]).to(tl.float32)
    sx = tl.load(sx_ptr + rm, mask=rm < M, other=0.0)
    sw = tl.load(sw_ptr + rn, mask=nmask, other=0.0)
    y = v * (sx[:, None] * sw[None, :])
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=nmask, other=0.0)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y, mask=(rm[:, None] < M) & nmask[None, :])


def _gpu_launch(device: torch.device) -> bool:
    """Whether a launch on this device takes the compiled GPU tiling (CPU tensors: Triton's interpreter, small
    tiles). far_kernels.triton_aot forces it on to compile the GPU launches without a GPU."""
    return device.type != "cpu"


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


def crossbar_matmul_triton(call: CrossbarCall, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The Triton backend on normalized arguments: [M, N] fp32 (written into `out`, a contiguous
    [M, N] fp32 tensor, when given)."""
    why = triton_unsupported(call)
    if why is not None:
        raise BackendUnavailable(f"crossbar_matmul: the triton backend cannot run this call: {why}")
    cfg, prog, plan = call.cfg, call.prog, call.adc
    x2d = call.x2d
    M, K = x2d.shape
    N = prog.N
    dev = x2d.device
    y = torch.empty(M, N, dtype=torch.float32, device=dev) if out is None else out
    if M == 0 or N == 0:
        return y
    s_x, sdiv = input_scales(x2d.float(), cfg)  # the reference's scales, bit for bit
    T = -(-K // cfg.tile_rows)
    interp = not _gpu_launch(dev)
    BK = _pow2(cfg.tile_rows, 32, 128)
    nsub = -(-cfg.tile_rows // BK)
    if interp:
        BM, BN = _pow2(M, 16, 64), _pow2(N, 16, 64)
    else:
        BM, BN = 64, 128
    L = cfg.adc_levels or 0
    mode = _MODES[plan.mode]
    steps = plan.steps if plan.steps is not None else plan.step.reshape(1)
    mults = plan.mults if plan.mults is not None else plan.step.reshape(1)
    bias = call.bias if call.bias is not None else s_x  # dummy pointer when there is no bias
    # the kernel addresses a level row and the scales with unit stride: a programmed crossbar may hold any layout
    levels, w_scale = prog.levels.contiguous(), prog.w_scale.contiguous()
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    const = dict(
        TILE_ROWS=cfg.tile_rows, S=cfg.n_weight_slices, J=cfg.n_input_slices, CB=cfg.cell_bits, DB=cfg.dac_bits,
        DMAX=cfg.dac_max, XQMAX=cfg.x_qmax, L=L, PMAX=cfg.p_max, OFFSET=cfg.offset,
        MODE=mode, WIDE=cfg.p_max * max(L, 1) >= INT32, FLOAT_LEV=prog.noisy, READ_NOISE=cfg.read_noise > 0,
        HAS_BIAS=call.bias is not None, BM=BM, BN=BN, BK=BK, NSUB=nsub)
    args = (x2d, sdiv, s_x, levels, w_scale, bias, steps, mults, y,
            M, N, K, T, x2d.stride(0), levels.stride(0), levels.stride(1), y.stride(0),
            plan.step_value, float(cfg.read_noise * cfg.p_max), call.read_key)
    if interp:
        _crossbar_kernel[grid](*args, **const, num_warps=4, num_stages=1, enable_fp_fusion=False)
        return y
    # Software pipelining depth: 3 stages unless the GPU's shared memory per block cannot hold them (fp32 levels of
    # a 256-row tile need 224 KiB at 3 stages, more than an A100 block's 163 KiB, and 128 KiB at 2: python -m
    # far_kernels.triton_aot --arch 80); fewer stages change no result. Remembered per device and specialization.
    key = (dev.type, dev.index, tuple(const.items()))
    first = _STAGES.get(key, GPU_STAGES[0])
    for stages in [s for s in GPU_STAGES if s <= first]:
        try:
            _crossbar_kernel[grid](*args, **const, num_warps=8, num_stages=stages, enable_fp_fusion=False)
        except OutOfResources:
            if stages == GPU_STAGES[-1]:
                raise
            continue
        _STAGES[key] = stages
        return y
