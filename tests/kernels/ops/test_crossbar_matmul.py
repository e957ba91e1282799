"""crossbar_matmul: config, programming, the reference against the exactness law and a per-element
loop implementation, noise statistics, seeds, stuck-at faults, calibration, and bad inputs."""
import math
from fractions import Fraction

import pytest
import torch

import far_kernels
from far_kernels import (BackendUnavailable, CrossbarConfig, ProgrammedCrossbar, crossbar_matmul,
                         crossbar_matmul_loop, crossbar_matmul_ref, crossbar_partial_sum_absmax, program_crossbar,
                         program_group)
from far_kernels.ops.crossbar_matmul import quantize_inputs, quantize_weights
from far_kernels.ops.crossbar_matmul.reference import rhe_div


def make_xw(M, K, N, seed, dtype=torch.float32):
    """Inputs with row magnitudes spread over two decades and a few outliers; weights with spread rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.exp(torch.randn(M, 1, generator=g))
    x[torch.rand(M, K, generator=g) < 0.02] *= 8
    w = torch.randn(N, K, generator=g) / K ** 0.5 * torch.exp(0.5 * torch.randn(N, 1, generator=g))
    return x.to(dtype), w.to(dtype)


def calibrated_range(x, prog, per_slice, frac):
    r = crossbar_partial_sum_absmax(x, prog) * frac
    r = torch.clamp(r, min=1.0)
    return r if per_slice else r.max()


# A grid over every axis the brief names (cell_bits 1-4, dac_bits 1-2, adc_bits 4-10 and None,
# max/granular/calibrated, differential/offset, channel/tensor, row/tensor, K % tile_rows != 0).
GRID = [
    pytest.param(dict(), id="isaac-defaults"),
    pytest.param(dict(cell_bits=1, dac_bits=1, adc_bits=4, tile_rows=8), id="c1-d1-a4-max-t8"),
    pytest.param(dict(cell_bits=3, dac_bits=2, adc_bits=6, adc_range="granular", tile_rows=16), id="c3-d2-a6-gran-t16"),
    pytest.param(dict(cell_bits=4, dac_bits=2, adc_bits=10, encoding="offset", tile_rows=12), id="c4-d2-a10-max-off-t12"),
    pytest.param(dict(cell_bits=2, dac_bits=1, adc_bits=None, weight_scale="tensor", input_scale="tensor", tile_rows=10),
                 id="c2-d1-noadc-tensor-t10"),
    pytest.param(dict(cell_bits=2, dac_bits=2, adc_bits=5, adc_range="calibrated", tile_rows=8), id="c2-d2-a5-cal-slices"),
    pytest.param(dict(cell_bits=1, dac_bits=2, adc_bits=7, adc_range="calibrated", encoding="offset",
                      weight_scale="tensor", tile_rows=16), id="c1-d2-a7-cal-layer-off"),
    pytest.param(dict(cell_bits=4, dac_bits=1, adc_bits=8, adc_range="granular", encoding="offset",
                      input_scale="tensor", tile_rows=32), id="c4-d1-a8-gran-off"),
    pytest.param(dict(cell_bits=3, dac_bits=1, adc_bits=4, weight_bits=6, input_bits=5, tile_rows=7), id="w6-i5-c3-a4-t7"),
]


def programmed_for(cfg, x, w, slice_range=True):
    prog = program_crossbar(w, cfg)
    if cfg.adc_range == "calibrated":
        prog.adc_range = calibrated_range(x, prog, per_slice=slice_range, frac=0.5)
    return prog


# ---- ADC rounding primitive and quantizers ----
def test_rhe_div_is_round_half_even_of_the_rational():
    a = torch.arange(0, 3000, dtype=torch.int64)
    for d in (1, 2, 3, 7, 24, 384, 1000):
        got = rhe_div(a, d).tolist()
        assert got == [round(Fraction(v, d)) for v in a.tolist()], d  # Python rounds Fractions half to even


def test_quantizers_follow_the_formula():
    x, w = make_xw(9, 50, 7, seed=0)
    for scale in ("channel", "tensor"):
        cfg = CrossbarConfig(weight_scale=scale)
        wq, s = quantize_weights(w, cfg)
        amax = w.abs().amax(1) if scale == "channel" else w.abs().amax().expand(7)
        assert torch.equal(s, amax / 127)
        assert wq.abs().max() <= 127 and (wq.abs().amax(1) == 127).any()
        assert ((w - wq * s[:, None]).abs() <= s[:, None] / 2 * (1 + 1e-6)).all()
    for scale in ("row", "tensor"):
        cfg = CrossbarConfig(input_bits=6, input_scale=scale)
        xq, s = quantize_inputs(x, cfg)
        amax = x.abs().amax(1) if scale == "row" else x.abs().amax().expand(9)
        assert torch.equal(s, amax / 31)
        assert torch.equal(xq, torch.round(x / s[:, None]).clamp(-31, 31).int())


# ---- the exactness law ----
@pytest.mark.parametrize("kw", [
    pytest.param(dict(adc_bits=None), id="no-adc"),
    pytest.param(dict(adc_bits=10, adc_range="granular"), id="granular-a10"),  # L = 511 >= p_max = 384
    pytest.param(dict(adc_bits=10, adc_range="granular", encoding="offset", weight_scale="tensor"), id="granular-offset"),
    pytest.param(dict(adc_bits=None, cell_bits=3, dac_bits=2, input_scale="tensor", tile_rows=50), id="c3-d2-t50"),
    pytest.param(dict(adc_bits=6, adc_range="granular", cell_bits=1, tile_rows=20), id="granular-a6-t20"),  # 31 >= 20
])
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (5, 130, 9), (17, 300, 33)])
def test_exactness_law(kw, M, K, N):
    """No noise and no clipping ADC => y == s_x * s_w * (x_q @ w_q.T) exactly."""
    cfg = CrossbarConfig(**kw)
    assert cfg.is_exact
    x, w = make_xw(M, K, N, seed=M + K)
    b = torch.randn(N)
    xq, s_x = quantize_inputs(x, cfg)
    wq, s_w = quantize_weights(w, cfg)
    exact = (xq.long() @ wq.long().T).float() * (s_x[:, None] * s_w[None, :])
    assert torch.equal(crossbar_matmul(x, w, cfg, backend="torch"), exact)
    assert torch.equal(crossbar_matmul(x, w, cfg, b, backend="torch"), exact + b)
    # and it is the float product up to the quantization error: |x - s_x x_q| <= s_x/2, |w - s_w w_q| <= s_w/2
    ref = x.double() @ w.double().T
    sx, sw = s_x.double()[:, None], s_w.double()[:, None]
    bound = (x.double().abs() @ (sw / 2).expand(N, K).T + (sx / 2).expand(M, K) @ w.double().abs().T
             + K * sx * sw.T / 4)
    assert ((exact.double() - ref).abs() <= bound * (1 + 1e-5) + 1e-6).all()


def test_a_clipping_adc_breaks_exactness():
    """The law's condition matters: a granular ADC below p_max clips, and differs from the integer product."""
    cfg = CrossbarConfig(adc_bits=4, adc_range="granular", cell_bits=2, tile_rows=64)
    assert not cfg.is_exact
    x, w = make_xw(8, 200, 8, seed=3)
    xq, s_x = quantize_inputs(x, cfg)
    wq, s_w = quantize_weights(w, cfg)
    exact = (xq.long() @ wq.long().T).float() * (s_x[:, None] * s_w[None, :])
    assert not torch.equal(crossbar_matmul(x, w, cfg), exact)


