"""crossbar_matmul, triton backend: bit-identical to the reference without noise, on CPU under the
Triton interpreter (small shapes: the interpreter is slow) and, cuda-marked, compiled on a GPU at
realistic sizes; noise statistics and seeds.

Without a CUDA device this module sets TRITON_INTERPRET=1 before triton is imported (far_kernels
imports triton only when the triton backend is first used).
"""
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from far_kernels import (BackendUnavailable, CrossbarConfig, crossbar_matmul, crossbar_matmul_group,  # noqa: E402
                         crossbar_matmul_group_ref, crossbar_matmul_ref, crossbar_partial_sum_absmax, program_crossbar,
                         program_group)
from far_kernels.ops.crossbar_matmul import OP, quantize_inputs, quantize_weights  # noqa: E402
from far_kernels.ops.crossbar_matmul.program import prepare_call  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET or OP.reason("triton", "cpu") is not None,
                                       reason="interpreted tests need TRITON_INTERPRET=1 (set when no CUDA device)")


def make_xw(M, K, N, seed, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.exp(torch.randn(M, 1, generator=g))
    x[torch.rand(M, K, generator=g) < 0.02] *= 8
    w = torch.randn(N, K, generator=g) / K ** 0.5 * torch.exp(0.5 * torch.randn(N, 1, generator=g))
    return x.to(device, dtype), w.to(device)


def program_for(cfg, x, w, per_slice=True):
    prog = program_crossbar(w, cfg)
    if cfg.adc_range == "calibrated":
        r = torch.clamp(crossbar_partial_sum_absmax(x, prog) * 0.5, min=1.0)
        prog.adc_range = r if per_slice else r.max()
    return prog


def triton_poisoned(x, prog, bias=None):
    """The triton backend writing into a NaN-poisoned output (every element must be written)."""
    call = prepare_call(x, prog, None, bias, None)
    out = torch.full((call.x2d.shape[0], prog.N), float("nan"), device=x.device)
    from far_kernels.ops.crossbar_matmul.triton import crossbar_matmul_triton
    with torch.no_grad():
        return crossbar_matmul_triton(call, out).to(x.dtype).reshape(*call.lead, prog.N)


# Interpreted grid: every axis of the brief with few slices and tiles (cost ~ tiles x S x J per program).
GRID = [
    pytest.param(dict(), 5, 37, 6, id="isaac-defaults"),
    pytest.param(dict(weight_bits=5, input_bits=4, tile_rows=16), 5, 37, 6, id="w5-i4-c2-d1-a8-max-t16"),
    pytest.param(dict(weight_bits=4, input_bits=3, cell_bits=1, adc_bits=4, tile_rows=16), 3, 37, 5, id="c1-a4-max"),
    pytest.param(dict(weight_bits=7, input_bits=5, cell_bits=3, dac_bits=2, adc_bits=6, adc_range="granular",
                      tile_rows=24), 4, 37, 7, id="c3-d2-a6-granular"),
    pytest.param(dict(input_bits=5, cell_bits=4, dac_bits=2, adc_bits=10, encoding="offset", weight_scale="tensor",
                      input_scale="tensor", tile_rows=20), 5, 37, 6, id="c4-d2-a10-offset-tensor"),
    pytest.param(dict(weight_bits=5, input_bits=4, adc_bits=None, input_scale="tensor", tile_rows=20), 5, 37, 6,
                 id="noadc-row-tensor"),
    pytest.param(dict(weight_bits=5, input_bits=5, dac_bits=2, adc_bits=5, adc_range="calibrated", tile_rows=16),
                 5, 37, 6, id="a5-calibrated-per-slice"),
    pytest.param(dict(weight_bits=4, input_bits=3, cell_bits=1, adc_bits=7, adc_range="calibrated",
                      encoding="offset", tile_rows=32), 5, 37, 6, id="a7-calibrated-layer-offset"),
    pytest.param(dict(weight_bits=5, input_bits=3, adc_bits=9, tile_rows=130), 3, 150, 5, id="t130-two-chunks"),
    pytest.param(dict(weight_bits=3, input_bits=3, adc_bits=6, adc_range="granular", encoding="offset", tile_rows=64),
                 70, 37, 70, id="M70-N70-four-programs"),
]


@needs_interpreter
@pytest.mark.parametrize("kw,M,K,N", GRID)
def test_triton_bit_identical_to_reference(kw, M, K, N):
    cfg = CrossbarConfig(**kw)
    x, w = make_xw(M, K, N, seed=M * K + N)
    b = torch.randn(N)
    prog = program_for(cfg, x, w, per_slice="layer" not in str(kw))
    ref = crossbar_matmul(x, prog, bias=b, backend="torch")
    out = triton_poisoned(x, prog, b)
    assert torch.isfinite(out).all()
    assert torch.equal(out, ref), f"max diff {(out - ref).abs().max().item():.3g}"


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_triton_input_dtypes_and_leading_shape(dtype):
    cfg = CrossbarConfig(weight_bits=5, input_bits=4, tile_rows=32, adc_bits=6)
    x, w = make_xw(6, 40, 5, seed=1, dtype=dtype)
    prog = program_crossbar(w, cfg)
    x3 = x.reshape(2, 3, 40)
    y = crossbar_matmul(x3, prog, backend="triton")
    assert y.dtype == dtype and y.shape == (2, 3, 5)
    assert torch.equal(y, crossbar_matmul(x3, prog, backend="torch"))


@needs_interpreter
def test_triton_nan_and_zero_rows():
    cfg = CrossbarConfig(weight_bits=5, input_bits=4, encoding="offset", adc_bits=5, tile_rows=32)
    x, w = make_xw(4, 40, 5, seed=2)
    x[1] = 0
    x[2, 3] = float("nan")
    x[3, 4] = float("inf")
    w[0] = 0
    prog = program_crossbar(w, cfg)
    y, ref = crossbar_matmul(x, prog, backend="triton"), crossbar_matmul(x, prog, backend="torch")
    assert torch.equal(y[[0, 1]], ref[[0, 1]]) and torch.equal(y[1], torch.zeros(5))
    assert torch.isnan(y[2]).all() and torch.isnan(ref[2]).all() and torch.isnan(ref[3]).all() and torch.isnan(y[3]).all()


@needs_interpreter
def test_triton_programming_noise_matches_reference():
    """Float (noisy) levels: the dot's summation order differs, so only float rounding may differ."""
    x, w = make_xw(6, 40, 5, seed=3)
    cfg = CrossbarConfig(weight_bits=5, input_bits=4, adc_bits=None, prog_noise=0.05, stuck_at=(0.02, 0.02), tile_rows=20)
    prog = program_crossbar(w, cfg)
    y, ref = crossbar_matmul(x, prog, backend="triton"), crossbar_matmul(x, prog, backend="torch")
    scale = ref.abs().max().item()
    assert (y - ref).abs().max().item() <= 1e-5 * scale
    # through an ADC, a code may flip only where p sits on a rounding boundary: nearly all equal
    prog_adc = program_crossbar(w, cfg.replace(adc_bits=6))
    y, ref = crossbar_matmul(x, prog_adc, backend="triton"), crossbar_matmul(x, prog_adc, backend="torch")
    assert (y == ref).float().mean().item() >= 0.9
    # and where a code flipped, by whole ADC steps: (y - ref) / (s_x s_w step) is a sum of a few +-2^(i*cb + j*db)
    c = prog_adc.cfg
    _, s_x = quantize_inputs(x, c)
    step = c.p_max / c.adc_levels
    units = (y - ref).double() / (s_x.double().reshape(-1, 1) * prog_adc.w_scale.double() * step)
    T = -(-x.shape[1] // c.tile_rows)
    most = T * sum(2 ** (i * c.cell_bits) for i in range(c.n_weight_slices)) * \
        sum(2 ** (j * c.dac_bits) for j in range(c.n_input_slices))
    assert (units - units.round()).abs().max().item() < 1e-3 and units.abs().max().item() <= most


def _read_noise_check(device):
    cfg = CrossbarConfig(weight_bits=3, input_bits=3, adc_bits=None, read_noise=0.01, tile_rows=16, seed=4)
    M, K, N = (64, 37, 48) if device == "cpu" else (512, 300, 256)
    x, w = make_xw(M, K, N, seed=5, device=device)
    prog = program_crossbar(w, cfg.replace(read_noise=0.0))
    clean = crossbar_matmul(x, prog, cfg.replace(read_noise=0.0), backend="triton")
    noisy = crossbar_matmul(x, program_crossbar(w, cfg), backend="triton")
    _, s_x = quantize_inputs(x, cfg)
    _, s_w = quantize_weights(w, cfg)
    T = -(-K // cfg.tile_rows)
    gain = sum(4 ** (i * cfg.cell_bits) for i in range(cfg.n_weight_slices)) * \
        sum(4 ** (j * cfg.dac_bits) for j in range(cfg.n_input_slices))
    sigma = cfg.read_noise * cfg.p_max * math.sqrt(T * gain)
    e = ((noisy - clean) / (s_x[:, None] * s_w[None, :])).double().flatten()
    n = e.numel()
    assert abs(e.std().item() - sigma) <= 6 * sigma / math.sqrt(2 * n), (e.std().item(), sigma)
    assert abs(e.mean().item()) <= 6 * sigma / math.sqrt(n)
    # neighbouring outputs get independent noise (a broken counter would correlate them)
    corr = torch.corrcoef(torch.stack((e[:-1], e[1:])))[0, 1].item()
    assert abs(corr) <= 6 / math.sqrt(n)


@needs_interpreter
def test_triton_read_noise_statistics():
    _read_noise_check("cpu")


@needs_interpreter
def test_triton_seeds():
    cfg = CrossbarConfig(weight_bits=3, input_bits=2, adc_bits=6, read_noise=0.02, tile_rows=64, seed=7)
    x, w = make_xw(8, 40, 8, seed=6)
    a, b, c = program_crossbar(w, cfg), program_crossbar(w, cfg), program_crossbar(w, cfg.replace(seed=8))
    ya1, ya2 = crossbar_matmul(x, a, backend="triton"), crossbar_matmul(x, a, backend="triton")
    yb1 = crossbar_matmul(x, b, backend="triton")
    yc1 = crossbar_matmul(x, c, backend="triton")
    assert torch.equal(ya1, yb1)
    assert not torch.equal(ya1, ya2) and not torch.equal(ya1, yc1)


def test_triton_refuses_configs_that_overflow_int32():
    cfg = CrossbarConfig(weight_bits=16, input_bits=16, cell_bits=1, dac_bits=1, adc_bits=None)
    # on the device triton runs on here (CPU tensors without the interpreter are refused for that reason instead)
    x, w = make_xw(2, 40, 3, seed=8, device="cpu" if INTERPRET else "cuda")
    with pytest.raises(BackendUnavailable, match="overflow"):
        crossbar_matmul(x, w, cfg, backend="triton")
    assert crossbar_matmul(x, w, cfg).shape == (2, 3)  # auto picks a backend that can



def test_triton_refuses_noisy_granular_codes_beyond_p_max():
    """Programming noise takes partial sums past p_max (here 1), so a granular ADC with L > p_max gives codes up to
    L: the int32 bound must count L (with p_max it was 1.07e9 < 2^31, the call ran and its accumulators wrapped)."""
    from far_kernels.ops.crossbar_matmul.program import triton_unsupported

    cfg = CrossbarConfig(weight_bits=16, cell_bits=1, input_bits=16, dac_bits=1, adc_bits=8, adc_range="granular",
                         tile_rows=1, prog_noise=2.0, seed=3)
    x, w = make_xw(5, 1, 4, seed=0)
    prog = program_crossbar(w, cfg)
    assert prog.levels.abs().max() > 2  # partial sums (one product per tile) far beyond p_max = 1 occur
    why = triton_unsupported(prepare_call(x, prog, consume_read=False))
    assert why is not None and "overflow" in why
    assert triton_unsupported(prepare_call(x, program_crossbar(w, cfg.replace(prog_noise=0.0)),
                                           consume_read=False)) is None  # integer partial sums: codes <= p_max


def test_triton_refuses_shapes_beyond_int32_offsets():
    """M*K, M*N or S*N*K >= 2^31 would overflow the kernel's int32 address arithmetic (shapes on the meta
    device: nothing that large is allocated)."""
    import dataclasses

    from far_kernels.ops.crossbar_matmul.program import triton_unsupported

    x, w = make_xw(2, 40, 3, seed=8)
    call = prepare_call(x, program_crossbar(w, CrossbarConfig()), consume_read=False)
    assert triton_unsupported(call) is None
    big = dataclasses.replace(call, x2d=torch.empty(2 ** 26, 40, device="meta"))  # M*K = 2.7e9
    assert "int32 offsets" in triton_unsupported(big)
    assert triton_unsupported(dataclasses.replace(call, x2d=torch.empty(2 ** 24, 40, device="meta"))) is None


# ---- ties: inputs built to land exactly on half steps, on every backend (random data almost never does) ----
TIE_BACKENDS = ["torch", "reference", pytest.param("triton", marks=needs_interpreter),
                pytest.param("cpp", marks=pytest.mark.skipif(OP.reason("cpp", "cpu") is not None,
                                                             reason="far_kernels._C unavailable"))]


def _run(backend, x, prog, cfg=None):
    if backend == "reference":
        from far_kernels import crossbar_matmul_ref
        return crossbar_matmul_ref(x, prog, cfg)
    return crossbar_matmul(x, prog, cfg, backend=backend)


@pytest.mark.parametrize("backend", TIE_BACKENDS)
def test_input_quantizer_ties_round_half_to_even(backend):
    """Row max 127 at 8 input bits: s_x = 1, so x/s_x = 2.5, 3.5, -2.5, -3.5, 0.5, 1.5 are exact half steps;
    half to even gives 2, 4, -2, -4, 0, 2 (half up would give 3, 4, -2, -3, 1, 2). An identity weight and no
    ADC pass x_q through unchanged."""
    cfg = CrossbarConfig(adc_bits=None, tile_rows=16)
    x = torch.tensor([[127.0, 2.5, 3.5, -2.5, -3.5, 0.5, 1.5, 0.0]])
    y = _run(backend, x, program_crossbar(torch.eye(8), cfg))
    want = torch.tensor([[127.0, 2, 4, -2, -4, 0, 2, 0]])
    assert (y - want).abs().max().item() <= 1e-4, y


@pytest.mark.parametrize("backend", TIE_BACKENDS)
def test_max_adc_ties_round_half_to_even_every_backend(backend):
    """tile_rows=8, 1-bit DAC, 2-bit cells: p_max = 24; w_q = 3 everywhere and x_q = 1 on 4 rows give p = 12,
    i.e. code p L / p_max = 0.5 (L=1) -> 0, 1.5 (L=3) -> 2, 3.5 (L=7) -> 4, 7.5 (L=15) -> 8."""
    x = torch.tensor([[1.0, 1, 1, 1, 0, 0, 0, 0]])
    for adc_bits, code in ((2, 0), (3, 2), (4, 4), (5, 8)):
        cfg = CrossbarConfig(weight_bits=3, cell_bits=2, input_bits=2, dac_bits=1, adc_bits=adc_bits, tile_rows=8)
        y = _run(backend, x, program_crossbar(torch.ones(1, 8), cfg))
        assert abs(y.item() - code * 24 / cfg.adc_levels / 3) <= 1e-6, (adc_bits, y.item())


# ---- crossbar_matmul_group through the triton backend (one kernel per member) ----
def _group_case(cfg, device="cpu", sizes=((6, 37), (3, 20), (5, 9)), M=5, seed=9):
    g = torch.Generator().manual_seed(seed)
    K = max(k for _, k in sizes)
    x = torch.zeros(len(sizes), M, K)
    ws = []
    for i, (n, k) in enumerate(sizes):
        x[i, :, :k] = torch.randn(M, k, generator=g) * torch.exp(torch.randn(M, 1, generator=g))
        ws.append(torch.randn(n, k, generator=g) / k ** 0.5)
    grp = program_group([w.to(device) for w in ws], cfg)
    if cfg.adc_range == "calibrated":
        for i, (m, (_, k)) in enumerate(zip(grp.members, sizes)):
            m.adc_range = torch.clamp(crossbar_partial_sum_absmax(x[i, :, :k].to(device), m) * 0.5, min=1.0)
    bias = torch.randn(len(sizes), max(n for n, _ in sizes), generator=g)
    return x.to(device), grp, bias.to(device)


@needs_interpreter
@pytest.mark.parametrize("kw", [dict(weight_bits=5, input_bits=4, adc_bits=6, tile_rows=16),
                                dict(weight_bits=5, input_bits=5, dac_bits=2, adc_bits=5, adc_range="calibrated",
                                     encoding="offset", tile_rows=16)], ids=["a6-max", "a5-calibrated-offset"])
def test_triton_group_bit_identical_to_reference(kw):
    x, grp, bias = _group_case(CrossbarConfig(**kw))
    y = crossbar_matmul_group(x, grp, bias=bias, backend="triton")
    assert torch.equal(y, crossbar_matmul_group_ref(x, grp, bias=bias))
    assert torch.equal(y, crossbar_matmul_group(x, grp, bias=bias, backend="torch"))


@needs_interpreter
def test_triton_group_ties_round_half_to_even():
    """The tie case of test_crossbar_matmul (p = p_max / 2): code 1.5 -> 2 at 3 ADC bits, on the triton path."""
    cfg = CrossbarConfig(weight_bits=3, cell_bits=2, input_bits=2, dac_bits=1, adc_bits=3, tile_rows=8)
    x = torch.zeros(2, 1, 8)
    x[0, 0, :4] = 1.0
    x[1, 0] = torch.randn(8)
    grp = program_group([torch.ones(1, 8), torch.randn(3, 8)], cfg)
    y = crossbar_matmul_group(x, grp, backend="triton")
    assert abs(y[0, 0, 0].item() - 2 * 24 / cfg.adc_levels / 3) <= 1e-6
    assert torch.equal(y, crossbar_matmul_group_ref(x, grp))


@needs_interpreter
def test_triton_group_members_draw_independent_read_noise():
    """Identical members of one group (the images and heads of CrossbarAttention, the heads of a FAR block) get
    independent read noise: member keys a few apart once made their Philox streams overlap (corr 0.24-0.29)."""
    cfg = CrossbarConfig(adc_bits=12, adc_range="granular", read_noise=0.01, tile_rows=64, seed=3)
    g = torch.Generator().manual_seed(8)  # rows of one scale: make_xw's spread of row scales (the noise's too)
    x, w = torch.randn(256, 64, generator=g), torch.randn(32, 64, generator=g)  # would swamp the estimate
    x3 = x.expand(3, -1, -1).contiguous()
    grp = program_group([w, w, w], cfg, seeds=[1, 1, 1])
    clean = crossbar_matmul_group(x3, grp, cfg.replace(read_noise=0.0), backend="torch")
    e = (crossbar_matmul_group(x3, grp, backend="triton") - clean).reshape(3, -1).double()
    assert (e.std(1) > 0).all()
    corr = torch.corrcoef(e)
    bound = 6 / math.sqrt(e.shape[1])
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert abs(corr[a, b].item()) <= bound, (a, b, corr)


# ---- compiled on a GPU (cuda-marked; the GPU suite runs them) ----
CUDA_GRID = [
    pytest.param(dict(), 4096, 768, 768, id="isaac-M4096-K768-N768"),
    pytest.param(dict(adc_bits=6, encoding="offset", weight_scale="tensor", input_scale="tensor"), 1576, 384, 1152,
                 id="deit-qkv-a6-offset-tensor"),
    pytest.param(dict(cell_bits=1, dac_bits=2, adc_bits=10, adc_range="granular"), 1576, 1536, 384, id="deit-fc2-granular"),
    pytest.param(dict(cell_bits=4, adc_bits=5, adc_range="calibrated", tile_rows=256), 1000, 1000, 300,
                 id="t256-calibrated"),
    pytest.param(dict(adc_bits=None, input_bits=6, cell_bits=3, tile_rows=100), 333, 777, 129, id="noadc-t100"),
]


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
@pytest.mark.parametrize("kw,M,K,N", CUDA_GRID)
def test_triton_cuda_bit_identical(kw, M, K, N):
    cfg = CrossbarConfig(**kw)
    x, w = make_xw(M, K, N, seed=M + N, device="cuda")
    b = torch.randn(N, device="cuda")
    prog = program_for(cfg, x, w)
    ref = crossbar_matmul(x, prog, bias=b, backend="torch")
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        out = triton_poisoned(xd, prog, b)
        r = ref if dtype == torch.float32 else crossbar_matmul(xd, prog, bias=b, backend="torch")
        assert torch.equal(out, r), f"{dtype}: max diff {(out.float() - r.float()).abs().max().item():.3g}"
    # cpu reference on the same programmed cells agrees too (the cells are drawn on the CPU)
    if M * N <= 1 << 20:
        cpu = crossbar_matmul(x.cpu(), prog.to("cpu"), bias=b.cpu(), backend="torch")
        assert torch.equal(cpu, ref.cpu())


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
def test_triton_cuda_noise():
    _read_noise_check("cuda")
    x, w = make_xw(512, 768, 384, seed=9, device="cuda")
    cfg = CrossbarConfig(adc_bits=None, prog_noise=0.03)
    prog = program_crossbar(w, cfg)
    y, ref = crossbar_matmul(x, prog, backend="triton"), crossbar_matmul(x, prog, backend="torch")
    assert (y - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_group_cuda_bit_identical(backend):
    """A FAR-like recurrent group (8 members, ragged k, M = batch) on the GPU, both backends."""
    cfg = CrossbarConfig(adc_bits=8, tile_rows=128)
    sizes = [(4 * k, k) for k in (64, 48, 64, 33, 64, 64, 17, 64)]
    x, grp, bias = _group_case(cfg, "cuda", sizes=sizes, M=256, seed=10)
    for g, (_, k) in enumerate(sizes):
        x[g, :, k:] = 0
    y = crossbar_matmul_group(x, grp, bias=bias, backend=backend)
    assert torch.equal(y.cpu(), crossbar_matmul_group_ref(x.cpu(), grp.to("cpu"), bias=bias.cpu()))


@pytest.mark.parametrize("backend", TIE_BACKENDS[:1] + TIE_BACKENDS[2:])
def test_cells_in_any_layout_and_reprogrammed_in_place(backend):
    """A ProgrammedCrossbar may hold strided levels / scales (the triton kernel read them with unit strides), and
    cells changed in place after a call (drift, faults) are read at the next call (the torch and cpp backends kept
    a stale copy): every backend equals the reference."""
    from far_kernels import ProgrammedCrossbar, crossbar_matmul_ref

    cfg = CrossbarConfig(tile_rows=8)
    x, w = make_xw(3, 20, 6, seed=11)
    prog = program_crossbar(w, cfg)
    levels = prog.levels.transpose(1, 2).contiguous().transpose(1, 2)  # K not unit-stride
    wide = torch.full((2 * 6,), 123.0)
    wide[::2] = prog.w_scale
    strided = ProgrammedCrossbar(levels, wide[::2], cfg, 6, 20)
    assert not strided.levels.is_contiguous() and not strided.w_scale.is_contiguous()
    assert torch.equal(_run(backend, x, strided), crossbar_matmul_ref(x, prog))
    for change in (lambda p: p.levels[0].zero_(), lambda p: p.w_scale.mul_(2),
                   lambda p: setattr(p, "levels", -p.levels)):
        before = _run(backend, x, prog)
        change(prog)
        after, ref = _run(backend, x, prog), crossbar_matmul_ref(x, prog)
        assert torch.equal(after, ref) and not torch.equal(after, before)


# ---- TF32: codes of 2^11 and more are exact only in IEEE fp32 ----
# p_max = 256 rows * 3 (2-bit DAC) * 3 (2-bit cells) = 2304 >= 2^11 (a 13-bit ADC: L = 4095 >= p_max), and 4-bit weights and inputs (2 slices each)
# keep the sum of shifted codes below 2^24, so the torch backend sums the codes with an fp32 matmul, where TF32
# (11 significant bits) would turn an odd code above 2048 into an even one.
TF32_CFG = dict(adc_bits=13, adc_range="granular", tile_rows=256, dac_bits=2, weight_bits=4, input_bits=4)


def _tf32_case(device):
    # entries 1 (quantized 7: low slice 3) or 6/7 (quantized 6: low slice 2): the low slices' partial sums are
    # 9 a + 6 b + 4 c over the 256 rows, mostly above 2048, odd wherever a is odd
    g = torch.Generator().manual_seed(11)
    x = torch.where(torch.rand(24, 256, generator=g) < 0.05, 6 / 7, 1.0)
    w = torch.where(torch.rand(40, 256, generator=g) < 0.1, 6 / 7, 1.0)
    return x.to(device), w.to(device)


def test_tf32_case_has_odd_codes_above_2_11_on_the_fp32_path():
    """The CUDA test below is meaningful: the case's codes pass 2^11 (odd ones too) and take the fp32 sum."""
    from far_kernels.ops.crossbar_matmul.batched import EXACT
    from far_kernels.ops.crossbar_matmul.reference import partial_sums

    cfg = CrossbarConfig(**TF32_CFG)
    assert cfg.p_max == 2304 and cfg.adc_levels >= cfg.p_max  # granular, L >= p_max: the code is the partial sum
    x, w = _tf32_case("cpu")
    xq, _ = quantize_inputs(x, cfg)
    prog = program_crossbar(w, cfg)
    p = torch.cat([q.flatten() for _, _, _, q in partial_sums(xq, prog, cfg)])
    assert ((p > 2048) & (p.remainder(2) == 1)).sum() > 100
    assert cfg.p_max * sum(1 << (j * cfg.dac_bits) for j in range(cfg.n_input_slices)) < EXACT  # batched.acc_bound
    assert torch.equal(crossbar_matmul(x, prog, backend="torch"), crossbar_matmul_ref(x, prog))


# Run alone per setting (the TF32 settings are process-wide): the setting, then the guard on the CPU (nothing changes)
# and on a CUDA device (no GPU needed: torch.backends.cuda.matmul.allow_tf32 reads the flag every cuBLAS call reads,
# and raises as every cuBLAS call does while torch's legacy and new TF32 settings disagree).
_GUARD_CHECK = """
import sys, warnings
import torch
from far_kernels.ops.crossbar_matmul.reference import ieee_fp32
warnings.simplefilter("ignore")

def cublas_tf32():
    try:
        return torch.backends.cuda.matmul.allow_tf32
    except RuntimeError:
        return "raises"

def state():
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:
        legacy = "raises"
    b = torch.backends
    return (cublas_tf32(), legacy, getattr(b, "fp32_precision", None), getattr(b.cuda.matmul, "fp32_precision", None),
            getattr(b.mkldnn.matmul, "fp32_precision", None) if hasattr(b.mkldnn, "matmul") else None)

exec(sys.argv[1])
before = state()
with ieee_fp32("cpu"):
    assert state() == before, ("cpu", state(), before)
try:
    with ieee_fp32(torch.device("cuda", 0)):
        assert cublas_tf32() is False, ("inside", cublas_tf32(), before)
        1 / 0
except ZeroDivisionError:
    pass
assert state() == before, ("after", state(), before)
print("ok", before)
"""


@pytest.mark.parametrize("setting", [
    "pass",
    "torch.set_float32_matmul_precision('high')",  # timm's and many training scripts' way; it crashed cuBLAS
    "torch.set_float32_matmul_precision('medium')",
    "torch.backends.cuda.matmul.allow_tf32 = True",
    "torch.backends.cuda.matmul.fp32_precision = 'tf32'",
    "torch.backends.fp32_precision = 'tf32'",
], ids=["default", "legacy-high", "legacy-medium", "legacy-allow_tf32", "new-cuda-matmul", "new-generic"])
def test_ieee_fp32_guard_gives_ieee_cublas_and_restores_every_tf32_setting(setting):
    """Inside the guard cuBLAS computes in IEEE fp32 and does not raise, whichever API turned TF32 on; after it (an
    exception too) every setting is as before. Setting only the new fp32_precision (as the guard did) under a legacy
    "high" left torch's two settings disagreeing, and then every cuBLAS call raised: the torch backend on a GPU
    failed for anyone who called torch.set_float32_matmul_precision("high")."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _GUARD_CHECK, setting], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr[-2000:]


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_torch_backend_on_cuda_is_exact_with_tf32_enabled():
    cfg = CrossbarConfig(**TF32_CFG)
    x, w = _tf32_case("cuda")
    prog = program_crossbar(w, cfg)
    ref = crossbar_matmul_ref(x.cpu(), prog.to("cpu"))
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # as in a user's training script
        y = crossbar_matmul(x, prog, backend="torch")
        yg = crossbar_matmul_group(x[None], program_group([w], cfg), backend="torch")[0]
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.set_float32_matmul_precision(old)
    assert torch.equal(y.cpu(), ref)
    assert torch.equal(yg.cpu(), ref)


def _no_host_reads(monkeypatch):
    """Make every read of a tensor's value on the host (item, float, bool, int, tolist) raise: on a GPU each is a
    device sync, and the emulator calls the crossbar thousands of times per batch."""
    def refuse(name):
        def f(self, *a, **k):
            raise AssertionError(f"Tensor.{name} in a crossbar launch (a GPU sync per call)")
        return f
    for name in ("item", "__float__", "__bool__", "__int__", "__index__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse(name))


def test_triton_launch_reads_no_tensor_value_on_the_host(monkeypatch):
    """The GPU launch path (kernel stubbed, GPU tiling forced, so this runs on CPU tensors) reads no tensor value
    on the host once the crossbar is programmed and calibrated: before, float(plan.step) ran in every call and a
    calibrated range was checked with two bool() in every call."""
    from far_kernels.ops.crossbar_matmul import triton as K

    launches = []

    class Stub:
        def __getitem__(self, grid):
            return lambda *a, **k: launches.append(k)

    monkeypatch.setattr(K, "_crossbar_kernel", Stub())
    monkeypatch.setattr(K, "_gpu_launch", lambda device: True)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 50, generator=g)
    progs = [program_crossbar(torch.randn(40, 50, generator=g), CrossbarConfig(**kw))
             for kw in (dict(), dict(adc_range="granular"), dict(adc_bits=None), dict(read_noise=0.02),
                        dict(adc_range="calibrated"))]
    progs[-1].adc_range = crossbar_partial_sum_absmax(x, progs[-1])
    grp = program_group([torch.randn(64, 32, generator=g), torch.randn(48, 20, generator=g)])
    xg = torch.randn(2, 7, 32, generator=g)
    for p in progs:  # a first call may check a calibrated range (once per range tensor and version)
        crossbar_matmul(x, p, backend="triton")
    _no_host_reads(monkeypatch)
    for p in progs:
        crossbar_matmul(x, p, backend="triton")
    crossbar_matmul_group(xg, grp, backend="triton")
    assert len(launches) == 2 * len(progs) + 2
    monkeypatch.undo()
    # a range changed in place is checked again
    progs[-1].adc_range.fill_(-1.0)
    with pytest.raises(ValueError, match="positive and finite"):
        crossbar_matmul(x, progs[-1], backend="torch")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
def test_triton_cuda_call_does_not_sync():
    """torch's sync debug mode raises on any device sync inside the calls (max, granular, calibrated, group)."""
    x, w = make_xw(64, 300, 40, seed=3, device="cuda")
    progs = [program_crossbar(w, CrossbarConfig(**kw)) for kw in (dict(), dict(adc_range="granular"),
                                                                   dict(read_noise=0.02), dict(adc_range="calibrated"))]
    progs[-1].adc_range = crossbar_partial_sum_absmax(x, progs[-1])
    for p in progs:
        crossbar_matmul(x, p, backend="triton")  # compile and check the calibrated range once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for p in progs:
            crossbar_matmul(x, p, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
