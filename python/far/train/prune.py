"""`far prune`: structured pruning of FAR students, then physical compaction.

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

import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from far.models.far_attention import FARAttention
from far.train.engine import Task, TrainConfig, TrainError, save_figure


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
        raise TrainError("give exactly one of --prune-ratio and --threshold")
    if threshold is not None:
        if threshold < 0:
            raise TrainError(f"--threshold must be >= 0, got {threshold}")
        return float(threshold)
    if not 0 <= prune_ratio < 1:
        raise TrainError(f"--prune-ratio must be in [0, 1), got {prune_ratio}")
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
    """[{block, direction, head, kept, width}] for every FAR block."""
    import far

    rows = []
    for name, m in far.far_modules(model):
        for r in (0, 1):
            for h in range(m.num_heads):
                rows.append({"block": name, "direction": "fwd" if r == 0 else "bwd", "head": h,
                             "kept": int(m.hidden_sizes[r, h]), "of": m.head_dim})
    return rows


def format_kept(model: nn.Module, before: Optional[Dict[str, torch.Tensor]] = None) -> str:
    """Text table: blocks as rows, (direction, head) as columns, kept/original units."""
    import far

    mods = list(far.far_modules(model))
    if not mods:
        return "(no FAR blocks)"
    H = mods[0][1].num_heads
    cols = [f"{'fwd' if r == 0 else 'bwd'}{h}" for r in (0, 1) for h in range(H)]
    w = max(len(n) for n, _ in mods)
    lines = [" " * w + "  " + "  ".join(c.rjust(7) for c in cols)]
    for name, m in mods:
        ref = before.get(name) if before else None
        cells = []
        for r in (0, 1):
            for h in range(m.num_heads):
                k = int(m.hidden_sizes[r, h])
                o = int(ref[r, h]) if ref is not None else None
                cells.append((f"{k}/{o}" if o is not None else str(k)).rjust(7))
        lines.append(name.ljust(w) + "  " + "  ".join(cells))
    return "\n".join(lines)


def plot_kept(model: nn.Module, path: Path, before: Optional[Dict[str, torch.Tensor]] = None,
              title: str = "kept LSTM units") -> Optional[str]:
    """Heatmap PNG: blocks x (direction, head), colour and label = kept units. None or why not written."""
    import far

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib unavailable ({e})"
    mods = list(far.far_modules(model))
    if not mods:
        return "no FAR blocks"
    H = mods[0][1].num_heads
    grid = torch.tensor([[int(m.hidden_sizes[r, h]) for r in (0, 1) for h in range(m.num_heads)] for _, m in mods])
    full = torch.tensor([[int(before[n][r, h]) if before else m.head_dim for r in (0, 1) for h in range(m.num_heads)]
                         for n, m in mods])
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * 2 * H, 1.0 + 0.5 * len(mods)))
    im = ax.imshow((grid / full.clamp_min(1)).numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{int(grid[i, j])}/{int(full[i, j])}", ha="center", va="center", fontsize=8,
                    color="white" if grid[i, j] < 0.6 * full[i, j] else "black")
    ax.set_xticks(range(2 * H), [f"{'fwd' if r == 0 else 'bwd'} h{h}" for r in (0, 1) for h in range(H)])
    ax.set_yticks(range(len(mods)), [n for n, _ in mods])
    fig.colorbar(im, ax=ax, label="kept fraction")
    ax.set_title(title)
    save_figure(fig, path)
    return None


# ---------------------------------------------------------------- tasks
class HoyerTask(Task):
    """CE + hoyer * sum over blocks of the Hoyer-square of the group norms."""

    name = "prune-reg"

    def __init__(self, model: nn.Module, cfg: TrainConfig, hoyer: float):
        super().__init__(model, cfg)
        import far

        if hoyer < 0:
            raise TrainError(f"--hoyer must be >= 0, got {hoyer}")
        self.hoyer = hoyer
        self.mods = [m for _, m in far.far_modules(model)]
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
        import far

        self.mods = [m for _, m in far.far_modules(model)]
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
    """(LSTM weights+biases of kept units, plus head_proj) over every FAR block."""
    import far

    lstm = hp = 0
    for _, m in far.far_modules(model):
        k = m.hidden_sizes
        lstm += int((4 * k * m.head_dim + 4 * k * k + 8 * k).sum())
        hp += int(m.head_dim * k.sum()) + m.num_heads * m.head_dim
    return lstm, hp


# ---------------------------------------------------------------- the command
def prune(student: str, data: str = "fashion-mnist", cfg: Optional[TrainConfig] = None, hoyer: float = 1e-3,
          reg_epochs: float = 1.0, prune_ratio: Optional[float] = 0.3, threshold: Optional[float] = None,
          finetune_epochs: float = 1.0, finetune_lr: float = 2e-4, output: Optional[str] = None,
          device: Optional[str] = None, val: Optional[str] = None) -> dict:
    """Hoyer-regularized training (cfg.lr, reg_epochs) -> global threshold -> masked fine-tune
    (finetune_lr, finetune_epochs) -> compaction -> save. Run folders <out_dir>/reg and <out_dir>/finetune."""
    import dataclasses

    import far
    from far.train.common import datasets, finish, run_metadata
    from far.train.engine import (TrainResult, cleanup_distributed, evaluate, join_histories,
                                  setup_distributed, train)

    cfg = (cfg or TrainConfig()).validate()
    if reg_epochs < 0 or finetune_epochs < 0:
        raise TrainError("--reg-epochs and --finetune-epochs must be >= 0")
    d = setup_distributed(device)
    try:
        if not os.path.exists(student):
            raise TrainError(f"{student}: no such checkpoint")
        model = far.load(student).to(d.device)
        mods = [m for _, m in far.far_modules(model)]
        if not mods:
            raise TrainError(f"{student} has no FAR blocks: prune a FAR student (far distill makes one)")
        before = {name: m.hidden_sizes.clone() for name, m in far.far_modules(model)}
        params_before = lstm_param_count(model)
        train_set, eval_set = datasets(data, model, cfg, val)
        root = Path(cfg.out_dir)
        ident = {"student": os.path.abspath(student), "data": str(data), "hoyer": hoyer}
        seconds = 0.0
        histories: list = []
        masked_path = root / "masked.safetensors"
        if cfg.resume and masked_path.is_file():
            model = far.load(masked_path).to(d.device)
            thr = float(model.far_checkpoint["metadata"]["threshold"])
        else:
            if reg_epochs > 0:
                c1 = dataclasses.replace(cfg, out_dir=os.fspath(root / "reg"), epochs=reg_epochs,
                                         resume=cfg.resume and (root / "reg" / "last.pt").is_file())
                r1 = train(HoyerTask(model, c1, hoyer), train_set, eval_set, c1, d, identity=ident, desc="prune: hoyer")
                seconds += r1.seconds
                if not r1.completed:
                    return finish(r1.model, None, cfg, d, r1, "prune", "prune (regularized stage)", [], {})
                model = r1.model
                histories.append(r1.history)
            mods = [m for _, m in far.far_modules(model)]
            thr = global_threshold(mods, prune_ratio, threshold)
            for m, keep in zip(mods, keep_masks(mods, thr)):
                apply_keep_mask(m, keep)
            if d.main:
                far.save(model, masked_path, metadata={"threshold": thr})
            d.barrier()
        masked_acc = evaluate(model, eval_set, cfg.eval_batch_size, d) if eval_set is not None else None
        result = TrainResult(model, [], masked_acc, 0.0, 0, root, True)
        if finetune_epochs > 0:
            c2 = dataclasses.replace(cfg, out_dir=os.fspath(root / "finetune"), epochs=finetune_epochs,
                                     lr=finetune_lr, min_lr=min(cfg.min_lr, finetune_lr),
                                     warmup_epochs=min(cfg.warmup_epochs, finetune_epochs / 4),
                                     resume=cfg.resume and (root / "finetune" / "last.pt").is_file())
            result = train(MaskedTask(model, c2), train_set, eval_set, c2, d, identity={**ident, "threshold": thr},
                           desc="prune: masked fine-tune")
            seconds += result.seconds
            if not result.completed:
                return finish(result.model, None, cfg, d, result, "prune", "prune (fine-tune stage)", [], {})
            histories.append(result.history)
        model = result.model
        result.history = join_histories(*histories)
        with torch.no_grad():
            for m in far.far_modules(model):
                compact_(m[1])
        result.model = model
        result.seconds = seconds
        params_after = lstm_param_count(model)
        cut = 1 - params_after[0] / max(params_before[0], 1)
        cut_hp = 1 - sum(params_after) / max(sum(params_before), 1)
        meta = run_metadata("prune", cfg, d, result, data=str(data), source=os.path.abspath(student),
                            pruning={"hoyer": hoyer, "reg_epochs": reg_epochs, "prune_ratio": prune_ratio,
                                     "threshold": thr, "finetune_epochs": finetune_epochs,
                                     "finetune_lr": finetune_lr, "masked_test_accuracy": masked_acc,
                                     "lstm_params_before": params_before[0], "lstm_params_after": params_after[0],
                                     "head_proj_params_before": params_before[1],
                                     "head_proj_params_after": params_after[1]})
        summary = finish(model, output, cfg, d, result, "prune", f"pruned FAR student of {student}",
                         [("global threshold", f"{thr:.4g}"),
                          ("LSTM params", f"{params_before[0]:,} -> {params_after[0]:,} ({100 * cut:.1f}% fewer)"),
                          ("LSTM + head_proj", f"{sum(params_before):,} -> {sum(params_after):,} "
                                               f"({100 * cut_hp:.1f}% fewer)"),
                          ("after masking (before fine-tune)",
                           f"{100 * masked_acc:.2f}%" if masked_acc is not None else "n/a")], meta,
                         logs=os.fspath(root / "{reg,finetune}" / "metrics.jsonl"))
        if d.main:
            print("\nkept units per block (kept/before):\n" + format_kept(model, before))
            why = plot_kept(model, root / "kept_units.png", before, title=f"kept LSTM units (threshold {thr:.3g})")
            print(f"  plot: {root / 'kept_units.png'}" if why is None else f"  plot not written: {why}")
            summary["kept_units"] = kept_table(model)
            summary["lstm_params_cut"] = cut
        return summary
    finally:
        cleanup_distributed()
