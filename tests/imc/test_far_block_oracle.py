"""An emulated FAR block against an independent re-implementation from crossbar_matmul_ref calls, seeded random
cases: docs/design.md "Crossbar emulation" spelled out per (head, direction, time step).

Every weight product is programmed on its own (program_crossbar with layer_seed(cfg.seed, name)) and read by the
reference: pre_proj over the tokens; per live (head, direction) W_ih over the head's tokens (bias b_ih + b_hh) and
W_hh on h_{t-1} at every step from h_{-1} = 0 ("separate"), or [W_ih | W_hh] on [x_t; h_{t-1}] ("fused"); the
gates in fp32 as nn.LSTM orders them; head_proj per head on [forward h | backward h] (a head with no unit gives its
bias); proj. No noise, any ADC: the grouped, batched backends must give the same bits (design: "Without noise every
backend is bit-identical" to the reference, and a group member equals its product alone).
"""
import random

import pytest
import torch
import torch.nn as nn

import far
from far.imc import emulate, layer_seed
from far_kernels import CrossbarConfig, crossbar_matmul_ref, program_crossbar


def _xb(x, w, cfg, name, bias=None):
    prog = program_crossbar(w.detach().float(), cfg.replace(seed=layer_seed(cfg.seed, name)))
    return crossbar_matmul_ref(x, prog, None, None if bias is None else bias.detach().float()).float()


def oracle(m: far.FARAttention, x: torch.Tensor, cfg, mapping: str, name: str = "attn") -> torch.Tensor:
    B, N, C = x.shape
    H, d = m.num_heads, m.head_dim
    xh = _xb(x.reshape(B * N, C), m.pre_proj.weight, cfg, f"{name}.pre_proj", m.pre_proj.bias).view(B, N, H, d)
    o = torch.zeros(B, N, H, d)
    for h in range(H):
        seqs = []
        for r in (0, 1):
            k = int(m.hidden_sizes[r, h])
            if k == 0:
                continue
            w_ih, w_hh, b_ih, b_hh = m.lstm_params(r, h)
            xs = xh[:, :, h]  # [B, N, d]
            if mapping == "separate":
                gx = _xb(xs.reshape(B * N, d), w_ih, cfg, f"{name}.w_ih.{h}.{r}", b_ih + b_hh).view(B, N, 4 * k)
            hc, c, out = torch.zeros(B, k), torch.zeros(B, k), torch.zeros(B, N, k)
            for t in (range(N) if r == 0 else range(N - 1, -1, -1)):
                if mapping == "separate":
                    g = gx[:, t] + _xb(hc, w_hh, cfg, f"{name}.w_hh.{h}.{r}")
                else:
                    g = _xb(torch.cat((xs[:, t], hc), 1), torch.cat((w_ih, w_hh), 1), cfg, f"{name}.lstm.{h}.{r}",
                            b_ih + b_hh)
                i, f, z, og = g.chunk(4, dim=-1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(z)
                hc = torch.sigmoid(og) * torch.tanh(c)
                out[:, t] = hc
            seqs.append(out)
        w, b = m.head_proj_params(h)
        o[:, :, h] = (_xb(torch.cat(seqs, -1).reshape(B * N, -1), w, cfg, f"{name}.head_proj.{h}", b).view(B, N, d)
                      if seqs else b.float())
    return _xb(o.reshape(B * N, H * d), m.proj.weight, cfg, f"{name}.proj", m.proj.bias).view(B, N, -1)


def _case(seed: int):
    rng = random.Random(seed)
    H, d = rng.choice([1, 2, 3]), rng.choice([2, 3, 5])
    hs = [[rng.randint(0, d) for _ in range(H)] for _ in range(2)]
    if rng.random() < 0.3:  # a head with no unit left
        dead = rng.randrange(H)
        hs[0][dead] = hs[1][dead] = 0
    torch.manual_seed(seed)
    m = far.FARAttention(H * d, H, hidden_sizes=hs, proj_bias=rng.random() < 0.7).eval()
    with torch.no_grad():  # LSTM-init weights are small: widen them so the gates leave their linear range
        for p in (m.w_ih, m.w_hh):
            p.mul_(3.0)
        m.zero_padding_()
    wb, ib = rng.randint(2, 9), rng.randint(2, 9)
    cfg = CrossbarConfig(weight_bits=wb, cell_bits=rng.randint(1, min(4, wb)), input_bits=ib,
                         dac_bits=rng.randint(1, min(3, ib)), adc_bits=rng.choice([None, 3, 5, 8]),
                         adc_range=rng.choice(["max", "granular"]), tile_rows=rng.choice([1, 2, 3, 7, 128]),
                         encoding=rng.choice(["differential", "offset"]),
                         weight_scale=rng.choice(["channel", "tensor"]), input_scale=rng.choice(["row", "tensor"]),
                         seed=rng.randrange(1 << 20))
    B, N = rng.choice([1, 2, 3]), rng.choice([2, 4, 5])
    return m, cfg, torch.randn(B, N, H * d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("mapping", ["separate", "fused"])
@pytest.mark.parametrize("seed", [0, 3, 5, 6, 9, 11])  # ragged, dead heads, ADCs, both scales
def test_emulated_far_block_equals_per_product_reference(seed, mapping, backend):
    m, cfg, x = _case(seed)
    with torch.no_grad():
        y = emulate(nn.ModuleDict({"attn": m}), cfg, backend=backend, lstm_mapping=mapping)["attn"](x)
        want = oracle(m, x, cfg, mapping)
    assert torch.isfinite(want).all()
    assert torch.equal(y, want), ((y - want).abs().max().item(), cfg, m.hidden_sizes.tolist())
