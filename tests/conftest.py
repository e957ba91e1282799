"""Shared test helpers: independent oracles built from torch.nn.LSTM, and derived tolerances."""
import os

import pytest
import torch
import torch.nn as nn

# Triton runs kernels on CPU tensors only in its interpreter, and the mode is fixed when triton is
# first imported (torch._dynamo, which timm and far import, does that): choose it here, first, on
# machines without a CUDA device. The shared CPU grids add "triton" only when the user set
# TRITON_INTERPRET=1 (slow); tests/kernels/ops/test_bilstm_scan_triton.py always covers it.
USER_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import far_kernels  # noqa: E402
from far_kernels.dispatch import backend_reason  # noqa: E402


def cpu_backends(op=None):
    """Backends of `op` (default: the scan's OP) to test on CPU: torch always, cpp when the extension is
    built (CI builds it), triton only when the user set TRITON_INTERPRET=1 and the op has a Triton kernel."""
    op = op or far_kernels.ops.bilstm_scan.OP
    out = ["torch", "cpp"]
    if USER_INTERPRET and op.impls.get("triton"):
        out.append("triton")
    return out


def require_backend(backend, device="cpu", op=None):
    why = (op or far_kernels.ops.bilstm_scan.OP).reason(backend, device)
    if why is not None:
        if os.environ.get("CI") == "true" and backend == "cpp":
            pytest.fail(f"CI must build the cpp backend: {why}")
        pytest.skip(f"backend {backend} unavailable: {why}")


def per_head_lstm(x_heads, params, device="cpu"):
    """torch.nn.LSTM(bidirectional=True) on one head's input x_heads [B, T, d] in float64, with
    params = ((w_ih, w_hh, b_ih, b_hh) forward, (...) backward) of kept sizes k_f, k_b.
    Returns [B, T, k_f + k_b]; a direction with 0 units contributes nothing (nn.LSTM needs >= 1)."""
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


def far_block_oracle(m, x):
    """FAR block composed from per-head torch.nn.LSTM in float64: proj(cat_h head_proj_h(BiLSTM_h(pre_proj x)))."""
    f64 = torch.float64
    with torch.no_grad():
        xh = nn.functional.linear(x.double(), m.pre_proj.weight.double(), m.pre_proj.bias.double())
        d = m.head_dim
        heads = []
        for h in range(m.num_heads):
            params = [[t.double() for t in m.lstm_params(dr, h)] for dr in (0, 1)]
            y = per_head_lstm(xh[..., h * d:(h + 1) * d], params)
            w, b = m.head_proj_params(h)
            heads.append(y @ w.to(f64).T + b.to(f64))
        o = torch.cat(heads, dim=-1)
        bias = None if m.proj.bias is None else m.proj.bias.double()
        return nn.functional.linear(o, m.proj.weight.double(), bias)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_derived(out, ref64, out_pt, name="", tiny=1e-6):
    """flash-attention's rule: the kernel's error vs the float64 oracle is at most twice the error of
    the same math done by plain PyTorch in the same dtype (plus a tiny absolute slack). NaN never passes."""
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err, err_pt = max_err(out, ref64), max_err(out_pt, ref64)
    assert err <= 2 * err_pt + tiny, f"{name}: error {err:.3g} > 2 * torch error {err_pt:.3g} + {tiny:g}"
    return err, err_pt
