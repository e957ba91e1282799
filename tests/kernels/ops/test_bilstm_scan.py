"""bilstm_scan: every backend against the reference (itself checked against torch.nn.LSTM)."""
import pytest
import torch

import far_kernels
from far_kernels import BackendUnavailable, bilstm_scan, bilstm_scan_ref
from conftest import assert_close_derived, assert_same_rounding, cpu_backends, per_head_lstm, require_backend

# (H, B, T, n, hidden sizes [2, H]) with awkward sizes: T = 1, 50, 197; B = 1, 3, 17; pruned 37 and 0
GRID = [
    pytest.param(3, 1, 1, 64, [[64, 37, 0], [64, 64, 12]], id="H3-B1-T1-n64-pruned"),
    pytest.param(3, 3, 50, 64, [[64, 37, 0], [5, 64, 64]], id="H3-B3-T50-n64-pruned"),
    pytest.param(3, 17, 50, 64, [[64, 64, 64], [64, 64, 64]], id="H3-B17-T50-n64"),
    pytest.param(6, 2, 197, 64, [[64, 37, 0, 64, 1, 33], [0, 0, 64, 8, 64, 64]], id="H6-B2-T197-n64-pruned"),
    pytest.param(2, 9, 197, 37, [[37, 37], [37, 20]], id="H2-B9-T197-n37"),
    pytest.param(1, 3, 50, 16, [[16], [16]], id="H1-B3-T50-n16"),
]


