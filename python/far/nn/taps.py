"""Taps on a ViT's token mixers: what each block's attention (or FAR block) reads and what it hands to
its output projection W_O, recorded during an ordinary forward pass.

    with MixerTaps(model) as taps:
        model(x)
    inputs, pre_proj = taps.take()     # per block: the mixer's input x [B, N, C] and proj's input [B, N, H*d]

For timm Attention the proj input is the attention output before W_O; for FARAttention it is the
concatenated head_proj outputs (FARAttention.token_mix). Distillation compares the two."""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn


def token_mixers(model: nn.Module) -> List[nn.Module]:
    """The token mixers (timm Attention or FARAttention: `block.attn`) of a timm ViT's blocks, in order.
    ValueError for a model without `.blocks` or a mixer without a `.proj` (W_O)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no .blocks: this needs a timm ViT")
    mixers = [getattr(b, "attn", None) for b in blocks]
    if not mixers or not all(m is not None and hasattr(m, "proj") for m in mixers):
        raise ValueError("every block needs a token mixer .attn with an output projection .proj (W_O)")
    return mixers


class MixerTaps:
    """Records, per block, the token mixer's input (its first positional argument) and the input of its
    proj, on every forward pass; `take()` returns and clears them. A context manager (removes its hooks)."""

    def __init__(self, model: nn.Module, inputs: bool = True, pre_proj: bool = True):
        mixers = token_mixers(model)
        self.inputs: List[Optional[torch.Tensor]] = [None] * len(mixers)
        self.pre_proj: List[Optional[torch.Tensor]] = [None] * len(mixers)
        self._want = (inputs, pre_proj)
        self.handles = []
        for i, m in enumerate(mixers):
            if inputs:
                self.handles.append(m.register_forward_pre_hook(self._store(self.inputs, i)))
            if pre_proj:
                self.handles.append(m.proj.register_forward_pre_hook(self._store(self.pre_proj, i)))

    @staticmethod
    def _store(where: list, i: int):
        def hook(module, args):
            where[i] = args[0]
        return hook

    def take(self):
        """(inputs, pre_proj) lists of the last forward pass (None for what is not tapped); cleared."""
        out = []
        for want, vals in zip(self._want, (self.inputs, self.pre_proj)):
            if want and any(v is None for v in vals):
                raise RuntimeError("a tapped module did not run during the forward pass")
            out.append(list(vals) if want else None)
            vals[:] = [None] * len(vals)
        return tuple(out)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self) -> "MixerTaps":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
