"""bilstm_scan, triton backend: against the reference on awkward sizes, on CPU under the Triton
interpreter and, cuda-marked, compiled on a GPU.

tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton on machines without a CUDA
device (one process builds Triton kernels for one mode): there the interpreted tests run. With a
CUDA device the cuda tests run compiled, and the interpreted ones only if TRITON_INTERPRET=1 is set
for the whole run (then the cuda tests skip).
"""
import os
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

import far  # noqa: E402
import far_kernels  # noqa: E402
from far_kernels import BackendUnavailable, bilstm_scan, bilstm_scan_ref  # noqa: E402
from far_kernels.testing import behind_a_busy_side_stream  # noqa: E402
from conftest import assert_close_derived, assert_same_rounding, far_block_oracle  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
OP = far_kernels.ops.bilstm_scan.OP

# (H, B, T, n, hidden sizes [2, H]): T = 1, 50, 197; B = 1, 3, 17; kept 64, 37, 0 mixed per
# (direction, head); n = 37 (not a power of two), n = 8 (< the 16 an MMA needs), kept sizes
# whose power of two is below n (zero columns). Small H and n: the interpreter is slow.
GRID = [
    pytest.param(2, 1, 1, 64, [[64, 37], [0, 64]], id="H2-B1-T1-n64-pruned"),
    pytest.param(2, 3, 50, 64, [[64, 0], [37, 64]], id="H2-B3-T50-n64-pruned"),
    pytest.param(2, 17, 50, 37, [[37, 20], [0, 37]], id="H2-B17-T50-n37-pruned"),
    pytest.param(1, 1, 197, 64, [[64], [37]], id="H1-B1-T197-n64-pruned"),
    pytest.param(1, 3, 20, 64, [[20], [3]], id="H1-B3-T20-n64-narrow"),
    pytest.param(2, 2, 9, 8, [[8, 0], [3, 8]], id="H2-B2-T9-n8-pruned"),
]


def require_interpreter():
    if not INTERPRET:
        pytest.skip("interpreted CPU tests need TRITON_INTERPRET=1 from the start of the run "
                    "(tests/conftest.py sets it where no CUDA device is present)")
    mod = sys.modules.get("far_kernels.ops.bilstm_scan.triton")
    if mod is not None and not mod.INTERPRETED:
        pytest.fail("the Triton kernel was built for the GPU although TRITON_INTERPRET=1: triton was "
                    "imported before tests/conftest.py set it")
    why = OP.reason("triton", "cpu")
    assert why is None, why


