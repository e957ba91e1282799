"""An emulated FAR block against an independent re-implementation from crossbar_matmul_ref calls, seeded random
cases: docs/design.md "Crossbar emulation" spelled out per (head, direction, time step).

Every weight product is programmed on its own (program_crossbar with layer_seed(cfg.seed, name)) and read by the
reference: pre_proj over the tokens; per live (head, direction) W_ih over the head's tokens (bias b_ih + b_hh) and
W_hh on h_{t-1} at every step from h_{-1} = 0 ("separate"), or [W_ih | W_hh] on [x_t; h_{t-1}] ("fused"); the
gates in fp32 as nn.LSTM orders them; head_proj per head on [forward h | backward h] (a head with no unit gives its
bias); proj. No noise, any ADC: the grouped, batched backends must give the same bits (design: "Without noise every
backend is bit-identical" to the reference, and a group member equals its product alone).
"""
import fnmatch
import random

import pytest
import torch
import torch.nn as nn

import far
from far.imc import calibrate, emulate, layer_seed
from far_kernels import CrossbarConfig, crossbar_matmul_ref, crossbar_partial_sum_absmax, program_crossbar


# what the oracle does beyond plain crossbar reads: products left digital (glob patterns), and calibration: while
# RECORD is a dict, each product runs as a "max" ADC and its max |partial sum| per weight slice is recorded there; a
# RANGES dict gives each product its ADC range
OPTS = {"digital": (), "record": None, "ranges": None}


def _xb(x, w, cfg, name, bias=None):
    b = None if bias is None else bias.detach().float()
    if any(fnmatch.fnmatchcase(name, p) for p in OPTS["digital"]):
        return torch.addmm(b, x, w.detach().float().T) if b is not None else x @ w.detach().float().T
    prog = program_crossbar(w.detach().float(), cfg.replace(seed=layer_seed(cfg.seed, name)))
    read = None
    if OPTS["record"] is not None:
        p = crossbar_partial_sum_absmax(x, prog).float()
        OPTS["record"][name] = torch.maximum(OPTS["record"].get(name, p), p)
        read = prog.cfg.replace(adc_range="max")
    elif OPTS["ranges"] is not None:
        prog.adc_range = OPTS["ranges"][name]
    return crossbar_matmul_ref(x, prog, read, b).float()


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


class _Wrap(nn.Module):  # calibrate runs the model: a ModuleDict has no forward
    def __init__(self, m):
        super().__init__()
        self.attn = m

    def forward(self, x):
        return self.attn(x)


@pytest.mark.parametrize("mapping", ["separate", "fused"])
@pytest.mark.parametrize("seed", [0, 3, 6, 11])
def test_calibrated_subsets_with_faulty_cells_equal_per_product_reference(seed, mapping):
    """What the test above leaves out: adc_range="calibrated" (ranges recorded by far.imc.calibrate, per slice or
    per product, while every product runs as a "max" ADC), products excluded from emulation (digital members in a
    group, a digital proj or pre_proj), and stuck cells (each product's cells are program_crossbar's under its
    layer_seed, integer levels still, so every read is bit-identical; programming noise makes the levels floats,
    whose sums the grouped products add in another order)."""
    m, cfg, x = _case(seed)
    cfg = cfg.replace(adc_bits=cfg.adc_bits or 6, adc_range="calibrated", stuck_at=(0.03, 0.02))
    live = [(h, r) for h in range(m.num_heads) for r in (0, 1) if int(m.hidden_sizes[r, h])]
    h0, r0 = live[0]
    lstm = f"attn.{'w_hh' if mapping == 'separate' else 'lstm'}.{h0}.{r0}"
    for digital, per_slice in (((), False), ((lstm, "attn.proj"), True), (("attn.pre_proj", "attn.head_proj.*"), True)):
        emu = emulate(_Wrap(m), cfg, exclude=list(digital) or None, lstm_mapping=mapping, backend="torch")
        OPTS.update(digital=digital, record={}, ranges=None)
        try:
            with torch.no_grad():
                got_r = calibrate(emu, x, per_slice=per_slice)
                oracle(m, x, cfg, mapping)
                rec = {n: (v if per_slice else v.max()) for n, v in OPTS["record"].items()}
                OPTS.update(record=None, ranges={n: torch.where(v > 0, v, torch.full_like(v, float(cfg.p_max)))
                                                 for n, v in rec.items()})
                want, y = oracle(m, x, cfg, mapping), emu.attn(x)
            ranges = OPTS["ranges"]
        finally:
            OPTS.update(digital=(), record=None, ranges=None)
        assert set(got_r) == set(ranges), set(got_r) ^ set(ranges)
        assert all(torch.equal(got_r[n].reshape(-1), ranges[n].reshape(-1)) for n in ranges)
        assert torch.isfinite(want).all()
        assert torch.equal(y, want), ((y - want).abs().max().item(), digital, cfg, m.hidden_sizes.tolist())
