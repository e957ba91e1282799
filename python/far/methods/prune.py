"""far.prune: structured pruning of FAR students, then physical compaction. Modules in, module out;
the group norms, regularizer, threshold, masks and compaction are usable on their own.

Group = one hidden unit of one (block, head, direction): its 4 gate rows of W_ih, its 4 rows of W_hh
and its column of W_hh (the shared entries counted once), its 8 biases (b_ih and b_hh rows — biases
too, unlike the public FAR code) and its head_proj column. Steps:
1. regularized training: CE + hoyer * sum_blocks (sum_g ||g||_2)^2 / sum_g ||g||_2^2 (DeepHoyer's
   Hoyer-square on group norms);
2. one global threshold on the group norms (given, or the quantile that prunes --prune-ratio of all
   groups): the groups below it are removed — in every block, head and direction at once, so the
   per-head ratios emerge from the threshold;
3. masked fine-tune: kept units are moved to the front of each (head, direction) (an LSTM is
   unchanged by a permutation of its hidden units), hidden_sizes shrink, the rest is zero and stays
   zero (its gradients are exactly zero);
4. physical compaction: the module is rebuilt with width = the widest kept (head, direction); the
   saved checkpoint holds kept units only and runs on every backend.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from far.errors import ConfigError
from far.evaluate import accuracy
from far.models import far_modules, load, save
from far.nn import FARAttention
from far.train import (RunReport, Task, TrainConfig, TrainResult, join_histories, run_metadata, setup_distributed,
                       stage_config, train)


# ---------------------------------------------------------------- groups
def group_sq_norms(m: FARAttention) -> torch.Tensor:
    """[H, 2, n] squared L2 norm of every unit's group (differentiable)."""
    H, n, d = m.num_heads, m.width, m.head_dim
    w_ih = m.w_ih.view(H, 2, 4, n, d)
    w_hh = m.w_hh.view(H, 2, 4, n, n)
    sq = w_ih.square().sum(dim=(2, 4))                       # W_ih rows
    sq = sq + w_hh.square().sum(dim=(2, 4))                  # W_hh rows of unit u
    sq = sq + w_hh.square().sum(dim=(2, 3))                  # W_hh column u (all 4n rows)
    diag = torch.diagonal(w_hh, dim1=3, dim2=4)              # [H, 2, 4, n]: in both the rows and the column
    sq = sq - diag.square().sum(dim=2)
    sq = sq + m.b_ih.view(H, 2, 4, n).square().sum(2) + m.b_hh.view(H, 2, 4, n).square().sum(2)
    sq = sq + m.head_proj_weight.view(H, d, 2, n).square().sum(1)  # head_proj column of unit u
    return sq


def group_norms(m: FARAttention) -> torch.Tensor:
    """[H, 2, n] group L2 norms; padded (not kept) units are 0."""
    return group_sq_norms(m).clamp_min(0).sqrt() * m.unit_mask().to(m.w_ih.device)


def hoyer_square(m: FARAttention, eps: float = 1e-12) -> torch.Tensor:
    """(sum_g ||g||)^2 / sum_g ||g||^2 over the kept groups of one block (scale-invariant, in [1, #groups])."""
    sq = group_sq_norms(m)
    mask = m.unit_mask().to(sq.device)
    norms = (sq + eps).sqrt() * mask
    return norms.sum().square() / (sq * mask).sum().clamp_min(eps)


def global_threshold(models: List[FARAttention], prune_ratio: Optional[float] = None,
                     threshold: Optional[float] = None) -> float:
    """The threshold: given, or the value below which `prune_ratio` of all kept groups lie."""
    if (prune_ratio is None) == (threshold is None):
        raise ConfigError("give exactly one of --prune-ratio and --threshold")
    if threshold is not None:
        if threshold < 0:
            raise ConfigError(f"--threshold must be >= 0, got {threshold}")
        return float(threshold)
    if not 0 <= prune_ratio < 1:
        raise ConfigError(f"--prune-ratio must be in [0, 1), got {prune_ratio}")
    with torch.no_grad():
        norms = torch.cat([group_norms(m)[m.unit_mask()].flatten().double().cpu() for m in models])
    if norms.numel() == 0:
        return 0.0
    k = int(round(prune_ratio * norms.numel()))
    if k == 0:
        return 0.0
    s = norms.sort().values
    return float((s[k - 1] + s[k]) / 2) if k < s.numel() else float(s[-1]) + 1.0


