"""FARAttention: the DESIGN.md contract, equality with the per-head torch.nn.LSTM composition,
the fast block path vs the reference forward, bad inputs, training."""
import pytest
import torch

import far
import far_kernels
from conftest import assert_close_derived, cpu_backends, far_block_oracle, max_err, require_backend

SHAPES = {"tiny": (192, 3), "small": (384, 6)}  # DeiT-tiny / DeiT-small block: C, H (d = 64)


def make_block(C, H, hidden_sizes, seed, dtype=torch.float32):
    torch.manual_seed(seed)
    m = far.FARAttention(C, H, hidden_sizes=hidden_sizes).eval()
    with torch.no_grad():  # biases away from 0 so that pruned paths are exercised
        for p in (m.b_ih, m.b_hh, m.head_proj_bias):
            p.add_(0.1 * torch.randn_like(p))
        m.zero_padding_()
    return m.to(dtype)


def pruned_sizes(H):
    base = [[64, 37, 0, 64, 12, 50], [37, 64, 64, 0, 64, 1]]
    return [row[:H] for row in base]


CASES = [
    pytest.param("tiny", 1, None, id="tiny-T1"),
    pytest.param("tiny", 50, "pruned", id="tiny-T50-pruned"),
    pytest.param("tiny", 197, None, id="tiny-T197"),
    pytest.param("small", 50, None, id="small-T50"),
    pytest.param("small", 197, "pruned", id="small-T197-pruned"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("shape,T,prune", CASES)
def test_block_equals_per_head_nn_lstm(shape, T, prune, backend, dtype):
    require_backend(backend)
    C, H = SHAPES[shape]
    m = make_block(C, H, pruned_sizes(H) if prune else None, seed=T + H, dtype=dtype)
    x = torch.randn(2, T, C).to(dtype)
    ref64 = far_block_oracle(m, x)
    with torch.inference_mode():
        out_pt = m(x, backend="torch")
        out = m(x, backend=backend)
    assert out.shape == (2, T, C) and out.dtype == dtype
    # GEMMs in dtype, scan in fp32: both paths share every rounding but the scan's
    tiny = 1e-5 if dtype == torch.float32 else 1e-2 * ref64.abs().max().item()
    assert_close_derived(out, ref64, out_pt, f"{shape}/{backend}/{dtype}", tiny=tiny)


@pytest.mark.parametrize("backend", cpu_backends())
def test_fast_path_equals_reference_forward(backend):
    require_backend(backend)
    m = make_block(192, 3, pruned_sizes(3), seed=0)
    x = torch.randn(3, 50, 192)
    ref = m.forward_reference(x)  # float64 loops over heads, directions, time
    torch.testing.assert_close(ref.double(), far_block_oracle(m, x), rtol=0, atol=1e-6)
    with torch.inference_mode():
        out = m(x, backend=backend)
    assert max_err(out, ref) < 2e-5


def test_contract_shapes_and_padding():
    hs = [[64, 37, 0], [5, 64, 64]]
    m = make_block(192, 3, hs, seed=1)
    assert isinstance(m.pre_proj, torch.nn.Linear) and m.pre_proj.weight.shape == (192, 192)
    assert isinstance(m.proj, torch.nn.Linear) and m.proj.weight.shape == (192, 192)
    assert m.num_heads == 3 and m.head_dim == 64
    assert m.hidden_sizes.dtype == torch.int64 and m.hidden_sizes.tolist() == hs
    for d in (0, 1):
        for h in range(3):
            k = hs[d][h]
            w_ih, w_hh, b_ih, b_hh = m.lstm_params(d, h)
            assert w_ih.shape == (4 * k, 64) and w_hh.shape == (4 * k, k) and b_ih.shape == b_hh.shape == (4 * k,)
    for h in range(3):
        w, b = m.head_proj_params(h)
        assert w.shape == (64, hs[0][h] + hs[1][h]) and b.shape == (64,)
    # padded entries are exactly zero; storage is per head (no C x C masked matrices)
    mask = m.unit_mask()
    assert m.w_ih.shape == (3, 2, 4 * 64, 64) and m.w_hh.shape == (3, 2, 4 * 64, 64)
    assert (m.w_hh.view(3, 2, 4, 64, 64)[~mask.unsqueeze(2).expand(3, 2, 4, 64)] == 0).all()
    assert (m.head_proj_weight.view(3, 64, 2, 64).permute(0, 2, 1, 3)[~mask[:, :, None, :].expand(3, 2, 64, 64)] == 0).all()


def test_set_params_round_trip_and_validation():
    m = make_block(96, 3, [[32, 17, 0], [5, 32, 32]], seed=2)
    w_ih, w_hh, b_ih, b_hh = (t.clone() + 1 for t in m.lstm_params(0, 1))
    m.set_lstm_params(0, 1, w_ih, w_hh, b_ih, b_hh)
    for a, b in zip(m.lstm_params(0, 1), (w_ih, w_hh, b_ih, b_hh)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"w_hh must be \[68, 17\]"):
        m.set_lstm_params(0, 1, w_ih, w_hh[:, :-1], b_ih, b_hh)
    with pytest.raises(ValueError, match="direction must be 0"):
        m.lstm_params(2, 0)
    with pytest.raises(ValueError, match=r"head must be in \[0, 3\)"):
        m.head_proj_params(3)


def test_fully_pruned_direction_and_block():
    m = make_block(96, 3, [[0, 0, 0], [32, 0, 3]], seed=3)
    x = torch.randn(2, 9, 96)
    with torch.inference_mode():
        for backend in cpu_backends():
            require_backend(backend)
            assert max_err(m(x, backend=backend), far_block_oracle(m, x)) < 1e-5
    m0 = make_block(96, 3, 0, seed=4)  # every unit pruned: head_proj biases only
    with torch.inference_mode():
        assert max_err(m0(x), far_block_oracle(m0, x)) < 1e-5


def test_timm_block_keywords():
    m = make_block(96, 3, None, seed=5)
    x = torch.randn(1, 5, 96)
    with torch.inference_mode():
        y = m(x, attn_mask=None, is_causal=False)
        assert y.shape == x.shape
        with pytest.raises(ValueError, match="attn_mask must be None"):
            m(x, attn_mask=torch.zeros(5, 5))
        with pytest.raises(ValueError, match="is_causal"):
            m(x, is_causal=True)


@pytest.mark.parametrize(
    "x,exc,match",
    [
        (torch.randn(5, 96), ValueError, r"\[B, N, C=96\]"),
        (torch.randn(1, 5, 95), ValueError, r"\[B, N, C=96\]"),
        (torch.randn(1, 5, 96, dtype=torch.float64), TypeError, "float64 but the module is torch.float32"),
        (torch.randn(1, 5, 96, device="meta"), ValueError, "is on meta"),
        ([[1.0]], TypeError, "expects a torch.Tensor"),
    ],
    ids=["rank", "channels", "dtype", "device", "not-tensor"],
)
def test_bad_inputs(x, exc, match):
    m = make_block(96, 3, None, seed=6)
    with pytest.raises(exc, match=match):
        m(x)


def test_bad_construction():
    with pytest.raises(ValueError, match="not divisible"):
        far.FARAttention(100, 3)
    with pytest.raises(ValueError, match=r"shape \[2, num_heads\]"):
        far.FARAttention(96, 3, hidden_sizes=[[1, 2], [3, 4]])
    with pytest.raises(ValueError, match=">= 0"):
        far.FARAttention(96, 3, hidden_sizes=[[1, 2, -3], [3, 4, 5]])
    with pytest.raises(ValueError, match="num_heads must be an int >= 1, got 0"):  # was a ZeroDivisionError
        far.FARAttention(96, 0)
    with pytest.raises(ValueError, match="whole numbers of units"):  # 2.7 became 2
        far.FARAttention(96, 3, hidden_sizes=2.7)
    for bad in (float("inf"), float("nan"), [[1.0, 2.0, 1e20], [3.0, 4.0, 5.0]]):  # inf, 1e20: int64's minimum
        with pytest.raises(ValueError, match="whole numbers of units"):
            far.FARAttention(96, 3, hidden_sizes=bad)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        far.FARAttention(96, 3, backend="nope")


def test_no_tokens():
    m = make_block(96, 3, None, seed=6)
    assert m(torch.randn(2, 0, 96)).shape == (2, 0, 96)
    x = torch.randn(2, 0, 96, requires_grad=True)  # the training path (torch.lstm refuses empty sequences)
    m(x).sum().backward()
    assert x.grad.shape == (2, 0, 96)


def test_training_gradients_and_padding_stay_zero():
    m = make_block(96, 3, [[32, 17, 0], [5, 32, 32]], seed=7).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.05)
    x = torch.randn(2, 7, 96)
    mask = m.unit_mask()
    for _ in range(2):
        loss = m(x).square().mean()  # auto backend -> differentiable reference scan
        opt.zero_grad()
        loss.backward()
        g = m.w_hh.grad.view(3, 2, 4, 32, 32)
        assert (g[~mask.unsqueeze(2).expand(3, 2, 4, 32)] == 0).all()
        opt.step()
    assert (m.w_hh.view(3, 2, 4, 32, 32)[~mask.unsqueeze(2).expand(3, 2, 4, 32)] == 0).all()
    with torch.inference_mode():
        assert max_err(m.eval()(x), far_block_oracle(m, x)) < 1e-5


def test_training_path_equals_reference_scan_in_value_and_gradient():
    """The differentiable native-LSTM path (used when a gradient is needed) gives the same output and
    the same parameter gradients as pre_proj -> input_gates -> bilstm_scan_ref -> head_proj, in float64."""
    m = make_block(96, 3, [[32, 17, 0], [5, 32, 32]], seed=11).double().train()
    x = torch.randn(3, 9, 96, dtype=torch.float64)
    w = torch.randn(3, 9, 96, dtype=torch.float64)
    y = m(x)  # grad enabled, auto backend -> bilstm_fused_scan's torch.lstm path
    (y * w).sum().backward()
    grads = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad()
    xh = m.pre_proj(x)
    gx = far_kernels.ops.bilstm_fused_scan.input_gates_ref(xh, m.w_ih, m.b_ih + m.b_hh)
    h = far_kernels.bilstm_scan_ref(gx, m.w_hh, m.hidden_sizes)  # [H, B, N, 2, n]
    H, B, N, _, n = h.shape
    o = torch.baddbmm(m.head_proj_bias.unsqueeze(1), h.reshape(H, B * N, 2 * n), m.head_proj_weight.transpose(1, 2))
    y_ref = m.proj(o.view(H, B, N, -1).permute(1, 2, 0, 3).reshape(B, N, -1))
    (y_ref * w).sum().backward()
    assert max_err(y, y_ref) < 1e-12
    for k, p in m.named_parameters():
        assert max_err(grads[k], p.grad) < 1e-10, k
    mask = m.unit_mask()
    assert (grads["w_ih"].view(3, 2, 4, 32, 32)[~mask.unsqueeze(2).expand(3, 2, 4, 32)] == 0).all()


def test_training_path_under_autocast_keeps_the_recurrence_in_fp32():
    m = make_block(96, 3, [[32, 17, 0], [5, 32, 32]], seed=12).train()
    x = torch.randn(2, 9, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    y.float().square().mean().backward()
    assert torch.isfinite(m.w_hh.grad).all() and m.w_hh.grad.abs().sum() > 0
    with torch.no_grad():
        ref = m.eval()(x)
    # only pre_proj / head_proj / proj run in bf16: the error is that of bf16 GEMMs, not of a bf16 recurrence
    assert max_err(y.float(), ref) < 5e-2
