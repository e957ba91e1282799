"""Argument validation shared by the ops (clear errors before any kernel runs)."""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_float_tensors(op: str, named) -> None:
    """Every (name, t) in `named` is a torch.Tensor of a supported float dtype."""
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOATS:
            raise TypeError(f"{op}: {name} must be float32/float16/bfloat16/float64, got {t.dtype}")


def check_same_device(op: str, ref_name: str, ref: torch.Tensor, named) -> None:
    for name, t in named:
        if t.device != ref.device:
            raise ValueError(f"{op}: {ref_name} is on {ref.device} but {name} is on {t.device}")


def as_hidden_sizes(hidden_sizes, H: int, n: int, op: str) -> torch.Tensor:
    """hidden_sizes as a [2, H] int64 CPU tensor with entries in [0, n] (ValueError/TypeError otherwise)."""
    hs = torch.as_tensor(hidden_sizes)
    if hs.dtype.is_floating_point or hs.dtype == torch.bool or hs.is_complex():
        raise TypeError(f"{op}: hidden_sizes must be integers, got {hs.dtype}")
    if tuple(hs.shape) != (2, H):
        raise ValueError(f"{op}: hidden_sizes must have shape [2, H] = [2, {H}], got {list(hs.shape)}")
    hs = hs.to(device="cpu", dtype=torch.int64).contiguous()
    if H and (hs.min() < 0 or hs.max() > n):
        raise ValueError(f"{op}: hidden_sizes must lie in [0, n] = [0, {n}], got {hs.tolist()}")
    return hs


def check_out(op: str, out, shape, dtype, device) -> None:
    """`out` is a contiguous tensor of this shape, dtype and device."""
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(shape) or out.dtype != dtype \
            or out.device != device or not out.is_contiguous():
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{op}: out must be a contiguous {list(shape)} {dtype} tensor on {device}, got {got}")


def has_tangent(tensors) -> bool:
    """Whether some tensor carries a forward-mode AD tangent (torch.autograd.forward_ad, torch.func.jvp)."""
    return any(fwAD.unpack_dual(t).tangent is not None for t in tensors)


def needs_grad(tensors) -> bool:
    """Whether a derivative must flow through the op: reverse mode (grad mode on and some input requires grad) or
    forward mode (some input carries a tangent). Only the torch backend propagates either: a compiled kernel
    drops a tangent silently."""
    return (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) or has_tangent(tensors)