def keep_masks(models: List[FARAttention], threshold: float) -> List[torch.Tensor]:
    """Per module, [H, 2, n] bool: kept units (group norm >= threshold, among the currently kept)."""
    with torch.no_grad():
        return [(group_norms(m) >= threshold) & m.unit_mask().to(m.w_ih.device) for m in models]


# ---------------------------------------------------------------- masking and compaction
@torch.no_grad()
def apply_keep_mask(m: FARAttention, keep: torch.Tensor) -> None:
    """Keep only the units in `keep` [H, 2, n]: move them to the front of their (head, direction) in
    their original order, set hidden_sizes to their counts and zero the rest. The block's function
    is unchanged except for the removed units. Width (padding) stays as it was."""
    H, n, d = m.num_heads, m.width, m.head_dim
    keep = keep.to("cpu", torch.bool)
    if tuple(keep.shape) != (H, 2, n):
        raise ValueError(f"keep mask must be [H, 2, n] = [{H}, 2, {n}], got {list(keep.shape)}")
    keep = keep & m.unit_mask()
    dev = m.w_ih.device
    w_ih = m.w_ih.view(H, 2, 4, n, d).clone()
    w_hh = m.w_hh.view(H, 2, 4, n, n).clone()
    b_ih = m.b_ih.view(H, 2, 4, n).clone()
    b_hh = m.b_hh.view(H, 2, 4, n).clone()
    hp = m.head_proj_weight.view(H, d, 2, n).clone()
    sizes = torch.zeros(2, H, dtype=torch.int64)
    for h in range(H):
        for r in (0, 1):
            kept = torch.nonzero(keep[h, r]).flatten()
            k = kept.numel()
            sizes[r, h] = k
            perm = torch.cat([kept, torch.nonzero(~keep[h, r]).flatten()]).to(dev)
            m.w_ih.view(H, 2, 4, n, d)[h, r] = w_ih[h, r][:, perm]
            m.w_hh.view(H, 2, 4, n, n)[h, r] = w_hh[h, r][:, perm][:, :, perm]
            m.b_ih.view(H, 2, 4, n)[h, r] = b_ih[h, r][:, perm]
            m.b_hh.view(H, 2, 4, n)[h, r] = b_hh[h, r][:, perm]
            m.head_proj_weight.view(H, d, 2, n)[h, :, r] = hp[h, :, r][:, perm]
    m.hidden_sizes = sizes
    m.zero_padding_()


@torch.no_grad()
def compact_(m: FARAttention) -> FARAttention:
    """Shrink the padded width to max(hidden_sizes) in place (parameters are replaced)."""
    state = m.compact_state()
    n = int(m.hidden_sizes.max()) if m.hidden_sizes.numel() else 0
    H, d = m.num_heads, m.head_dim
    dd = {"device": m.w_ih.device, "dtype": m.w_ih.dtype}
    m.w_ih = nn.Parameter(torch.zeros(H, 2, 4 * n, d, **dd))
    m.w_hh = nn.Parameter(torch.zeros(H, 2, 4 * n, n, **dd))
    m.b_ih = nn.Parameter(torch.zeros(H, 2, 4 * n, **dd))
    m.b_hh = nn.Parameter(torch.zeros(H, 2, 4 * n, **dd))
    m.head_proj_weight = nn.Parameter(torch.zeros(H, d, 2 * n, **dd))
    m.load_compact_state(state)
    return m


