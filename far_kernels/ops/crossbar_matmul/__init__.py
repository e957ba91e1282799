"""Bit-sliced ReRAM crossbar emulation GEMM: y ≈ x @ w.T + bias as an IMC accelerator computes it.

Public API:
    CrossbarConfig                      the emulated hardware (frozen dataclass, validated)
    program_crossbar(w, cfg)            quantize/slice/program weights once -> ProgrammedCrossbar
    crossbar_matmul(x, w|prog, cfg, bias, backend=, adc_range=)   the product, any backend
    crossbar_matmul_ref(...)            the reference (plain PyTorch, loops over slices): the oracle
    crossbar_matmul_loop(x, w|prog)     per-element pure-Python version (tiny sizes, tests)
    crossbar_partial_sum_absmax(x, prog)   calibration statistic: [S] max |partial sum| per weight slice
    quantize_inputs / quantize_weights  the quantizers (x_q, s_x) / (w_q, s_w)
    program_group(ws, cfg, seeds)       several weights (ragged shapes) programmed as one CrossbarGroup
    program_stacked(w [G, N, K], cfg)   G same-shaped weights at once (attention's K and V, per input)
    crossbar_matmul_group(x [G, M, K], group, cfg, bias)   G independent products in one call
    crossbar_matmul_group_ref(...)      the group as G crossbar_matmul_ref calls: its oracle

Backends: torch (batched.py: every member, tile and slice in one fp32 batched matmul, exact while partial
sums stay below 2^24, int64 where not), cpp (the same matmul and far_kernels._C's fused epilogue),
triton (GPU). Without noise all are bit-identical to the reference.

Calibration (adc_range="calibrated"): run representative inputs through
`r = crossbar_partial_sum_absmax(x, prog)` and set `prog.adc_range = r` (one range per weight slice)
or `r.max()` (one per layer); or pass `adc_range=` to crossbar_matmul. A calibrated config without a
range raises.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from far_kernels import dispatch
from far_kernels.ops.crossbar_matmul.batched import run_group, run_single
from far_kernels.ops.crossbar_matmul.calibration import crossbar_partial_sum_absmax, crossbar_partial_sum_absmax_group
from far_kernels.ops.crossbar_matmul.config import CrossbarConfig
from far_kernels.ops.crossbar_matmul.cpp import (cpp_limit_group, cpp_limit_single, crossbar_matmul_cpp,
                                                 crossbar_matmul_group_cpp)
from far_kernels.ops.crossbar_matmul.group import (CrossbarGroup, group_call_members, prepare_group_call,
                                                   program_group, program_stacked)
from far_kernels.ops.crossbar_matmul.reference import crossbar_matmul_loop, crossbar_matmul_ref
from far_kernels.ops.crossbar_matmul.program import (ProgrammedCrossbar, prepare_call, program_crossbar,
                                                     quantize_inputs, quantize_weights, read_noise_key,
                                                     triton_unsupported)


def crossbar_matmul_triton(call, out=None):
    """triton backend; Triton is imported on first use (far_kernels imports without it, and the kernel
    is built for the mode TRITON_INTERPRET selects at that moment)."""
    from far_kernels.ops.crossbar_matmul.triton import crossbar_matmul_triton as impl

    return impl(call, out)


OP = dispatch.Op(
    "crossbar_matmul",
    {"torch": run_single, "cpp": crossbar_matmul_cpp, "cuda": None, "triton": crossbar_matmul_triton},
    missing={
        "cuda": "crossbar_matmul has no cuda backend; use triton (GPU) or torch",
    },
    # triton: e.g. int32 accumulators that could overflow; cpp: calls its fused epilogue does not take
    limits={"triton": triton_unsupported, "cpp": cpp_limit_single},
    fp32_only=False,  # the emulation quantizes: every backend computes the same fp32 math from any float dtype
)


def crossbar_matmul(
    x: torch.Tensor,
    w: Union[torch.Tensor, ProgrammedCrossbar],
    cfg: Optional[CrossbarConfig] = None,
    bias: Optional[torch.Tensor] = None,
    *,
    backend: Optional[str] = None,
    adc_range=None,
) -> torch.Tensor:
    """Emulate y ≈ x @ w.T + bias on bit-sliced ReRAM crossbars (docs/design.md, "Crossbar emulation").

    Weights: symmetric quantization to weight_bits (per row or tensor), sliced into S weight slices of
    cell_bits (differential column pairs or offset encoding). Inputs: symmetric quantization to
    input_bits (per row or tensor), sign-magnitude, J input slices of dac_bits. For every tile of
    tile_rows rows, weight slice i and input slice j the analog partial sum p (|p| <= p_max) goes
    through the ADC (round half to even, clip to ±L; step p_max/L for "max", 1 for "granular", r/L for
    "calibrated"); the codes are shifted and added digitally and scaled by s_x·s_w; bias is added in
    fp32. Without noise every backend is bit-identical.

    Args:
        x: [..., K] float32/float16/bfloat16/float64 (quantization math in fp32).
        w: [N, K] weight (programmed on the fly, noise drawn from cfg.seed) or a ProgrammedCrossbar
            (program once with program_crossbar and reuse it; cfg may then change read-side fields
            such as adc_bits, but not the programming fields).
        cfg: CrossbarConfig; default the programmed one (or CrossbarConfig() for a raw weight).
        bias: optional [N].
        backend: "torch" | "cpp" | "triton" | "auto"; default env FAR_BACKEND, else auto (triton on CUDA;
            on CPU cpp, the batched torch path with far_kernels._C's fused noise/ADC/shift-add epilogue,
            where it takes the call, else torch).
        adc_range: ADC range r (scalar or [S]) for adc_range="calibrated"; default prog.adc_range.
    Returns:
        y: [..., N] in x.dtype. Not differentiable (quantization). Rows of x holding NaN/inf give NaN.
        Read noise is fresh for every call and reproducible: call number c of a programmed crossbar
        uses a key derived from (cfg.seed, c). A raw weight is programmed anew by every call, so each
        such call is call 0 of its own crossbar (the same read noise for the same cfg.seed): program
        once with program_crossbar for a sequence of noisy reads.

    Example:
        >>> cfg = CrossbarConfig(adc_bits=6)
        >>> prog = program_crossbar(torch.randn(384, 768), cfg)
        >>> y = crossbar_matmul(torch.randn(8, 197, 768), prog)  # [8, 197, 384]
    """
    call = prepare_call(x, w, cfg, bias, adc_range, consume_read=False)
    name = dispatch.select(OP, backend, x.device, x.dtype, needs_grad=False, args=(call,))
    if call.cfg.read_noise > 0:
        call.prog.reads += 1
    with torch.no_grad():
        y = OP.impls[name](call)
    return y.to(x.dtype).reshape(*call.lead, call.prog.N)


def _group_via_members(impl):
    """A backend of crossbar_matmul_group made of one crossbar_matmul `impl` call per member."""
    def run(call, out=None):
        G, M, _ = call.x.shape
        y = torch.zeros(G, M, call.group.N, dtype=torch.float32, device=call.x.device)
        for g, (x, prog, bias) in enumerate(group_call_members(call)):
            c = prepare_call(x, prog, call.cfg.replace(seed=prog.cfg.seed), bias, op="crossbar_matmul_group",
                             consume_read=False)
            if call.read_key:  # each member its own stream (a hash: keys a few apart would overlap Philox counters)
                c.read_key = read_noise_key(call.read_key, g)
            y[g, :, :prog.N] = impl(c)
        return y if out is None else out.copy_(y)
    return run


def _group_triton_limit(call) -> Optional[str]:
    for x, prog, bias in group_call_members(call):
        why = triton_unsupported(prepare_call(x, prog, call.cfg.replace(seed=prog.cfg.seed), bias, consume_read=False))
        if why is not None:
            return why
    return None


GROUP_OP = dispatch.Op(
    "crossbar_matmul_group",
    {"torch": run_group, "cpp": crossbar_matmul_group_cpp, "cuda": None,
     "triton": _group_via_members(crossbar_matmul_triton)},
    missing={
        "cuda": "crossbar_matmul_group has no cuda backend; use triton (GPU) or torch",
    },
    limits={"triton": _group_triton_limit, "cpp": cpp_limit_group},
    fp32_only=False,
)


def crossbar_matmul_group(x: torch.Tensor, group: CrossbarGroup, cfg: Optional[CrossbarConfig] = None,
                          bias: Optional[torch.Tensor] = None, *, backend: Optional[str] = None) -> torch.Tensor:
    """G independent crossbar products in one call: y[g] = crossbar_matmul(x[g, :, :K_g], member g) + bias[g].

    Args:
        x: [G, M, K] (K the group's largest input size; a member's columns beyond its K_g are no input of it:
            ignored, as the reference slices them off).
        group: a CrossbarGroup (far_kernels.program_group): the members' programmed cells, stacked.
        cfg: the read-side config (default the members'); programming fields must match.
        bias: optional [G, N], added digitally.
        backend: "torch" (batched: every member, tile and slice in one matmul) | "cpp" (the same matmul,
            then one fused C++ pass for noise, ADC, shift-and-add and scaling) | "triton" (one kernel per
            member) | "auto".
    Returns:
        [G, M, N] in x.dtype; a member's outputs beyond its N_g are 0. Without noise, bit-identical to
        separate crossbar_matmul calls; with read noise, fresh noise per call (group.reads keys it).

    Example:
        >>> grp = program_group([torch.randn(128, 32), torch.randn(64, 20)])
        >>> y = crossbar_matmul_group(torch.randn(2, 5, 32), grp)   # [2, 5, 128]; y[1, :, 64:] == 0
    """
    call = prepare_group_call(x, group, cfg, bias)
    name = dispatch.select(GROUP_OP, backend, x.device, x.dtype, needs_grad=False, args=(call,))
    if call.cfg.read_noise > 0:
        group.reads += 1
    with torch.no_grad():
        y = GROUP_OP.impls[name](call)
    return y.to(x.dtype)


def crossbar_matmul_group_ref(x: torch.Tensor, group: CrossbarGroup, cfg: Optional[CrossbarConfig] = None,
                              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The group as G separate crossbar_matmul_ref calls (the oracle of crossbar_matmul_group): [G, M, N] fp32."""
    call = prepare_group_call(x, group, cfg, bias)
    y = torch.zeros(group.G, x.shape[1], group.N, dtype=torch.float32, device=x.device)
    for g, (xg, prog, bg) in enumerate(group_call_members(call)):
        y[g, :, :prog.N] = crossbar_matmul_ref(xg, prog, call.cfg.replace(seed=prog.cfg.seed), bg).float()
    return y


__all__ = [
    "CrossbarGroup",
    "crossbar_matmul_group",
    "crossbar_matmul_group_ref",
    "crossbar_partial_sum_absmax_group",
    "program_group",
    "program_stacked",
    "GROUP_OP",
    "CrossbarConfig",
    "ProgrammedCrossbar",
    "program_crossbar",
    "crossbar_matmul",
    "crossbar_matmul_ref",
    "crossbar_matmul_loop",
    "crossbar_partial_sum_absmax",
    "quantize_inputs",
    "quantize_weights",
    "OP",
]
