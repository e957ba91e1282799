"""Attention reuse (TReX-style): an encoder skips its own attention and takes an earlier encoder's
attention output through a small transformation block.

    apply_reuse(model, {2: 1, 3: 1})   # blocks 2 and 3 reuse block 1's attention output
    model.far_reuse                     # {2: 1, 3: 1}: what far.save records

Mechanics, for a timm ViT (x = x + ls1(attn(norm1(x))) per block): the source block's `ls1` becomes an
AttentionTap that records its input (the attention output after W_O, before any LayerScale) in the
model's ReuseStore and applies the LayerScale it replaced (parameter `gamma` kept, so checkpoint keys do
not change); the reusing block's `attn` becomes a ReuseAttention, which ignores its input and returns
transform(stored output of the source). The transformation block is LayerNorm -> Linear(C, C) -> GELU by
default ("ln-linear-gelu"; "ln-linear" drops the GELU): TReX's paper describes "normalization, linear
layers and activation functions"; the exact layers are not public, so this is an assumption.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn

TRANSFORMS = ("ln-linear-gelu", "ln-linear")


class ReuseStore:
    """Attention outputs of the current forward pass, by source block. Not a module (no parameters, not
    in the state_dict); a deepcopy of the model gets a fresh, empty store shared by its taps and reusers,
    and so does a pickled one (torch.save(model)): no activation of a past batch travels with the model."""

    def __init__(self):
        self.outputs: Dict[int, torch.Tensor] = {}

    def __deepcopy__(self, memo) -> "ReuseStore":
        new = ReuseStore()
        memo[id(self)] = new
        return new

    def __getstate__(self) -> dict:
        return {"outputs": {}}


class AttentionTap(nn.Module):
    """Stands in for a source block's ls1: records x (the attention output) under `source`, then applies
    the LayerScale it replaced (gamma) or nothing."""

    def __init__(self, store: ReuseStore, source: int, gamma: Optional[torch.Tensor] = None):
        super().__init__()
        self.store, self.source = store, source
        if gamma is not None:
            self.gamma = nn.Parameter(gamma.detach().clone())
        else:
            self.register_parameter("gamma", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.store.outputs[self.source] = x
        return x if self.gamma is None else x * self.gamma  # never in place: x is stored

    def extra_repr(self) -> str:
        return f"source={self.source}, layer_scale={self.gamma is not None}"


class Transform(nn.Module):
    """TReX's transformation block: LayerNorm -> Linear(C, C) [-> GELU]."""

    def __init__(self, dim: int, kind: str = "ln-linear-gelu", device=None, dtype=None):
        super().__init__()
        if kind not in TRANSFORMS:
            raise ValueError(f"transform must be one of {', '.join(TRANSFORMS)}, got {kind!r}")
        dd = {"device": device, "dtype": dtype}
        self.kind = kind
        self.norm = nn.LayerNorm(dim, **dd)
        self.linear = nn.Linear(dim, dim, **dd)
        self.act = nn.GELU() if kind == "ln-linear-gelu" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.linear(self.norm(x)))

    @torch.no_grad()
    def center_(self) -> float:
        """Remove from every row of linear.weight its component along the LayerNorm's null direction, in
        place, without changing the function: a normalized row n sums to 0, so LN(x) = g * n + b (g, b the
        LayerNorm's affine) never moves along u = 1/g, and adding c*u to a weight row only adds c*sum(b/g) to
        its output, which the bias takes back. A least-squares fit can put a huge component there (the
        columns of [LN(x), 1] are linearly dependent): weights of ~10^3 that cancel exactly in float but not
        on a quantized crossbar. Returns the Frobenius norm removed (0 when g has a zero: not centred)."""
        w = self.linear.weight
        g = self.norm.weight if self.norm.weight is not None else torch.ones(w.shape[1], device=w.device)
        b = self.norm.bias if self.norm.bias is not None else torch.zeros(w.shape[1], device=w.device)
        if bool((g == 0).any()):
            return 0.0
        u = 1.0 / g.double()
        c = (w.double() @ u) / (u @ u)  # [C_out]: each row's component along u
        removed = c[:, None] * u[None, :]
        w.copy_((w.double() - removed).to(w.dtype))
        if self.linear.bias is not None:
            self.linear.bias.add_((c * (b.double() * u).sum()).to(w.dtype))
        return float(removed.norm())