def make_inputs(H, B, T, n, seed, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    gx = torch.randn(H, B, T, 2, 4 * n, generator=g) * scale
    w = torch.randn(H, 2, 4 * n, n, generator=g) / n ** 0.5
    return gx.to(dtype), w.to(dtype)


@pytest.mark.parametrize("H,B,T,n,hs", GRID)
def test_reference_matches_torch_nn_lstm(H, B, T, n, hs):
    """The oracle of the oracle: bilstm_scan_ref == per-head torch.nn.LSTM(bidirectional) in float64."""
    gx, w = make_inputs(H, B, T, n, seed=1, dtype=torch.float64)
    # With x = identity-ish inputs: choose W_ih = I (4n x 4n over the gate pre-activations) so that
    # nn.LSTM's input is exactly gx; biases 0.
    out = bilstm_scan_ref(gx, w, torch.tensor(hs))
    for h in range(H):
        params = []
        for d in (0, 1):
            k = hs[d][h]
            rows = torch.cat([torch.arange(q * n, q * n + k) for q in range(4)])
            params.append((torch.eye(4 * n, dtype=torch.float64)[rows], w[h, d][rows][:, :k],
                           torch.zeros(4 * k, dtype=torch.float64), torch.zeros(4 * k, dtype=torch.float64)))
        for d in (0, 1):
            k = hs[d][h]
            one = [params[d], (params[1 - d][0][:0], params[1 - d][1][:0, :0], params[1 - d][2][:0], params[1 - d][3][:0])]
            if d == 1:
                one = one[::-1]
            y = per_head_lstm(gx[h, :, :, d], one)  # [B, T, k]
            torch.testing.assert_close(out[h, :, :, d, :k], y, rtol=0, atol=1e-12)
            assert (out[h, :, :, d, k:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("H,B,T,n,hs", GRID)
def test_backend_matches_reference(backend, dtype, H, B, T, n, hs):
    require_backend(backend)
    gx, w = make_inputs(H, B, T, n, seed=hash((H, B, T, n)) % 2**31, dtype=dtype)
    hs_t = torch.tensor(hs)
    ref64 = bilstm_scan_ref(gx.double(), w.double(), hs_t)
    out_pt = bilstm_scan_ref(gx, w, hs_t)  # fp32 math, rounded to dtype like every backend
    out = torch.full((H, B, T, 2, n), float("nan"), dtype=dtype)  # poisoned
    res = bilstm_scan(gx, w, hs_t, backend=backend, out=out)
    assert res.data_ptr() == out.data_ptr() and res.dtype == dtype
    assert_close_derived(out, ref64, out_pt, f"{backend}/{dtype}")
    if dtype != torch.float32:  # 16-bit: fp32 math rounded once (no operand rounded inside the recurrence)
        assert_same_rounding(out, out_pt, f"{backend}/{dtype}")
    for d in (0, 1):
        for h in range(H):
            assert (out[h, :, :, d, hs[d][h]:] == 0).all(), "pruned units must be written as 0"
    res2 = bilstm_scan(gx, w, hs_t, backend=backend)  # allocating form agrees bit for bit
    assert torch.equal(res2, out)


@pytest.mark.parametrize("backend", cpu_backends())
def test_large_preactivations_saturate_without_nan(backend):
    require_backend(backend)
    gx, w = make_inputs(2, 3, 20, 16, seed=7, scale=1e4)
    gx[0, 0, 3, 0, :5] = 3e38
    gx[0, 1, 4, 1, 5:9] = -3e38
    hs = torch.full((2, 2), 16)
    out = bilstm_scan(gx, w * 100, hs, backend=backend)
    assert torch.isfinite(out).all() and out.abs().max() <= 1
    torch.testing.assert_close(out, bilstm_scan_ref(gx, w * 100, hs), rtol=0, atol=2e-6)


@pytest.mark.parametrize("backend", cpu_backends())
def test_nan_input_propagates(backend):
    require_backend(backend)
    gx, w = make_inputs(1, 2, 5, 8, seed=3)
    gx[0, 0, 2, 0, 0] = float("nan")
    out = bilstm_scan(gx, w, torch.full((2, 1), 8), backend=backend)
    assert torch.isnan(out[0, 0, 2:, 0]).any() and torch.isfinite(out[0, 1]).all()


@pytest.mark.parametrize("backend", cpu_backends())
def test_padded_units_are_ignored_even_nan(backend):
    """What padded units hold (their gates, their W_hh rows and columns) is never read: NaN there changes nothing
    (the torch backend multiplied by a 0/1 mask, and NaN * 0 = NaN poisoned every kept unit)."""
    require_backend(backend)
    gx, w = make_inputs(2, 3, 6, 8, seed=6)
    hs = [[8, 3], [5, 0]]  # a list, as bilstm_scan takes (the reference took tensors only)
    clean = bilstm_scan_ref(gx, w, torch.tensor(hs))
    gx_bad, w_bad = gx.clone(), w.clone()
    for head, dr, k in ((1, 0, 3), (0, 1, 5), (1, 1, 0)):
        for q in range(4):
            gx_bad[head, :, :, dr, q * 8 + k:(q + 1) * 8] = float("nan")
            w_bad[head, dr, q * 8 + k:(q + 1) * 8] = float("nan")
        w_bad[head, dr, :, k:] = float("nan")
    assert torch.equal(bilstm_scan_ref(gx_bad, w_bad, hs), clean)
    out = bilstm_scan(gx_bad, w_bad, hs, backend=backend)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, clean, rtol=0, atol=2e-6)


@pytest.mark.parametrize("backend", cpu_backends())
def test_non_contiguous_inputs_give_right_answer(backend):
    require_backend(backend)
    gx, w = make_inputs(2, 3, 7, 8, seed=5)
    gx_nc = gx.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    assert not gx_nc.is_contiguous()
    hs = torch.tensor([[8, 3], [0, 8]])
    torch.testing.assert_close(bilstm_scan(gx_nc, w, hs, backend=backend), bilstm_scan_ref(gx, w, hs),
                               rtol=0, atol=2e-6)


def test_zero_sizes():
    for backend in cpu_backends():
        require_backend(backend)
        gx, w = make_inputs(2, 0, 5, 8, seed=1)
        assert bilstm_scan(gx, w, torch.full((2, 2), 8), backend=backend).shape == (2, 0, 5, 2, 8)
        gx, w = make_inputs(2, 3, 0, 8, seed=1)
        assert bilstm_scan(gx, w, torch.full((2, 2), 8), backend=backend).shape == (2, 3, 0, 2, 8)


def test_empty_sequence_on_the_gradient_path():
    """T = 0 with a gradient required: the empty result is still part of the graph (it was a detached tensor, so
    backward raised), and every gradient is 0, as with B = 0 and as in bilstm_fused_scan's training path."""
    for B, T in ((3, 0), (0, 4)):
        gx, w = (t.requires_grad_(True) for t in make_inputs(2, B, T, 8, seed=1))
        out = bilstm_scan(gx, w, [[8, 3], [0, 8]])
        assert out.shape == (2, B, T, 2, 8) and out.requires_grad
        out.sum().backward()
        assert not gx.grad.any() and not w.grad.any()


def test_forward_mode_ad_gets_the_reference():
    """A forward-mode AD tangent needs a derivative as much as requires_grad does: auto ran the cpp kernel on fp32
    and dropped the tangent silently (None); now it takes the reference, and cpp refuses."""
    import torch.autograd.forward_ad as fwAD

    gx, w = make_inputs(2, 3, 6, 8, seed=13)
    hs = torch.tensor([[8, 3], [0, 8]])
    tan = torch.randn(w.shape, generator=torch.Generator().manual_seed(14))

    def jvp(f, g, w):
        return torch.func.jvp(lambda v: f(g, v, hs), (w,), (tan.to(w.dtype),))[1]

    t64, t_pt = jvp(bilstm_scan_ref, gx.double(), w.double()), jvp(bilstm_scan_ref, gx, w)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(bilstm_scan(gx, fwAD.make_dual(w, tan), hs)).tangent
        assert tangent is not None
        assert_close_derived(tangent, t64, t_pt, "forward_ad")
        if "cpp" in cpu_backends():
            with pytest.raises(BackendUnavailable, match="inference-only"):
                bilstm_scan(gx, fwAD.make_dual(w, tan), hs, backend="cpp")
    assert_close_derived(jvp(bilstm_scan, gx, w), t64, t_pt, "func.jvp")


def test_torch_backend_is_differentiable_and_auto_picks_it():
    gx, w = make_inputs(2, 2, 4, 3, seed=2, dtype=torch.float64)
    gx.requires_grad_(True)
    w.requires_grad_(True)
    hs = torch.tensor([[3, 2], [1, 3]])
    assert torch.autograd.gradcheck(lambda a, b: bilstm_scan(a, b, hs), (gx, w))
    with pytest.raises(BackendUnavailable, match="inference-only"):
        require_backend("cpp")
        bilstm_scan(gx.float(), w.float(), hs, backend="cpp")


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda gx, w, hs: (gx[0], w, hs), ValueError, r"gx must be \[H, B, T, 2, 4n\]"),
        (lambda gx, w, hs: (gx[..., :-1], w, hs), ValueError, r"gx must be"),
        (lambda gx, w, hs: (gx, w[:, :, :, :-1], hs), ValueError, r"w_hh must be \[H, 2, 4n, n\]"),
        (lambda gx, w, hs: (gx, w, [[8, 8]]), ValueError, r"hidden_sizes must have shape \[2, H\]"),
        (lambda gx, w, hs: (gx, w, [[8, 9], [0, 1]]), ValueError, r"must lie in \[0, n\]"),
        (lambda gx, w, hs: (gx, w, [[8, -1], [0, 1]]), ValueError, r"must lie in \[0, n\]"),
        (lambda gx, w, hs: (gx, w, torch.ones(2, 2)), TypeError, r"hidden_sizes must be integers"),
        (lambda gx, w, hs: (gx.int(), w, hs), TypeError, r"gx must be float"),
        (lambda gx, w, hs: (gx.numpy(), w, hs), TypeError, r"gx must be a torch.Tensor"),
        (lambda gx, w, hs: (gx, w.to("meta"), hs), ValueError, r"gx is on cpu but w_hh is on meta"),
    ],
    ids=["rank", "gate-width", "w-shape", "hs-shape", "hs-too-big", "hs-negative", "hs-float", "int-dtype",
         "numpy", "device"],
)
def test_bad_inputs_raise_clear_errors(mutate, exc, match):
    gx, w = make_inputs(2, 3, 4, 8, seed=0)
    args = mutate(gx, w, torch.full((2, 2), 8))
    for backend in cpu_backends():
        with pytest.raises(exc, match=match):
            bilstm_scan(*args, backend=backend)


