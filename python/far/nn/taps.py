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


def token_mixers(model: nn.Module, need_proj: bool = True) -> List[nn.Module]:
    """The token mixers (timm Attention, FARAttention, ReuseAttention: `block.attn`) of a timm ViT's
    blocks, in order. ValueError for a model without `.blocks`, or (need_proj) a mixer without `.proj` (W_O)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no .blocks: this needs a timm ViT")
    mixers = [getattr(b, "attn", None) for b in blocks]
    if not mixers or any(m is None for m in mixers) or (need_proj and not all(hasattr(m, "proj") for m in mixers)):
        raise ValueError("every block needs a token mixer .attn" + (" with an output projection .proj (W_O)"
                                                                    if need_proj else ""))
    return mixers


class MixerTaps:
    """Records, per block, the token mixer's input (its first positional argument), the input of its
    proj and (outputs=True) the mixer's output (after W_O), on every forward pass; `take()` returns and
    clears them. A context manager (removes its hooks)."""

    def __init__(self, model: nn.Module, inputs: bool = True, pre_proj: bool = True, outputs: bool = False):
        mixers = token_mixers(model, need_proj=pre_proj)
        self.inputs: List[Optional[torch.Tensor]] = [None] * len(mixers)
        self.pre_proj: List[Optional[torch.Tensor]] = [None] * len(mixers)
        self.outputs: List[Optional[torch.Tensor]] = [None] * len(mixers)
        self._want = (inputs, pre_proj, outputs)
        self.handles = []
        for i, m in enumerate(mixers):
            if inputs:
                self.handles.append(m.register_forward_pre_hook(self._store(self.inputs, i)))
            if pre_proj:
                self.handles.append(m.proj.register_forward_pre_hook(self._store(self.pre_proj, i)))
            if outputs:
                self.handles.append(m.register_forward_hook(self._store_out(self.outputs, i)))

    @staticmethod
    def _store(where: list, i: int):
        def hook(module, args):
            where[i] = args[0]
        return hook

    @staticmethod
    def _store_out(where: list, i: int):
        def hook(module, args, out):
            where[i] = out
        return hook

    def take(self):
        """(inputs, pre_proj) lists of the last forward pass (None for what is not tapped), plus outputs
        when tapped; cleared."""
        out = []
        for want, vals in zip(self._want, (self.inputs, self.pre_proj, self.outputs)):
            if want and any(v is None for v in vals):
                raise RuntimeError("a tapped module did not run during the forward pass")
            out.append(list(vals) if want else None)
            vals[:] = [None] * len(vals)
        return tuple(out) if self._want[2] else tuple(out[:2])

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self) -> "MixerTaps":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
