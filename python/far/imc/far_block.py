"""UnrolledFARAttention: a FAR block with every weight product as its own Linear module, for IMC emulation.

A FARAttention runs all heads as one batched GEMM and a fused scan; on a crossbar chip every
(head, direction) LSTM has its own arrays, and the recurrent product h_{t-1} W_hh^T is read once per
time step with the previous step's h as input. This module spells that out with per-product
modules that far.imc.emulate turns into CrossbarLinear:

    pre_proj                    Linear(C, H*d)
    w_ih.<head>.<direction>     Linear(d, 4k), bias b_ih + b_hh (digital)
    w_hh.<head>.<direction>     Linear(k, 4k, bias=False), called once per time step on h_{t-1}
    head_proj.<head>            Linear(k_fwd + k_bwd, d)
    proj                        the block's W_O

k = kept units of that (direction, head) (lstm_params: pruned units take no crossbar rows or columns);
direction 0 = forward, 1 = backward. Gates (sigmoid, tanh), the cell update and all bias adds are
digital, in the activations' dtype.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn as nn
from torch.nn.utils import skip_init

from far.nn import FARAttention


def _linear(w: torch.Tensor, b: Optional[torch.Tensor]) -> nn.Linear:
    with warnings.catch_warnings():  # a pruned-away direction has a [0, d] weight: nothing to initialise
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")
        lin = skip_init(nn.Linear, w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)
    return lin


class UnrolledFARAttention(nn.Module):
    """The FARAttention `far` with one module per weight product (see the module docstring).
    Same forward contract: x [B, N, C] -> [B, N, dim_out]; shares pre_proj, proj and proj_drop with `far`."""

    def __init__(self, far: FARAttention) -> None:
        super().__init__()
        if not isinstance(far, FARAttention):
            raise TypeError(f"UnrolledFARAttention expects a FARAttention, got {type(far).__name__}")
        self.dim = far.dim
        self.num_heads = far.num_heads
        self.head_dim = far.head_dim
        self.hidden_sizes = far.hidden_sizes.clone()  # CPU int64 [2, H]
        self.pre_proj = far.pre_proj
        self.w_ih = nn.ModuleList()
        self.w_hh = nn.ModuleList()
        self.head_proj = nn.ModuleList()
        with torch.no_grad():
            for head in range(far.num_heads):
                ih, hh = nn.ModuleList(), nn.ModuleList()
                for direction in (0, 1):
                    w_ih, w_hh, b_ih, b_hh = far.lstm_params(direction, head)
                    ih.append(_linear(w_ih, b_ih + b_hh))
                    hh.append(_linear(w_hh, None))
                self.w_ih.append(ih)
                self.w_hh.append(hh)
                self.head_proj.append(_linear(*far.head_proj_params(head)))
        self.proj = far.proj
        self.proj_drop = far.proj_drop
        self.train(far.training)

    def _direction(self, xs: torch.Tensor, head: int, direction: int) -> torch.Tensor:
        """One LSTM over xs [B, N, d] -> h [B, N, k]; the recurrent product once per step."""
        B, N, _ = xs.shape
        k = int(self.hidden_sizes[direction, head])
        if k == 0:
            return xs.new_zeros(B, N, 0)
        gx = self.w_ih[head][direction](xs)  # [B, N, 4k]
        w_hh = self.w_hh[head][direction]
        h = c = None
        hs = [None] * N
        for step, t in enumerate(range(N) if direction == 0 else range(N - 1, -1, -1)):
            g = gx[:, t] if step == 0 else gx[:, t] + w_hh(h)  # h_{-1} = 0: its product is exactly 0
            i, f, gg, o = g.chunk(4, dim=-1)
            c = torch.sigmoid(i) * torch.tanh(gg) if step == 0 else torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
            h = torch.sigmoid(o) * torch.tanh(c)
            hs[t] = h
        return torch.stack(hs, dim=1)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("UnrolledFARAttention (a BiLSTM) takes no attn_mask and is not causal")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected x of shape [B, N, C={self.dim}], got {list(x.shape)}")
        d = self.head_dim
        xh = self.pre_proj(x)  # [B, N, H*d]
        heads = []
        for head in range(self.num_heads):
            xs = xh[..., head * d:(head + 1) * d]
            h = torch.cat([self._direction(xs, head, direction) for direction in (0, 1)], dim=-1)
            heads.append(self.head_proj[head](h))  # [B, N, d]
        return self.proj_drop(self.proj(torch.cat(heads, dim=-1)))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"hidden_sizes={self.hidden_sizes.tolist()}")