# ---- reference == per-element loop ----
@pytest.mark.parametrize("kw", GRID)
def test_reference_matches_loop(kw):
    cfg = CrossbarConfig(**kw)
    x, w = make_xw(3, 37, 4, seed=11)
    b = torch.randn(4)
    prog = programmed_for(cfg, x, w)
    y = crossbar_matmul_ref(x, prog, bias=b)
    y_loop = crossbar_matmul_loop(x, prog, bias=b)
    assert torch.isfinite(y).all()
    assert torch.equal(y, y_loop), (y - y_loop).abs().max()
    if cfg.adc_range != "calibrated":  # the loop's own quantization and slicing of the raw weight
        assert torch.equal(y, crossbar_matmul_loop(x, w, cfg, bias=b))


@pytest.mark.parametrize("kw", GRID[:5])
def test_reference_is_close_to_the_float_product(kw):
    """Sanity of the whole chain: with the full-range ADC the result tracks x @ w.T (loosely)."""
    cfg = CrossbarConfig(**kw)
    x, w = make_xw(16, 96, 12, seed=5)
    y = crossbar_matmul(x, w, cfg).double()
    ref = x.double() @ w.double().T
    assert (y - ref).norm() <= 0.8 * ref.norm()


def test_max_adc_ties_round_half_to_even():
    """tile_rows=8, 1-bit DAC, 2-bit cells: p_max = 24; w_q = 3 everywhere and x_q = 1 on 4 rows give p = 12,
    i.e. code p·L/p_max = 0.5 (L=1) -> 0, 1.5 (L=3) -> 2, 3.5 (L=7) -> 4."""
    x = torch.tensor([[1.0, 1, 1, 1, 0, 0, 0, 0]])
    w = torch.ones(1, 8)
    for adc_bits, code in ((2, 0), (3, 2), (4, 4)):
        cfg = CrossbarConfig(weight_bits=3, cell_bits=2, input_bits=2, dac_bits=1, adc_bits=adc_bits, tile_rows=8)
        L = cfg.adc_levels
        y = crossbar_matmul(x, w, cfg)
        assert abs(y.item() - code * 24 / L / 3) <= 1e-6, (adc_bits, y.item())


