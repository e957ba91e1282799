"""far.convert: replace every timm Attention of a model by a FARAttention (in place)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn as nn

import far_kernels
from far.errors import ConfigError
from far.nn import FARAttention


def attention_classes() -> tuple:
    """The timm self-attention classes far.convert replaces (timm.layers.Attention and the
    vision_transformer module's, where they differ)."""
    from timm.layers import Attention as LayersAttention

    classes = {LayersAttention}
    try:
        from timm.models.vision_transformer import Attention as VitAttention

        classes.add(VitAttention)
    except ImportError:
        pass
    return tuple(classes)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def mixer_params(model: nn.Module) -> int:
    """Parameters of a ViT's token mixers (`block.attn`: attention's qkv and proj; a FAR block's pre_proj,
    LSTMs, head_proj and proj counting kept units only; a reuse block's transformation): the part FAR
    replaces."""
    total = 0
    for blk in getattr(model, "blocks", []):
        m = blk.attn
        if isinstance(m, FARAttention):
            total += m.num_lstm_params() + count_params(m.pre_proj) + count_params(m.proj)
        else:
            total += count_params(m)
    return total


def param_counts(model: nn.Module) -> dict:
    """Two honest counts, of the whole model and of its token mixers (`block.attn`):
    kept: the parameters the model has — a pruned FAR block's kept units only; what a checkpoint stores;
    stored: the parameters held in memory — a pruned FAR block's tensors are padded to its widest
    (head, direction) so that all heads run as one batched GEMM (the padding is exactly zero).
    Returns {"kept", "stored", "mixer_kept", "mixer_stored"}."""
    stored = count_params(model)
    padding = 0
    for m in model.modules():
        if isinstance(m, FARAttention):
            padded = sum(getattr(m, n).numel() for n in FARAttention.COMPACT_KEYS)
            padding += padded - m.num_lstm_params()
    mixer_stored = sum(count_params(blk.attn) for blk in getattr(model, "blocks", []))
    return {"kept": stored - padding, "stored": stored, "mixer_kept": mixer_params(model), "mixer_stored": mixer_stored}


@dataclass
class ConversionReport:
    """Parameter counts per converted block: the attention's (qkv + proj) vs FAR's (pre_proj + LSTMs +
    head_proj + proj, kept units only)."""

    rows: list = field(default_factory=list)  # (name, attention params, FAR params)

    @property
    def attention_total(self) -> int:
        return sum(r[1] for r in self.rows)

    @property
    def far_total(self) -> int:
        return sum(r[2] for r in self.rows)

    def table(self) -> str:
        w = max([len(r[0]) for r in self.rows] + [5])
        lines = [f"{'block':<{w}}  {'attention':>10}  {'FAR':>10}  {'ratio':>6}"]
        for name, a, f in self.rows:
            lines.append(f"{name:<{w}}  {a:>10,}  {f:>10,}  {f / max(a, 1):>6.2f}")
        lines.append(f"{'total':<{w}}  {self.attention_total:>10,}  {self.far_total:>10,}  "
                     f"{self.far_total / max(self.attention_total, 1):>6.2f}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def far_param_count(m: FARAttention) -> int:
    """FAR block parameters with kept units only (pre_proj + LSTMs + head_proj + proj)."""
    return count_params(m.pre_proj) + m.num_lstm_params() + count_params(m.proj)


def convert(
    model: nn.Module,
    hidden_sizes=None,
    init: str = "value",
    backend: Optional[str] = None,
    verbose: bool = False,
) -> nn.Module:
    """Replace every timm `Attention` in `model` by a `FARAttention`; returns the same model.

    Args:
        model: a timm VisionTransformer (DeiT tiny/small/base, other ViTs built on timm's Attention).
        hidden_sizes: None (units = head_dim), an int, or a list with one [2, H] entry per block in
            model order (a pruned model's sizes).
        init: "value" initialises pre_proj from the attention's value projection (the part of
            qkv that the attention output is a mix of); "random" keeps nn.Linear's init.
        backend: scan backend stored on every FAR module (None = env FAR_BACKEND / auto).
        verbose: print the parameter table.
    The attention's own output projection (proj, W_O) and proj_drop are reused, not copied.
    The report (attention vs FAR parameters per block and total) is at `model.far_conversion`.
    """
    if init not in ("value", "random"):
        raise ConfigError(f"init must be 'value' or 'random', got {init!r}")
    classes = attention_classes()
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, classes)]
    if not targets:
        raise ConfigError(f"{type(model).__name__} has no timm Attention module to convert "
                         "(already converted, or not a timm ViT)")
    if hidden_sizes is not None and not isinstance(hidden_sizes, int):
        if len(hidden_sizes) != len(targets):
            raise ConfigError(f"hidden_sizes has {len(hidden_sizes)} entries but the model has {len(targets)} "
                             "attention blocks")
    report = ConversionReport()
    for idx, (name, attn) in enumerate(targets):
        if getattr(attn, "gate", None) is not None:
            raise NotImplementedError(f"{name}: gated attention is not supported by FAR conversion")
        if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
            raise NotImplementedError(f"{name}: attention with scale_norm is not supported by FAR conversion")
        hs = hidden_sizes if hidden_sizes is None or isinstance(hidden_sizes, int) else hidden_sizes[idx]
        w = attn.qkv.weight
        far = FARAttention(
            dim=attn.qkv.in_features,
            num_heads=attn.num_heads,
            head_dim=attn.head_dim,
            hidden_sizes=hs,
            dim_out=attn.proj.out_features,
            proj_bias=attn.proj.bias is not None,
            backend=backend,
            device=w.device,
            dtype=w.dtype,
        )
        far.proj = attn.proj
        far.proj_drop = attn.proj_drop
        if init == "value":
            A = far.attn_dim
            with torch.no_grad():
                far.pre_proj.weight.copy_(attn.qkv.weight[2 * A:3 * A])
                if attn.qkv.bias is not None:
                    far.pre_proj.bias.copy_(attn.qkv.bias[2 * A:3 * A])
                else:
                    far.pre_proj.bias.zero_()
        far.train(attn.training)
        report.rows.append((name, count_params(attn), far_param_count(far)))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, far)
    model.far_conversion = report
    if verbose:
        print(report.table())
    return model


def far_modules(model: nn.Module):
    """[(name, FARAttention)] in model order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FARAttention)]


def set_backend(model: nn.Module, backend: Optional[str]) -> nn.Module:
    """Set the scan backend of every FARAttention in `model` (None = env FAR_BACKEND / auto)."""
    if backend is not None:
        far_kernels.requested_backend(backend)  # validates the name
    for _, m in far_modules(model):
        m.backend = backend
    return model