def make_inputs(H, B, T, n, seed, dtype=torch.float32, scale=1.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    gx = torch.randn(H, B, T, 2, 4 * n, generator=g) * scale
    w = torch.randn(H, 2, 4 * n, n, generator=g) / n ** 0.5
    return gx.to(device=device, dtype=dtype), w.to(device=device, dtype=dtype)


def check_against_reference(H, B, T, n, hs, dtype, device, seed, tiny, repeat=True):
    gx, w = make_inputs(H, B, T, n, seed=seed, dtype=dtype, device=device)
    hs_t = torch.tensor(hs)
    ref64 = bilstm_scan_ref(gx.double(), w.double(), hs_t).cpu()
    out_pt = bilstm_scan_ref(gx, w, hs_t).cpu()  # fp32 math rounded to dtype, as the kernel does
    out = torch.full((H, B, T, 2, n), float("nan"), dtype=dtype, device=device)  # poisoned
    res = bilstm_scan(gx, w, hs_t, backend="triton", out=out)
    assert res.data_ptr() == out.data_ptr() and res.dtype == dtype
    out = out.cpu()
    err, err_pt = assert_close_derived(out, ref64, out_pt, f"triton/{dtype}", tiny=tiny)
    if dtype != torch.float32:  # 16-bit: fp32 math rounded once (h keeps its hi+lo split in the product)
        assert_same_rounding(out, out_pt, f"triton/{dtype}")
    for d in (0, 1):
        for h in range(H):
            assert (out[h, :, :, d, hs[d][h]:] == 0).all(), "pruned units must be written as 0"
    if repeat:  # the allocating form agrees bit for bit
        assert torch.equal(bilstm_scan(gx, w, hs_t, backend="triton").cpu(), out)
    return err, err_pt


# ---------------------------------------------------------------- CPU, interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("H,B,T,n,hs", GRID)
def test_matches_reference(H, B, T, n, hs, dtype):
    require_interpreter()
    check_against_reference(H, B, T, n, hs, dtype, "cpu", seed=hash((H, B, T, n)) % 2**31, tiny=1e-6,
                            repeat=B * T <= 60)


@pytest.mark.parametrize("H,B,T,n,hs", [GRID[1], GRID[5]])
def test_fp16_matches_reference(H, B, T, n, hs):
    require_interpreter()
    check_against_reference(H, B, T, n, hs, torch.float16, "cpu", seed=5, tiny=1e-6, repeat=False)


def test_mixed_dtypes_use_fp32_products():
    """bf16 gates with fp32 W_hh (not exact in bf16): the kernel multiplies in fp32."""
    require_interpreter()
    gx, w = make_inputs(2, 3, 12, 16, seed=9)
    gx = gx.bfloat16()
    hs = torch.tensor([[16, 7], [16, 0]])
    out = bilstm_scan(gx, w, hs, backend="triton")
    assert out.dtype == torch.bfloat16
    assert_close_derived(out, bilstm_scan_ref(gx.double(), w.double(), hs), bilstm_scan_ref(gx, w, hs), "mixed")


def test_every_unit_pruned_writes_zeros():
    require_interpreter()
    gx, w = make_inputs(2, 3, 6, 16, seed=4)
    out = torch.full((2, 3, 6, 2, 16), float("nan"))
    bilstm_scan(gx, w, torch.zeros(2, 2, dtype=torch.int64), backend="triton", out=out)
    assert (out == 0).all()



@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_pruned_units_stay_zero_when_a_kept_unit_is_nan(dtype):
    # a padded unit's gates are its zero W_hh row times h: 0 * NaN = NaN once a kept unit's h is NaN, and the
    # kernel wrote NaN into the units it must write as 0 (the reference and cpp select them to 0)
    require_interpreter()
    gx, w = make_inputs(2, 3, 5, 16, seed=6, dtype=dtype)
    gx[0, 1, 1, 0, 2] = float("nan")  # forward, t = 1: the input gate of kept unit 2
    w[1, 1, 4, 2] = float("inf")  # head 1 backward: inf * h = NaN from its first step on
    hs = torch.tensor([[5, 16], [16, 9]])
    out = torch.full((2, 3, 5, 2, 16), float("nan"), dtype=dtype)
    bilstm_scan(gx, w, hs, backend="triton", out=out)
    ref = bilstm_scan_ref(gx, w, hs)
    assert torch.isnan(ref).any() and torch.equal(torch.isnan(out), torch.isnan(ref))
    assert (out[0, :, :, 0, 5:] == 0).all() and (out[1, :, :, 1, 9:] == 0).all()

def run_activations(device):
    """The scan's sigmoid/tanh on values up to +-3e38 and +-inf: finite, and close to float64 torch.

    Error bound: the interpreter computes 1/(1+2^y) and 2/(1+2^y)-1 with IEEE fp32 operations (numpy); an fp32
    result of magnitude <= 2 then errs by a few half-ulps, 3e-7 covers it. Compiled for a GPU (sm_90 PTX, seen with
    python -m far_kernels.triton_aot) the same code is ex2.approx.ftz.f32 and div.full.f32, each up to 2 ulp (PTX
    ISA for div.full; the CUDA guide's 2 ulp for exp2f). For tanh, q = 2/(1+e) <= 2 carries e's relative error
    (2^-22, so <= 4.8e-7), the rounding of 1+e (2^-24 relative, <= 1.2e-7) and the division's 2 ulp (<= 2^-22 =
    2.4e-7), 8.3e-7 in all; q - 1 is exact for q in [1/2, 2]. So 1e-6 there; sigmoid's share is smaller."""
    from far_kernels.ops.bilstm_scan.triton import _activations_kernel

    big = [3e38, -3e38, float("inf"), float("-inf"), 1e30, -1e30, 1e4, -1e4, 89.0, -89.0, 44.5, -44.5,
           20.0, -20.0, 1e-30, -1e-30, 0.0]
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.tensor(big), torch.randn(512 - len(big), generator=g) * 6]).float().to(device)
    s, t = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    _activations_kernel[(1,)](x, s, t, N=512)
    x64 = x.double().cpu()
    for name, got, want in (("sigmoid", s, torch.sigmoid(x64)), ("tanh", t, torch.tanh(x64))):
        got = got.cpu()
        assert torch.isfinite(got).all(), f"{name}: non-finite for {x64[~torch.isfinite(got)].tolist()}"
        err = (got.double() - want).abs().max().item()
        bound = 3e-7 if x.device.type == "cpu" else 1e-6
        assert err <= bound, f"{name}: max abs error {err:.3g} > {bound:g} ({x.device.type})"


OVERFLOW_OK = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, interpreter


@OVERFLOW_OK
def test_activations_saturate_without_nan():
    require_interpreter()
    run_activations("cpu")


