"""The crossbar GEMM in a few large tensor operations (the `torch` backend of crossbar_matmul_group):
every group, tile, weight slice and input slice of a call in one batched fp32 matmul, the ADC
vectorized, the shift-and-add in int64. Bit-identical to the reference (reference.py, which loops over
slices) without noise: the partial sums are integers below 2^24 (CrossbarConfig checks p_max < 2^24),
so the fp32 matmul is exact in any summation order; the ADC and the epilogue are the reference's
operations on the same fp32/int64 values. With noise the draws differ from the reference's (the same
distributions)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from far_kernels.ops.crossbar_matmul.group import GroupCall, chunk_rows
from far_kernels.ops.crossbar_matmul.program import code_bound, exact_divisor
from far_kernels.ops.crossbar_matmul.reference import ieee_fp32, rhe_div


def _quantize(x: torch.Tensor, cfg):
    """x [G, M, K] -> (x_q int32, s_x [G, M]): per group exactly quantize_inputs' fp32 operations."""
    x = x.float()
    G, M, K = x.shape
    if cfg.input_scale == "row":
        a = x.abs().amax(dim=2) if K else x.new_zeros(G, M)
    else:
        a = (x.abs().amax(dim=(1, 2)) if x.numel() else x.new_zeros(G)).view(G, 1).expand(G, M)
    s = a / exact_divisor(cfg.x_qmax, a)
    s = torch.where(torch.isfinite(s), s, torch.full_like(s, float("nan")))
    div = torch.where((s > 0) & torch.isfinite(s), s, torch.ones_like(s))
    xq = torch.round(x / div[..., None]).clamp_(-cfg.x_qmax, cfg.x_qmax)
    return torch.nan_to_num(xq, nan=0.0).to(torch.int32), s.contiguous()


EXACT = 1 << 24  # fp32 holds every integer below this exactly
# "max" codes round(p * L / p_max) in fp32 are the exact codes while p_max * L < 2^23: the quotient q <= L is then
# off by at most L 2^-24 < 1 / (2 p_max), less than its distance to any half step that is not a tie
MAX_CODES_F32 = 1 << 23


def _codes(p: torch.Tensor, call: GroupCall, integer: bool) -> torch.Tensor:
    """ADC codes of partial sums p [G, T, J, m, S, N] fp32 as fp32 integers, computed in place in p (the
    reference's _adc, vectorized). Exact: p holds integers below 2^24 without noise; "max" rounds (p * L) / p_max, an
    exact product and a correctly rounded quotient, so a tie is exactly k + 1/2 and anything else is at
    least 1 / (2 p_max) from one, more than the quotient's error (the caller checks p_max * L < 2^23, MAX_CODES_F32,
    else uses _codes_int64)."""
    plan, cfg = call.adc, call.cfg
    L = float(plan.L)
    if plan.mode == "none":
        return p
    if plan.mode == "granular":
        if integer:
            return p if plan.L >= cfg.p_max else p.clamp_(-L, L)  # |p| <= p_max: no clipping possible
        return p.div_(plan.step).round_().clamp_(-L, L)
    if plan.mode == "max":
        if integer:  # |p| <= p_max, so |code| <= L: no clamp needed
            return p.mul_(L).div_(exact_divisor(cfg.p_max, p)).round_()
        return p.div_(plan.step).round_().clamp_(-L, L)
    steps = plan.steps.view(-1, 1, 1, 1, plan.steps.shape[-1], 1)  # [G, 1, 1, 1, S, 1]
    return p.div_(steps).round_().clamp_(-L, L)


def _codes_int64(p: torch.Tensor, call: GroupCall) -> torch.Tensor:
    """"max" codes in exact integer arithmetic, for configs where p_max * L reaches MAX_CODES_F32 (2^23)."""
    L = call.adc.L
    pi = p.to(torch.int64)
    return (torch.sign(pi) * rhe_div(pi.abs() * L, call.cfg.p_max)).clamp(-L, L)


