"""The parts of the scan's cuda path that run on the host, tested without a GPU: the reference's
product_dtype (the mma path's "same math in PyTorch", the tolerance of every cuda test and benchmark
check) and the wrapper's cached fp32 copy of W_hh."""
import torch

from far_kernels import bilstm_scan_ref
from far_kernels.ops.bilstm_scan import cuda as cuda_wrapper


def inputs(seed, H=2, B=3, T=7, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(H, B, T, 2, 4 * n, generator=g), torch.randn(H, 2, 4 * n, n, generator=g) / n ** 0.5


def test_product_dtype_rounds_h_and_w_hh_before_each_product():
    gx, w = inputs(0)
    hs = torch.tensor([[8, 5], [3, 8]])
    plain = bilstm_scan_ref(gx, w, hs)
    assert torch.equal(bilstm_scan_ref(gx, w, hs, product_dtype=torch.float32), plain)
    # weights exact in fp16 change nothing at T = 1 (h_0 = 0); inexact ones do once h != 0
    w16 = w.half().float()
    assert torch.equal(bilstm_scan_ref(gx[:, :, :1], w16, hs, product_dtype=torch.float16),
                       bilstm_scan_ref(gx[:, :, :1], w16, hs))
    half = bilstm_scan_ref(gx, w, hs, product_dtype=torch.float16)
    bf = bilstm_scan_ref(gx, w, hs, product_dtype=torch.bfloat16)
    e16, ebf = (half - plain).abs().max().item(), (bf - plain).abs().max().item()
    assert 0 < e16 < ebf < 0.05  # bf16 has 3 fewer mantissa bits than fp16


def test_w_hh_fp32_copy_is_cached_and_follows_in_place_changes():
    _, w = inputs(1)
    w32 = w.clone()
    assert cuda_wrapper._w_hh_fp32(w32) is w32  # fp32 contiguous: no copy
    wb = w.to(torch.bfloat16)
    first = cuda_wrapper._w_hh_fp32(wb)
    assert first.dtype == torch.float32 and torch.equal(first, wb.float())
    assert cuda_wrapper._w_hh_fp32(wb) is first  # cached: no conversion per call
    wb.mul_(-0.5)  # in place: the version counter moves, the copy is remade
    again = cuda_wrapper._w_hh_fp32(wb)
    assert again is not first and torch.equal(again, wb.float())
    view = wb.transpose(-1, -2)  # another tensor (a view): its own entry, right values
    assert torch.equal(cuda_wrapper._w_hh_fp32(view), view.float())
    with torch.inference_mode():  # inference tensors have no version counter: converted, not cached
        wi = w.to(torch.float16)
        assert torch.equal(cuda_wrapper._w_hh_fp32(wi), wi.float())


def test_w_hh_fp32_copy_is_per_stream_and_not_cached_while_capturing(monkeypatch):
    """A copy is read only on the stream that made it (no cross-stream read of a copy in flight, no copy freed
    under another stream's kernel), and none is stored during CUDA graph capture (it would exist only on replay)."""
    _, w = inputs(2)
    wb = w.to(torch.float16)
    stream = {"id": 1}
    monkeypatch.setattr(cuda_wrapper, "_stream_of", lambda device: stream["id"])
    on1 = cuda_wrapper._w_hh_fp32(wb)
    stream["id"] = 2
    on2 = cuda_wrapper._w_hh_fp32(wb)
    assert on2 is not on1 and torch.equal(on2, on1)  # stream 2 converts its own
    assert cuda_wrapper._w_hh_fp32(wb) is on2
    stream["id"] = 1
    assert cuda_wrapper._w_hh_fp32(wb) is on1  # stream 1's copy was kept, not replaced
    monkeypatch.setattr(cuda_wrapper, "_capturing", lambda device: True)
    stream["id"] = 3
    captured = cuda_wrapper._w_hh_fp32(wb)
    assert torch.equal(captured, wb.float()) and cuda_wrapper._w_hh_fp32(wb) is not captured  # not stored
    monkeypatch.setattr(cuda_wrapper, "_capturing", lambda device: False)
    stream["id"] = 1
    assert cuda_wrapper._w_hh_fp32(wb) is on1


def test_uses_tensor_cores_follows_the_kernels_rule(monkeypatch):
    """The launcher's rule (csrc/cuda/bilstm_cuda.cu dispatch): mma for 16-bit inputs when forced or, under
    auto, from B = 16 on; float32 and kept sizes above 64 never."""
    f = cuda_wrapper.uses_tensor_cores
    monkeypatch.setenv("FAR_CUDA_SCAN_PATH", "auto")
    assert f(torch.float16, 16) and f(torch.bfloat16, 64) and not f(torch.float16, 15)
    assert not f(torch.float32, 64) and not f(torch.float16, 64, max_hidden=96)
    monkeypatch.setenv("FAR_CUDA_SCAN_PATH", "mma")
    assert f(torch.bfloat16, 1) and not f(torch.float32, 1)
    monkeypatch.setenv("FAR_CUDA_SCAN_PATH", "fma")
    assert not f(torch.float16, 256)
