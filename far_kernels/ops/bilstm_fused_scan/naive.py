"""Reference of the fused BiLSTM scan: the input gates as one batched GEMM (exactly as
FARAttention.input_gates computes them), then the reference scan. Plain PyTorch, differentiable."""
from __future__ import annotations

import torch

from far_kernels.ops.bilstm_scan.naive import bilstm_scan_ref


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

    Args: see far_kernels.bilstm_fused_scan. Returns [H, B, T, 2, n] in the dtype of the input gates
    (x's dtype promoted with the weights'); units >= hidden size are 0."""
    return bilstm_scan_ref(input_gates_ref(x, w_ih, bias), w_hh, hidden_sizes)
