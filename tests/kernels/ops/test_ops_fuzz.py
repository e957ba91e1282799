"""Seeded random configurations of the kernel ops across the CPU backends, where the other files use fixed grids:
crossbar_matmul and crossbar_matmul_group bit for bit against their references (and crossbar_matmul_loop for tiny
products), bilstm_scan and bilstm_fused_scan within the derived tolerance. Case `seed` is drawn from
random.Random(seed), so a failure names the seed that reproduces it. Triton is left to its own files (the
interpreter is too slow for many cases)."""
import random

import pytest
import torch

from conftest import assert_close_derived, cpu_backends, poisoned
from far_kernels import (BackendUnavailable, CrossbarConfig, bilstm_fused_scan, bilstm_fused_scan_ref, bilstm_scan,
                         bilstm_scan_ref, crossbar_matmul, crossbar_matmul_group, crossbar_matmul_group_ref,
                         crossbar_matmul_loop, crossbar_matmul_ref, program_crossbar, program_group)

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
CHUNK = 40  # cases per test item


def same(a, b):
    """Bit-identical values, NaN where NaN."""
    na, nb = torch.isnan(a), torch.isnan(b)
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(na, nb) and \
        torch.equal(torch.where(na, 0, a), torch.where(nb, 0, b))


def draw_cfg(r):
    """A valid noiseless CrossbarConfig (stuck cells keep integer levels: still exact), fields over their ranges."""
    while True:
        wb, ib = (r.randint(2, 16), r.randint(2, 16)) if r.random() < 0.5 else (r.randint(2, 8), r.randint(2, 8))
        kw = dict(weight_bits=wb, input_bits=ib, cell_bits=r.randint(1, min(7, wb)), dac_bits=r.randint(1, min(7, ib)),
                  adc_bits=None if r.random() < 0.2 else r.randint(2, 24),
                  adc_range=r.choice(["max", "granular", "calibrated"]),
                  tile_rows=r.choice([1, 3, 7, 8, 13, 31, 32, 33, 100, 128, 129, 257]),
                  encoding=r.choice(["differential", "offset"]), weight_scale=r.choice(["channel", "tensor"]),
                  input_scale=r.choice(["row", "tensor"]), seed=r.randrange(1 << 64),
                  stuck_at=(0.1, 0.05) if r.random() < 0.15 else (0.0, 0.0))
        try:
            return CrossbarConfig(**kw)
        except ValueError:  # p_max >= 2^24
            continue


def draw_x(r, g, shape, dtype):
    """Inputs of `dtype` with huge or tiny magnitudes, exact zeros, zero rows, integers (ties), the odd non-finite
    value, and strided or broadcast layouts."""
    emax = {torch.float16: 14, torch.bfloat16: 100, torch.float32: 100, torch.float64: 100}[dtype]
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 2.0 ** r.choice([0, 0, r.randint(-emax, emax)])
    if r.random() < 0.3:
        x[torch.rand(x.shape, generator=g) < 0.3] = 0
    if r.random() < 0.2:
        x.view(-1, shape[-1])[0] = 0
    if r.random() < 0.1:
        x = torch.round(x)
    if r.random() < 0.05:
        x.view(-1, shape[-1])[-1, 0] = r.choice([float("nan"), float("inf")])
    x = x.clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype)
    kind = r.choice(["contiguous", "strided", "broadcast"])
    if kind == "strided":
        big = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=dtype)
        big[..., 1::2] = x
        x = big[..., 1::2]
    elif kind == "broadcast" and x.dim() >= 2:
        x = x[..., :1, :].expand(x.shape)
    return x


def draw_w(r, g, N, K):
    w = torch.randn(N, K, generator=g) * 2.0 ** r.randint(-20, 20)
    if r.random() < 0.2:
        w[0] = 0
    dtype = r.choice(FLOATS)
    top = min(torch.finfo(dtype).max, torch.finfo(w.dtype).max)
    return w.clamp(-top, top).to(dtype)


def calibrated_range(r, cfg):
    if r.random() < 0.5:
        return float(r.choice([0.5, 3.0, cfg.p_max, 1e-3, 1e6]))
    return torch.tensor([r.uniform(0.1, 1.5 * cfg.p_max) for _ in range(cfg.n_weight_slices)])