def kept_table(model: nn.Module) -> List[dict]:
    """[{block, direction, head, kept, of}] for every FAR block."""
    rows = []
    for name, m in far_modules(model):
        for r in (0, 1):
            for h in range(m.num_heads):
                rows.append({"block": name, "direction": "fwd" if r == 0 else "bwd", "head": h,
                             "kept": int(m.hidden_sizes[r, h]), "of": m.head_dim})
    return rows


# ---------------------------------------------------------------- tasks
class HoyerTask(Task):
    """CE + hoyer * sum over blocks of the Hoyer-square of the group norms."""

    name = "prune-reg"

    def __init__(self, model: nn.Module, cfg: TrainConfig, hoyer: float):
        super().__init__(model, cfg)
        if hoyer < 0:
            raise ConfigError(f"--hoyer must be >= 0, got {hoyer}")
        self.hoyer = hoyer
        self.mods = [m for _, m in far_modules(model)]
        for p in model.parameters():
            p.requires_grad_(True)

    def loss(self, model, x, y):
        ce = F.cross_entropy(model(x), y, label_smoothing=self.cfg.label_smoothing)
        reg = torch.stack([hoyer_square(m) for m in self.mods]).sum()
        return {"loss": ce + self.hoyer * reg, "ce": ce.detach(), "hoyer": reg.detach()}


class MaskedTask(Task):
    """CE fine-tune of the masked model; re-zeroes the padding after each step (a no-op in exact
    arithmetic, kept as a guard)."""

    name = "prune-finetune"

    def __init__(self, model: nn.Module, cfg: TrainConfig):
        super().__init__(model, cfg)
        self.mods = [m for _, m in far_modules(model)]
        for p in model.parameters():
            p.requires_grad_(True)

    def after_step(self, model):
        for m in self.mods:
            m.zero_padding_()

    def state(self):
        return {f"hidden_sizes.{i}": m.hidden_sizes for i, m in enumerate(self.mods)}

    def load_state(self, state):
        for i, m in enumerate(self.mods):
            key = f"hidden_sizes.{i}"
            if key in state:
                m.hidden_sizes = state[key].clone()


def lstm_param_count(model: nn.Module) -> Tuple[int, int]:
    """(LSTM weights+biases of kept units, head_proj weights+biases) over every FAR block."""
    lstm = hp = 0
    for _, m in far_modules(model):
        k = m.hidden_sizes
        lstm += int((4 * k * m.head_dim + 4 * k * k + 8 * k).sum())
        hp += int(m.head_dim * k.sum()) + m.num_heads * m.head_dim
    return lstm, hp


