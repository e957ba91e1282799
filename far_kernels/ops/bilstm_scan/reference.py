"""Reference of the multi-head bidirectional LSTM scan: plain PyTorch, a loop over time, fp32 math.

Importable without Triton or the extension; the oracle every backend is tested against, and the
`torch` backend (differentiable, so training uses it).
"""
from __future__ import annotations

from typing import Optional

import torch


def padded_masks(hidden_sizes, n: int, device) -> Optional[tuple]:
    """None when every (head, direction) keeps all n units, else (keep [H, 2, n], rows [H, 2, 4n]) bool masks
    of the kept units and of their gate rows (gate q of unit u at q*n + u), on `device`. Decided on the host:
    no device sync."""
    hs = torch.as_tensor(hidden_sizes).cpu()
    if bool((hs >= n).all()):
        return None
    keep = (torch.arange(n) < hs[..., None]).transpose(0, 1).to(device)
    return keep, keep.repeat(1, 1, 4)


def bilstm_scan_ref(gx: torch.Tensor, w_hh: torch.Tensor, hidden_sizes: torch.Tensor,
                    product_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Run H independent bidirectional LSTMs (zero initial state) over precomputed input gates.

    Args:
        gx: [H, B, T, 2, 4n] input-gate pre-activations W_ih x_t + b_ih + b_hh for every head,
            batch row, time step and direction (0 = forward, 1 = backward); gate order (i, f, g, o),
            gate q of unit u at column q*n + u (torch.nn.LSTM layout padded to n units).
        w_hh: [H, 2, 4n, n] recurrent weights in the same padded layout.
        hidden_sizes: [2, H] ints (a tensor or nested lists), kept units per (direction, head); units >= the
            size are ignored (their gates and W_hh rows and columns are never read, even NaN there).
        product_dtype: None, or a dtype that h_{t-1} and W_hh are rounded to before every recurrent
            product (state and accumulation stay fp32): the math of a tensor-core kernel with 16-bit
            operands (the cuda backend's mma path), as "the same math in plain PyTorch" for its tests.
    Returns:
        [H, B, T, 2, n] hidden states in gx.dtype (units >= hidden size are 0). Math in fp32
        (fp64 when gx is fp64).
    """
    H, B, T, _, G = gx.shape
    n = G // 4
    acc = torch.float64 if gx.dtype == torch.float64 else torch.float32
    g = gx.to(acc)
    w = w_hh.to(acc) if product_dtype is None else w_hh.to(product_dtype).to(acc)
    masks = padded_masks(hidden_sizes, n, gx.device)
    mask = None
    if masks is not None:  # padded units are ignored, whatever they hold (NaN included): selected away
        keep, rows = masks
        g = torch.where(rows[:, None, None], g, 0.0)
        w = torch.where(rows[..., None] & keep[:, :, None, :], w, 0.0)
        mask = keep.unsqueeze(1)  # [H, 1, 2, n]
    h = gx.new_zeros((H, B, 2, n), dtype=acc)
    c = torch.zeros_like(h)
    steps = []
    for s in range(T):
        x_t = torch.stack((g[:, :, s, 0], g[:, :, T - 1 - s, 1]), dim=2)  # [H, B, 2, 4n]
        hp = h if product_dtype is None else h.to(product_dtype).to(acc)
        gates = x_t + torch.einsum("hbdk,hdjk->hbdj", hp, w)
        i, f, z, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(z)
        h = torch.sigmoid(o) * torch.tanh(c)
        if mask is not None:
            c, h = torch.where(mask, c, 0.0), torch.where(mask, h, 0.0)
        steps.append(h)
    if T == 0:  # nothing to compute, but still part of the graph (zero gradients), as for B = 0
        return (g.sum() * 0 + w.sum() * 0).expand(H, B, 0, 2, n).to(gx.dtype)
    fwd = torch.stack([st[:, :, 0] for st in steps], dim=2)  # step s is time s
    bwd = torch.stack([st[:, :, 1] for st in reversed(steps)], dim=2)  # step s is time T-1-s
    return torch.stack((fwd, bwd), dim=3).to(gx.dtype)