def acc_bound(call: GroupCall) -> int:
    """The largest |sum| of one weight slice's ADC codes over tiles and input slices (weights 2^(j dac_bits))."""
    cfg = call.cfg
    tiles = -(-call.group.K // cfg.tile_rows)
    return tiles * code_bound(cfg, call.adc, call.float_path) * sum(1 << (j * cfg.dac_bits) for j in range(cfg.n_input_slices))


def run_group(call: GroupCall, fused_epilogue=None) -> torch.Tensor:
    """[G, M, N] fp32: every member's product, as crossbar_matmul computes it alone. fused_epilogue: None (torch
    operations), or a class like cpp.FusedEpilogue, made as cls(call, xq, s_x, integer, f32_acc), called per row
    chunk with the partial sums, whose .y is the output: read noise, ADC and the shift-and-add over tiles and
    input slices in one pass (cpp.py passes it; this module never imports the extension)."""
    cfg, grp, plan = call.cfg, call.group, call.adc
    G, M, K = call.x.shape
    N, S, J = grp.N, cfg.n_weight_slices, cfg.n_input_slices
    dev = call.x.device
    xq, s_x = _quantize(call.x, cfg)
    lev, valid = grp.tiles(cfg.tile_rows)  # [G*T, tr, S*N], [G, T]
    T, tr = valid.shape[1], lev.shape[1]
    integer = not call.float_path
    wide_max = integer and plan.mode == "max" and cfg.p_max * plan.L >= MAX_CODES_F32
    bound = acc_bound(call)  # |sum over tiles, input slices| of one weight slice's codes
    # integer codes (any path with an ADC) are summed exactly in fp32 below 2^24, else in int64 as the reference does
    f32_acc = (not integer and plan.mode == "none") or bound < EXACT
    # the whole shift-and-add (weight slices too) in fp32 when every partial total stays exact
    f32_all = integer and f32_acc and not wide_max and plan.mode != "calibrated" and \
        bound * sum(1 << (i * cfg.cell_bits) for i in range(S)) + cfg.offset * K * cfg.x_qmax < EXACT
    # the shift-and-add over tiles and input slices as one reduction: weight 2^(j dac_bits), 0 for a tile a
    # member does not have (it takes no read, no noise)
    wts = torch.tensor([float(1 << (j * cfg.dac_bits)) for j in range(J)], device=dev)
    wts = (valid.float()[:, :, None] * wts).reshape(G, 1, T * J)  # [G, 1, T*J]
    fused = fused_epilogue is not None
    if fused:  # the fused pass writes the outputs: no partial totals in memory
        fused_pass = fused_epilogue(call, xq, s_x, integer, f32_acc)
    Cs = None if fused else torch.empty(G, M, S, N, dtype=torch.float32 if (f32_all or (plan.mode == "none" and not integer))
                     else torch.int64, device=dev)
    gen = None
    if cfg.read_noise > 0 and not fused:
        gen = torch.Generator(device=dev).manual_seed(call.read_key)
        sigma = torch.tensor(cfg.read_noise * cfg.p_max, dtype=torch.float32, device=dev)
    mag_shift = (torch.arange(J, device=dev, dtype=torch.int32) * cfg.dac_bits).view(1, J, 1, 1)
    rows = chunk_rows(M, G * T * J * S * N, budget=1 << 21)  # ~8 MB of partial sums per chunk: cache-sized passes
    for m0 in range(0, M, rows):
        xc = F.pad(xq[:, m0:m0 + rows], (0, T * tr - K))  # [G, m, T*tr]
        m = xc.shape[1]
        sl = torch.sign(xc)[:, None] * ((xc.abs()[:, None] >> mag_shift) & cfg.dac_max)  # [G, J, m, T*tr]
        sl = sl.float().view(G, J, m, T, tr).permute(0, 3, 1, 2, 4).reshape(G * T, J * m, tr)
        with ieee_fp32(dev):
            p = torch.bmm(sl, lev).view(G, T, J, m, S, N)
        if fused:
            fused_pass(p.view(G, T, J, m, S * N), wts.view(G, T, J), m0)
            continue
        if gen is not None:
            p = p + torch.randn(p.shape, generator=gen, device=dev) * sigma
        if wide_max or not f32_acc:
            c = (_codes_int64(p, call) if wide_max else _codes(p, call, integer).to(torch.int64))
            c = c * (wts.view(G, T, J, 1, 1, 1).to(torch.int64))
            Cs[:, m0:m0 + m] = c.sum(dim=(1, 2))
        else:  # exact in fp32: |sum| < 2^24
            c = _codes(p, call, integer).view(G, T * J, m * S * N)
            with ieee_fp32(dev):
                Cs[:, m0:m0 + m] = torch.bmm(wts, c).view(G, m, S, N).to(Cs.dtype)
    y = fused_pass.y if fused else _epilogue(Cs, xq, s_x, call, exact_f32=f32_all)
    if any(n < N for n, _ in grp.sizes):  # padded outputs are 0 (w_scale 0 there, but a NaN row's s_x makes 0 NaN)
        n_g = torch.tensor([n for n, _ in grp.sizes], device=dev).view(G, 1, 1)
        y.masked_fill_(torch.arange(N, device=dev) >= n_g, 0)
    return y


def _epilogue(Cs: torch.Tensor, xq: torch.Tensor, s_x: torch.Tensor, call: GroupCall,
              exact_f32: bool = False) -> torch.Tensor:
    """The reference's fp32 epilogue for every member at once (the same operations in the same order).
    exact_f32: Cs and every sum of them are integers below 2^24, so fp32 holds them exactly."""
    cfg, plan = call.cfg, call.adc
    S = cfg.n_weight_slices
    off = cfg.offset * xq.to(torch.int64).sum(2, keepdim=True)  # [G, M, 1]
    if exact_f32:
        C = Cs[:, :, 0].clone()
        for i in range(1, S):
            C.add_(Cs[:, :, i], alpha=float(1 << (i * cfg.cell_bits)))
        v = C.mul_(plan.step).sub_(off.float()) if plan.mode == "max" else C.sub_(off.float())
        y = v.mul_(s_x[:, :, None] * call.group.w_scale[:, None, :])
        return y.add_(call.bias[:, None, :]) if call.bias is not None else y
    if plan.mode == "calibrated":
        mults = plan.mults  # [G, S]
        v = Cs[:, :, 0].float() * mults[:, 0].view(-1, 1, 1)
        for i in range(1, S):
            v = v + Cs[:, :, i].float() * mults[:, i].view(-1, 1, 1)
        v = v - off.float()
    else:
        C = Cs[:, :, 0]
        for i in range(1, S):
            C = C + Cs[:, :, i] * (1 << (i * cfg.cell_bits))
        if C.dtype == torch.float32:
            v = C - off.float()
        elif plan.mode == "max":
            v = C.float() * plan.step - off.float()
        else:
            v = (C - off).float()
    y = v * (s_x[:, :, None] * call.group.w_scale[:, None, :])
    if call.bias is not None:
        y = y + call.bias[:, None, :]
    return y


def run_single(call, fused_epilogue=None) -> torch.Tensor:
    """crossbar_matmul's `torch` (and `cpp`) backend: one product (a CrossbarCall) as a group of one, [M, N] fp32."""
    from far_kernels.ops.crossbar_matmul.group import CrossbarGroup

    prog, plan = call.prog, call.adc
    group = CrossbarGroup.of_one(prog)
    gplan = plan if plan.steps is None else type(plan)(plan.mode, plan.L, plan.step, plan.steps.view(1, -1),
                                                        plan.mults.view(1, -1))
    gcall = GroupCall(call.x2d[None], group, call.cfg, None if call.bias is None else call.bias[None], gplan,
                      call.read_key, call.float_path)
    return run_group(gcall, fused_epilogue)[0]


def partial_sum_absmax(call: GroupCall) -> torch.Tensor:
    """[G, S] fp32: per member and weight slice, max |p| over every tile, input slice, row and column of this
    call's partial sums (programmed levels, no read noise): the calibration statistic, for a whole group."""
    cfg, grp = call.cfg, call.group
    G, M, K = call.x.shape
    N, S, J = grp.N, cfg.n_weight_slices, cfg.n_input_slices
    dev = call.x.device
    xq, _ = _quantize(call.x, cfg)
    lev, valid = grp.tiles(cfg.tile_rows)
    T, tr = valid.shape[1], lev.shape[1]
    out = torch.zeros(G, S, dtype=torch.float32, device=dev)
    mag_shift = (torch.arange(J, device=dev, dtype=torch.int32) * cfg.dac_bits).view(1, J, 1, 1)
    rows = chunk_rows(M, G * T * J * S * N, budget=1 << 21)
    for m0 in range(0, M, rows):
        xc = F.pad(xq[:, m0:m0 + rows], (0, T * tr - K))
        m = xc.shape[1]
        sl = torch.sign(xc)[:, None] * ((xc.abs()[:, None] >> mag_shift) & cfg.dac_max)
        sl = sl.float().view(G, J, m, T, tr).permute(0, 3, 1, 2, 4).reshape(G * T, J * m, tr)
        with ieee_fp32(dev):
            p = torch.bmm(sl, lev).view(G, T, J, m, S, N).abs_()
        out = torch.maximum(out, p.permute(0, 4, 1, 2, 3, 5).reshape(G, S, -1).amax(dim=2))
    return out