def test_bad_out_raises():
    gx, w = make_inputs(2, 3, 4, 8, seed=0)
    hs = torch.full((2, 2), 8)
    for out in (torch.empty(2, 3, 4, 2, 7), torch.empty(2, 3, 4, 2, 8, dtype=torch.float64),
                torch.empty(2, 3, 4, 8, 2).transpose(-1, -2)):
        for backend in cpu_backends():
            with pytest.raises(ValueError, match="out must be"):
                bilstm_scan(gx, w, hs, backend=backend, out=out)


def test_dispatch_rules(monkeypatch):
    gx, w = make_inputs(1, 1, 2, 4, seed=0)
    hs = torch.full((2, 1), 4)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        bilstm_scan(gx, w, hs, backend="fast")
    monkeypatch.setenv("FAR_BACKEND", "nope")
    with pytest.raises(ValueError, match="env FAR_BACKEND"):
        bilstm_scan(gx, w, hs)
    monkeypatch.setenv("FAR_BACKEND", "cuda")  # a CPU tensor cannot run on cuda: raise, never substitute
    with pytest.raises(BackendUnavailable, match="cuda"):
        bilstm_scan(gx, w, hs)
    monkeypatch.setenv("FAR_BACKEND", "torch")
    assert far_kernels.dispatch.select(far_kernels.ops.bilstm_scan.OP, None, "cpu") == "torch"
    monkeypatch.delenv("FAR_BACKEND")
    auto = far_kernels.dispatch.select(far_kernels.ops.bilstm_scan.OP, None, "cpu")
    assert auto == ("cpp" if far_kernels.backend_reason("cpp") is None else "torch")
    assert far_kernels.dispatch.select(far_kernels.ops.bilstm_scan.OP, "torch", "cpu") == "torch"  # argument beats env


