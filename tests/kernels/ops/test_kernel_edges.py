"""Edges of the CPU kernels found by reading them against their references: non-finite recurrent weights at the
first step, a zero LSTM gate that drifted the C++ cell, "max" ADC codes where the fp32 formula stops being
exact, noisy partial sums beyond 2^24, totals past int64, and a malformed call of the fused crossbar epilogue."""
import pytest
import torch

import far_kernels.ops.bilstm_fused_scan as fused_op
import far_kernels.ops.crossbar_matmul as xbar_op
from conftest import assert_close_derived, cpu_backends
from far_kernels import (CrossbarConfig, bilstm_fused_scan, bilstm_fused_scan_ref, bilstm_scan, bilstm_scan_ref,
                         crossbar_matmul, crossbar_matmul_ref, program_crossbar)
from far_kernels.dispatch import BackendUnavailable


@pytest.mark.parametrize("backend", cpu_backends())
def test_nan_or_inf_in_w_hh_is_nan_from_the_first_step(backend):
    # h = 0 at each direction's first step, but 0 * NaN is NaN: the C++ kernel skipped that product and gave
    # finite outputs at t = 0 (forward) and t = T-1 (backward); an inf never became NaN at all
    H, B, T, n, d = 1, 2, 4, 8, 5
    g = torch.Generator().manual_seed(0)
    gx = torch.randn(H, B, T, 2, 4 * n, generator=g)
    w = torch.randn(H, 2, 4 * n, n, generator=g) * 0.3
    w[0, 0, 3, 5] = float("nan")
    w[0, 1, 2, 1] = float("inf")
    hs = torch.tensor([[n], [n]])
    ref = bilstm_scan_ref(gx, w, hs)
    out = bilstm_scan(gx, w, hs, backend=backend)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and not torch.isfinite(ref[0, :, 0, 0]).all()
    if backend in cpu_backends(fused_op.OP):
        x = torch.randn(B, T, H * d, generator=g)
        wi, b = torch.randn(H, 2, 4 * n, d, generator=g), torch.zeros(H, 2, 4 * n)
        ref = bilstm_fused_scan_ref(x, wi, b, w, hs)
        out = bilstm_fused_scan(x, wi, b, w, hs, backend=backend)
        assert torch.equal(torch.isnan(out), torch.isnan(ref))


@pytest.mark.parametrize("backend", cpu_backends())
def test_a_zero_candidate_gate_adds_nothing_to_the_cell(backend):
    # input and forget gates at 1, candidate gate 0: c stays 0 and h = 0 at every step. The C++ cell's 2^r
    # polynomial had the constant 1.00000007 (1 + 2^-23 in fp32), so e^0 != 1, tanh(0) = -3e-8 and c drifted by
    # -6e-8 per step: nothing is forgotten at f = 1, and h was off by 1.1e-5 after 197 steps
    H, B, T, n, d = 2, 3, 197, 16, 4
    g = torch.Generator().manual_seed(0)
    gx = torch.zeros(H, B, T, 2, 4 * n)
    gx[..., :2 * n] = 30.0  # i = f = 1 in fp32
    gx[..., 3 * n:] = torch.randn(H, B, T, 2, n, generator=g)  # any output gate
    w = torch.randn(H, 2, 4 * n, n, generator=g) / n ** 0.5
    w[:, :, 2 * n:3 * n] = 0  # nothing feeds the candidate gate (else h = 0 is an unstable fixed point)
    hs = torch.tensor([[n, 9], [n, n]])
    ref64 = bilstm_scan_ref(gx.double(), w.double(), hs)
    assert_close_derived(bilstm_scan(gx, w, hs, backend=backend), ref64, bilstm_scan_ref(gx, w, hs), backend)
    if backend in cpu_backends(fused_op.OP):  # the fused kernel's cell: the same gates from W_ih x + bias
        x = torch.randn(B, T, H * d, generator=g)
        wi = torch.randn(H, 2, 4 * n, d, generator=g)
        wi[:, :, :3 * n] = 0  # i, f from the bias alone, the candidate gate 0
        b = torch.zeros(H, 2, 4 * n)
        b[..., :2 * n] = 30.0
        ref64 = bilstm_fused_scan_ref(x.double(), wi.double(), b.double(), w.double(), hs)
        assert_close_derived(bilstm_fused_scan(x, wi, b, w, hs, backend=backend), ref64,
                             bilstm_fused_scan_ref(x, wi, b, w, hs), f"fused/{backend}")


