"""far.convert: replace the timm Attentions of a model (every one, or chosen blocks) by FARAttentions (in place)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

import far_kernels
from far.checkpoint import ARCH_LIMITS
from far.errors import ConfigError
from far.nn import FARAttention
from far.nn.far_attention import as_hidden_sizes


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


def attention_pool_classes() -> tuple:
    """timm's attention-pooling heads (VisionTransformer global_pool "map": AttentionPoolLatent; "prr":
    AttentionPoolPrr, in timm versions that have it): q@k^T and attn@v inside a head, which far.convert leaves
    as they are."""
    import timm.layers.attention_pool as pools

    return tuple(c for c in (getattr(pools, "AttentionPoolLatent", None), getattr(pools, "AttentionPoolPrr", None))
                 if c is not None)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside torch.compile / DataParallel / DistributedDataParallel wrappers."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def mixer_params(model: nn.Module) -> int:
    """Parameters of a ViT's token mixers (`block.attn`: attention's qkv and proj; a FAR block's pre_proj,
    LSTMs, head_proj and proj counting kept units only; a reuse block's transformation): the part FAR
    replaces."""
    total = 0
    for blk in getattr(unwrap(model), "blocks", []):
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
    (head, direction) so that all heads run as one batched GEMM (the padding is exactly zero), unless
    its storage is "ragged" (far.models.set_storage): then stored = kept.
    Returns {"kept", "stored", "mixer_kept", "mixer_stored"} (of the model inside a DDP / compile wrapper)."""
    model = unwrap(model)
    stored = count_params(model)
    padding = 0
    for m in model.modules():
        if isinstance(m, FARAttention):
            padding += sum(p.numel() for p in m.lstm_storage().values()) - m.num_lstm_params()
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


PRE_PROJ_INITS = ("v", "random")


def parse_blocks(text: str) -> List[int]:
    """'0-5' -> [0, 1, 2, 3, 4, 5]; '0,2,4-6' -> [0, 2, 4, 5, 6] (sorted, no repeats): the block lists of
    --replace. ConfigError for anything else."""
    out = set()
    for item in str(text).split(","):
        a, sep, b = item.strip().partition("-")
        if not a.strip().isdigit() or (sep and not b.strip().isdigit()):
            raise ConfigError(f"block list: expected indices and ranges like 0-5 or 0,2,4-6, got {item.strip()!r}")
        lo, hi = int(a), int(b) if sep else int(a)
        if hi < lo:
            raise ConfigError(f"block list: range {item.strip()!r} runs backwards")
        out.update(range(lo, hi + 1))
    return sorted(out)


def _targets(model: nn.Module, blocks) -> list:
    """[(name, attention)] to convert: every timm Attention (blocks None), or those of the given blocks
    (int: index into model.blocks; str: the attention's module name)."""
    classes = attention_classes()
    every = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, classes)]
    if blocks is None:
        return every
    if isinstance(blocks, (str, int)):
        raise ConfigError(f"blocks must be a list of block indices or attention names, got {blocks!r}")
    if not len(blocks):
        raise ConfigError("blocks is empty: name at least one block to convert (None converts every one)")
    by_name = dict(every)
    seq = getattr(model, "blocks", None)
    out, seen = [], set()
    for b in blocks:
        if isinstance(b, bool) or not isinstance(b, (int, str)):
            raise ConfigError(f"blocks: entries are block indices or attention module names, got {b!r}")
        if isinstance(b, int):
            if seq is None:
                raise ConfigError(f"{type(model).__name__} has no .blocks: name the attention modules instead")
            if not 0 <= b < len(seq):
                raise ConfigError(f"block {b} does not exist: the model has blocks 0-{len(seq) - 1}")
            inside = [n for n in by_name if n.startswith(f"blocks.{b}.")]
            if not inside:
                raise ConfigError(f"block {b} has no timm Attention to convert (already converted?)")
            names = inside
        else:
            if b not in by_name:
                raise ConfigError(f"'{b}' is not a timm Attention module of the model (already converted?)")
            names = [b]
        for n in names:
            if n not in seen:
                seen.add(n)
                out.append((n, by_name[n]))
    order = {n: i for i, (n, _) in enumerate(every)}
    return sorted(out, key=lambda t: order[t[0]])