@OVERFLOW_OK
def test_large_preactivations_saturate_without_nan():
    require_interpreter()
    gx, w = make_inputs(2, 3, 20, 16, seed=7, scale=1e4)
    gx[0, 0, 3, 0, :5] = 3e38
    gx[0, 1, 4, 1, 5:9] = -3e38
    gx[1, 2, 5, 0, 40:50] = 3e38
    hs = torch.tensor([[16, 16], [16, 9]])
    out = bilstm_scan(gx, w * 100, hs, backend="triton")
    assert torch.isfinite(out).all() and out.abs().max() <= 1
    torch.testing.assert_close(out, bilstm_scan_ref(gx, w * 100, hs), rtol=0, atol=2e-6)


def test_nan_input_propagates():
    require_interpreter()
    gx, w = make_inputs(1, 2, 5, 8, seed=3)
    gx[0, 0, 2, 0, 0] = float("nan")
    out = bilstm_scan(gx, w, torch.full((2, 1), 8), backend="triton")
    assert torch.isnan(out[0, 0, 2:, 0]).any() and torch.isfinite(out[0, 1]).all()


def test_strided_inputs_give_right_answer():
    require_interpreter()
    gx, w = make_inputs(2, 3, 7, 16, seed=5)
    hs = torch.tensor([[16, 3], [0, 16]])
    ref = bilstm_scan_ref(gx, w, hs)
    gx_bt = gx.transpose(1, 2).contiguous().transpose(1, 2)  # other batch/time strides, gate stride 1
    gx_g = gx.transpose(3, 4).contiguous().transpose(3, 4)  # gate stride 2: copied by the wrapper
    for g in (gx_bt, gx_g):
        assert not g.is_contiguous()
        torch.testing.assert_close(bilstm_scan(g, w, hs, backend="triton"), ref, rtol=0, atol=2e-6)


def test_zero_sizes():
    require_interpreter()
    for shape, want in (((2, 0, 5, 8), (2, 0, 5, 2, 8)), ((2, 3, 0, 8), (2, 3, 0, 2, 8))):
        gx, w = make_inputs(*shape, seed=1)
        assert bilstm_scan(gx, w, torch.full((2, 2), 8), backend="triton").shape == want


def test_bad_input_leaves_out_untouched():
    require_interpreter()
    from far_kernels.ops.bilstm_scan.triton import bilstm_scan_triton

    with pytest.raises(ValueError, match="block_b must be a power of two"):
        bilstm_scan_triton(*make_inputs(1, 2, 3, 8, seed=0), torch.full((2, 1), 8), block_b=24)
    gx, w = make_inputs(2, 3, 4, 8, seed=0)
    out = torch.full((2, 3, 4, 2, 8), float("nan"))
    for args, exc in (((gx, w, [[8, 9], [0, 1]]), ValueError), ((gx, w[..., :-1], [[8, 8], [8, 8]]), ValueError),
                      ((gx.int(), w, [[8, 8], [8, 8]]), TypeError)):
        with pytest.raises(exc):
            bilstm_scan(*args, backend="triton", out=out)
    assert torch.isnan(out).all()
    with pytest.raises(BackendUnavailable, match="computes in fp32"):
        bilstm_scan(gx.double(), w.double(), torch.full((2, 2), 8), backend="triton")
    with pytest.raises(BackendUnavailable, match="inference-only"):
        bilstm_scan(gx.requires_grad_(True), w, torch.full((2, 2), 8), backend="triton")


def test_unavailable_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    why = OP.reason("triton", "cpu")
    assert why is not None and "TRITON_INTERPRET=1" in why
    gx, w = make_inputs(1, 1, 2, 4, seed=0)
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        bilstm_scan(gx, w, torch.full((2, 1), 4), backend="triton")


def test_far_block_runs_through_triton_scan(monkeypatch):
    """FARAttention(backend='triton'): pre_proj -> input-gate GEMM -> triton scan -> head_proj -> proj."""
    require_interpreter()
    calls = []
    impl = OP.impls["triton"]
    monkeypatch.setitem(OP.impls, "triton", lambda *a: calls.append(a[0].shape) or impl(*a))
    torch.manual_seed(0)
    m = far.FARAttention(32, 2, hidden_sizes=[[16, 9], [0, 16]], backend="triton").eval()
    x = torch.randn(2, 9, 32)
    with torch.inference_mode():
        out = m(x)
        out_pt = m(x, backend="torch")
    assert calls == [torch.Size([2, 2, 9, 2, 64])], "the block must call the triton scan once"
    assert_close_derived(out, far_block_oracle(m, x), out_pt, "block/triton", tiny=1e-5)


