"""far_kernels.testing's checks have teeth: no broadcasting between shapes, and the 16-bit rounding check
catches a kernel that rounds h to 16 bits before every recurrent product (which the derived bound lets pass)."""
import pytest
import torch

from far_kernels import bilstm_scan_ref
from far_kernels.testing import assert_close_derived, assert_same_rounding


def test_shapes_must_match():
    z = torch.zeros(3, 4, 5)
    with pytest.raises(AssertionError, match="shapes differ"):
        assert_close_derived(torch.zeros(1), z, z)
    assert_close_derived(z, z.double(), z)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_rounding_check_catches_a_16_bit_recurrent_product(dtype):
    g = torch.Generator().manual_seed(0)
    H, B, T, n = 2, 3, 50, 32
    gx = torch.randn(H, B, T, 2, 4 * n, generator=g).to(dtype)
    w = (torch.randn(H, 2, 4 * n, n, generator=g) / n ** 0.5).to(dtype)
    hs = torch.tensor([[32, 20], [7, 32]])
    ref64 = bilstm_scan_ref(gx.double(), w.double(), hs)
    out_pt = bilstm_scan_ref(gx, w, hs)
    no_split = bilstm_scan_ref(gx, w, hs, product_dtype=dtype)  # h and W_hh rounded to 16 bits per product
    assert_close_derived(no_split, ref64, out_pt)  # the derived bound does not see it ...
    with pytest.raises(AssertionError, match="of the outputs differ from fp32 math rounded once"):
        assert_same_rounding(no_split, out_pt)  # ... this does
    assert assert_same_rounding(out_pt.clone(), out_pt) == 0.0