def convert(
    model: nn.Module,
    hidden_sizes=None,
    init: Optional[str] = None,
    backend: Optional[str] = None,
    verbose: bool = False,
    *,
    blocks: Optional[Sequence] = None,
    pre_proj_init: Optional[str] = None,
) -> nn.Module:
    """Replace the timm `Attention`s of `model` (every one, or those of `blocks`) by `FARAttention`s;
    returns the same model.

    Args:
        model: a timm VisionTransformer (DeiT tiny/small/base, other ViTs built on timm's Attention).
        hidden_sizes: None (units = head_dim), an int, or a list with one entry per converted block in
            model order: an int (that block's units per head and direction) or a [2, H] (a pruned model's sizes).
        blocks: None converts every attention; a list converts only those blocks (int: index into
            model.blocks, e.g. range(6) or far.models.parse_blocks("0-5"); str: an attention's module
            name). The other blocks keep their attention (a partial FAR model).
        pre_proj_init: "v" (default) initialises pre_proj from the attention's value projection (the
            part of qkv the attention output is a mix of); "random" keeps nn.Linear's initialisation,
            as the FAR authors' public code does.
        init: the older name of pre_proj_init ("value" = "v", or "random").
        backend: scan backend stored on every FAR module (None = env FAR_BACKEND / auto).
        verbose: print the parameter table.
    The attention's own output projection (proj, W_O) and proj_drop are reused, not copied.
    The report (attention vs FAR parameters per block and total) is at `model.far_conversion`.
    """
    if init is not None and pre_proj_init is not None:
        raise ConfigError("give pre_proj_init or its older name init, not both")
    mode = pre_proj_init if pre_proj_init is not None else {"value": "v"}.get(init, init) if init else "v"
    if mode not in PRE_PROJ_INITS:
        raise ConfigError(f"pre_proj_init must be 'v' (from the value projection) or 'random', got {mode!r}")
    targets = _targets(model, blocks)
    if not targets:
        depth = len(getattr(model, "blocks", ()) or ())
        raise ConfigError(f"{type(model).__name__} has no timm Attention module to convert "
                          + ("(it has no blocks: depth 0)" if hasattr(model, "blocks") and depth == 0 else
                             "(already converted, or not a timm ViT)"))
    if hidden_sizes is not None and not isinstance(hidden_sizes, int):
        if not isinstance(hidden_sizes, (list, tuple)):
            raise ConfigError(f"hidden_sizes must be an int, a list of one per converted block (ints or [2, H] "
                              f"nested lists) or None, got {type(hidden_sizes).__name__} {hidden_sizes!r}")
        if len(hidden_sizes) != len(targets):
            raise ConfigError(f"hidden_sizes has {len(hidden_sizes)} entries but {len(targets)} attention "
                              "block(s) are converted")
    # every size checked before the first block is converted (an error half-way left a half-converted model)
    lo, hi = ARCH_LIMITS["hidden_size"]
    for idx, hs in enumerate([hidden_sizes] if hidden_sizes is None or isinstance(hidden_sizes, int)
                             else hidden_sizes):
        if hs is None:
            continue
        try:
            t = torch.as_tensor(hs)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ConfigError(f"hidden_sizes entry {idx}: {hs!r} is not a number or a [2, H] table ({e})") from None
        if t.dtype == torch.bool or t.is_complex() or (t.is_floating_point() and not bool((t == t.round()).all())):
            raise ConfigError(f"hidden_sizes entry {idx}: units must be whole numbers, got {hs!r}")
        if t.numel() and not bool(((t >= lo) & (t <= hi)).all()):
            raise ConfigError(f"hidden_sizes entry {idx}: units must lie in [{lo}, {hi}], got {hs!r}")
        attn = targets[idx][1] if idx < len(targets) else None
        if attn is not None and t.dim() > 0:  # a table: its shape, against this block's heads
            try:
                as_hidden_sizes(hs, attn.num_heads, attn.head_dim)
            except ValueError as e:
                raise ConfigError(f"hidden_sizes entry {idx} ({targets[idx][0]}): {e}") from None
    for name, attn in targets:  # before any block is replaced, as the sizes are
        if getattr(attn, "gate", None) is not None:
            raise ConfigError(f"{name}: gated attention is not supported by FAR conversion")
        if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
            raise ConfigError(f"{name}: attention with scale_norm is not supported by FAR conversion")
    report = ConversionReport()
    for idx, (name, attn) in enumerate(targets):
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
        if mode == "v":
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


def set_storage(model: nn.Module, storage: str) -> nn.Module:
    """Convert every FARAttention of `model` in place to storage "padded" (the default: tensors padded to each
    block's widest (head, direction); pruning needs it) or "ragged" (kept units only in memory; each forward
    gathers the padded operands). Outputs are identical. Returns the model; build optimizers afterwards."""
    from far.nn.far_attention import STORAGES

    if storage not in STORAGES:
        raise ConfigError(f"storage must be one of {', '.join(STORAGES)}, got {storage!r}")
    for _, m in far_modules(model):
        m.set_storage(storage)
    return model


def set_backend(model: nn.Module, backend: Optional[str]) -> nn.Module:
    """Set the scan backend of every FARAttention in `model` (None = env FAR_BACKEND / auto)."""
    if backend is not None:
        far_kernels.requested_backend(backend)  # validates the name
    for _, m in far_modules(model):
        m.backend = backend
    return model
