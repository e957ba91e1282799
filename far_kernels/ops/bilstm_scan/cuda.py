"""cuda backend of bilstm_scan: far_kernels._C.bilstm_scan_cuda, one persistent launch for every
(direction, head, batch tile); fp32 state; fp32/fp16/bf16 gates (csrc/cuda/bilstm_cuda.cu).

Two switches (environment, read per call) pick the kernel variant; the defaults are the tested ones:
  FAR_CUDA_SCAN_PATH = auto | fma | mma
      auto: tensor cores (mma.sync, h and W_hh rounded to the input dtype, fp32 accumulate) for
      fp16/bf16 when B >= 16, else fp32 FMA (exact fp32 math); fp32 inputs always use fma.
  FAR_CUDA_FAST_TANH = 0 | 1
      1: tanh.approx.f32 activations (one MUFU op each, relative error ~2^-11) instead of the
      ex2/rcp form (~1e-7). Faster at large batch, less accurate: off by default.
"""
import os
from typing import Optional

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from far_kernels._ext import lib as _C

PATHS = {"auto": 0, "fma": 1, "mma": 2}


def scan_path() -> int:
    name = os.environ.get("FAR_CUDA_SCAN_PATH", "auto").strip().lower()
    if name not in PATHS:
        raise ValueError(f"env FAR_CUDA_SCAN_PATH='{name}': choose one of {', '.join(PATHS)}")
    return PATHS[name]


def fast_tanh() -> bool:
    v = os.environ.get("FAR_CUDA_FAST_TANH", "0").strip().lower()
    if v not in ("0", "1", "false", "true", ""):
        raise ValueError(f"env FAR_CUDA_FAST_TANH='{v}': use 0 or 1")
    return v in ("1", "true")


def uses_tensor_cores(dtype: torch.dtype, batch: int, max_hidden: int = 64) -> bool:
    """Whether a call with gates of `dtype`, `batch` rows and kept sizes up to `max_hidden` runs the mma path
    (h and W_hh rounded to the dtype for the product), under the current FAR_CUDA_SCAN_PATH; sizes above 64
    run the simple fp32 kernel."""
    path = scan_path()
    half = dtype in (torch.float16, torch.bfloat16)
    return half and max_hidden <= 64 and (path == PATHS["mma"] or (path == PATHS["auto"] and batch >= 16))


# fp32 copies of non-fp32 / non-contiguous W_hh, one per source tensor and CUDA stream, remade when it changes
# (its version counter moves; a write through .data moves no counter and is not seen): a fp16 model would
# otherwise convert W_hh on every call. Per stream: a copy is made on the stream that reads it, so no kernel
# reads a copy still being written on another stream, and no copy is freed (entry replaced) while another
# stream's kernel reads it. None is stored while a CUDA graph is being captured (its copy would exist only on
# replay). Weak keys: no tensor is kept alive.
_W32 = WeakTensorKeyDictionary()


def _stream_of(device: torch.device):
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _w_hh_fp32(w_hh: torch.Tensor) -> torch.Tensor:
    if w_hh.dtype == torch.float32 and w_hh.is_contiguous():
        return w_hh
    try:
        version = w_hh._version
    except RuntimeError:  # an inference tensor has no version counter: cannot tell a change, no cache
        return w_hh.float().contiguous()
    key = (version, w_hh.data_ptr(), w_hh.dtype, tuple(w_hh.shape), w_hh.stride(), w_hh.device)
    stream = _stream_of(w_hh.device)
    per_stream = _W32.get(w_hh)
    hit = per_stream.get(stream) if per_stream is not None else None
    if hit is not None and hit[0] == key:
        return hit[1]
    w32 = w_hh.detach().float().contiguous()
    if not _capturing(w_hh.device):
        if per_stream is None:
            per_stream = _W32[w_hh] = {}
        per_stream[stream] = (key, w32)
    return w32


def bilstm_scan_cuda(gx: torch.Tensor, w_hh: torch.Tensor, hidden_sizes: torch.Tensor,
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
    # gx [H, B, T, 2, 4n], w_hh [H, 2, 4n, n] (fp32 in the kernel), hidden_sizes [2, H] int64 CPU
    return _C.bilstm_scan_cuda(gx.contiguous(), _w_hh_fp32(w_hh), hidden_sizes, out, scan_path(), fast_tanh())
