"""UnrolledFARAttention: a FAR block with its weight products spelled out as a chip computes them, for
IMC emulation.

On a crossbar chip every (head, direction) LSTM has its own arrays and the recurrent product
h_{t-1} W_hh^T is read once per time step, the previous step's h as input. This module computes:

    pre_proj                    Linear(C, H*d)
    w_ih                        GroupLinear, member "<head>.<direction>": (d -> 4k), bias b_ih + b_hh (digital)
    w_hh                        GroupLinear, member "<head>.<direction>": (k -> 4k), no bias, read once per
                                time step (t = 0 included and counted as a read; its output is exactly 0,
                                noise included, since a zero row's dynamic input scale is 0) with every
                                head and direction in one grouped call
    head_proj                   GroupLinear, member "<head>": (k_fwd + k_bwd -> d)
    proj                        the block's W_O

That is the "separate" LSTM mapping. With mapping="fused" (the usual crossbar mapping of an LSTM, and
far.imc.cost's default) w_ih and w_hh are one product instead:

    lstm                        GroupLinear, member "<head>.<direction>": ([x_t; h_{t-1}] -> 4k) =
                                [W_ih | W_hh], bias b_ih + b_hh (digital), read once per time step: one input
                                (one input scale) and one ADC conversion per output for both products

k = kept units of that (direction, head): pruned units take no crossbar rows or columns; a
(direction, head) with none has no member. Direction 0 = forward, 1 = backward. far.imc.emulate turns
pre_proj and proj into CrossbarLinear and the groups into CrossbarGroupLinear (each member selectable
by name: X.w_ih.<head>.<direction>, X.w_hh.<head>.<direction> or X.lstm.<head>.<direction>,
X.head_proj.<head>). Gates (sigmoid, tanh), the cell update and every bias add are digital: the recurrence (state,
gates, the W_hh product's output) in fp32 (fp64 for an fp64 model) as the model's own scan runs it, h rounded once
to the activations' dtype; the other products in the activations' dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from far.imc.layers import GroupLinear
from far.nn import FARAttention

# How an LSTM maps onto crossbars, in far.imc.cost's terms (HardwareSpec.lstm_mapping): "separate" = W_ih over all
# tokens and W_hh at every step, each with its own ADC conversions; "fused" = one [W_ih | W_hh] product per step.
LSTM_MAPPINGS = ("separate", "fused")
EMULATED_LSTM_MAPPING = "separate"  # far.imc.emulate's default


class UnrolledFARAttention(nn.Module):
    """The FARAttention `far` with grouped weight products (see the module docstring). Same forward
    contract: x [B, N, C] -> [B, N, dim_out]; shares pre_proj, proj and proj_drop with `far`. `mapping`:
    "separate" (w_ih, w_hh) or "fused" (lstm), see the module docstring."""

    def __init__(self, far: FARAttention, mapping: str = EMULATED_LSTM_MAPPING) -> None:
        super().__init__()
        if not isinstance(far, FARAttention):
            raise TypeError(f"UnrolledFARAttention expects a FARAttention, got {type(far).__name__}")
        if mapping not in LSTM_MAPPINGS:
            raise ValueError(f"mapping must be one of {', '.join(LSTM_MAPPINGS)}, got {mapping!r}")
        self.mapping = mapping
        self.dim, self.num_heads, self.head_dim = far.dim, far.num_heads, far.head_dim
        self.hidden_sizes = far.hidden_sizes.clone()  # CPU int64 [2, H]
        hs = self.hidden_sizes
        self.pre_proj = far.pre_proj
        self.proj = far.proj
        self.proj_drop = far.proj_drop
        # the live (head, direction) LSTMs, in (head, direction) order: group members
        self.lstms = [(h, r, int(hs[r, h])) for h in range(far.num_heads) for r in (0, 1) if int(hs[r, h]) > 0]
        self.heads = [h for h in range(far.num_heads) if int(hs[:, h].sum()) > 0]
        self.width = max([k for _, _, k in self.lstms], default=0)
        with torch.no_grad():
            if self.lstms:
                params = [far.lstm_params(r, h) for h, r, _ in self.lstms]
                names = [f"{h}.{r}" for h, r, _ in self.lstms]
                if mapping == "fused":  # member input [x_t (d) | h (k)]: padded h columns beyond k are 0
                    self.lstm = GroupLinear(names, [torch.cat((p[0], p[1]), dim=1) for p in params],
                                            [p[2] + p[3] for p in params])
                else:
                    self.w_ih = GroupLinear(names, [p[0] for p in params], [p[2] + p[3] for p in params])
                    self.w_hh = GroupLinear(names, [p[1] for p in params])
            if self.heads:
                hp = [far.head_proj_params(h) for h in self.heads]
                self.head_proj = GroupLinear([str(h) for h in self.heads], [w for w, _ in hp], [b for _, b in hp])
        # gather maps: member g's gate q of unit u sits at column q * k_g + u of its output
        n = self.width
        G = len(self.lstms)
        idx = torch.zeros(G, 4 * n, dtype=torch.long)
        mask = torch.zeros(G, 1, n, dtype=torch.bool)
        for g, (_, _, k) in enumerate(self.lstms):
            for q in range(4):
                idx[g, q * n:q * n + k] = torch.arange(q * k, (q + 1) * k)
            mask[g, 0, :k] = True
        # a head with no unit left outputs its head_proj bias (digital): kept for those heads
        self.register_buffer("dead_head_bias", far.lstm_storage()["head_proj.bias"].detach().clone(), persistent=False)
        self.register_buffer("_gate_index", idx, persistent=False)
        self.register_buffer("_unit_mask", mask, persistent=False)
        self.train(far.training)

    def _recurrence(self, gx: torch.Tensor, N: int) -> torch.Tensor:
        """gx [G, B, N, 4k_max] (members' own gate layout; "fused": the members' inputs x [G, B, N, d]) -> h [G, B, N, n]
        (padded unit layout, 0 beyond k)."""
        G, B = gx.shape[0], gx.shape[1]
        n = self.width
        idx = self._gate_index.view(G, 1, 4 * n)
        dtype = gx.dtype  # state, gates and the recurrent product in fp32 as the model's own scan; h out in dtype
        gx = gx.to(torch.float64 if dtype == torch.float64 else torch.float32)
        mask = self._unit_mask.to(gx.dtype)
        fwd = torch.tensor([r == 0 for _, r, _ in self.lstms], device=gx.device)
        h = gx.new_zeros(G, B, n)
        c = gx.new_zeros(G, B, n)
        out = gx.new_zeros(G, B, N, n)
        for s in range(N):
            t_f, t_b = s, N - 1 - s
            x_t = torch.where(fwd.view(G, 1, 1), gx[:, :, t_f], gx[:, :, t_b])  # [G, B, 4k_max] ("fused": [G, B, d])
            if self.mapping == "fused":  # one read of [x_t; h_{t-1}] per step
                g = self.lstm(torch.cat((x_t, h), dim=-1)[:, :, :self.lstm.in_features])
            else:
                g = x_t + self.w_hh(h[:, :, :self.w_hh.in_features])  # the recurrent read, every step
            g = g.gather(2, idx.expand(G, B, 4 * n))  # [G, B, 4n]: (i, f, g, o) in the padded unit layout
            i, f, z, o = g.chunk(4, dim=-1)
            c = (torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(z)) * mask
            h = torch.sigmoid(o) * torch.tanh(c) * mask
            out[fwd, :, t_f] = h[fwd]
            out[~fwd, :, t_b] = h[~fwd]
        return out.to(dtype)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("UnrolledFARAttention (a BiLSTM) takes no attn_mask and is not causal")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected x of shape [B, N, C={self.dim}], got {list(x.shape)}")
        B, N, _ = x.shape
        H, d = self.num_heads, self.head_dim
        xh = self.pre_proj(x)  # [B, N, H*d]
        o = xh.new_zeros(B, N, H, d)
        if self.lstms:
            heads = xh.view(B * N, H, d)
            xin = torch.stack([heads[:, h] for h, _, _ in self.lstms])  # [G, B*N, d]
            if self.mapping == "fused":
                gx = xin.view(len(self.lstms), B, N, d)  # the products happen inside the recurrence
            else:
                gx = self.w_ih(xin).view(len(self.lstms), B, N, self.w_ih.out_features)
            hseq = self._recurrence(gx, N)  # [G, B, N, n]
            pos = {(h, r): g for g, (h, r, _) in enumerate(self.lstms)}
            parts = []
            for h in self.heads:  # [fwd k_f | bwd k_b] per head
                cat = [hseq[pos[(h, r)], :, :, :int(self.hidden_sizes[r, h])] for r in (0, 1) if (h, r) in pos]
                parts.append(torch.cat(cat, dim=-1).reshape(B * N, int(self.hidden_sizes[:, h].sum())))
            hp_in = xh.new_zeros(len(self.heads), B * N, self.head_proj.in_features)
            for j, p in enumerate(parts):
                hp_in[j, :, :p.shape[1]] = p
            hp = self.head_proj(hp_in)  # [H_live, B*N, d]
            for j, h in enumerate(self.heads):
                o[:, :, h] = hp[j].view(B, N, d)
        for h in range(H):  # a head with no unit left outputs its head_proj bias
            if h not in self.heads:
                o[:, :, h] = self.dead_head_bias[h].to(o.dtype)
        return self.proj_drop(self.proj(o.reshape(B, N, H * d)))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"hidden_sizes={self.hidden_sizes.tolist()}, mapping={self.mapping}")
