"""cpp backend of bilstm_scan: far_kernels._C.bilstm_scan_cpu (fp32 math; half inputs are widened)."""
from typing import Optional

import torch

from far_kernels._ext import lib as _C


def bilstm_scan_cpp(gx: torch.Tensor, w_hh: torch.Tensor, hidden_sizes: torch.Tensor,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    if gx.dtype == torch.float32:
        return _C.bilstm_scan_cpu(gx.contiguous(), w_hh.float().contiguous(), hidden_sizes, out)
    h = _C.bilstm_scan_cpu(gx.float().contiguous(), w_hh.float().contiguous(), hidden_sizes, None)
    return h.to(gx.dtype) if out is None else out.copy_(h)