@pytest.mark.parametrize("chunk", range(8))
def test_crossbar_matmul_random_configs(chunk):
    for seed in range(chunk * CHUNK, (chunk + 1) * CHUNK):
        r, g = random.Random(seed), torch.Generator().manual_seed(seed)
        cfg = draw_cfg(r)
        M, N = r.choice([1, 2, 3, 7, 16]), r.choice([1, 2, 5, 17])
        K = r.choice([1, 2, 5, 37, max(1, cfg.tile_rows - 1), cfg.tile_rows, cfg.tile_rows + 1])
        lead = r.choice([(M,), (2, M)])
        x = draw_x(r, g, (*lead, K), r.choice(FLOATS))
        bias = torch.randn(N, generator=g).to(r.choice(FLOATS)) if r.random() < 0.5 else None
        prog = program_crossbar(draw_w(r, g, N, K), cfg)
        if r.random() < 0.4:  # read under other read-side settings (an ADC, tile or DAC sweep)
            other = draw_cfg(r)
            try:
                cfg = cfg.replace(**{f: getattr(other, f) for f in ("input_bits", "dac_bits", "adc_bits", "adc_range",
                                                                     "tile_rows", "input_scale") if r.random() < 0.5})
            except ValueError:
                pass
        adc_range = calibrated_range(r, cfg) if cfg.adc_range == "calibrated" and cfg.adc_bits is not None else None
        case = f"seed {seed}: {cfg}, x {list(x.shape)} {x.dtype}, N {N}, bias {bias is not None}"
        try:
            ref = crossbar_matmul_ref(x, prog, cfg, bias, adc_range=adc_range)
        except ValueError:  # totals past int64: refused by every backend alike
            with pytest.raises(ValueError):
                crossbar_matmul(x, prog, cfg, bias, backend="torch", adc_range=adc_range)
            continue
        for backend in ("torch", "cpp"):
            try:
                y = crossbar_matmul(x, prog, cfg, bias, backend=backend, adc_range=adc_range)
            except BackendUnavailable:
                assert backend != "torch", case
                continue
            assert same(y, ref), f"{backend} differs from the reference, {case}"
        if x.dim() == 2 and M * N * K * cfg.n_weight_slices * cfg.n_input_slices <= 4000:
            assert same(crossbar_matmul_loop(x, prog, cfg, bias, adc_range=adc_range).to(x.dtype), ref), \
                f"the reference differs from crossbar_matmul_loop, {case}"


@pytest.mark.parametrize("chunk", range(4))
def test_crossbar_matmul_group_random_configs(chunk):
    for seed in range(chunk * CHUNK, (chunk + 1) * CHUNK):
        r, g = random.Random(seed), torch.Generator().manual_seed(seed)
        cfg = draw_cfg(r)
        k_max = r.choice([1, 3, 20, 37, cfg.tile_rows, cfg.tile_rows + 1])
        sizes = [(r.randint(1, 17), r.randint(1, k_max)) for _ in range(r.randint(1, 4))]
        group = program_group([draw_w(r, g, n, k) for n, k in sizes], cfg)
        if cfg.adc_range == "calibrated" and cfg.adc_bits is not None:
            for member in group.members:
                member.adc_range = calibrated_range(r, cfg)
        x = draw_x(r, g, (len(sizes), r.choice([1, 2, 5, 13]), group.K), r.choice(FLOATS))
        bias = torch.randn(len(sizes), group.N, generator=g) if r.random() < 0.5 else None
        case = f"seed {seed}: {cfg}, sizes {sizes}, x {list(x.shape)} {x.dtype}, bias {bias is not None}"
        try:
            ref = crossbar_matmul_group_ref(x, group, cfg, bias).to(x.dtype)
        except ValueError:
            continue
        for backend in ("torch", "cpp"):
            try:
                y = crossbar_matmul_group(x, group, cfg, bias, backend=backend)
            except BackendUnavailable:
                assert backend != "torch", case
                continue
            assert same(y, ref), f"{backend} differs from the reference, {case}"


def noncontiguous(r, t):
    if r.random() < 0.5:
        return t
    big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    big[..., 1::2] = t
    return big[..., 1::2]


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b not in ("torch", "triton")])
@pytest.mark.parametrize("chunk", range(2))
def test_bilstm_scan_random_shapes(chunk, backend):
    for seed in range(chunk * CHUNK, (chunk + 1) * CHUNK):
        r, g = random.Random(seed), torch.Generator().manual_seed(seed)
        H, B, T, n = r.randint(1, 3), r.choice([1, 2, 3, 9]), r.choice([1, 2, 13, 30]), r.choice([1, 3, 8, 17, 33])
        hs = torch.tensor([[r.choice([0, n, r.randint(0, n)]) for _ in range(H)] for _ in range(2)])
        dtype = r.choice(FLOATS[:3])
        gx = noncontiguous(r, torch.randn(H, B, T, 2, 4 * n, generator=g).to(dtype))
        w = noncontiguous(r, (torch.randn(H, 2, 4 * n, n, generator=g) / n ** 0.5).to(r.choice([dtype, torch.float32])))
        out = poisoned((H, B, T, 2, n), dtype) if r.random() < 0.5 else None
        case = f"seed {seed}: H {H} B {B} T {T} n {n} hidden {hs.tolist()} {dtype}, W_hh {w.dtype}"
        y = bilstm_scan(gx, w, hs, backend=backend, out=out)
        assert out is None or y.data_ptr() == out.data_ptr(), case
        assert_close_derived(y, bilstm_scan_ref(gx.double(), w.double(), hs), bilstm_scan_ref(gx, w, hs), case)
        d = r.choice([1, 5, 16])
        x = noncontiguous(r, torch.randn(B, T, H * d, generator=g).to(dtype))
        w_ih = (torch.randn(H, 2, 4 * n, d, generator=g) / d ** 0.5).to(dtype)
        bias = torch.randn(H, 2, 4 * n, generator=g).to(dtype)
        w = w.to(dtype)
        y = bilstm_fused_scan(x, w_ih, bias, w, hs, backend=backend)
        assert_close_derived(y, bilstm_fused_scan_ref(x.double(), w_ih.double(), bias.double(), w.double(), hs),
                             bilstm_fused_scan_ref(x, w_ih, bias, w, hs), f"fused, {case}")
