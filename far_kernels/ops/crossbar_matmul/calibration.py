"""The calibration statistic of adc_range="calibrated": the largest |partial sum| a crossbar's reads produce."""
from __future__ import annotations

from typing import Optional

import torch

from far_kernels.ops.crossbar_matmul.config import CrossbarConfig
from far_kernels.ops.crossbar_matmul.program import as_programmed, prepare_call, quantize_inputs
from far_kernels.ops.crossbar_matmul.reference import partial_sums


@torch.no_grad()
def crossbar_partial_sum_absmax(x: torch.Tensor, w, cfg: Optional[CrossbarConfig] = None) -> torch.Tensor:
    """Calibration statistic: for each weight slice i, max |p| over the data x [..., K] of every tile's
    partial sum (all input slices, rows and columns; programmed levels, no read noise).

    Returns [S] fp32 on x's device. With w a ProgrammedCrossbar, `prog.adc_range = result` (or its max
    for one range per layer) calibrates it for adc_range="calibrated"."""
    prog = as_programmed(w, cfg)
    cfg = cfg if cfg is not None else prog.cfg
    # the statistic needs no ADC range: validate the arguments under adc_range="max"
    call = prepare_call(x, prog, cfg.replace(adc_range="max"), None, None, op="crossbar_partial_sum_absmax",
                        consume_read=False)
    xq, _ = quantize_inputs(call.x2d, cfg)
    out = torch.zeros(cfg.n_weight_slices, dtype=torch.float32, device=x.device)
    for _, i, _, p in partial_sums(xq, prog, cfg):
        if p.numel():
            out[i] = torch.maximum(out[i], p.abs().amax())
    return out


@torch.no_grad()
def crossbar_partial_sum_absmax_group(x: torch.Tensor, group, cfg: Optional[CrossbarConfig] = None) -> torch.Tensor:
    """crossbar_partial_sum_absmax of every member of a CrossbarGroup on x [G, M, K] at once: [G, S] fp32."""
    from far_kernels.ops.crossbar_matmul.batched import partial_sum_absmax
    from far_kernels.ops.crossbar_matmul.group import prepare_group_call

    cfg = cfg if cfg is not None else group.cfg
    return partial_sum_absmax(prepare_group_call(x, group, cfg.replace(adc_range="max", read_noise=0.0),
                                                 op="crossbar_partial_sum_absmax_group"))
