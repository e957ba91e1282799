"""crossbar_matmul_group (the batched torch backend): bit-identical to its oracle crossbar_matmul_group_ref
(G separate crossbar_matmul_ref calls) without read noise, on fresh random data over the config axes, with
ragged members, every exact-arithmetic path (fp32 ADC, int64 "max" codes, int64 accumulation), ties,
empty and NaN rows; read noise in distribution; calibration statistics; bad inputs; program_stacked (the
per-input programming of attention's K and V). The triton backend of
the group op is tested in test_crossbar_matmul_triton.py (it needs the interpreter set up first)."""
import pytest
import torch

import far_kernels
from far_kernels import (CrossbarConfig, CrossbarGroup, crossbar_matmul, crossbar_matmul_group,
                         crossbar_matmul_group_ref, crossbar_partial_sum_absmax, crossbar_partial_sum_absmax_group,
                         program_crossbar, program_group, program_stacked)
from far_kernels.ops.crossbar_matmul import GROUP_OP

from far_kernels.ops.crossbar_matmul import OP  # noqa: E402

CPP = pytest.param("cpp", marks=pytest.mark.skipif(OP.reason("cpp", "cpu") is not None,
                                                   reason=f"cpp backend unavailable: {OP.reason('cpp', 'cpu')}"))
BACKENDS = ["torch", CPP]  # the batched torch backend, and the same with far_kernels._C's fused epilogue

SIZES = [(6, 37), (3, 20), (9, 5)]  # (N_g, K_g): ragged members, K not a multiple of the tile rows


def make_group(cfg, sizes, seed, M=7, calibrate_frac=0.5, per_slice=True):
    """Fresh x [G, M, K] (zero beyond each member's K_g), a programmed group, a bias [G, N]."""
    g = torch.Generator().manual_seed(seed)
    G, N, K = len(sizes), max(n for n, _ in sizes), max(k for _, k in sizes)
    x = torch.zeros(G, M, K)
    ws = []
    for i, (n, k) in enumerate(sizes):
        x[i, :, :k] = torch.randn(M, k, generator=g) * torch.exp(torch.randn(M, 1, generator=g))
        ws.append(torch.randn(n, k, generator=g) / k ** 0.5 * torch.exp(0.5 * torch.randn(n, 1, generator=g)))
    grp = program_group(ws, cfg)
    if cfg.adc_range == "calibrated":
        for i, m in enumerate(grp.members):
            r = torch.clamp(crossbar_partial_sum_absmax(x[i, :, :sizes[i][1]], m) * calibrate_frac, min=1.0)
            m.adc_range = r if per_slice else r.max()
    bias = torch.randn(G, N, generator=g)
    return x, grp, bias, ws


