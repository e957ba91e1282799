"""cuda backend of bilstm_scan: far_kernels._C.bilstm_scan_cuda (fp32 state, fp32/fp16/bf16 gates)."""
from typing import Optional

import torch

from far_kernels._ext import _C


def bilstm_scan_cuda(gx: torch.Tensor, w_hh: torch.Tensor, hidden_sizes: torch.Tensor,
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _C.bilstm_scan_cuda(gx.contiguous(), w_hh.float().contiguous(), hidden_sizes, out)