# ---------------------------------------------------------------- GPU, compiled
def require_cuda():
    if not HAS_CUDA:
        pytest.skip("no CUDA device")
    if INTERPRET:
        pytest.skip("TRITON_INTERPRET=1: the cuda tests check the compiled kernel")
    why = OP.reason("triton", "cuda")
    assert why is None, why


# the CPU grid plus DeiT-small (H = 6, n = 64) at B = 64, full and pruned
CUDA_GRID = GRID + [
    pytest.param(6, 64, 197, 64, [[64] * 6, [64] * 6], id="H6-B64-T197-n64"),
    pytest.param(6, 64, 197, 64, [[64, 37, 0, 64, 1, 33], [0, 17, 64, 8, 64, 64]], id="H6-B64-T197-n64-pruned"),
    pytest.param(6, 3, 197, 64, [[64, 37, 0, 64, 1, 33], [0, 17, 64, 8, 64, 64]], id="H6-B3-T197-n64-pruned"),
    pytest.param(3, 17, 197, 37, [[37, 37, 0], [37, 20, 37]], id="H3-B17-T197-n37-pruned"),
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("H,B,T,n,hs", CUDA_GRID)
def test_cuda_matches_reference(H, B, T, n, hs, dtype):
    require_cuda()
    # approximate exp2 / division on the GPU: allow 1e-5 on top of the derived bound
    check_against_reference(H, B, T, n, hs, dtype, "cuda", seed=hash((H, B, T, n, 2)) % 2**31, tiny=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("block_b", [16, 32, 64])
def test_cuda_batch_tiles_agree(block_b):
    require_cuda()
    from far_kernels.ops.bilstm_scan.triton import bilstm_scan_triton

    gx, w = make_inputs(6, 70, 50, 64, seed=3, dtype=torch.float16, device="cuda")
    hs = torch.tensor([[64, 37, 0, 64, 1, 33], [0, 17, 64, 8, 64, 64]])
    ref = bilstm_scan_triton(gx, w, hs, block_b=16)
    torch.testing.assert_close(bilstm_scan_triton(gx, w, hs, block_b=block_b), ref, rtol=0, atol=1e-3)


@pytest.mark.cuda
def test_cuda_activations_saturate_without_nan():
    require_cuda()
    run_activations("cuda")


@pytest.mark.cuda
def test_cuda_large_preactivations_saturate_without_nan():
    require_cuda()
    gx, w = make_inputs(2, 3, 20, 64, seed=7, scale=1e4)
    gx[0, 0, 3, 0, :5] = 3e38
    gx[0, 1, 4, 1, 5:9] = -3e38
    hs = torch.full((2, 2), 64)
    for dtype in (torch.float32, torch.bfloat16):
        g, ww = gx.to(dtype), (w * 100).to(dtype)
        out = bilstm_scan(g.cuda(), ww.cuda(), hs, backend="triton").cpu()
        assert torch.isfinite(out).all() and out.abs().max() <= 1
        assert_close_derived(out, bilstm_scan_ref(g.double(), ww.double(), hs), bilstm_scan_ref(g, ww, hs),
                             f"saturation/{dtype}", tiny=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_far_block(dtype):
    """DeiT-small block on the GPU through the triton scan vs the torch backend and the fp64 oracle."""
    require_cuda()
    torch.manual_seed(0)
    hs = [[64, 37, 0, 64, 12, 50], [37, 64, 64, 0, 64, 1]]
    m = far.FARAttention(384, 6, hidden_sizes=hs).eval().to(device="cuda", dtype=dtype)
    x = torch.randn(4, 197, 384, device="cuda", dtype=dtype)
    with torch.inference_mode():
        out = m(x, backend="triton")
        out_pt = m(x, backend="torch")
    ref64 = far_block_oracle(m.cpu(), x.cpu())
    tiny = 1e-4 if dtype == torch.float32 else 1e-2 * ref64.abs().max().item()
    assert_close_derived(out.cpu(), ref64, out_pt.cpu(), f"block/cuda/{dtype}", tiny=tiny)


@pytest.mark.cuda
def test_cuda_runs_on_the_current_stream():
    """The launch goes to torch's current stream: on a side stream the input is written only after a
    long GPU sleep, so a kernel launched on any other stream would read the NaN it holds before."""
    require_cuda()
    gx, w = make_inputs(2, 20, 197, 64, seed=11, dtype=torch.float16)
    hs = torch.tensor([[64, 37], [0, 64]])
    expect = bilstm_scan(gx.cuda(), w.cuda(), hs, backend="triton").cpu()
    wc = w.cuda()
    out = behind_a_busy_side_stream(lambda g: bilstm_scan(g, wc, hs, backend="triton"), gx.cuda())
    assert torch.equal(out.cpu(), expect)
