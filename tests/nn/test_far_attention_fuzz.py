"""Seeded random FARAttention configurations (heads, head_dim given or not, ragged hidden sizes with 0 and the full
width, whole heads pruned, dim_out, no proj bias, fp32 / bf16 / fp64, B and N down to 1, masked widths) against
the invariants that must hold exactly or within the derived tolerance:
- padded and ragged storage give bit-identical outputs and input gradients on every CPU backend, with and without
  a gradient, and the ragged gradients are the padded gradients of the kept units;
- every path is within the derived tolerance of the float64 per-head torch.nn.LSTM oracle: err <= 2 err(out_pt)
  + 16 ulps of the largest output, out_pt = the same math by torch.nn.LSTM in the compute dtype (fp32 for bf16);
- compact_state -> load_compact_state and lstm_params / head_proj_params -> their setters are inverses, into a
  fresh block of either storage;
- a masked block (far.prune's apply_keep_mask: width beyond max(hidden_sizes)) and its compact_ copy agree.
A larger run of the same generator (thousands of cases, ONNX, checkpoints) found no discrepancy; this keeps a
small deterministic slice of it in CI."""
import pytest
import torch
import torch.nn as nn

import far
import far_kernels
from conftest import cpu_backends, far_block_oracle, max_err
from far.methods.prune import apply_keep_mask, compact_

DTYPES = (torch.float32, torch.bfloat16, torch.float64)


@pytest.fixture(autouse=True)
def one_thread():
    # tiny shapes: a second intra-op thread only spins (25x the CPU time on a busy 2-core machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_block(seed):
    g = torch.Generator().manual_seed(seed)

    def r(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    H, d = r(1, 4), r(1, 6)
    dim = r(1, 10) if r(0, 1) else H * d
    hs = torch.randint(0, 8, (2, H), generator=g)
    if r(0, 1):
        hs[:, r(0, H - 1)] = 0  # a whole head pruned
    if r(0, 1):
        hs[r(0, 1), r(0, H - 1)] = d  # the full width
    dtype = DTYPES[seed % 3]
    m = far.FARAttention(dim, H, head_dim=d, hidden_sizes=hs, dim_out=r(1, 9) if r(0, 3) == 0 else None,
                         proj_bias=bool(r(0, 3)), dtype=dtype).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        m.zero_padding_()
        if m.width and r(0, 2) == 0:
            apply_keep_mask(m, torch.rand(H, 2, m.width, generator=g) < 0.6)
    x = torch.randn(r(1, 3), r(1, 6), dim, generator=g, dtype=torch.float64).to(dtype)
    return m, x


def same_math(m, x):
    """The block by per-head torch.nn.LSTM in the compute dtype (fp32 for bf16), rounded to x.dtype."""
    dt = torch.float32 if x.dtype == torch.bfloat16 else x.dtype
    d = m.head_dim
    with torch.no_grad():
        xh = nn.functional.linear(x, m.pre_proj.weight, m.pre_proj.bias).to(dt)
        heads = []
        for h in range(m.num_heads):
            ys = []
            for r in (0, 1):
                w_ih, w_hh, b_ih, b_hh = (t.to(dt) for t in m.lstm_params(r, h))
                if w_hh.shape[1]:
                    lstm = nn.LSTM(d, w_hh.shape[1], batch_first=True).to(dt)
                    for name, t in zip(("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"),
                                       (w_ih, w_hh, b_ih, b_hh)):
                        getattr(lstm, name).copy_(t)
                    xi = xh[..., h * d:(h + 1) * d]
                    y = lstm(xi if r == 0 else xi.flip(1))[0]
                    ys.append(y if r == 0 else y.flip(1))
            y = torch.cat(ys, -1) if ys else xh.new_zeros(*xh.shape[:2], 0)
            w, b = m.head_proj_params(h)
            heads.append(y.to(x.dtype) @ w.T + b)
        return nn.functional.linear(torch.cat(heads, -1), m.proj.weight, m.proj.bias)


def run_all(m, x):
    """{path: (output, input gradient or None)} for every CPU backend without a gradient and the gradient path."""
    out = {}
    op = far_kernels.ops.bilstm_fused_scan.OP
    for backend in cpu_backends(op):
        if op.reason(backend, x.device) is not None or (backend != "torch" and x.dtype == torch.float64):
            continue  # not built, or computes in fp32 (refused for float64: tests/kernels)
        with torch.no_grad():
            out[backend] = (m(x, backend=backend), None)
    xg = x.clone().requires_grad_(True)
    y = m(xg)
    y.float().square().sum().backward()
    out["grad"] = (y.detach(), xg.grad)
    return out


def fresh(m, storage):
    return far.FARAttention(m.dim, m.num_heads, head_dim=m.head_dim, hidden_sizes=m.hidden_sizes,
                            dim_out=m.proj.out_features, proj_bias=m.proj.bias is not None,
                            dtype=m.pre_proj.weight.dtype, storage=storage)


@pytest.mark.parametrize("seed", range(48))
def test_random_blocks(seed):
    m, x = random_block(seed)
    ref = far_block_oracle(m, x)
    out_pt = same_math(m, x)
    tiny = 16 * torch.finfo(x.dtype).eps * max(1.0, float(ref.abs().max()))
    err_pt = max_err(out_pt, ref)
    padded = run_all(m, x)
    for path, (y, _) in padded.items():
        assert torch.isfinite(y).all() and y.dtype == x.dtype, path
        assert max_err(y, ref) <= 2 * err_pt + tiny, (path, max_err(y, ref), err_pt)
    grads = {n: p.grad for n, p in m.named_parameters()}
    r = fresh(m, "ragged")
    r.load_state_dict({k: v for k, v in m.state_dict().items() if k.startswith(("pre_proj.", "proj."))},
                      strict=False)
    r.load_compact_state(m.compact_state())
    ragged = run_all(r, x)
    masked = m.width > r.width  # the padded operands differ in width: same function, not the same bits
    for path in padded:
        for a, b in zip(padded[path], ragged[path]):
            if a is None or b is None:
                assert a is None and b is None or (a if b is None else b).abs().max() == 0, path
            elif masked:
                assert max_err(a, b) <= tiny * max(1.0, float(a.abs().max())), path
            else:
                assert torch.equal(a, b), path
    state = {k: v.clone() for k, v in m.compact_state().items()}
    for storage in ("padded", "ragged"):  # the per-head accessors and setters are inverses in either storage
        f = fresh(m, storage)
        for h in range(m.num_heads):
            for direction in (0, 1):
                f.set_lstm_params(direction, h, *m.lstm_params(direction, h))
            f.set_head_proj_params(h, *m.head_proj_params(h))
        for key, t in f.compact_state().items():
            assert torch.equal(t, state[key]), (storage, key)
    if masked:  # compaction keeps the function and gives the ragged block's operands
        compact_(m)
        assert m.width == int(m.hidden_sizes.max())
        with torch.no_grad():
            assert torch.equal(m(x, backend="torch"), ragged["torch"][0])
    else:  # the ragged gradients are the padded gradients of the kept units
        with torch.no_grad():
            for name in far.FARAttention.COMPACT_KEYS:
                getattr(m, name).copy_(grads[name] if grads[name] is not None else 0)
        for key, g in m.compact_state().items():
            got = getattr(r.get_submodule(key.split(".")[0]), key.split(".")[1]).grad
            assert torch.equal(got if got is not None else torch.zeros_like(g), g), key