GRID = [
    pytest.param(dict(), id="isaac-defaults"),
    pytest.param(dict(cell_bits=1, dac_bits=1, adc_bits=4, tile_rows=8), id="c1-d1-a4-max-t8"),
    pytest.param(dict(cell_bits=3, dac_bits=2, adc_bits=6, adc_range="granular", tile_rows=16), id="c3-d2-a6-gran"),
    pytest.param(dict(cell_bits=4, dac_bits=2, adc_bits=10, encoding="offset", tile_rows=12), id="c4-d2-a10-off"),
    pytest.param(dict(cell_bits=2, dac_bits=1, adc_bits=None, weight_scale="tensor", input_scale="tensor",
                      tile_rows=10), id="noadc-tensor"),
    pytest.param(dict(cell_bits=2, dac_bits=2, adc_bits=5, adc_range="calibrated", tile_rows=8), id="a5-calibrated"),
    pytest.param(dict(cell_bits=1, dac_bits=2, adc_bits=7, adc_range="calibrated", encoding="offset",
                      weight_scale="tensor", tile_rows=16), id="a7-calibrated-offset"),
    pytest.param(dict(cell_bits=3, dac_bits=1, adc_bits=4, weight_bits=6, input_bits=5, tile_rows=7), id="w6-i5-t7"),
    pytest.param(dict(prog_noise=0.05, stuck_at=(0.02, 0.01), adc_bits=6, tile_rows=16, seed=9),
                 id="programming-noise-stuck"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", GRID)
def test_group_bit_identical_to_reference(kw, backend):
    cfg = CrossbarConfig(**kw)
    x, grp, bias, _ = make_group(cfg, SIZES, seed=sum(map(ord, str(kw))))
    for b in (None, bias):
        y = crossbar_matmul_group(x, grp, bias=b, backend=backend)
        ref = crossbar_matmul_group_ref(x, grp, bias=b)
        assert y.shape == (3, 7, 9) and torch.equal(y, ref)
        for g, (n, _) in enumerate(SIZES):  # beyond a member's N_g: zeros
            assert (y[g, :, n:] == 0).all()


def test_group_equals_separate_crossbar_matmul_calls():
    """A member's product is the one crossbar_matmul computes for it alone (its own programming seed)."""
    cfg = CrossbarConfig(adc_bits=6, tile_rows=16, prog_noise=0.03, seed=2)
    x, grp, bias, ws = make_group(cfg, SIZES, seed=3)
    y = crossbar_matmul_group(x, grp, bias=bias)
    for g, ((n, k), w) in enumerate(zip(SIZES, ws)):
        own = program_crossbar(w, cfg.replace(seed=cfg.seed + g))  # program_group's default seeds
        assert torch.equal(own.levels, grp.members[g].levels)
        alone = crossbar_matmul(x[g, :, :k], own, own.cfg, bias=bias[g, :n], backend="torch")
        assert torch.equal(y[g, :, :n], alone)


@pytest.mark.parametrize("kw,K,what", [
    # p_max = 1024 * 15 * 3 = 46080, L = 511: p_max * L >= 2^24, so "max" codes take the int64 path
    (dict(cell_bits=4, dac_bits=2, adc_bits=10, tile_rows=1024), 1500, "int64 max codes"),
    # no ADC, 5 tiles of p_max 46080, 4 input slices: the accumulation passes 2^24 and runs in int64
    (dict(cell_bits=4, dac_bits=2, adc_bits=None, tile_rows=1024), 5000, "int64 accumulation"),
    # granular ADC finer than p_max: codes are the partial sums themselves
    (dict(cell_bits=2, dac_bits=1, adc_bits=12, adc_range="granular", tile_rows=16), 40, "granular L >= p_max"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_group_wide_arithmetic_paths(kw, K, what, backend):
    cfg = CrossbarConfig(**kw)
    x, grp, bias, _ = make_group(cfg, [(5, K), (4, K // 3)], seed=len(what), M=3)
    y = crossbar_matmul_group(x, grp, bias=bias, backend=backend if "int64 max" not in what else "torch")
    assert torch.equal(y, crossbar_matmul_group_ref(x, grp, bias=bias)), what


@pytest.mark.parametrize("backend", BACKENDS)
def test_noisy_granular_codes_beyond_p_max_are_summed_exactly(backend):
    """Programming noise takes partial sums past p_max = 3, so granular codes reach past it (up to L = 2047). With
    one row per tile each partial sum is one exact product, so every backend has the reference's codes; their sum
    over 170 tiles and 15 input slices passes 2^24 when the levels average above 3, and must not be summed in
    fp32 (the bound that chose fp32 took p_max as the largest code: the cpp epilogue rounded the totals)."""
    cfg = CrossbarConfig(weight_bits=3, cell_bits=2, input_bits=16, dac_bits=1, adc_bits=12, adc_range="granular",
                         tile_rows=1, prog_noise=0.3, seed=0)
    K = 170
    x = torch.ones(3, K)
    x[1], x[2, ::2] = -1.0, 0.5
    prog = program_crossbar(torch.ones(16, K), cfg)
    assert prog.levels.round().sum(-1).max() * (2 ** 15 - 1) >= 2 ** 24  # the totals do pass 2^24
    assert torch.equal(crossbar_matmul(x, prog, backend=backend), far_kernels.crossbar_matmul_ref(x, prog))


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_max_adc_ties_round_half_to_even(backend):
    """Member 0 is the tie case of test_crossbar_matmul (p = 12 = half of p_max 24): codes p L / p_max =
    0.5 -> 0, 1.5 -> 2, 3.5 -> 4; member 1 is random and must not disturb it."""
    for adc_bits, code in ((2, 0), (3, 2), (4, 4)):
        cfg = CrossbarConfig(weight_bits=3, cell_bits=2, input_bits=2, dac_bits=1, adc_bits=adc_bits, tile_rows=8)
        x = torch.zeros(2, 1, 8)
        x[0, 0, :4] = 1.0
        x[1] = torch.randn(1, 8)
        grp = program_group([torch.ones(1, 8), torch.randn(2, 8)], cfg)
        y = crossbar_matmul_group(x, grp, backend=backend)
        L = cfg.adc_levels
        assert abs(y[0, 0, 0].item() - code * 24 / L / 3) <= 1e-6, (adc_bits, y[0, 0, 0].item())
        assert torch.equal(y, crossbar_matmul_group_ref(x, grp))


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_edge_shapes_zero_and_nan_rows(backend):
    cfg = CrossbarConfig(adc_bits=6, tile_rows=16)
    x, grp, bias, _ = make_group(cfg, SIZES, seed=5)
    empty = crossbar_matmul_group(x[:, :0], grp, bias=bias, backend=backend)
    assert empty.shape == (3, 0, 9)
    x[1, 2] = 0.0  # an all-zero row: bias only
    x[2, 4, 1] = float("nan")  # a NaN row: NaN outputs, as crossbar_matmul gives
    y = crossbar_matmul_group(x, grp, bias=bias, backend=backend)
    ref = crossbar_matmul_group_ref(x, grp, bias=bias)
    assert torch.equal(y.nan_to_num(123.0), ref.nan_to_num(123.0))
    assert torch.equal(y[1, 2, :3], bias[1, :3]) and torch.isnan(y[2, 4, :9]).all()
    one = program_group([torch.randn(4, 10)], cfg)  # G = 1
    x1 = torch.randn(1, 3, 10)
    assert torch.equal(crossbar_matmul_group(x1, one, backend=backend), crossbar_matmul_group_ref(x1, one))


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_nan_row_of_a_narrow_member_keeps_its_padded_outputs_zero(backend):
    """Member 1 (N_g = 3 < N = 9) gets a NaN row: its 3 outputs are NaN, its padded outputs stay 0 as the oracle
    and the docstring say (the batched epilogue scaled them by s_x = NaN times w_scale = 0: NaN)."""
    cfg = CrossbarConfig(adc_bits=6, tile_rows=16)
    x, grp, bias, _ = make_group(cfg, SIZES, seed=5)
    x[1, 2, 4] = float("nan")
    y = crossbar_matmul_group(x, grp, bias=bias, backend=backend)
    assert torch.isnan(y[1, 2, :3]).all() and torch.equal(y[1, 2, 3:], torch.zeros(6))
    assert torch.equal(y.nan_to_num(123.0), crossbar_matmul_group_ref(x, grp, bias=bias).nan_to_num(123.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_group_dtypes(dtype):
    cfg = CrossbarConfig(adc_bits=8, tile_rows=16)
    x, grp, _, _ = make_group(cfg, SIZES, seed=6)
    x = x.to(dtype)
    y = crossbar_matmul_group(x, grp)
    assert y.dtype == dtype and torch.equal(y, crossbar_matmul_group_ref(x, grp).to(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [dict(adc_bits=8), dict(adc_bits=6, adc_range="calibrated"),
                                dict(adc_bits=7, adc_range="granular", encoding="offset")],
                         ids=["a8-max", "a6-calibrated", "a7-granular-offset"])
def test_group_read_noise(kw, backend):
    """Fresh draws each call, independent between identical members, reproducible from the seed, unbiased, and
    the same spread as the reference's (4096 x 16 x 2 outputs: the std is estimated to ~1%; agree within 10%)."""
    torch.manual_seed(12)
    cfg = CrossbarConfig(read_noise=0.02, tile_rows=16, seed=4, **kw)
    w = torch.randn(16, 37) / 6
    x = torch.randn(1, 4096, 37).expand(2, -1, -1).contiguous()

    def group(c):
        g = program_group([w, w], c, seeds=[0, 0])  # two identical members
        if c.adc_range == "calibrated":
            for m in g.members:
                m.adc_range = torch.full((c.n_weight_slices,), 0.3 * c.p_max)
        return g

    clean = crossbar_matmul_group_ref(x, group(cfg.replace(read_noise=0.0)))
    grp = group(cfg)
    y1, y2 = crossbar_matmul_group(x, grp, backend=backend), crossbar_matmul_group(x, grp, backend=backend)
    assert not torch.equal(y1, y2) and not torch.equal(y1[0], y1[1])
    assert torch.equal(crossbar_matmul_group(x, group(cfg), backend=backend), y1)
    ref = crossbar_matmul_group_ref(x, group(cfg))
    d, d_ref = (y1 - clean).double(), (ref - clean).double()
    s_ours, s_ref = d.std().item(), d_ref.std().item()
    assert s_ref > 0 and 0.9 < s_ours / s_ref < 1.1, (s_ours, s_ref)
    assert abs(d.mean().item() - d_ref.mean().item()) < 6 * s_ref / d.numel() ** 0.5
    corr = torch.corrcoef(torch.stack((d[0].flatten(), d[1].flatten())))[0, 1].item()  # members independent
    assert abs(corr) < 6 / d[0].numel() ** 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_programming_noise_paths(backend):
    """Float levels (programming noise) through no ADC: the partial sums are no longer integers; the torch
    backend sums them as floats (cpp declines such calls: auto falls back), others agree to fp32 rounding."""
    cfg = CrossbarConfig(prog_noise=0.05, adc_bits=None, tile_rows=16, seed=1)
    x, grp, bias, _ = make_group(cfg, SIZES, seed=13)
    if backend == "cpp":
        with pytest.raises(far_kernels.BackendUnavailable, match="torch backend does that"):
            crossbar_matmul_group(x, grp, bias=bias, backend="cpp")
        assert torch.equal(crossbar_matmul_group(x, grp, bias=bias), crossbar_matmul_group(x, grp, bias=bias,
                                                                                            backend="torch"))
        return
    y, ref = crossbar_matmul_group(x, grp, bias=bias, backend=backend), crossbar_matmul_group_ref(x, grp, bias=bias)
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_group_partial_sum_absmax():
    cfg = CrossbarConfig(cell_bits=2, dac_bits=2, adc_bits=5, tile_rows=8)
    x, grp, _, _ = make_group(cfg, SIZES, seed=7)
    got = crossbar_partial_sum_absmax_group(x, grp)
    want = torch.stack([crossbar_partial_sum_absmax(x[g, :, :k], m) for g, (m, (_, k)) in
                        enumerate(zip(grp.members, SIZES))]).float()
    assert got.shape == (3, cfg.n_weight_slices) and torch.equal(got.float(), want)


def test_group_bad_inputs():
    cfg = CrossbarConfig(adc_bits=6, tile_rows=16)
    x, grp, bias, ws = make_group(cfg, SIZES, seed=8)
    assert isinstance(grp, CrossbarGroup) and grp.G == 3 and (grp.N, grp.K) == (9, 37)
    with pytest.raises(TypeError, match="CrossbarGroup"):
        crossbar_matmul_group(x, grp.members[0])
    with pytest.raises(TypeError, match="float tensor"):
        crossbar_matmul_group(x.to(torch.int32), grp)
    with pytest.raises(ValueError, match=r"\[G, M, K\] = \[3, M, 37\]"):
        crossbar_matmul_group(x[:2], grp)
    with pytest.raises(ValueError, match=r"\[G, M, K\]"):
        crossbar_matmul_group(x[:, :, :30], grp)
    with pytest.raises(ValueError, match="bias must be a"):
        crossbar_matmul_group(x, grp, bias=bias[:, :5])
    with pytest.raises(ValueError, match="programmed with in weight_bits"):
        crossbar_matmul_group(x, grp, cfg.replace(weight_bits=6))
    with pytest.raises(ValueError, match="3 weights but 2 seeds"):
        program_group(ws, cfg, seeds=[1, 2])
    cal = program_group(ws, cfg.replace(adc_range="calibrated"))
    with pytest.raises(ValueError, match="member 0"):
        crossbar_matmul_group(x, cal)
    assert GROUP_OP.name == "crossbar_matmul_group"


# ---- program_stacked: the dynamic products' per-input programming ----
@pytest.mark.parametrize("kw", [dict(), dict(encoding="offset", weight_scale="tensor"),
                                dict(cell_bits=3, weight_bits=6, stuck_at=(0.0, 0.0))], ids=["diff-channel",
                                                                                             "offset-tensor", "c3-w6"])
def test_program_stacked_equals_program_crossbar(kw):
    cfg = CrossbarConfig(**kw)
    w = torch.randn(5, 7, 11) * torch.exp(torch.randn(5, 7, 1))
    w[2] = 0  # an all-zero member: zero scale, zero output
    grp = program_stacked(w, cfg)
    assert grp.G == 5 and grp.levels.dtype == torch.int8
    for g in range(5):
        one = program_crossbar(w[g], cfg)
        assert torch.equal(grp.members[g].levels, one.levels) and torch.equal(grp.members[g].w_scale, one.w_scale)
    x = torch.randn(5, 3, 11)
    assert torch.equal(crossbar_matmul_group(x, grp), crossbar_matmul_group_ref(x, grp))


def test_program_stacked_noise_faults_and_nan():
    cfg = CrossbarConfig(prog_noise=0.05, stuck_at=(0.03, 0.02), seed=1)
    w = torch.randn(64, 16, 32)
    clean = program_stacked(w, cfg.replace(prog_noise=0.0, stuck_at=(0.0, 0.0))).levels.float()
    noisy_only = program_stacked(w, cfg.replace(stuck_at=(0.0, 0.0)), seed=3).levels
    d = (noisy_only - clean).flatten()
    sigma = 0.05 * cfg.cell_max * 2 ** 0.5  # a differential pair: two cells, each with its own noise
    n = d.numel()
    assert abs(d.std().item() - sigma) <= 6 * sigma / (2 * n) ** 0.5 and abs(d.mean().item()) <= 6 * sigma / n ** 0.5
    a, b = program_stacked(w, cfg, seed=5), program_stacked(w, cfg, seed=5)
    assert torch.equal(a.levels, b.levels)  # reproducible from the seed
    assert not torch.equal(a.levels, program_stacked(w, cfg, seed=6).levels)
    faults = program_stacked(w, cfg.replace(prog_noise=0.0), seed=2).levels
    assert faults.dtype == torch.int8 and (faults != clean).float().mean() > 0.01  # faults without noise
    w[3, 2, 1] = float("nan")
    grp = program_stacked(w, cfg.replace(prog_noise=0.0, stuck_at=(0.0, 0.0)))
    y = crossbar_matmul_group(torch.randn(64, 2, 32), grp)
    assert torch.isnan(y[3]).all() and torch.isfinite(y[[0, 1, 2, 4]]).all()
    with pytest.raises(ValueError, match=r"\[G, N, K\]"):
        program_stacked(torch.randn(3, 4), cfg)
    with pytest.raises(TypeError, match="float tensor"):
        program_stacked(torch.ones(2, 3, 4, dtype=torch.int32), cfg)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [dict(adc_bits=6, tile_rows=8), dict(encoding="offset", adc_bits=5, tile_rows=16)],
                         ids=["max", "offset"])
def test_padded_input_columns_are_no_input(backend, kw):
    """A member's columns beyond its K_g are ignored as the reference ignores them (the batched backends
    quantized whole rows: a non-zero there changed the member's input scale and offset correction)."""
    x, grp, bias, _ = make_group(CrossbarConfig(**kw), SIZES, seed=31)
    dirty = x.clone()
    for i, (_, k) in enumerate(SIZES):
        dirty[i, :, k:] = 100.0 * (i + 1)
    ref = crossbar_matmul_group_ref(x, grp, bias=bias)
    assert torch.equal(crossbar_matmul_group_ref(dirty, grp, bias=bias), ref)
    assert torch.equal(crossbar_matmul_group(dirty, grp, bias=bias, backend=backend), ref)
    assert torch.equal(dirty[1, :, 20:], torch.full_like(dirty[1, :, 20:], 200.0))  # the caller's x untouched
    with pytest.raises(TypeError, match="bias must be a float tensor"):
        crossbar_matmul_group(x, grp, bias=torch.ones(3, 9, dtype=torch.int64), backend=backend)


@pytest.mark.parametrize("seed", [1 << 64, -1, 1.5, True, "3"], ids=["2^64", "-1", "float", "bool", "str"])
def test_program_stacked_refuses_a_seed_the_generator_cannot_take(seed):
    """CrossbarConfig.seed's rule (an int in [0, 2^64)): 2^64 used to escape as torch's 'Overflow when unpacking
    long long', and only when noise was on; a seed without noise was never looked at."""
    w = torch.randn(2, 3, 4)
    for cfg in (CrossbarConfig(prog_noise=0.05), CrossbarConfig()):
        with pytest.raises(ValueError, match=r"program_stacked: seed must be None or an int in \[0, 2\^64\)"):
            program_stacked(w, cfg, seed=seed)
    edge = program_stacked(w, CrossbarConfig(prog_noise=0.05), seed=(1 << 64) - 1)  # the largest one works
    assert torch.isfinite(edge.levels).all()