def test_max_adc_codes_near_a_half_step_round_as_the_reference():
    # p_max * L = 2^23 - 1 + ...: the fp32 quotient of p L / p_max = 3071.49998 rounded to exactly 3071.5 (-> 3072)
    cfg = CrossbarConfig(weight_bits=2, input_bits=2, cell_bits=1, dac_bits=1, adc_bits=13, adc_range="max",
                         tile_rows=4097)
    assert 2**23 <= cfg.p_max * cfg.adc_levels < 2**24
    K = 4097
    x = torch.zeros(1, K)
    x[0, :3073] = 1.0  # one partial sum p = 3073
    prog = program_crossbar(torch.ones(1, K), cfg)
    ref = crossbar_matmul_ref(x, prog)
    assert ref.item() / (cfg.p_max / cfg.adc_levels) == pytest.approx(3071)
    assert torch.equal(crossbar_matmul(x, prog, backend="torch"), ref)
    assert torch.equal(crossbar_matmul(x, prog), ref)  # auto: cpp refuses the call, torch takes it
    if "cpp" in cpu_backends(xbar_op.OP):
        with pytest.raises(BackendUnavailable, match="p_max \\* L >= 2\\^23"):
            crossbar_matmul(x, prog, backend="cpp")


def test_noisy_codes_beyond_2_24_are_summed_exactly():
    # programming noise makes the partial sums floats, but the ADC codes are integers: their totals passed 2^24 and
    # were summed in fp32 (12 of 64 outputs differed between cpp and torch, 30 from the reference)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 300, generator=g), torch.randn(16, 300, generator=g)
    prog = program_crossbar(w, CrossbarConfig(prog_noise=0.05, adc_bits=24, input_bits=16, dac_bits=4))
    ref = crossbar_matmul_ref(x, prog)
    ran = []
    for backend in cpu_backends(xbar_op.OP):
        try:
            y = crossbar_matmul(x, prog, backend=backend)
        except BackendUnavailable:  # triton's int32 accumulators refuse these totals
            continue
        assert torch.equal(y, ref), backend
        ran.append(backend)
    assert "torch" in ran


def test_totals_past_int64_are_refused():
    # weight and input bits of 16 with one-bit cells and DACs and a 24-bit max ADC: the shift-and-add total passes
    # 2^63 and every backend, the reference included, wrapped around (1200 came out as -848.125)
    cfg = CrossbarConfig(weight_bits=16, input_bits=16, cell_bits=1, dac_bits=1, adc_bits=24, adc_range="max",
                         tile_rows=1)
    prog = program_crossbar(torch.ones(2, 1200), cfg)
    with pytest.raises(ValueError, match="would overflow int64"):
        crossbar_matmul_ref(torch.ones(1, 1200), prog)
    with pytest.raises(ValueError, match="would overflow int64"):
        crossbar_matmul(torch.ones(1, 1200), prog)
    small = program_crossbar(torch.ones(2, 12), cfg)  # the same bits on a short row fit
    assert torch.isfinite(crossbar_matmul_ref(torch.ones(1, 12), small)).all()


def test_fused_epilogue_refuses_a_call_without_weight_slices():
    C = pytest.importorskip("far_kernels._C")
    if not hasattr(C, "crossbar_adc_reduce"):
        pytest.skip("far_kernels._C has no crossbar_adc_reduce")
    G, T, J, m, N = 1, 1, 1, 4, 1024
    e = torch.empty(0)
    with pytest.raises(RuntimeError, match="no weight slice"):  # it read past an empty vector (a segfault)
        C.crossbar_adc_reduce(torch.zeros(G, T, J, m, 0), torch.ones(G, T, J), e, torch.zeros(G, m, N),
                              torch.ones(G, m), torch.ones(G, N), e, e, torch.empty(G, 0), 0, 0, 0, 2, 1.0, 1.0, 1.0,
                              0.0, 0, False)
