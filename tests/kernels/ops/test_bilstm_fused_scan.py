"""bilstm_fused_scan: every backend against the reference (input gates as FARAttention computes them,
then bilstm_scan_ref), itself checked against per-head torch.nn.LSTM."""
import re

import pytest
import torch

import far_kernels
from far_kernels import BackendUnavailable, bilstm_fused_scan, bilstm_fused_scan_ref
import conftest
from conftest import assert_close_derived, per_head_lstm


def cpu_backends():  # this op's own backends
    return conftest.cpu_backends(far_kernels.ops.bilstm_fused_scan.OP)


def require_backend(backend, device="cpu"):
    conftest.require_backend(backend, device, far_kernels.ops.bilstm_fused_scan.OP)


# (H, B, T, d, n, hidden sizes [2, H]) with awkward sizes: T = 1, 50, 197; B = 1, 3, 17; pruned 37 and 0
GRID = [
    pytest.param(3, 1, 1, 64, 64, [[64, 37, 0], [64, 64, 12]], id="H3-B1-T1-d64-n64-pruned"),
    pytest.param(3, 3, 50, 64, 64, [[64, 37, 0], [5, 64, 64]], id="H3-B3-T50-d64-n64-pruned"),
    pytest.param(3, 17, 50, 64, 64, [[64, 64, 64], [64, 64, 64]], id="H3-B17-T50-d64-n64"),
    pytest.param(6, 2, 197, 64, 64, [[64, 37, 0, 64, 1, 33], [0, 0, 64, 8, 64, 64]], id="H6-B2-T197-d64-n64-pruned"),
    pytest.param(2, 9, 197, 40, 37, [[37, 37], [37, 20]], id="H2-B9-T197-d40-n37"),
    pytest.param(1, 3, 50, 16, 16, [[16], [16]], id="H1-B3-T50-d16-n16"),
    pytest.param(2, 8, 20, 5, 24, [[24, 17], [3, 24]], id="H2-B8-T20-d5-n24"),
]


def make_inputs(H, B, T, d, n, seed, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H * d, generator=g) * scale
    w_ih = torch.randn(H, 2, 4 * n, d, generator=g) / d ** 0.5
    bias = torch.randn(H, 2, 4 * n, generator=g) * 0.5
    w_hh = torch.randn(H, 2, 4 * n, n, generator=g) / n ** 0.5
    return tuple(t.to(dtype) for t in (x, w_ih, bias, w_hh))


def as64(args):
    return tuple(t.double() for t in args)