# ---------------------------------------------------------------- the method
def prune(model: nn.Module, train_data, *, eval_data=None, config: Optional[TrainConfig] = None,
          hoyer: float = 1e-3, prune_ratio: Optional[float] = 0.3, threshold: Optional[float] = None,
          finetune_epochs: float = 1.0, finetune_lr: float = 2e-4, device: Optional[str] = None,
          identity: Optional[dict] = None, inplace: bool = False) -> nn.Module:
    """A pruned, compacted copy of the FAR model `model` (inplace=True prunes `model` itself).

    Steps: Hoyer-regularized training (config.epochs at config.lr; 0 epochs skips it) -> one global
    threshold (`threshold`, or the one that removes `prune_ratio` of all unit groups) -> masked
    fine-tune (finetune_epochs at finetune_lr; 0 skips it) -> compaction (kept units only).
    config.out_dir None writes nothing; with a folder, <out_dir>/reg, <out_dir>/finetune hold each
    stage's state and metrics and <out_dir>/masked.safetensors the masked model, and config.resume
    continues an interrupted run. identity: extra settings a resumed run must match.
    Returns the model (eval mode) with `far_metadata` and `far_run` (see far.distill)."""
    cfg = config or TrainConfig()
    dataclasses.replace(cfg, epochs=cfg.epochs or 1.0).validate()
    if cfg.epochs < 0 or finetune_epochs < 0:
        raise ConfigError("the regularized and fine-tune epochs must be >= 0")
    mods = [m for _, m in far_modules(model)]
    if not mods:
        raise ConfigError("the model has no FAR blocks: prune a FAR student (far.distill makes one)")
    d = setup_distributed(device)
    model = (model if inplace else copy.deepcopy(model)).to(d.device)
    before = {name: m.hidden_sizes.clone() for name, m in far_modules(model)}
    params_before = lstm_param_count(model)
    ident = {**(identity or {}), "hoyer": hoyer}
    histories: list = []
    seconds, steps = 0.0, 0
    masked_file = None if cfg.out_dir is None else os.path.join(cfg.out_dir, "masked.safetensors")
    result: Optional[TrainResult] = None
    if cfg.resume and masked_file is not None and os.path.isfile(masked_file):
        model = load(masked_file).to(d.device)
        thr = float(model.far_checkpoint["metadata"]["threshold"])
    else:
        if cfg.epochs > 0:
            c1 = stage_config(cfg, "reg")
            result = train(HoyerTask(model, c1, hoyer), train_data, eval_data, c1, d, identity=ident,
                           desc="prune: hoyer")
            seconds, steps = result.seconds, result.steps
            model = result.model
            histories.append(result.history)
        if result is None or result.completed:
            mods = [m for _, m in far_modules(model)]
            thr = global_threshold(mods, prune_ratio, threshold)
            for m, keep in zip(mods, keep_masks(mods, thr)):
                apply_keep_mask(m, keep)
            if masked_file is not None and d.main:
                save(model, masked_file, metadata={"threshold": thr})
            d.barrier()
    masked_acc = None
    if result is None or result.completed:
        masked_acc = accuracy(model, eval_data, batch_size=cfg.eval_batch_size, device=d.device)
        result = TrainResult(model, [], masked_acc, 0.0, 0, None, True)
        if finetune_epochs > 0:
            c2 = stage_config(cfg, "finetune", epochs=finetune_epochs, lr=finetune_lr,
                              min_lr=min(cfg.min_lr, finetune_lr),
                              warmup_epochs=min(cfg.warmup_epochs, finetune_epochs / 4))
            result = train(MaskedTask(model, c2), train_data, eval_data, c2, d, identity={**ident, "threshold": thr},
                           desc="prune: masked fine-tune")
            seconds += result.seconds
            steps += result.steps
            histories.append(result.history)
        model = result.model
        if result.completed:
            with torch.no_grad():
                for _, m in far_modules(model):
                    compact_(m)
    done = TrainResult(model, join_histories(*histories), result.final_accuracy, seconds, steps, None,
                       result.completed)
    params_after = lstm_param_count(model)
    cut = 1 - params_after[0] / max(params_before[0], 1)
    cut_hp = 1 - sum(params_after) / max(sum(params_before), 1)
    model.far_metadata = run_metadata(
        "prune", cfg, d, done, **(identity or {}),
        pruning={"hoyer": hoyer, "reg_epochs": cfg.epochs, "prune_ratio": prune_ratio,
                 "threshold": thr if result.completed else None, "finetune_epochs": finetune_epochs,
                 "finetune_lr": finetune_lr, "masked_test_accuracy": masked_acc,
                 "lstm_params_before": params_before[0], "lstm_params_after": params_after[0],
                 "head_proj_params_before": params_before[1], "head_proj_params_after": params_after[1]})
    rows = []
    if done.completed:
        rows = [("global threshold", f"{thr:.4g}"),
                ("LSTM params", f"{params_before[0]:,} -> {params_after[0]:,} ({100 * cut:.1f}% fewer)"),
                ("LSTM + head_proj", f"{sum(params_before):,} -> {sum(params_after):,} ({100 * cut_hp:.1f}% fewer)"),
                ("after masking (before fine-tune)", f"{100 * masked_acc:.2f}%" if masked_acc is not None else "n/a")]
    model.far_run = RunReport("prune", done.history, done.final_accuracy, seconds, steps, done.completed,
                              cfg.out_dir, rows=rows)
    model.far_pruned_from = before  # {block: hidden sizes before pruning}, for reports
    return model.eval()
