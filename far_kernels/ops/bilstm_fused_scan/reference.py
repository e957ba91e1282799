"""References of the fused BiLSTM scan, plain PyTorch and differentiable:

- bilstm_fused_scan_ref: the input gates as one batched GEMM, then the reference scan (a loop over
  time in fp32); the oracle and the `torch` backend for inference.
- bilstm_fused_scan_autograd: one torch.lstm(bidirectional=True) call per head (cuDNN on GPUs, ATen's
  C++ loop on CPUs); the same math, used whenever a gradient is required (training).
"""
from __future__ import annotations

import torch

from far_kernels.ops._checks import has_tangent
from far_kernels.ops.bilstm_scan.reference import bilstm_scan_ref, padded_masks


def input_gates_ref(x: torch.Tensor, w_ih: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x [B, T, H*d], w_ih [H, 2, 4n, d], bias [H, 2, 4n] -> gx [H, B, T, 2, 4n] = x_h W_ih^T + bias."""
    B, T, _ = x.shape
    H, _, G, d = w_ih.shape
    a = x.reshape(B * T, H, d).transpose(0, 1)  # [H, B*T, d] (strided view)
    gx = torch.baddbmm(bias.reshape(H, 1, 2 * G), a, w_ih.reshape(H, 2 * G, d).transpose(1, 2))  # [H, B*T, 8n]
    return gx.view(H, B, T, 2, G)


def bilstm_fused_scan_ref(x: torch.Tensor, w_ih: torch.Tensor, bias: torch.Tensor, w_hh: torch.Tensor,
                          hidden_sizes: torch.Tensor) -> torch.Tensor:
    """H bidirectional LSTMs over the heads of x (head h = columns h*d .. h*d+d-1), zero initial state.

    Args: see far_kernels.bilstm_fused_scan (which casts the weights to x's dtype first). Returns
    [H, B, T, 2, n] in x's dtype; units >= hidden size are 0."""
    return bilstm_scan_ref(input_gates_ref(x, w_ih, bias), w_hh, hidden_sizes)


def bilstm_fused_scan_autograd(x: torch.Tensor, w_ih: torch.Tensor, bias: torch.Tensor, w_hh: torch.Tensor,
                               hidden_sizes: torch.Tensor) -> torch.Tensor:
    """bilstm_fused_scan_ref through torch.lstm, one bidirectional call per head on the padded weights.

    Padded units (>= hidden_sizes) are selected away before the call, whatever their stored weights hold:
    their rows of W_ih, W_hh and the bias and their columns of W_hh read as 0, so their h is exactly 0, the
    kept units never see them, and every gradient to a padded weight is exactly 0. Under autocast the
    recurrence runs in fp32. Forward-mode AD (a tangent on an input) runs bilstm_fused_scan_ref instead:
    torch.lstm has no forward derivative on oneDNN or cuDNN. Returns [H, B, T, 2, n]."""
    if has_tangent((x, w_ih, bias, w_hh)):
        return bilstm_fused_scan_ref(x, w_ih, bias, w_hh, hidden_sizes)
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return bilstm_fused_scan_autograd(x.float(), w_ih.float(), bias.float(), w_hh.float(), hidden_sizes)
    B, T, _ = x.shape
    H, _, G, d = w_ih.shape
    n = G // 4
    if T == 0 or B == 0 or n == 0 or H == 0:  # torch.lstm refuses T, B or n = 0 (stack: H = 0); nothing to compute
        # (still part of the graph)
        return (x.sum() * 0 + w_ih.sum() * 0 + bias.sum() * 0 + w_hh.sum() * 0).expand(H, B, T, 2, n)
    masks = padded_masks(hidden_sizes, n, x.device)
    if masks is not None:
        keep, rows = masks
        w_ih = torch.where(rows[..., None], w_ih, 0.0)
        bias = torch.where(rows, bias, 0.0)
        w_hh = torch.where(rows[..., None] & keep[:, :, None, :], w_hh, 0.0)
    h0 = x.new_zeros(2, B, n)
    outs = []
    for head in range(H):
        params = []
        for direction in (0, 1):
            b = bias[head, direction]
            params += [w_ih[head, direction], w_hh[head, direction], b, torch.zeros_like(b)]
        h, _, _ = torch.lstm(x[..., head * d:(head + 1) * d], (h0, h0), params, True, 1, 0.0, True, True, True)
        outs.append(h.view(B, T, 2, n))  # [B, T, 2n]: [forward | backward]
    return torch.stack(outs)