# ---- shapes, dtypes, reuse ----
def test_leading_shapes_and_programmed_reuse():
    cfg = CrossbarConfig(adc_bits=6)
    x, w = make_xw(24, 70, 5, seed=2)
    prog = program_crossbar(w, cfg)
    y = crossbar_matmul(x, prog)
    assert torch.equal(y, crossbar_matmul(x, w, cfg))
    assert torch.equal(crossbar_matmul(x.reshape(2, 3, 4, 70), prog), y.reshape(2, 3, 4, 5))
    # a read-side change (adc_bits, dac_bits) reads the same cells: equal to programming with that config
    for change in (dict(adc_bits=9), dict(dac_bits=2, adc_range="granular"), dict(tile_rows=16)):
        c2 = cfg.replace(**change)
        assert torch.equal(crossbar_matmul(x, prog, c2), crossbar_matmul(x, w, c2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_quantize_the_given_values_in_fp32(dtype):
    cfg = CrossbarConfig(adc_bits=7)
    x, w = make_xw(6, 40, 3, seed=4, dtype=dtype)
    y = crossbar_matmul(x, w, cfg)
    assert y.dtype == dtype
    assert torch.equal(y, crossbar_matmul(x.float(), w.float(), cfg).to(dtype))


def test_zero_rows_nan_rows_and_empty():
    cfg = CrossbarConfig(encoding="offset", adc_bits=5)  # offset + clipping ADC: zero rows still give exactly 0
    x, w = make_xw(4, 30, 3, seed=6)
    x[1] = 0
    x[2, 5] = float("nan")
    w[0] = 0
    b = torch.randn(3)
    y = crossbar_matmul(x, w, cfg, b)
    assert torch.equal(y[1], b) and torch.equal(y[[0, 3], 0], b[0].expand(2))
    assert torch.isnan(y[2]).all() and torch.isfinite(y[[0, 1, 3]]).all()
    assert crossbar_matmul(x[:0], w, cfg).shape == (0, 3)
    yt = crossbar_matmul(x, w, cfg.replace(input_scale="tensor"))
    assert torch.isnan(yt).all()  # one scale for the tensor: a NaN anywhere poisons everything


def test_programmed_weight_and_to():
    cfg = CrossbarConfig(cell_bits=3, encoding="offset")
    _, w = make_xw(1, 33, 6, seed=7)
    prog = program_crossbar(w, cfg)
    assert prog.levels.dtype == torch.int8 and prog.levels.shape == (cfg.n_weight_slices, 6, 33)
    wq, s_w = quantize_weights(w, cfg)
    assert torch.equal(prog.weight(), (wq.double() * s_w.double()[:, None]).float())
    p2 = prog.to("cpu")
    assert torch.equal(p2.levels, prog.levels) and p2.cfg == cfg


# ---- noise: statistics, seeds ----
def _sample_std_ok(samples, sigma, name):
    """Sample std within 6 standard errors (se of a std ≈ sigma / sqrt(2n)) of the target."""
    n = samples.numel()
    sd = samples.double().std().item()
    assert abs(sd - sigma) <= 6 * sigma / math.sqrt(2 * n), f"{name}: std {sd:.5g} vs sigma {sigma:.5g} (n={n})"
    assert abs(samples.double().mean().item()) <= 6 * sigma / math.sqrt(n), f"{name}: biased noise"


@pytest.mark.parametrize("encoding,pairs", [("differential", 2), ("offset", 1)])
def test_programming_noise_statistics(encoding, pairs):
    cfg = CrossbarConfig(encoding=encoding, cell_bits=2, prog_noise=0.05, seed=3)
    _, w = make_xw(1, 200, 64, seed=8)
    clean = program_crossbar(w, cfg.replace(prog_noise=0.0)).levels.float()
    noisy = program_crossbar(w, cfg)
    assert noisy.noisy and noisy.levels.dtype == torch.float32
    # each cell gets N(0, (0.05 * 3)^2); a differential level is the difference of two cells
    _sample_std_ok(noisy.levels - clean, 0.05 * 3 * math.sqrt(pairs), f"prog noise {encoding}")


@pytest.mark.parametrize("kw", [
    pytest.param(dict(encoding="differential"), id="diff"),
    pytest.param(dict(encoding="offset", cell_bits=3, dac_bits=2, tile_rows=32), id="offset-c3-d2"),
])
def test_read_noise_statistics(kw):
    """No ADC: y - y_clean = s_x s_w Σ_t Σ_i Σ_j 2^(i·cb + j·dac) ε with ε ~ N(0, (read_noise·p_max)^2) per partial sum."""
    cfg = CrossbarConfig(adc_bits=None, read_noise=0.01, **kw)
    x, w = make_xw(64, 100, 48, seed=9)
    clean = crossbar_matmul(x, w, cfg.replace(read_noise=0.0))
    noisy = crossbar_matmul(x, w, cfg)
    xq, s_x = quantize_inputs(x, cfg)
    wq, s_w = quantize_weights(w, cfg)
    T = -(-100 // cfg.tile_rows)
    gain = sum(4 ** (i * cfg.cell_bits) for i in range(cfg.n_weight_slices)) * \
        sum(4 ** (j * cfg.dac_bits) for j in range(cfg.n_input_slices))
    sigma_int = cfg.read_noise * cfg.p_max * math.sqrt(T * gain)
    _sample_std_ok((noisy - clean) / (s_x[:, None] * s_w[None, :]), sigma_int, "read noise")


def test_read_noise_through_the_adc_changes_codes():
    cfg = CrossbarConfig(read_noise=0.02)
    x, w = make_xw(8, 256, 16, seed=10)
    assert not torch.equal(crossbar_matmul(x, w, cfg), crossbar_matmul(x, w, cfg.replace(read_noise=0.0)))


def test_seeds_reproduce_and_differ():
    cfg = CrossbarConfig(prog_noise=0.03, read_noise=0.01, stuck_at=(0.01, 0.01), seed=5)
    x, w = make_xw(8, 150, 16, seed=12)
    a, b, c = program_crossbar(w, cfg), program_crossbar(w, cfg), program_crossbar(w, cfg.replace(seed=6))
    assert torch.equal(a.levels, b.levels) and not torch.equal(a.levels, c.levels)
    ya1, ya2 = crossbar_matmul(x, a), crossbar_matmul(x, a)
    yb1, yb2 = crossbar_matmul(x, b), crossbar_matmul(x, b)
    assert torch.equal(ya1, yb1) and torch.equal(ya2, yb2)  # same seed => same sequence of products
    assert not torch.equal(ya1, ya2)  # read noise is fresh for every product
    assert not torch.equal(ya1, crossbar_matmul(x, c))  # different seed => different
    assert a.reads == 2 and c.reads == 1
    crossbar_matmul(x, a, cfg.replace(read_noise=0.0))  # a read without read noise takes no key
    assert a.reads == 2
    # a raw weight is programmed afresh on every call: the same seed gives the same product
    assert torch.equal(crossbar_matmul(x, w, cfg), crossbar_matmul(x, w, cfg))


# ---- stuck-at faults ----
def test_stuck_at_fractions_honored():
    cfg = CrossbarConfig(encoding="offset", cell_bits=2, stuck_at=(0.1, 0.05), seed=1)
    _, w = make_xw(1, 300, 100, seed=13)
    clean = program_crossbar(w, cfg.replace(stuck_at=(0.0, 0.0))).levels
    faulty = program_crossbar(w, cfg).levels
    assert faulty.dtype == torch.int8  # faults alone keep the levels integer
    n = clean.numel()
    # a stuck-at-0 is visible on cells that were not 0; their fraction now at 0 estimates p0 (+ tiny p1 overlap)
    not0, notmax = clean != 0, clean != 3
    p0_hat = ((faulty == 0) & not0).sum().item() / not0.sum().item()
    p1_hat = ((faulty == 3) & notmax).sum().item() / notmax.sum().item()
    for got, p, m in ((p0_hat, 0.1, not0.sum().item()), (p1_hat, 0.05, notmax.sum().item())):
        assert abs(got - p) <= 6 * math.sqrt(p * (1 - p) / m), (got, p)
    changed = (faulty != clean).sum().item() / n
    assert changed <= 0.15 + 6 * math.sqrt(0.15 * 0.85 / n)
    # extremes: everything stuck at 0 gives 0; differential everything stuck at max gives 0 (G+ = G-)
    x, _ = make_xw(4, 300, 1, seed=14)
    b = torch.randn(100)
    for c in (cfg.replace(stuck_at=(1.0, 0.0), encoding="differential"), cfg.replace(stuck_at=(0.0, 1.0), encoding="differential")):
        assert torch.equal(crossbar_matmul(x, w, c, b), b.expand(4, 100))


def test_stuck_at_differential_pairs_fault_independently():
    cfg = CrossbarConfig(cell_bits=1, stuck_at=(0.0, 0.2), seed=2)
    _, w = make_xw(1, 400, 100, seed=15)
    clean = program_crossbar(w, cfg.replace(stuck_at=(0.0, 0.0))).levels
    faulty = program_crossbar(w, cfg).levels
    # a level-0 pair (both cells 0) becomes +1 or -1 when exactly one of its two cells sticks at 1:
    # probability 2 * 0.2 * 0.8 = 0.32
    zero = clean == 0
    frac = (faulty[zero] != 0).float().mean().item()
    m = zero.sum().item()
    assert abs(frac - 0.32) <= 6 * math.sqrt(0.32 * 0.68 / m), frac


# ---- calibration ----
def test_partial_sum_absmax_and_calibrated_adc():
    cfg = CrossbarConfig(cell_bits=2, dac_bits=1, tile_rows=16, adc_range="calibrated", adc_bits=10)
    x, w = make_xw(5, 40, 6, seed=16)
    prog = program_crossbar(w, cfg)
    r = crossbar_partial_sum_absmax(x, prog)
    # brute force: max |p| per slice over tiles, input slices, rows, columns
    xq, _ = quantize_inputs(x, cfg)
    lev = prog.levels.long()
    expect = torch.zeros(cfg.n_weight_slices)
    for i in range(cfg.n_weight_slices):
        for j in range(cfg.n_input_slices):
            xs = torch.sign(xq) * ((xq.abs() >> j) & 1)
            for t0 in range(0, 40, 16):
                p = xs[:, t0:t0 + 16].long() @ lev[i, :, t0:t0 + 16].T
                expect[i] = max(expect[i], p.abs().max().item())
    assert torch.equal(r, expect)
    with pytest.raises(ValueError, match="needs a range"):
        crossbar_matmul(x, prog)
    # a calibrated range that covers every partial sum with many levels is close to the unclipped product
    y_cal = crossbar_matmul(x, prog, adc_range=r)
    exact = crossbar_matmul(x, w, cfg.replace(adc_bits=None))
    assert (y_cal - exact).norm() <= 0.02 * exact.norm()
    prog.adc_range = r.max()
    assert torch.equal(crossbar_matmul(x, prog), crossbar_matmul(x, prog, adc_range=float(r.max())))


@pytest.mark.parametrize("adc_bits,r", [(6, 1e-45), (2, 1e38)], ids=["step-underflows", "shifted-step-overflows"])
def test_a_calibrated_range_whose_fp32_steps_degenerate_is_refused(adc_bits, r):
    # r passed as "positive and finite", but its fp32 step r/L was 0 (1e-45 / 31) or a shifted step
    # r/L·2^(i·cell_bits) was inf (1e38·2^6 at L = 1): codes p/0 (0/0 = NaN for p = 0) or C_i·inf (NaN for C_i = 0),
    # and the backends disagreed on such calls (the reference +0, torch -0, cpp NaN) or gave NaN for every output
    cfg = CrossbarConfig(adc_bits=adc_bits, adc_range="calibrated", tile_rows=16)
    x, w = make_xw(3, 20, 4, seed=18)
    prog = program_crossbar(w, cfg)
    runs = [lambda *a, b=b, **k: crossbar_matmul(*a, backend=b, **k) for b in ("torch", "cpp")]
    for run in [crossbar_matmul_ref] + runs:
        with pytest.raises(ValueError, match="ADC steps"):
            run(x, prog, adc_range=r)
    group = program_group([w, w[:2]], cfg)
    group.members[0].adc_range = r
    group.members[1].adc_range = 10.0
    with pytest.raises(ValueError, match="ADC steps"):
        far_kernels.crossbar_matmul_group(torch.zeros(2, 3, 20), group)
    # the extreme ranges that remain give finite outputs, the same on every backend: the smallest step (one fp32
    # subnormal, every nonzero p clips to ±L) and the largest shifted step below inf
    L, top = cfg.adc_levels, 2 ** ((cfg.n_weight_slices - 1) * cfg.cell_bits)
    for r in (L * 2.0 ** -149, float(torch.tensor(torch.finfo(torch.float32).max / top).float() * L / 2)):
        want = crossbar_matmul_ref(x, prog, adc_range=r)
        assert torch.isfinite(want).all()
        for backend in ["torch"] + ["cpp"] * far_kernels.extension_status()["loaded"]:
            assert torch.equal(crossbar_matmul(x, prog, adc_range=r, backend=backend), want)


# ---- config validation ----
@pytest.mark.parametrize("kw,err,match", [
    (dict(cell_bits=5, weight_bits=4), ValueError, "cell_bits .* > weight_bits"),
    (dict(dac_bits=3, input_bits=2), ValueError, "dac_bits .* > input_bits"),
    (dict(adc_bits=1), ValueError, "adc_bits"),
    (dict(weight_bits=1), ValueError, "weight_bits"),
    (dict(cell_bits=0), ValueError, "cell_bits"),
    (dict(tile_rows=0), ValueError, "tile_rows"),
    (dict(tile_rows=2.0), TypeError, "tile_rows must be an int"),
    (dict(prog_noise=-0.1), ValueError, "prog_noise"),
    (dict(read_noise=float("nan")), ValueError, "read_noise"),
    (dict(stuck_at=(0.6, 0.5)), ValueError, "sum to <= 1"),
    (dict(stuck_at=(-0.1, 0.0)), ValueError, "stuck_at"),
    (dict(stuck_at=0.1), ValueError, "pair"),
    (dict(adc_range="minmax"), ValueError, "adc_range must be one of"),
    (dict(encoding="twos"), ValueError, "encoding"),
    (dict(weight_scale="row"), ValueError, "weight_scale"),
    (dict(input_scale="channel"), ValueError, "input_scale"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=1 << 64), ValueError, r"seed must be an int in \[0, 2\^64\)"),  # torch.Generator takes 64 bits
    (dict(tile_rows=1 << 19, cell_bits=4, dac_bits=4), ValueError, "p_max"),
])
def test_config_validation(kw, err, match):
    with pytest.raises(err, match=match):
        CrossbarConfig(**kw)


def test_config_derived_and_frozen():
    cfg = CrossbarConfig()
    assert (cfg.n_weight_slices, cfg.n_input_slices, cfg.p_max, cfg.adc_levels) == (4, 7, 384, 127)
    assert CrossbarConfig(encoding="offset").n_weight_slices == 4 and CrossbarConfig(cell_bits=3).n_weight_slices == 3
    assert cfg.replace(adc_bits=None).adc_levels is None
    with pytest.raises(Exception):
        cfg.adc_bits = 4
    with pytest.raises(ValueError):
        cfg.replace(adc_bits=0)


# ---- bad inputs ----
def test_bad_inputs_raise_clearly():
    x, w = make_xw(3, 20, 4, seed=17)
    cfg = CrossbarConfig()
    prog = program_crossbar(w, cfg)
    with pytest.raises(TypeError, match="x must be float"):
        crossbar_matmul(x.int(), w)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        crossbar_matmul(x.tolist(), w)
    with pytest.raises(ValueError, match="K = 20"):
        crossbar_matmul(x[:, :19], prog)
    with pytest.raises(ValueError, match=r"w must be \[N, K\]"):
        crossbar_matmul(x, w[None])
    with pytest.raises(TypeError, match="ProgrammedCrossbar"):
        crossbar_matmul(x, w.numpy())
    with pytest.raises(ValueError, match=r"bias must be \[N\]"):
        crossbar_matmul(x, prog, bias=torch.zeros(5))
    with pytest.raises(TypeError, match="bias must be a float"):
        crossbar_matmul(x, prog, bias=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="programmed with in cell_bits"):
        crossbar_matmul(x, prog, cfg.replace(cell_bits=3))
    with pytest.raises(ValueError, match="only used with adc_range='calibrated'"):
        crossbar_matmul(x, prog, adc_range=3.0)
    with pytest.raises(ValueError, match="positive and finite"):
        crossbar_matmul(x, prog, cfg.replace(adc_range="calibrated"), adc_range=0.0)
    with pytest.raises(ValueError, match="one entry per weight slice"):
        crossbar_matmul(x, prog, cfg.replace(adc_range="calibrated"), adc_range=torch.ones(3))
    with pytest.raises(ValueError, match="N, K >= 1"):
        program_crossbar(torch.zeros(3, 0), cfg)
    with pytest.raises(ValueError, match="NaN or inf"):
        program_crossbar(torch.full((2, 3), float("inf")), cfg)
    with pytest.raises(TypeError, match="CrossbarConfig"):
        crossbar_matmul(x, w, cfg=dict(adc_bits=4))
    with pytest.raises(ValueError, match="programmed crossbar is on cpu"):
        crossbar_matmul(x.to("meta"), prog)
    with pytest.raises(ValueError, match="is on meta"):
        crossbar_matmul(x, w.to("meta"))
    with pytest.raises(BackendUnavailable, match="no cuda backend"):
        crossbar_matmul(x, prog, backend="cuda")
    with pytest.raises(BackendUnavailable, match="summed as floats" if far_kernels.extension_status()["loaded"]
                       else "far_kernels._C"):  # a call the cpp epilogue declines (or no extension at all)
        crossbar_matmul(x, program_crossbar(w, cfg.replace(adc_bits=None, prog_noise=0.1)), backend="cpp")
    reads = prog.reads
    with pytest.raises(BackendUnavailable):
        crossbar_matmul(x, program_crossbar(w, cfg.replace(read_noise=0.1)), backend="cuda")
    assert prog.reads == reads



def test_a_float64_weight_beyond_float32_range_is_refused():
    # weights are quantized in fp32: 1e300 passed the finiteness check in float64, became inf there, and the
    # crossbar was programmed with scale inf and all-zero cells: every output NaN, silently
    w = torch.randn(3, 5, dtype=torch.float64)
    w[1, 2] = 1e300
    for program in (program_crossbar, lambda w: crossbar_matmul(torch.randn(2, 5), w),
                    lambda w: program_group([w[:, :4], w])):
        with pytest.raises(ValueError, match="NaN or inf values .in float32"):
            program(w)
    w[1, 2] = 1e30  # in float32's range: programmed, finite outputs
    assert torch.isfinite(crossbar_matmul(torch.randn(2, 5), w)).all()

def test_public_names():
    for name in ("CrossbarConfig", "ProgrammedCrossbar", "program_crossbar", "crossbar_matmul", "crossbar_matmul_ref",
                 "crossbar_matmul_loop", "crossbar_partial_sum_absmax"):
        assert name in far_kernels.__all__ and hasattr(far_kernels, name)
    assert isinstance(program_crossbar(torch.randn(2, 3)), ProgrammedCrossbar)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_scales_and_max_adc_ties_divide_exactly_on_every_device(device):
    """ATen divides a CUDA tensor by a Python number by multiplying with the number's fp32 reciprocal: the torch
    backend's max|x| / 127 input scales (and the weights') came out an ulp off the CPU's for ~4% of rows, and its
    "max" ADC codes p L / p_max broke ties the wrong way in ~7% of configurations. Every device must give the
    reference's numbers: the scales the CPU computes, and half to even at a tie."""
    from far_kernels.ops.crossbar_matmul.program import exact_divisor

    assert exact_divisor(127, torch.ones(2)) == 127
    d = exact_divisor(127, torch.ones(2, device="meta", dtype=torch.float32))  # any non-CPU device: a 0-dim tensor
    assert isinstance(d, torch.Tensor) and d.dim() == 0 and d.device.type == "meta" and d.dtype == torch.float32
    # p_max = 30 rows, L = 15: five 1s against 1-weights give p = 5, code 7.5 / 3 = 2.5 -> 2 (the reciprocal: 3)
    cfg = CrossbarConfig(weight_bits=2, input_bits=2, cell_bits=1, dac_bits=1, adc_bits=5, tile_rows=30)
    x = torch.zeros(1, 30)
    x[0, :5] = 1
    prog = program_crossbar(torch.ones(1, 30, device=device), cfg)
    assert crossbar_matmul(x.to(device), prog, backend="torch").item() == 2 * cfg.p_max / cfg.adc_levels == 4
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4096, 16, generator=g) * 10
    cfg = CrossbarConfig()
    assert torch.equal(quantize_inputs(x.to(device), cfg)[1].cpu(), quantize_inputs(x, cfg)[1])
    assert torch.equal(quantize_weights(x.to(device), cfg)[1].cpu(), quantize_weights(x, cfg)[1])
    w = torch.randn(24, 16, generator=g)
    y = crossbar_matmul(x.to(device), program_crossbar(w.to(device), cfg), backend="torch")
    assert torch.equal(y.cpu(), crossbar_matmul(x, program_crossbar(w, cfg), backend="torch"))
