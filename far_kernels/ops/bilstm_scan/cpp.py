"""cpp backend of bilstm_scan: far_kernels._C.bilstm_scan_cpu (fp32 math; half inputs are widened)."""
import torch

from far_kernels._ext import _C


def bilstm_scan_cpp(gx: torch.Tensor, w_hh: torch.Tensor, hidden_sizes: torch.Tensor) -> torch.Tensor:
    out = _C.bilstm_scan_cpu(gx.float().contiguous(), w_hh.float().contiguous(), hidden_sizes.contiguous())
    return out if gx.dtype == torch.float32 else out.to(gx.dtype)