@pytest.mark.parametrize("H,B,T,d,n,hs", GRID[:4] + GRID[5:6])
def test_reference_matches_torch_nn_lstm(H, B, T, d, n, hs):
    """The oracle of the oracle: bilstm_fused_scan_ref == per-head torch.nn.LSTM(bidirectional) in float64."""
    x, w_ih, bias, w_hh = make_inputs(H, B, T, d, n, seed=1, dtype=torch.float64)
    out = bilstm_fused_scan_ref(x, w_ih, bias, w_hh, torch.tensor(hs))
    for h in range(H):
        params = []
        for dr in (0, 1):
            k = hs[dr][h]
            rows = torch.cat([torch.arange(q * n, q * n + k) for q in range(4)])
            params.append((w_ih[h, dr][rows], w_hh[h, dr][rows][:, :k], bias[h, dr][rows],
                           torch.zeros(4 * k, dtype=torch.float64)))
        y = per_head_lstm(x[..., h * d:(h + 1) * d], params)  # [B, T, k_f + k_b]
        kf, kb = hs[0][h], hs[1][h]
        torch.testing.assert_close(out[h, :, :, 0, :kf], y[..., :kf], rtol=0, atol=1e-12)
        torch.testing.assert_close(out[h, :, :, 1, :kb], y[..., kf:], rtol=0, atol=1e-12)
        assert (out[h, :, :, 0, kf:] == 0).all() and (out[h, :, :, 1, kb:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("H,B,T,d,n,hs", GRID)
def test_backend_matches_reference(backend, dtype, H, B, T, d, n, hs):
    require_backend(backend)
    args = make_inputs(H, B, T, d, n, seed=hash((H, B, T, d, n)) % 2**31, dtype=dtype)
    hs_t = torch.tensor(hs)
    ref64 = bilstm_fused_scan_ref(*as64(args), hs_t)
    out_pt = bilstm_fused_scan_ref(*args, hs_t)  # the same math by plain PyTorch in dtype
    out = torch.full((H, B, T, 2, n), float("nan"), dtype=dtype)  # poisoned
    res = bilstm_fused_scan(*args, hs_t, backend=backend, out=out)
    assert res.data_ptr() == out.data_ptr() and res.dtype == dtype
    assert_close_derived(out, ref64, out_pt, f"{backend}/{dtype}")
    for dr in (0, 1):
        for h in range(H):
            assert (out[h, :, :, dr, hs[dr][h]:] == 0).all(), "pruned units must be written as 0"
    res2 = bilstm_fused_scan(*args, hs_t, backend=backend)  # allocating form agrees bit for bit
    assert torch.equal(res2, out)


@pytest.mark.parametrize("backend", cpu_backends())
def test_matches_unfused_scan(backend):
    """Same answer as input gates + bilstm_scan on the same backend (up to fp32 rounding of the gates)."""
    require_backend(backend)
    args = make_inputs(3, 5, 33, 64, 64, seed=11)
    hs = torch.tensor([[64, 40, 0], [64, 9, 64]])
    gx = far_kernels.ops.bilstm_fused_scan.input_gates_ref(*args[:3])
    unfused = far_kernels.bilstm_scan(gx, args[3], hs, backend=backend)
    torch.testing.assert_close(bilstm_fused_scan(*args, hs, backend=backend), unfused, rtol=0, atol=2e-5)


@pytest.mark.parametrize("backend", cpu_backends())
def test_large_inputs_saturate_without_nan(backend):
    require_backend(backend)
    x, w_ih, bias, w_hh = make_inputs(2, 3, 20, 8, 16, seed=7)
    x[0, 3, :5] = 3e30
    x[1, 4, 9:12] = -3e30
    hs = torch.full((2, 2), 16)
    args = (x, w_ih, bias, w_hh * 100)
    out = bilstm_fused_scan(*args, hs, backend=backend)
    assert torch.isfinite(out).all() and out.abs().max() <= 1
    # the gates are summed in another order than the reference's: compare both to float64
    assert_close_derived(out, bilstm_fused_scan_ref(*as64(args), hs), bilstm_fused_scan_ref(*args, hs), backend)


@pytest.mark.parametrize("backend", cpu_backends())
def test_nan_input_propagates(backend):
    require_backend(backend)
    x, w_ih, bias, w_hh = make_inputs(1, 2, 5, 8, 8, seed=3)
    x[0, 2, 0] = float("nan")
    out = bilstm_fused_scan(x, w_ih, bias, w_hh, torch.full((2, 1), 8), backend=backend)
    assert torch.isnan(out[0, 0, 2:, 0]).any() and torch.isfinite(out[0, 1]).all()


@pytest.mark.parametrize("backend", cpu_backends())
def test_non_contiguous_inputs_give_right_answer(backend):
    require_backend(backend)
    x, w_ih, bias, w_hh = make_inputs(2, 3, 7, 8, 8, seed=5)
    x_nc = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    w_nc = w_ih.transpose(2, 3).contiguous().transpose(2, 3)
    assert not x_nc.is_contiguous() and not w_nc.is_contiguous()
    hs = torch.tensor([[8, 3], [0, 8]])
    torch.testing.assert_close(bilstm_fused_scan(x_nc, w_nc, bias, w_hh, hs, backend=backend),
                               bilstm_fused_scan_ref(x, w_ih, bias, w_hh, hs), rtol=0, atol=2e-6)


def test_zero_sizes():
    for backend in cpu_backends():
        require_backend(backend)
        x, w_ih, bias, w_hh = make_inputs(2, 0, 5, 4, 8, seed=1)
        assert bilstm_fused_scan(x, w_ih, bias, w_hh, torch.full((2, 2), 8), backend=backend).shape == (2, 0, 5, 2, 8)
        x, w_ih, bias, w_hh = make_inputs(2, 3, 0, 4, 8, seed=1)
        assert bilstm_fused_scan(x, w_ih, bias, w_hh, torch.full((2, 2), 8), backend=backend).shape == (2, 3, 0, 2, 8)


def test_zero_sizes_on_the_gradient_path():
    """torch.lstm refuses an empty sequence and 0 units (a oneDNN error), torch.stack 0 heads: the training path
    returns the empty result, differentiably, as the inference paths return it."""
    for H, B, T, n in ((2, 2, 0, 8), (2, 0, 5, 8), (2, 3, 5, 0), (0, 3, 5, 8)):
        args = [t.requires_grad_(True) for t in make_inputs(H, B, T, 4, n, seed=1)]
        out = bilstm_fused_scan(*args, torch.full((2, H), n))
        assert out.shape == (H, B, T, 2, n) and out.requires_grad
        out.sum().backward()
        assert all(a.grad is not None and not a.grad.any() for a in args)


def test_torch_backend_is_differentiable_and_auto_picks_it():
    args = [t.requires_grad_(True) for t in make_inputs(2, 2, 4, 3, 3, seed=2, dtype=torch.float64)]
    hs = torch.tensor([[3, 2], [1, 3]])
    assert torch.autograd.gradcheck(lambda *a: bilstm_fused_scan(*a, hs), tuple(args))
    with pytest.raises(BackendUnavailable, match="inference-only"):
        require_backend("cpp")
        bilstm_fused_scan(*(t.float() for t in args), hs, backend="cpp")


def test_forward_mode_ad_gets_the_reference():
    """A forward-mode AD tangent (torch.autograd.forward_ad, torch.func.jvp) needs a derivative as much as
    requires_grad does: auto ran the cpp kernel on fp32 and dropped the tangent silently (None), or crashed on
    torch.func's wrapped tensors. Now auto takes the reference (torch.lstm has no forward AD) and cpp refuses."""
    import torch.autograd.forward_ad as fwAD

    args = make_inputs(2, 3, 5, 4, 8, seed=13)
    hs = torch.tensor([[8, 3], [0, 8]])
    tan = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(14))

    def jvp(f, a):
        return torch.func.jvp(lambda x: f(x, *a[1:], hs), (a[0],), (tan.to(a[0].dtype),))[1]

    t64, t_pt = jvp(bilstm_fused_scan_ref, as64(args)), jvp(bilstm_fused_scan_ref, args)
    with fwAD.dual_level():
        out = bilstm_fused_scan(fwAD.make_dual(args[0], tan), *args[1:], hs)
        tangent = fwAD.unpack_dual(out).tangent
        assert tangent is not None
        assert_close_derived(tangent, t64, t_pt, "forward_ad")
        if "cpp" in cpu_backends():
            with pytest.raises(BackendUnavailable, match="inference-only"):
                bilstm_fused_scan(fwAD.make_dual(args[0], tan), *args[1:], hs, backend="cpp")
    assert_close_derived(jvp(bilstm_fused_scan, args), t64, t_pt, "func.jvp")


def test_gradient_path_ignores_padded_units():
    """The training path (torch.lstm per head) honours hidden_sizes as inference does, whatever the padded weights
    hold: the same outputs, padded units 0, and the gradients of the differentiable reference (0 on every padded
    weight) under a random upstream gradient (before, it ran the padded units and sent gradient into them)."""
    H, B, T, d, n = 2, 3, 5, 4, 6
    hs = torch.tensor([[6, 2], [0, 4]])
    x, w_ih, bias, w_hh = make_inputs(H, B, T, d, n, seed=8)
    up = torch.randn(H, B, T, 2, n, generator=torch.Generator().manual_seed(9))
    grads = []
    for impl in (far_kernels.ops.bilstm_fused_scan.bilstm_fused_scan_autograd, bilstm_fused_scan_ref):
        args = [t.clone().requires_grad_(True) for t in (x, w_ih, bias, w_hh)]
        out = impl(*args, hs)
        (out * up).sum().backward()
        grads.append((out.detach(), [a.grad for a in args]))
    (o_lstm, g_lstm), (o_ref, g_ref) = grads
    torch.testing.assert_close(o_lstm, o_ref, rtol=0, atol=1e-6)
    assert (o_lstm[1, :, :, 0, 2:] == 0).all() and (o_lstm[0, :, :, 1] == 0).all()
    for name, a, b in zip(("x", "w_ih", "bias", "w_hh"), g_lstm, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    assert (g_lstm[1][0, 1] == 0).all() and (g_lstm[2][0, 1] == 0).all()  # head 0 backward: no unit
    rows = torch.cat([torch.arange(q * n + 2, (q + 1) * n) for q in range(4)])  # head 1 forward keeps 2 units
    assert (g_lstm[1][1, 0][rows] == 0).all() and (g_lstm[3][1, 0][:, 2:] == 0).all()


@pytest.mark.parametrize("backend", cpu_backends())
def test_weights_of_another_dtype_are_cast_to_x(backend):
    """fp16/fp32/fp64 mixes: every backend casts the weights to x's dtype (cpp ran them, torch and triton
    raised from inside baddbmm)."""
    require_backend(backend)
    x, w_ih, bias, w_hh = make_inputs(2, 2, 4, 4, 8, seed=10)
    hs = [[8, 5], [3, 8]]
    for mixed in ((x, w_ih.bfloat16(), bias, w_hh), (x, w_ih, bias.double(), w_hh.half())):
        same = (x,) + tuple(t.to(x.dtype) for t in mixed[1:])
        out = bilstm_fused_scan(*mixed, hs, backend=backend)
        assert out.dtype == x.dtype
        assert torch.equal(out, bilstm_fused_scan(*same, hs, backend=backend))


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_result_has_x_dtype_under_autocast(backend):
    """Under autocast the input GEMM runs in autocast's dtype (bf16 here), but the result is x's dtype on every
    backend, with or without out= (triton returned bf16; the cuda scan refuses an out= of another dtype than its
    gates)."""
    require_backend(backend)
    args = make_inputs(2, 3, 4, 4, 16, seed=12)
    hs = torch.tensor([[16, 5], [0, 16]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out_pt = bilstm_fused_scan(*args, hs, backend="torch")
        out = bilstm_fused_scan(*args, hs, backend=backend)
        into = conftest.poisoned((2, 3, 4, 2, 16))
        res = bilstm_fused_scan(*args, hs, backend=backend, out=into)
    assert out.dtype == torch.float32 and res.data_ptr() == into.data_ptr() and torch.equal(out, into)
    assert_close_derived(out, bilstm_fused_scan_ref(*as64(args), hs), out_pt, f"autocast/{backend}")


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda x, wi, b, wh, hs: (x[0], wi, b, wh, hs), ValueError, r"x must be \[B, T, H\*d\]"),
        (lambda x, wi, b, wh, hs: (x[..., :-1], wi, b, wh, hs), ValueError, r"x must be \[B, T, H\*d\]"),
        (lambda x, wi, b, wh, hs: (x, wi[0], b, wh, hs), ValueError, r"w_ih must be \[H, 2, 4n, d\]"),
        (lambda x, wi, b, wh, hs: (x, wi[:, :, :-1], b, wh, hs), ValueError, r"w_ih must be"),
        (lambda x, wi, b, wh, hs: (x, wi, b[..., :-1], wh, hs), ValueError, r"bias must be \[H, 2, 4n\]"),
        (lambda x, wi, b, wh, hs: (x, wi, b, wh[..., :-1], hs), ValueError, r"w_hh must be \[H, 2, 4n, n\]"),
        (lambda x, wi, b, wh, hs: (x, wi, b, wh, [[8, 8]]), ValueError, r"hidden_sizes must have shape \[2, H\]"),
        (lambda x, wi, b, wh, hs: (x, wi, b, wh, [[8, 9], [0, 1]]), ValueError, r"must lie in \[0, n\]"),
        (lambda x, wi, b, wh, hs: (x, wi, b, wh, [[8, -1], [0, 1]]), ValueError, r"must lie in \[0, n\]"),
        (lambda x, wi, b, wh, hs: (x, wi, b, wh, torch.ones(2, 2)), TypeError, r"hidden_sizes must be integers"),
        (lambda x, wi, b, wh, hs: (x.int(), wi, b, wh, hs), TypeError, r"x must be float"),
        (lambda x, wi, b, wh, hs: (x, wi, b.numpy(), wh, hs), TypeError, r"bias must be a torch.Tensor"),
        (lambda x, wi, b, wh, hs: (x, wi, b, wh.to("meta"), hs), ValueError, r"x is on cpu but w_hh is on meta"),
    ],
    ids=["rank", "x-width", "w_ih-rank", "gate-width", "bias-shape", "w_hh-shape", "hs-shape", "hs-too-big",
         "hs-negative", "hs-float", "int-dtype", "numpy", "device"],
)
def test_bad_inputs_raise_clear_errors(mutate, exc, match):
    args = mutate(*make_inputs(2, 3, 4, 4, 8, seed=0), torch.full((2, 2), 8))
    for backend in cpu_backends():
        with pytest.raises(exc, match=match):
            bilstm_fused_scan(*args, backend=backend)


def test_bad_out_raises():
    args = make_inputs(2, 3, 4, 4, 8, seed=0)
    hs = torch.full((2, 2), 8)
    for out in (torch.empty(2, 3, 4, 2, 7), torch.empty(2, 3, 4, 2, 8, dtype=torch.float64),
                torch.empty(2, 3, 4, 8, 2).transpose(-1, -2)):
        for backend in cpu_backends():
            with pytest.raises(ValueError, match="out must be"):
                bilstm_fused_scan(*args, hs, backend=backend, out=out)


def test_extension_validates_directly():
    """The C++ binding's own checks (callers that bypass the Python wrapper get clear errors too)."""
    require_backend("cpp")
    from far_kernels._ext import lib as _C
    x, w_ih, bias, w_hh = make_inputs(2, 3, 4, 4, 8, seed=0)
    hs = torch.full((2, 2), 8)
    with pytest.raises(RuntimeError, match="must be float32"):
        _C.bilstm_fused_scan_cpu(x.double(), w_ih, bias, w_hh, hs)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        _C.bilstm_fused_scan_cpu(x.transpose(0, 1).contiguous().transpose(0, 1), w_ih, bias, w_hh, hs)
    with pytest.raises(RuntimeError, match=r"x must be \[B, T, H\*d\]"):
        _C.bilstm_fused_scan_cpu(x[..., :-1], w_ih, bias, w_hh, hs)
    with pytest.raises(RuntimeError, match="outside"):
        _C.bilstm_fused_scan_cpu(x, w_ih, bias, w_hh, torch.full((2, 2), 9))


def test_dispatch_rules(monkeypatch):
    args = make_inputs(1, 1, 2, 4, 4, seed=0)
    hs = torch.full((2, 1), 4)
    op = far_kernels.ops.bilstm_fused_scan.OP
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        bilstm_fused_scan(*args, hs, backend="fast")
    monkeypatch.setenv("FAR_BACKEND", "nope")
    with pytest.raises(ValueError, match="env FAR_BACKEND"):
        bilstm_fused_scan(*args, hs)
    monkeypatch.setenv("FAR_BACKEND", "cuda")  # never substituted
    with pytest.raises(BackendUnavailable, match="cuda"):
        bilstm_fused_scan(*args, hs)
    monkeypatch.setenv("FAR_BACKEND", "torch")
    assert far_kernels.dispatch.select(op, None, "cpu") == "torch"
    monkeypatch.delenv("FAR_BACKEND")
    assert far_kernels.dispatch.select(op, None, "cpu") == ("cpp" if far_kernels.backend_reason("cpp") is None else "torch")
    assert far_kernels.dispatch.select(op, "torch", "cpu") == "torch"  # argument beats env


def test_gpu_backends_compose_the_input_gemm_and_their_scan():
    """cuda and triton have no fused kernel: the op is the batched input GEMM then that backend's scan
    (checked here through the Triton interpreter; a CUDA backend on CPU tensors is refused)."""
    x, w_ih, bias, w_hh = make_inputs(2, 3, 5, 4, 8, seed=3)
    hs = torch.tensor([[8, 5], [0, 8]])
    op = far_kernels.ops.bilstm_fused_scan.OP
    why = op.reason("cuda", "cpu")
    refusal = "CUDA tensors|built without CUDA kernels"  # the CUDA build refuses CPU tensors; a CPU-only build, everything
    assert why is not None and re.search(refusal, why), why
    with pytest.raises(BackendUnavailable, match=refusal):
        bilstm_fused_scan(x, w_ih, bias, w_hh, hs, backend="cuda")
    require_backend("triton")
    out = conftest.poisoned((2, 3, 5, 2, 8))
    bilstm_fused_scan(x, w_ih, bias, w_hh, hs, backend="triton", out=out)
    ref64 = bilstm_fused_scan_ref(x.double(), w_ih.double(), bias.double(), w_hh.double(), hs)
    assert_close_derived(out, ref64, bilstm_fused_scan_ref(x, w_ih, bias, w_hh, hs), "triton")