class ReuseAttention(nn.Module):
    """In place of a block's attention: transform(the source block's attention output of this forward pass)."""

    def __init__(self, store: ReuseStore, source: int, dim: int, kind: str = "ln-linear-gelu", device=None,
                 dtype=None):
        super().__init__()
        self.store, self.source = store, source
        self.transform = Transform(dim, kind, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        a = self.store.outputs.get(self.source)
        if a is None or a.shape != x.shape:
            raise RuntimeError(f"ReuseAttention: block {self.source}'s attention output of this forward pass is missing "
                               "(the source must run before the reusing block)")
        return self.transform(a)

    def extra_repr(self) -> str:
        return f"source={self.source}, transform={self.transform.kind}"


def apply_reuse(model: nn.Module, plan: Dict[int, int], kind: str = "ln-linear-gelu") -> nn.Module:
    """Make every block i of `plan` reuse block plan[i]'s attention output (in place; returns the model).
    A source must come before its reuser and keep its own attention. The model's `far_reuse` is
    {reusing block: source} and its `far_reuse_transform` the transform kind."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no .blocks: attention reuse needs a timm ViT")
    plan = {int(i): int(j) for i, j in plan.items()}
    from timm.models.vision_transformer import Block

    for k in sorted({b for ij in plan.items() for b in ij if 0 <= b < len(blocks)}):
        blk = blocks[k]
        # the tap and ReuseAttention assume Block's x + ls1(attn(norm1(x))): timm's ResPostBlock (x + norm1(attn(x)))
        # and parallel blocks (attention fused with the MLP) have no ls1 to tap or no attention output of its own
        if not isinstance(blk, Block) or type(blk).forward is not Block.forward:
            raise ValueError(f"blocks.{k}: {type(blk).__name__} cannot take part in attention reuse: only timm's "
                             "pre-norm Block (x + ls1(attn(norm1(x)))) can")
    old = dict(getattr(model, "far_reuse", {}) or {})
    both = {**old, **plan}
    for i, j in both.items():
        if not 0 <= j < i < len(blocks):
            raise ValueError(f"block {i} cannot reuse block {j}: the source must be an earlier block (0 <= {j} < {i} "
                             f"< {len(blocks)})")
        if j in both:
            raise ValueError(f"block {j} is a source, so it must keep its own attention (it reuses block {both[j]})")
    store = getattr(model, "far_reuse_store", None)
    if store is None:
        store = model.far_reuse_store = ReuseStore()
    for i, j in sorted(plan.items()):
        src = blocks[j]
        if not isinstance(src.ls1, AttentionTap):
            gamma = getattr(src.ls1, "gamma", None)
            src.ls1 = AttentionTap(store, j, gamma)
        attn = blocks[i].attn
        p = next(attn.parameters(), None)
        dim = blocks[i].norm1.normalized_shape[0]
        blocks[i].attn = ReuseAttention(store, j, dim, kind, device=None if p is None else p.device,
                                        dtype=None if p is None else p.dtype)
    model.far_reuse = both
    model.far_reuse_transform = kind
    return model


def reuse_plan(model: nn.Module) -> Dict[int, int]:
    """{reusing block: source block} of a model (empty for none)."""
    return dict(getattr(model, "far_reuse", {}) or {})


__all__ = ["AttentionTap", "ReuseAttention", "ReuseStore", "TRANSFORMS", "Transform", "apply_reuse", "reuse_plan"]
