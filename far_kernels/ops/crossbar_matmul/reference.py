"""References of the bit-sliced crossbar GEMM: vectorized PyTorch (tiles are a reshape, a loop over
weight slices and input slices), and a per-element pure-Python version for tiny sizes.

Importable without Triton or the extension; the oracle every backend is tested against and the
`torch` backend. Semantics: docs/design.md ("Crossbar emulation") and far_kernels.crossbar_matmul.
"""
from __future__ import annotations

import contextlib
from fractions import Fraction
from typing import Optional

import numpy as np
import torch

from far_kernels.ops.crossbar_matmul.config import CrossbarConfig
from far_kernels.ops.crossbar_matmul.program import CrossbarCall, ProgrammedCrossbar, prepare_call, quantize_inputs

_CHUNK_ELEMS = 1 << 24  # rows per chunk keep [T, rows, N] partial sums near this many elements


def rhe_div(a: torch.Tensor, d: int) -> torch.Tensor:
    """round-half-even(a / d) in exact integer arithmetic, for int64 a >= 0 and int d > 0."""
    q = torch.div(a, d, rounding_mode="floor")
    r2 = 2 * (a - q * d)
    return q + ((r2 > d) | ((r2 == d) & (q % 2 == 1))).to(q.dtype)


@contextlib.contextmanager
def ieee_fp32(device):
    """fp32 matmuls on a CUDA `device` in IEEE fp32 within the block, whatever the user's TF32 setting
    (torch.set_float32_matmul_precision("high"), torch.backends.cuda.matmul.allow_tf32 / fp32_precision): TF32
    keeps 11 significant bits of each operand, so ADC codes of 2^11 and more and noisy levels would be rounded and
    the partial sums would no longer be the crossbar's. Restored on exit; a CPU matmul is IEEE fp32 already.

    torch (2.9 and later) keeps the legacy setting (set_float32_matmul_precision, allow_tf32) and the new one
    (fp32_precision) side by side, and every cuBLAS call raises while they disagree ("mix of the legacy and new
    APIs"): a setting made with one API is changed with that API. Already IEEE: nothing is touched."""
    m = torch.backends.cuda.matmul
    if torch.device(device).type != "cuda":
        yield
        return
    try:
        tf32 = m.allow_tf32
    except RuntimeError:  # the user's legacy and new settings disagree (set with the new API): change the new one
        tf32 = None
    if tf32 is False:
        yield
    elif tf32 is None:
        old = m.fp32_precision
        m.fp32_precision = "ieee"
        try:
            yield
        finally:
            m.fp32_precision = old
    else:  # a legacy setting ("high", "medium", allow_tf32 = True): the legacy API sets both sides consistently
        old = torch.get_float32_matmul_precision()
        m.allow_tf32 = False
        try:
            yield
        finally:
            m.allow_tf32 = True  # back to "high" as it was, be it set this way or by set_float32_matmul_precision
            try:
                restored = torch.get_float32_matmul_precision() == old
            except RuntimeError:  # "medium" (its CPU side, bf16, now disagrees with "high" on the GPU)
                restored = False
            if not restored:
                torch.set_float32_matmul_precision(old)


