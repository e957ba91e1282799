"""Sizes past the kernels' int32 index arithmetic and grid limits.

Triton passes an int argument below 2^31 as int32, and program ids, loop counters and aranges are int32, so an
offset such as t * (out's step stride) is computed in int32 unless promoted, and wraps. The triton scan keeps
such offsets int32 (an int64 promotion costs registers in its spill-bound sm_90 build) and refuses the sizes that
reach 2^31 (bilstm_scan.triton_index_limit); auto then takes another backend. The strided-out test reaches the
step offset on the smallest tensor that can: a view with a huge step stride into a buffer whose pages are never
touched (8 GiB of address space is reserved, a few KiB are written), in Triton's interpreter, which computes
offsets in the kernel's integer types."""
import importlib.util
import os

import pytest
import torch

from far_kernels import BackendUnavailable, dispatch
from far_kernels.ops import bilstm_fused_scan as fused_op, bilstm_scan as scan_op

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

INT32 = 2 ** 31


def require_interpreter():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the Triton kernels in the interpreter (TRITON_INTERPRET=1, set by tests/conftest.py "
                    "where no CUDA device is present)")


def reserve(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized buffer of numel elements; its untouched pages take no memory."""
    try:
        return torch.empty(numel, dtype=dtype)
    except RuntimeError as e:  # a machine that cannot reserve the address space
        pytest.skip(f"cannot reserve {numel * dtype.itemsize / 2 ** 30:.1f} GiB of address space: {e}")


@needs_triton
@pytest.mark.parametrize("gx_dtype", [torch.float16, torch.float32], ids=["fp16-products", "fp32-products"])
def test_triton_scan_step_offsets_near_2_31(gx_dtype):
    # the kernel stores step t at t * s_ot in int32 (s_ot = out's step stride < 2^31, an int32 argument). It wrote
    # step 2 of s_ot = 2^31 - m at -2m elements, before out (a contiguous out reaches this at (T - 1) 2n >= 2^31,
    # e.g. n = 64, T = 2^24 + 1); such an out is now refused, untouched, and the largest one accepted is written
    # right. Every store is covered: kept units, the zero columns of units in [NP, n) (n = 40 > NP = 32), and a
    # (direction, head) pruned to 0 units.
    require_interpreter()
    from far_kernels.ops.bilstm_scan.triton import bilstm_scan_triton

    H, B, T, n = 2, 1, 3, 40
    hs = torch.tensor([[3, 0], [32, 5]])
    g = torch.Generator().manual_seed(0)
    gx = torch.randn(H, B, T, 2, 4 * n, generator=g).to(gx_dtype)
    w = (torch.randn(H, 2, 4 * n, n, generator=g) / n ** 0.5).to(gx_dtype)
    expected = bilstm_scan_triton(gx, w, hs, torch.empty(H, B, T, 2, n, dtype=torch.float16))

    m = 4 * n  # one step's row of both heads; step t of head h at 2m + t s_ot + 4n h
    s_ot = INT32 - m
    assert (T - 1) * s_ot >= INT32 and 2 * s_ot - 2 ** 32 == -2 * m  # int32 wraps step 2 to -2m
    buf = reserve(2 * m + (T - 1) * s_ot + 2 * m, torch.float16)
    buf[:2 * m].fill_(float("nan"))  # where wrapped offsets land
    out = buf.as_strided((H, B, T, 2, n), (4 * n, 4 * n, s_ot, n, 1), storage_offset=2 * m).fill_(float("nan"))
    with pytest.raises(ValueError, match="offset of the last step into out"):
        bilstm_scan_triton(gx, w, hs, out)
    assert out.isnan().all() and buf[:2 * m].isnan().all(), "a refused call wrote"

    s_ot = (INT32 - 1) // (T - 1)  # the largest step stride accepted: step 2 at 2^31 - 2
    out = buf.as_strided((H, B, T, 2, n), (4 * n, 4 * n, s_ot, n, 1), storage_offset=2 * m).fill_(float("nan"))
    bilstm_scan_triton(gx, w, hs, out)
    assert torch.equal(out, expected), [int(out[:, :, t].isnan().sum()) for t in range(T)]
    assert buf[:2 * m].isnan().all(), "the kernel wrote outside out"


def scan_args(H, B, T, n):
    """bilstm_scan's arguments of these sizes, described without memory (meta tensors)."""
    return (torch.empty(H, B, T, 2, 4 * n, device="meta"), torch.empty(H, 2, 4 * n, n, device="meta"),
            torch.full((2, H), min(n, 64)))


def fused_args(H, B, T, n, d=4):
    return (torch.empty(B, T, H * d, device="meta"), torch.empty(H, 2, 4 * n, d, device="meta"),
            torch.empty(H, 2, 4 * n, device="meta"), torch.empty(H, 2, 4 * n, n, device="meta"),
            torch.full((2, H), min(n, 64)))


@needs_triton
@pytest.mark.parametrize("sizes, refused", [
    ((1, 1, 2 ** 24, 64), None),  # the last step at (T - 1) 2n = 2^31 - 128
    ((1, 1, 2 ** 24 + 1, 64), "offset of the last step into out"),  # ... at 2^31
    ((1, 1, 1, 23170), None),  # W_hh [4n, n] of one (direction, head): 2,147,395,600 elements
    ((1, 1, 1, 23171), "offsets into W_hh"),  # 2,147,580,964 >= 2^31
    ((3, 65535 * 32, 1, 1), None),  # 65535 batch tiles of 32 rows
    ((3, 65535 * 32 + 1, 1, 1), "split the batch"),  # a 65536th: past a CUDA grid's second axis
], ids=["T-fits", "T-past", "n-fits", "n-past", "B-fits", "B-past"])
@pytest.mark.parametrize("op, args", [(scan_op.OP, scan_args), (fused_op.OP, fused_args)], ids=["scan", "fused"])
def test_triton_scan_limits_refuse_what_its_int32_offsets_and_grid_cannot_hold(op, args, sizes, refused):
    # these calls passed the triton backend's limits (only kept units were checked) and then wrapped an int32
    # offset (reading W_hh or writing out before the tensor: a crash in the interpreter at n = 26755) or failed to
    # launch on a GPU (grid (2H, ceil(B / 32)), second axis <= 65535). Now auto moves on and an explicit triton
    # raises with the reason.
    a = args(*sizes)
    why = op.reason("triton", "cuda", a)
    if refused is None:
        assert why is None, why
        return
    assert why is not None and refused in why, why
    with pytest.raises(BackendUnavailable, match=refused):
        dispatch.select(op, "triton", "cuda", torch.float32, args=a)


@needs_triton
def test_triton_scan_default_tile_keeps_the_grid_launchable(monkeypatch):
    # the launcher's default batch tile was 16 off a GPU (and on one with many SMs per head), giving more than
    # 65535 tiles from B = 1,048,561 (a 17 MB gx at T = 1, n = 1). Recorded, not run.
    from far_kernels.ops.bilstm_scan import triton as K

    grids = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: grids.append(grid)

    monkeypatch.setattr(K, "_bilstm_scan_kernel", Recorder())
    H, B = 3, 65535 * 16 + 1
    gx, hs = torch.empty(H, B, 1, 2, 4, dtype=torch.float16), torch.ones(2, H, dtype=torch.int64)
    w = torch.empty(H, 2, 4, 1, dtype=torch.float16)
    K.bilstm_scan_triton(gx, w, hs)
    assert grids == [(2 * H, 32768)], grids
    with pytest.raises(ValueError, match="split the batch"):  # an explicit 16-row tile cannot launch
        K.bilstm_scan_triton(gx, w, hs, block_b=16)


@needs_triton
@pytest.mark.parametrize("N, refused", [(65535 * 128, False), (65535 * 128 + 1, True)], ids=["fits", "past"])
def test_crossbar_triton_limit_refuses_more_column_blocks_than_a_grid_holds(N, refused):
    # the crossbar kernel's GPU grid is (ceil(M / 64), ceil(N / 128)); N = 8,388,481 columns (K = 1: a 34 MB
    # programmed crossbar, M * N < 2^31 for a row) passed every limit and failed to launch ("invalid argument")
    from far_kernels import CrossbarConfig, ProgrammedCrossbar
    from far_kernels.ops.crossbar_matmul import OP
    from far_kernels.ops.crossbar_matmul.program import prepare_call

    cfg = CrossbarConfig()
    levels = torch.empty(cfg.n_weight_slices, N, 1, dtype=torch.int8, device="meta")
    prog = ProgrammedCrossbar(levels, torch.empty(N, device="meta"), cfg, N, 1)
    call = prepare_call(torch.empty(1, 1, device="meta"), prog, consume_read=False)
    why = OP.reason("triton", "cuda", (call,))
    assert (why is not None and "grid" in why) if refused else why is None, why


@pytest.mark.parametrize("sizes, refused", [
    ((256, 1, 1, 1), None), ((257, 1, 1, 1), "at most 256 heads"),  # hidden sizes in the kernel's parameters
    ((1, 2 ** 30 - 1, 1, 1), None), ((1, 2 ** 30, 1, 1), "2 H B < 2^31"),  # int work-item count
    ((1, 1, 2 ** 31 - 1025, 1), None), ((1, 1, 2 ** 31 - 1024, 1), "T < 2^31 - 1024"),  # int t + warps
    ((1, 1, 1, 65535), None), ((1, 1, 1, 65536), "n <= 65535"),  # uint16 hidden sizes
], ids=["H-fits", "H-past", "HB-fits", "HB-past", "T-fits", "T-past", "n-fits", "n-past"])
@pytest.mark.parametrize("op, args", [(scan_op.OP, scan_args), (fused_op.OP, fused_args)], ids=["scan", "fused"])
def test_cuda_scan_limits_let_auto_move_on(monkeypatch, op, args, sizes, refused):
    # the extension refuses these sizes itself (bilstm_scan_cuda), but the dispatcher did not know: auto chose
    # cuda on a CUDA tensor and raised (e.g. 257 heads of one unit, a few bytes of data) instead of taking triton
    # or torch. Every backend available as on a GPU machine, sizes on the meta device.
    monkeypatch.setattr(dispatch, "backend_reason", lambda backend, device="cpu": None)
    a = args(*sizes)
    why = op.reason("cuda", "cuda", a)
    assert (why is None) if refused is None else (why is not None and refused in why), why
    chosen = dispatch.select(op, None, "cuda", torch.float32, args=a)
    assert chosen == "cuda" if refused is None else chosen in ("triton", "torch"), chosen  # triton has limits too


# ---- the zero end: no heads, no units, no inputs (B = 0, T = 0 and pruned heads: tests/kernels/ops/test_bilstm_scan*)
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("H, n, d, kept", [(0, 8, 3, 0), (2, 0, 3, 0), (2, 8, 0, 8), (1, 1, 1, 1)],
                         ids=["no-heads", "no-units", "no-inputs", "one-of-each"])
def test_scans_at_the_zero_end(backend, H, n, d, kept):
    from conftest import assert_close_derived

    why = scan_op.OP.reason(backend, "cpu")
    if why is not None:
        pytest.skip(why)
    B, T = 2, 3
    g = torch.Generator().manual_seed(0)
    gx, w = torch.randn(H, B, T, 2, 4 * n, generator=g), torch.randn(H, 2, 4 * n, n, generator=g)
    hs = torch.full((2, H), kept)
    out = torch.full((H, B, T, 2, n), float("nan"))
    y = scan_op.bilstm_scan(gx, w, hs, backend=backend, out=out)
    assert y.data_ptr() == out.data_ptr() or out.numel() == 0
    assert_close_derived(y, scan_op.bilstm_scan_ref(gx.double(), w.double(), hs), scan_op.bilstm_scan_ref(gx, w, hs),
                         backend)
    x, w_ih = torch.randn(B, T, H * d, generator=g), torch.randn(H, 2, 4 * n, d, generator=g)
    bias = torch.randn(H, 2, 4 * n, generator=g)
    y = fused_op.bilstm_fused_scan(x, w_ih, bias, w, hs, backend=backend)
    ref64 = fused_op.bilstm_fused_scan_ref(x.double(), w_ih.double(), bias.double(), w.double(), hs)
    assert_close_derived(y, ref64, fused_op.bilstm_fused_scan_ref(x, w_ih, bias, w, hs), f"fused/{backend}")


def test_cuda_scan_host_refuses_steps_its_int_loop_would_pass_2_31(tmp_path):
    # write_pruned_zeros steps `int t` by the block's warps (up to 32): from T = 2^31 - 32 its last step passed
    # 2^31 (signed overflow, stores at negative steps). The launcher accepted T up to 2^31 - 1; it now refuses
    # T >= 2^31 - 1024 before reading anything (null data pointers here: the emulated launcher, the GPU's source).
    from far_kernels import cuda_emu

    why = cuda_emu.unavailable_reason()
    if why:
        pytest.skip(f"CUDA emulation unavailable: {why}")
    lib = cuda_emu.load(tmp_path)
    hs = torch.ones(2, 1, dtype=torch.int64)
    err = lib.far_emu_bilstm_scan(0, None, None, hs.data_ptr(), None, 1, 1, 2 ** 31 - 1024, 1, 0, 0, 132, 1, 232448,
                                  0, 0.0, 0)
    assert err is not None and b"T < 2^31 - 1024" in err, err


TR = 2 ** 20  # the largest tile: few tiles, so the int32 accumulators' bound stays small at K ~ 2^31


@needs_triton
@pytest.mark.parametrize("K, refused", [(2 ** 31 - 1 - TR - 256, False), (2 ** 31 - TR - 256, True)],
                         ids=["fits", "past"])
def test_crossbar_triton_limit_refuses_row_indices_past_2_31(K, refused):
    # one-bit weight and input slices (S = J = 1), a 2-bit granular ADC and 2^20-row tiles keep every other limit
    # (S N K, M K, the accumulators: 2048 tiles x code 1) below 2^31 up to K = 2^31 - 1 for one row and column,
    # but the kernel's int32 row indices (tile ends (t + 1) tile_rows, loads t tile_rows + sub BK + r, the offset
    # loop's k0 += BK) run up to a tile and two 128-row blocks past K and wrapped
    from far_kernels import CrossbarConfig, ProgrammedCrossbar
    from far_kernels.ops.crossbar_matmul import OP
    from far_kernels.ops.crossbar_matmul.program import prepare_call

    cfg = CrossbarConfig(weight_bits=2, cell_bits=1, input_bits=2, dac_bits=1, adc_bits=2, adc_range="granular",
                         tile_rows=TR)
    assert cfg.n_weight_slices == cfg.n_input_slices == 1
    prog = ProgrammedCrossbar(torch.empty(1, 1, K, dtype=torch.int8, device="meta"), torch.empty(1, device="meta"),
                              cfg, 1, K)
    why = OP.reason("triton", "cuda", (prepare_call(torch.empty(1, K, device="meta"), prog, consume_read=False),))
    assert (why is not None and "row indices" in why) if refused else why is None, why
