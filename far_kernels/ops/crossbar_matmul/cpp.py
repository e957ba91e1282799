"""crossbar_matmul(_group)'s `cpp` backend: the batched torch backend (batched.py) with its epilogue (read
noise, ADC codes, shift-and-add over tiles and input slices) in one fused pass of far_kernels._C
(csrc/crossbar_cpu.cpp) instead of several full passes of torch operations over the partial sums.

Without read noise it is bit-identical to the torch backend and the reference: the same fp32 ADC operations,
totals accumulated exactly. Read noise comes from the kernel's own counter-based generator (32-bit hashes of
the partial sums' index and the call's key, turned into standard normals by Box-Muller with polynomial log,
sin and cos; |z| <= 5.89), so the draws differ from torch's (same distribution) and do not depend on thread
count or chunking. Calls it does not take (cpp_limit): no ADC with read or programming noise (sums of non-integer
partial sums), "max" ADCs with p_max * L >= 2^23 (MAX_CODES_F32: exact codes need int64), and calls whose sums
of codes could pass 2^53."""
from __future__ import annotations

from typing import Optional

import torch

from far_kernels._ext import lib as _C
from far_kernels.ops.crossbar_matmul.batched import MAX_CODES_F32, acc_bound, run_group, run_single
from far_kernels.ops.crossbar_matmul.group import GroupCall

CODE_IDENTITY, CODE_MAX_EXACT, CODE_DIVIDE = 0, 1, 2


def _code(call: GroupCall, integer: bool) -> int:
    plan, cfg = call.adc, call.cfg
    if plan.mode == "none" or (plan.mode == "granular" and integer and plan.L >= cfg.p_max):
        return CODE_IDENTITY
    if plan.mode == "max" and integer:
        return CODE_MAX_EXACT
    return CODE_DIVIDE


def cpp_limit_group(call: GroupCall) -> Optional[str]:
    """None if the fused CPU epilogue takes this call, else why not (auto then uses the torch backend)."""
    if _C is None or not hasattr(_C, "crossbar_adc_reduce"):
        return "far_kernels._C has no crossbar_adc_reduce (built from older sources); rebuild the extension"
    plan, cfg = call.adc, call.cfg
    integer = not call.float_path
    if plan.mode == "none" and not integer:
        return "without an ADC, noisy partial sums are summed as floats: the torch backend does that"
    if plan.mode == "max" and integer and cfg.p_max * plan.L >= MAX_CODES_F32:
        return "a max ADC with p_max * L >= 2^23 needs exact integer codes: the torch backend does that"
    if acc_bound(call) >= 1 << 53:  # the epilogue sums each weight slice's codes in double (exact below 2^53)
        return "the sums of ADC codes may pass 2^53, where double is not exact: the torch backend sums them in int64"
    return None


def cpp_limit_single(call) -> Optional[str]:
    from far_kernels.ops.crossbar_matmul.group import CrossbarGroup

    group = CrossbarGroup.of_one(call.prog)
    plan = call.adc
    gplan = plan if plan.steps is None else type(plan)(plan.mode, plan.L, plan.step, plan.steps.view(1, -1),
                                                        plan.mults.view(1, -1))
    return cpp_limit_group(GroupCall(call.x2d[None], group, call.cfg, None, gplan, call.read_key, call.float_path))


EPILOGUE_INTEGER, EPILOGUE_MAX, EPILOGUE_CALIBRATED = 0, 1, 2


class FusedEpilogue:
    """far_kernels._C.crossbar_adc_reduce over the row chunks of one call: y [G, M, N] fp32 = the torch backend's
    output (noise, ADC, shift-and-add, scaling and bias in one pass per chunk)."""

    def __init__(self, call: GroupCall, xq: torch.Tensor, s_x: torch.Tensor, integer: bool, exact_f32: bool):
        plan, cfg, grp = call.adc, call.cfg, call.group
        G, M, _ = call.x.shape
        S = cfg.n_weight_slices
        self.call, self.integer, self.exact_f32 = call, integer, exact_f32
        self.code = _code(call, integer)
        if self.code == CODE_DIVIDE:
            steps = plan.steps if plan.mode == "calibrated" else plan.step.reshape(1, 1).expand(G, S)
            self.steps = steps.float().reshape(G, S).contiguous()
        else:
            self.steps = torch.empty(0)
        self.epilogue = (EPILOGUE_CALIBRATED if plan.mode == "calibrated" else
                         EPILOGUE_MAX if plan.mode == "max" else EPILOGUE_INTEGER)
        self.mults = plan.mults.float().reshape(G, S).contiguous() if plan.mode == "calibrated" else torch.empty(0)
        self.step = plan.step_value if plan.mode == "max" else 1.0
        self.offsets = (cfg.offset * xq.to(torch.int64).sum(2)).contiguous() if cfg.offset else torch.empty(0)
        self.s_x = s_x.float().contiguous()
        self.w_scale = grp.w_scale.float().contiguous()
        self.bias = call.bias.contiguous() if call.bias is not None else torch.empty(0)
        self.sigma = float(torch.tensor(cfg.read_noise * cfg.p_max, dtype=torch.float32)) if cfg.read_noise > 0 else 0.0
        self.y = torch.empty(G, M, grp.N, dtype=torch.float32)

    def __call__(self, p: torch.Tensor, weights: torch.Tensor, m0: int) -> None:
        c, cfg = self.call, self.call.cfg
        _C.crossbar_adc_reduce(p.contiguous(), weights.contiguous(), self.steps, self.y, self.s_x, self.w_scale,
                               self.offsets, self.bias, self.mults, m0, self.code, self.epilogue, cfg.cell_bits,
                               self.step, float(c.adc.L), float(cfg.p_max), self.sigma, c.read_key, self.exact_f32)


def crossbar_matmul_cpp(call, out=None):
    y = run_single(call, FusedEpilogue)
    return y if out is None else out.copy_(y)


def crossbar_matmul_group_cpp(call: GroupCall, out=None):
    y = run_group(call, FusedEpilogue)
    return y if out is None else out.copy_(y)