def _tiles(cfg: CrossbarConfig, K: int):
    """(T, rows per reshape tile, padded K): tiles of tile_rows rows; one tile of K rows when K <= tile_rows."""
    T = -(-K // cfg.tile_rows)
    tr = cfg.tile_rows if T > 1 else max(K, 1)
    return T, tr, T * tr


def _input_slice(xq: torch.Tensor, j: int, cfg: CrossbarConfig) -> torch.Tensor:
    """Input slice j of x_q (sign-magnitude): sign(x_q) * ((|x_q| >> j·dac_bits) & (2^dac_bits - 1)), fp32."""
    return (torch.sign(xq) * ((xq.abs() >> (j * cfg.dac_bits)) & cfg.dac_max)).float()


def partial_sums(xq: torch.Tensor, prog: ProgrammedCrossbar, cfg: CrossbarConfig):
    """Yield (rows slice, i, j, p [T, rows, N] fp32): every tile's analog partial sum of weight slice i
    and input slice j (integers, exact in fp32, when the levels are integers). One batched matmul per
    weight slice covers all input slices."""
    M, K = xq.shape
    N, J = prog.N, cfg.n_input_slices
    T, tr, Kp = _tiles(cfg, K)
    chunk = max(1, _CHUNK_ELEMS // max(1, T * N * J))
    lev = [torch.nn.functional.pad(prog.levels[i].float(), (0, Kp - K)).reshape(N, T, tr).permute(1, 2, 0).contiguous()
           for i in range(cfg.n_weight_slices)]  # [T, tr, N] each
    for m0 in range(0, M, chunk):
        rows = slice(m0, min(M, m0 + chunk))
        xc = torch.nn.functional.pad(xq[rows], (0, Kp - K))
        nr = xc.shape[0]
        xs = torch.stack([_input_slice(xc, j, cfg) for j in range(J)])  # [J, rows, Kp]
        xs = xs.reshape(J * nr, T, tr).transpose(0, 1).contiguous()  # [T, J·rows, tr]
        for i in range(cfg.n_weight_slices):
            with ieee_fp32(xs.device):
                p = torch.bmm(xs, lev[i])  # [T, J·rows, N]
            for j in range(J):
                yield rows, i, j, p[:, j * nr:(j + 1) * nr]


def _adc(p: torch.Tensor, i: int, call: CrossbarCall, integer: bool) -> torch.Tensor:
    """ADC codes c (the output divided by its step) of partial sums p [T, rows, N]: int64, or fp32 for
    "none" on the float path."""
    plan, cfg = call.adc, call.cfg
    L = plan.L
    if integer:  # p holds exact integers
        pi = p.to(torch.int64)
        if plan.mode == "none":
            return pi
        if plan.mode == "granular":
            return pi.clamp(-L, L)
        if plan.mode == "max":  # round-half-even of the rational p·L / p_max
            return (torch.sign(pi) * rhe_div(pi.abs() * L, cfg.p_max)).clamp(-L, L)
        return torch.round(p / plan.steps[i]).clamp(-L, L).to(torch.int64)
    if plan.mode == "none":
        return p
    step = plan.steps[i] if plan.mode == "calibrated" else plan.step
    return torch.round(p / step).clamp(-L, L).to(torch.int64)


def run_ref(call: CrossbarCall) -> torch.Tensor:
    """The reference on normalized arguments: [M, N] fp32."""
    cfg, prog = call.cfg, call.prog
    xq, s_x = quantize_inputs(call.x2d, cfg)
    M, N, S = xq.shape[0], prog.N, cfg.n_weight_slices
    integer = not call.float_path
    acc_dtype = torch.float32 if (call.adc.mode == "none" and not integer) else torch.int64
    Cs = [torch.zeros(M, N, dtype=acc_dtype, device=xq.device) for _ in range(S)]  # C_i = Σ_t Σ_j 2^(j·dac) c
    gen = None
    if cfg.read_noise > 0:
        gen = torch.Generator(device=xq.device).manual_seed(call.read_key)
        sigma = torch.tensor(cfg.read_noise * cfg.p_max, dtype=torch.float32, device=xq.device)
    for rows, i, j, p in partial_sums(xq, prog, cfg):
        if gen is not None:
            p = p + torch.randn(p.shape, generator=gen, device=p.device) * sigma
        c = _adc(p, i, call, integer)
        Cs[i][rows] += c.sum(0) * (1 << (j * cfg.dac_bits))
    return _epilogue(Cs, xq, s_x, prog, call)


def _epilogue(Cs, xq, s_x, prog, call) -> torch.Tensor:
    """The canonical fp32 epilogue (every backend computes exactly these operations in this order):
    v = f32(C - off) ("none"/"granular"), f32(C) * step - f32(off) ("max"), Σ_i f32(C_i) * mult_i - f32(off)
    ("calibrated"); y = v * (s_x[m] * s_w[n]) (+ bias[n])."""
    cfg, plan = call.cfg, call.adc
    off = cfg.offset * xq.to(torch.int64).sum(1, keepdim=True)  # [M, 1]
    if plan.mode == "calibrated":
        v = Cs[0].float() * plan.mults[0]
        for i in range(1, len(Cs)):
            v = v + Cs[i].float() * plan.mults[i]
        v = v - off.float()
    else:
        C = Cs[0]
        for i in range(1, len(Cs)):
            C = C + Cs[i] * (1 << (i * cfg.cell_bits))
        if C.dtype == torch.float32:
            v = C - off.float()
        elif plan.mode == "max":
            v = C.float() * plan.step - off.float()
        else:
            v = (C - off).float()
    y = v * (s_x[:, None] * prog.w_scale[None, :])
    if call.bias is not None:
        y = y + call.bias
    return y


def crossbar_matmul_ref(x: torch.Tensor, w, cfg: Optional[CrossbarConfig] = None, bias: Optional[torch.Tensor] = None,
                        *, adc_range=None) -> torch.Tensor:
    """Bit-sliced crossbar emulation of y ≈ x @ w.T + bias in plain PyTorch (CPU or GPU).

    Args:
        x: [..., K] float input. w: [N, K] float weight, or a ProgrammedCrossbar. cfg: CrossbarConfig
        (default: the programmed one, or CrossbarConfig()). bias: [N] or None. adc_range: the ADC range
        for adc_range="calibrated" (overrides the programmed one): scalar or [S].
    Returns:
        y: [..., N] in x.dtype (computed in fp32). Not differentiable.
    """
    call = prepare_call(x, w, cfg, bias, adc_range, op="crossbar_matmul_ref")
    return run_ref(call).to(x.dtype).reshape(*call.lead, call.prog.N)


# ---- per-element implementation (tiny sizes; shares nothing with the reference above) ----
def _f32(v) -> np.float32:
    return np.float32(v)


def _quantize_row(vals, qmax: int, amax) -> tuple:
    """Per-element symmetric quantization with fp32 arithmetic: (ints, scale)."""
    s = _f32(amax) / _f32(qmax)
    if not np.isfinite(s):
        return [0] * len(vals), _f32("nan")
    div = s if s > 0 else _f32(1.0)
    out = []
    for v in vals:
        q = round(float(_f32(v) / div))  # Python round: half to even
        out.append(max(-qmax, min(qmax, q)))
    return out, s


def crossbar_matmul_loop(x: torch.Tensor, w, cfg: Optional[CrossbarConfig] = None, bias: Optional[torch.Tensor] = None,
                         *, adc_range=None) -> torch.Tensor:
    """The crossbar semantics element by element in pure Python (ints, Fractions, numpy fp32 scalars):
    an independent check of the reference for tiny sizes. x: [M, K]; w: [N, K] or a ProgrammedCrossbar
    (its levels are used as programmed); no read noise. Returns [M, N] fp32."""
    cfg = cfg if cfg is not None else (w.cfg if isinstance(w, ProgrammedCrossbar) else CrossbarConfig())
    if cfg.read_noise > 0:
        raise ValueError("crossbar_matmul_loop: read noise is not supported (use crossbar_matmul_ref)")
    if x.dim() != 2:
        raise ValueError("crossbar_matmul_loop: x must be [M, K]")
    xf = x.detach().float().cpu().tolist()
    M, K = len(xf), x.shape[1]
    S, J, cb, db = cfg.n_weight_slices, cfg.n_input_slices, cfg.cell_bits, cfg.dac_bits
    # weights: levels [S][N][K] and scales
    if isinstance(w, ProgrammedCrossbar):
        N = w.N
        lv = w.levels.cpu()
        levels = lv.tolist() if w.noisy else lv.to(torch.int64).tolist()
        s_w = [_f32(v) for v in w.w_scale.cpu().tolist()]
        if adc_range is None:
            adc_range = w.adc_range
    else:
        wf = w.detach().float().cpu().tolist()
        N = len(wf)
        if cfg.prog_noise > 0 or cfg.stuck_at != (0.0, 0.0):
            raise ValueError("crossbar_matmul_loop: pass a ProgrammedCrossbar to use programming noise or faults")
        glob = max((abs(_f32(v)) for row in wf for v in row), default=_f32(0))
        levels = [[[0] * K for _ in range(N)] for _ in range(S)]
        s_w = []
        for n, row in enumerate(wf):
            amax = max((abs(_f32(v)) for v in row), default=_f32(0)) if cfg.weight_scale == "channel" else glob
            q, s = _quantize_row(row, cfg.w_qmax, amax)
            s_w.append(s)
            if s == 0:
                q = [0] * K
            for k, v in enumerate(q):
                for i in range(S):
                    if cfg.encoding == "differential":
                        levels[i][n][k] = (1 if v > 0 else -1) * ((abs(v) >> (i * cb)) & cfg.cell_max)
                    else:
                        levels[i][n][k] = ((v + cfg.offset) >> (i * cb)) & cfg.cell_max
    # inputs
    glob = max((abs(_f32(v)) for row in xf for v in row), default=_f32(0))
    if not all(np.isfinite(v) for row in xf for v in row):
        glob = _f32("inf")
    xq, s_x = [], []
    for row in xf:
        if cfg.input_scale == "row":
            amax = max((abs(_f32(v)) for v in row), default=_f32(0))
            if not all(np.isfinite(v) for v in row):
                amax = _f32("inf")
        else:
            amax = glob
        q, s = _quantize_row(row, cfg.x_qmax, amax)
        xq.append(q)
        s_x.append(s)
    L = cfg.adc_levels
    steps = None
    if cfg.adc_bits is not None and cfg.adc_range == "calibrated":
        if adc_range is None:
            raise ValueError("crossbar_matmul_loop: adc_range='calibrated' needs a range")
        r = torch.as_tensor(adc_range, dtype=torch.float32).expand(S).tolist()
        steps = [_f32(v) / _f32(L) for v in r]
    T = -(-K // cfg.tile_rows)
    y = torch.empty(M, N, dtype=torch.float32)
    for m in range(M):
        xs = [[(1 if v > 0 else -1) * ((abs(v) >> (j * db)) & cfg.dac_max) for v in xq[m]] for j in range(J)]
        for n in range(N):
            C = [0] * S
            for t in range(T):
                ks = range(t * cfg.tile_rows, min(K, (t + 1) * cfg.tile_rows))
                for i in range(S):
                    for j in range(J):
                        p = sum(xs[j][k] * levels[i][n][k] for k in ks)
                        if cfg.adc_bits is None:
                            c = p
                        elif isinstance(p, float) or cfg.adc_range == "calibrated":
                            st = steps[i] if cfg.adc_range == "calibrated" else \
                                (_f32(1.0) if cfg.adc_range == "granular" else _f32(cfg.p_max / L))
                            c = max(-L, min(L, round(float(_f32(p) / st))))
                        elif cfg.adc_range == "granular":
                            c = max(-L, min(L, p))
                        else:
                            c = max(-L, min(L, round(Fraction(p * L, cfg.p_max))))
                        C[i] += c * (1 << (j * db))
            off = cfg.offset * sum(xq[m])
            if cfg.adc_bits is not None and cfg.adc_range == "calibrated":
                v = _f32(0.0)
                for i in range(S):
                    v = _f32(v + _f32(C[i]) * _f32(steps[i] * _f32(1 << (i * cb))))
                v = _f32(v - _f32(off))
            else:
                tot = sum(C[i] * (1 << (i * cb)) for i in range(S))
                if isinstance(tot, float):
                    v = _f32(_f32(tot) - _f32(off))
                elif cfg.adc_bits is not None and cfg.adc_range == "max":
                    v = _f32(_f32(tot) * _f32(cfg.p_max / L) - _f32(off))
                else:
                    v = _f32(tot - off)
            val = _f32(v * _f32(s_x[m] * s_w[n]))
            if bias is not None:
                val = _f32(val + _f32(float(bias[n])))
            y[m, n] = float(val)
    return y