def test_triton_request_is_explained():
    why = far_kernels.ops.bilstm_scan.OP.reason("triton", "cpu")
    if far_kernels.ops.bilstm_scan.OP.impls.get("triton") is None:
        assert "not implemented" in why
    gx, w = make_inputs(1, 1, 2, 4, seed=0)
    if why is not None:
        with pytest.raises(BackendUnavailable, match="triton"):
            bilstm_scan(gx, w, torch.full((2, 1), 4), backend="triton")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("H,B,T,n,hs", GRID)
def test_cuda_backend_matches_reference(dtype, H, B, T, n, hs):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    require_backend("cuda", "cuda")
    gx, w = make_inputs(H, B, T, n, seed=hash((H, B, T, n, 1)) % 2**31, dtype=dtype)
    hs_t = torch.tensor(hs)
    ref64 = bilstm_scan_ref(gx.double(), w.double(), hs_t)
    out_pt = bilstm_scan_ref(gx, w, hs_t)
    out = torch.full((H, B, T, 2, n), float("nan"), dtype=dtype, device="cuda")
    bilstm_scan(gx.cuda(), w.cuda(), hs_t, backend="cuda", out=out)
    torch.cuda.synchronize()
    # the CUDA kernel uses __expf (fast-math) : allow that on top of the derived bound
    assert_close_derived(out.cpu(), ref64, out_pt, f"cuda/{dtype}", tiny=1e-5)


def test_triton_refuses_heads_wider_than_it_holds_on_chip(monkeypatch):
    """Compiled for sm_90, 128 padded units need 272 KB of shared memory (an H100 block gets 227 KiB): above 64
    kept units the compiled triton scan is unavailable with the reason (auto goes on to another backend); the
    interpreter and CPU devices are not limited."""
    from far_kernels.ops.bilstm_scan import TRITON_MAX_UNITS, triton_units_limit

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    wide = torch.tensor([[TRITON_MAX_UNITS + 1, 3], [0, 8]])
    assert "at most 64 units" in triton_units_limit(wide, torch.device("cuda"))
    assert triton_units_limit(torch.tensor([[64, 3], [0, 64]]), torch.device("cuda")) is None
    assert triton_units_limit(wide, torch.device("cpu")) is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_units_limit(wide, torch.device("cuda")) is None
