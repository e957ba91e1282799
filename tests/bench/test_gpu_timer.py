"""bench/common.py GpuTimer on a GPU: a CUDA graph of a fp16 cuda scan holds the kernel alone. The wrapper caches
the fp32 copy of a 16-bit W_hh per stream and stores nothing while capturing (far_kernels/ops/bilstm_scan/cuda.py);
the timer warms up on the stream it captures on, so the capture hits that cache. (torch.cuda.graph's own
capture stream had never run the call: every replay converted W_hh again, inside the timed region.)"""
import pytest
import torch

import far_kernels
from conftest import load_bench, require_backend

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def _cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    require_backend("cuda", "cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_graph_replays_read_the_cached_fp32_weights(dtype):
    from far_kernels.ops.bilstm_scan import cuda as scan_cuda

    common = load_bench("common")
    H, B, T, n = 2, 4, 9, 16
    g = torch.Generator().manual_seed(3)
    gx = torch.randn(H, B, T, 2, 4 * n, generator=g).to(device="cuda", dtype=dtype)
    w = (torch.randn(H, 2, 4 * n, n, generator=g) / n ** 0.5).to(device="cuda", dtype=dtype)
    hs = torch.full((2, H), n)
    out = torch.full((H, B, T, 2, n), float("nan"), device="cuda", dtype=dtype)
    with torch.inference_mode():
        t = common.GpuTimer(lambda: far_kernels.bilstm_scan(gx, w, hs, backend="cuda", out=out), "cuda")
        assert t.method == "cuda_graph" and t.graph1 is not None
        key, cached = scan_cuda._W32[w][t.stream.cuda_stream]  # filled by the warm-up on the capture stream
        out.fill_(float("nan"))
        t.graph1.replay()
        torch.cuda.synchronize()
        assert bool(torch.isfinite(out).all())
        cached.zero_()  # a graph that reads the cached copy now computes with W_hh = 0; one that converts does not
        t.graph1.replay()
        torch.cuda.synchronize()
        with_zero_w = far_kernels.bilstm_scan(gx, torch.zeros_like(w), hs, backend="cuda")
    torch.testing.assert_close(out, with_zero_w, rtol=0, atol=0)
