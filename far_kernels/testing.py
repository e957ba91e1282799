"""Helpers for checking kernels (tests and benchmarks use them): derived tolerances, poisoned
outputs, and an independent BiLSTM oracle built from torch.nn.LSTM.

The tolerance rule is flash-attention's: a kernel's error against a float64 oracle may be at most
twice the error of the same math done by plain PyTorch in the kernel's dtype, plus a tiny slack.
NaN never passes."""
from __future__ import annotations

import torch
import torch.nn as nn


def poisoned(shape, dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
    """A tensor full of NaN (integers: -1) to pass as `out=`: any element a kernel forgets to write
    shows up."""
    if dtype.is_floating_point:
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    return torch.full(tuple(shape), -1, dtype=dtype, device=device)


def behind_a_busy_side_stream(fn, x: torch.Tensor, cycles: int = 100_000_000) -> torch.Tensor:
    """fn(y) launched on a side stream where y (NaN until then) receives x only after a long GPU sleep
    (~50 ms at 100M cycles): a kernel that ignores torch's current stream reads the NaN. x on a CUDA device."""
    y = torch.full_like(x, float("nan"))
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(cycles)
        y.copy_(x)
        out = fn(y)
    s.synchronize()
    return out


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64 (0.0 for empty tensors)."""
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_derived(out: torch.Tensor, ref64: torch.Tensor, out_pt: torch.Tensor, name: str = "",
                         tiny: float = 1e-6):
    """err(out vs ref64) <= 2 * err(out_pt vs ref64) + tiny, and `out` is finite.

    out: the kernel's result; ref64: the float64 oracle; out_pt: plain PyTorch's result in the
    kernel's dtype (all three of one shape: nothing is broadcast). Returns (err, err_pt)."""
    assert out.shape == ref64.shape == out_pt.shape, \
        f"{name}: shapes differ: out {list(out.shape)}, ref64 {list(ref64.shape)}, out_pt {list(out_pt.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err, err_pt = max_err(out, ref64), max_err(out_pt, ref64)
    assert err <= 2 * err_pt + tiny, f"{name}: error {err:.3g} > 2 * torch error {err_pt:.3g} + {tiny:g}"
    return err, err_pt


def per_head_lstm(x_heads: torch.Tensor, params, device="cpu") -> torch.Tensor:
    """torch.nn.LSTM(bidirectional=True) on one head's input x_heads [B, T, d] in float64, with
    params = ((w_ih, w_hh, b_ih, b_hh) forward, (...) backward) of kept sizes k_f, k_b (nn.LSTM
    layout). Returns [B, T, k_f + k_b]; a direction with 0 units contributes nothing."""
    outs = []
    for direction, (w_ih, w_hh, b_ih, b_hh) in enumerate(params):
        k = w_hh.shape[1]
        if k == 0:
            continue
        lstm = nn.LSTM(x_heads.shape[-1], k, batch_first=True).double().to(device)
        with torch.no_grad():
            lstm.weight_ih_l0.copy_(w_ih)
            lstm.weight_hh_l0.copy_(w_hh)
            lstm.bias_ih_l0.copy_(b_ih)
            lstm.bias_hh_l0.copy_(b_hh)
            xi = x_heads.double() if direction == 0 else x_heads.double().flip(1)
            y, _ = lstm(xi)
        outs.append(y if direction == 0 else y.flip(1))
    if not outs:
        return x_heads.new_zeros(*x_heads.shape[:2], 0, dtype=torch.float64)
    return torch.cat(outs, dim=-1)


def assert_same_rounding(out: torch.Tensor, out_pt: torch.Tensor, name: str = "", max_frac: float = 0.01) -> float:
    """A 16-bit result computed with fp32 math, as `out_pt` (the same fp32 math in plain PyTorch, rounded once
    to the 16-bit dtype): equal but for rare rounding flips (summation order moves a value across a rounding
    boundary now and then). Sharper than assert_close_derived for 16-bit outputs, whose bound the final rounding
    dominates: a kernel that rounds an operand to 16 bits inside the math (e.g. h before each recurrent product)
    changes ~10% of the outputs and passes that bound, not this one. Returns the fraction that differs."""
    assert out.shape == out_pt.shape and out.dtype == out_pt.dtype, f"{name}: shape or dtype differs from out_pt"
    frac = (out != out_pt).double().mean().item() if out.numel() else 0.0
    assert frac <= max_frac, (f"{name}: {100 * frac:.2f}% of the outputs differ from fp32 math rounded once "
                              f"(> {100 * max_frac:g}%)")
    return frac
