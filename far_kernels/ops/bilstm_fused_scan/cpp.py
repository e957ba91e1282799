"""cpp backend of bilstm_fused_scan: far_kernels._C.bilstm_fused_scan_cpu (fp32 math; half inputs are widened)."""
from typing import Optional

import torch

from far_kernels._ext import lib as _C


def bilstm_fused_scan_cpp(x: torch.Tensor, w_ih: torch.Tensor, bias: torch.Tensor, w_hh: torch.Tensor,
                          hidden_sizes: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    args = [t.float().contiguous() for t in (x, w_ih, bias, w_hh)]
    if x.dtype == torch.float32:
        return _C.bilstm_fused_scan_cpu(*args, hidden_sizes, out)
    h = _C.bilstm_fused_scan_cpu(*args, hidden_sizes, None)
    return h.to(x.dtype) if out is None else out.copy_(h)
