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

To a budget (`budget=Budget.parse("mixer-params=116000")`, also params=, arrays=, mixer-arrays=, latency=,
energy=): step 2's threshold is the smallest one whose kept units meet the budget (a binary search over
the sorted group norms; the quantity is counted for each candidate by the parameter formula or by
far.imc.cost's chip model), and `align` rounds every (head, direction) down to whole crossbar column
blocks (4 units at the default 8-bit weights in 2-bit differential cells, 128 columns: 4k gate rows x 8
columns per unit). `rounds` > 1 repeats steps 1-3 with budgets shrinking geometrically to the target
(gradual pruning). `min_units` (with a budget, a ratio or a threshold) puts a floor under every (head,
direction) that keeps anything: it keeps at least that many units (its strongest), so no crossbar product is
left with one or two rows — a full-range ADC, sized for a whole tile, resolves such a product to a handful of
levels (README, "How `fmnist_far_tiny_xs` came to be made in one run"). `keep_heads` keeps every head: one the
threshold would empty in both directions keeps its max(min_units, align) strongest units in the direction of its
strongest unit instead (a removed head's channels carry head_proj's bias alone, cosine to its attention head ~0.2).

What can be removed physically: a unit (its W_ih and W_hh gate rows, its W_hh column, its biases, its
head_proj column). Not pruned: pre_proj rows and W_ih columns (a head's LSTM input width d is shared by
its two directions and every head has the same d in the kernels' layout), and head_proj rows / proj
columns (d outputs per head, the same layout constraint); masking them would save nothing on the chip
without ragged head widths.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from far.errors import ConfigError
from far.utils.checks import finite_number
from far.evaluate import accuracy
from far.models import far_modules, save, set_storage
from far.nn import FARAttention
from far.train import (RunReport, Task, TrainConfig, TrainResult, join_histories, run_metadata, setup_distributed,
                       stage_config, train)
from far.train.loop import (check_fresh_run, check_resumable, classification_loss, finished_stage_record,
                            limit_data, load_finished_stage, stage_identity, stage_record)


# ---------------------------------------------------------------- groups
GROUPS = ("far", "public")
HOYER_SCOPES = ("block", "head-direction")


def group_sq_norms(m: FARAttention, groups: str = "far", dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """[H, 2, n] squared L2 norm of every unit's group (differentiable), in the weights' dtype or `dtype`.
    groups="public" leaves out the biases and the head_proj column, as the authors' public code's groups do
    (its unit = W_ih and W_hh gate rows and the W_hh column, concatenated: W_hh's 4 diagonal entries of the unit,
    in both its rows and its column, count twice there; once in "far")."""
    H, n, d = m.num_heads, m.width, m.head_dim
    w_ih, w_hh, b_ih, b_hh, hp_w, _ = (t.to(dtype) if dtype is not None else t for t in m.padded_params())
    w_ih = w_ih.view(H, 2, 4, n, d)
    w_hh = w_hh.view(H, 2, 4, n, n)
    sq = w_ih.square().sum(dim=(2, 4))                       # W_ih rows
    sq = sq + w_hh.square().sum(dim=(2, 4))                  # W_hh rows of unit u
    sq = sq + w_hh.square().sum(dim=(2, 3))                  # W_hh column u (all 4n rows)
    if groups == "public":
        return sq
    diag = torch.diagonal(w_hh, dim1=3, dim2=4)              # [H, 2, 4, n]: in both the rows and the column
    sq = sq - diag.square().sum(dim=2)
    if groups != "far":
        raise ConfigError(f"groups must be one of {', '.join(GROUPS)}, got {groups!r}")
    sq = sq + b_ih.view(H, 2, 4, n).square().sum(2) + b_hh.view(H, 2, 4, n).square().sum(2)
    sq = sq + hp_w.reshape(H, d, 2, n).square().sum(1)  # head_proj column of unit u
    return sq


def group_norms(m: FARAttention, groups: str = "far") -> torch.Tensor:
    """[H, 2, n] group L2 norms in float64 (what the threshold ranks: a bf16 block's norms rounded to bf16 tie
    by the hundreds); padded (not kept) units are 0."""
    sq = group_sq_norms(m, groups, dtype=torch.float64)
    return sq.clamp_min(0).sqrt() * m.unit_mask().to(m.pre_proj.weight.device)


def finite_group_norms(models, groups: str = "far") -> List[torch.Tensor]:
    """group_norms of each module (detached), given as modules or (name, module) pairs; ConfigError naming the
    first kept unit whose group holds a NaN or an infinity: the threshold and the budget's ranking would keep or
    remove it silently (NaN compares false with everything; torch.sort ranks it strongest)."""
    out = []
    for i, item in enumerate(models):
        name, m = item if isinstance(item, tuple) else (f"FAR block {i}", item)
        with torch.no_grad():
            g = group_norms(m, groups)
        bad = ~torch.isfinite(g) & m.unit_mask().to(g.device)
        if bad.any():
            h, r, u = bad.nonzero()[0].tolist()
            raise ConfigError(f"{name}: head {h}, {'forward' if r == 0 else 'backward'} unit {u} has a non-finite "
                              f"weight (group norm {float(g[h, r, u])}; {int(bad.sum())} unit group(s) of this block): "
                              "pruning ranks units by these norms; repair the model (a diverged run?) first")
        out.append(g)
    return out


def hoyer_square(m: FARAttention, eps: float = 1e-12, scope: str = "block", groups: str = "far") -> torch.Tensor:
    """(sum_g ||g||)^2 / sum_g ||g||^2 over the kept groups of one block (scope="block": scale-invariant, in
    [1, #groups]), or that ratio per (head, direction), summed (scope="head-direction", the public code's
    pooling)."""
    if scope not in HOYER_SCOPES:
        raise ConfigError(f"the Hoyer scope must be one of {', '.join(HOYER_SCOPES)}, got {scope!r}")
    sq = group_sq_norms(m, groups)
    mask = m.unit_mask().to(sq.device)
    norms = (sq + eps).sqrt() * mask
    if scope == "block":
        return norms.sum().square() / (sq * mask).sum().clamp_min(eps)
    return (norms.sum(-1).square() / (sq * mask).sum(-1).clamp_min(eps)).sum()


def _between(lo, hi) -> float:
    """A threshold t with lo < t <= hi (groups >= t are kept): their midpoint, or hi when the two are adjacent
    doubles and the midpoint rounds down to lo (which would keep lo's group too)."""
    mid = float((lo + hi) / 2)
    return mid if float(lo) < mid else float(hi)


def global_threshold(models: List[FARAttention], prune_ratio: Optional[float] = None,
                     threshold: Optional[float] = None, groups: str = "far") -> float:
    """The threshold: given, or the value below which `prune_ratio` of all kept groups lie."""
    if (prune_ratio is None) == (threshold is None):
        raise ConfigError("give exactly one of --prune-ratio and --threshold")
    if threshold is not None:
        if threshold < 0:
            raise ConfigError(f"--threshold must be >= 0, got {threshold}")
        return float(threshold)
    if not 0 <= prune_ratio < 1:
        raise ConfigError(f"--prune-ratio must be in [0, 1), got {prune_ratio}")
    norms = torch.cat([g[m.unit_mask()].flatten().cpu() for g, m in zip(finite_group_norms(models, groups), models)])
    if norms.numel() == 0:
        return 0.0
    k = int(round(prune_ratio * norms.numel()))
    if k == 0:
        return 0.0
    s = norms.sort().values
    if k >= s.numel():
        return float(s[-1]) + 1.0
    if s[k - 1] < s[k]:
        return _between(s[k - 1], s[k])
    # k falls inside a run of equal norms (zero groups, low-precision weights): the run goes as one, all pruned
    # or all kept, whichever count lies nearer k (kept on a tie; never the whole model)
    below, through = int((s < s[k]).sum()), int((s <= s[k]).sum())
    if through - k < k - below and through < s.numel():
        return _between(s[k], s[through])
    return float(s[k])


def keep_masks(models: List[FARAttention], threshold: float, groups: str = "far") -> List[torch.Tensor]:
    """Per module, [H, 2, n] bool: kept units (group norm >= threshold, among the currently kept)."""
    # float64, as global_threshold ranks them: a bf16 tensor would round the threshold to bf16 first
    return [(g >= threshold) & m.unit_mask().to(g.device) for g, m in zip(finite_group_norms(models, groups), models)]


# ---------------------------------------------------------------- masking and compaction
@torch.no_grad()
def apply_keep_mask(m: FARAttention, keep: torch.Tensor) -> None:
    """Keep only the units in `keep` [H, 2, n]: move them to the front of their (head, direction) in
    their original order, set hidden_sizes to their counts and zero the rest. The block's function
    is unchanged except for the removed units. Width (padding) stays as it was. Needs storage "padded"."""
    if m.storage != "padded":
        raise ConfigError("apply_keep_mask needs a FAR block in padded storage (a mask shrinks hidden_sizes while "
                          "the tensors keep their width): call set_storage('padded') first")
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
    """Shrink the padded width to max(hidden_sizes) in place (parameters are replaced; a ragged block has no
    padding and is returned as it is)."""
    if m.storage == "ragged":
        return m
    return m.set_storage("ragged").set_storage("padded")  # the kept units, then padded to the new widest


def kept_table(model: nn.Module) -> List[dict]:
    """[{block, direction, head, kept, of}] for every FAR block."""
    rows = []
    for name, m in far_modules(model):
        for r in (0, 1):
            for h in range(m.num_heads):
                rows.append({"block": name, "direction": "fwd" if r == 0 else "bwd", "head": h,
                             "kept": int(m.hidden_sizes[r, h]), "of": m.head_dim})
    return rows


# ---------------------------------------------------------------- budgets
BUDGET_KINDS = {  # kind: (what, unit)
    "params": ("parameters of the whole model (kept units)", ""),
    "mixer-params": ("parameters of the token mixers (kept units)", ""),
    "arrays": ("crossbar arrays of the whole model (static, plus attention's K/V arrays)", ""),
    "mixer-arrays": ("crossbar arrays of the token mixers (static, plus attention's K/V arrays)", ""),
    "latency": ("latency of one image on the chip", "ns"),
    "energy": ("energy of one image on the chip", "pJ"),
}
_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}


@dataclass(frozen=True)
class Budget:
    """What a pruned model may cost: `kind` (BUDGET_KINDS) <= `value`. The chip kinds (arrays, mixer-arrays,
    latency, energy) are counted by far.imc.cost under `cfg` (far_kernels.CrossbarConfig, default ISAAC-like)
    and `hw` (far.imc.cost.HardwareSpec) for images of `input_size` (default: the model's)."""
    kind: str
    value: float
    cfg: object = None
    hw: object = None
    input_size: Optional[tuple] = None

    def __post_init__(self):
        if self.kind not in BUDGET_KINDS:
            raise ConfigError(f"unknown budget {self.kind!r}: give one of {', '.join(BUDGET_KINDS)}")
        if not (isinstance(self.value, (int, float)) and math.isfinite(self.value) and self.value > 0):
            raise ConfigError(f"the {self.kind} budget must be a number > 0, got {self.value!r}")

    @classmethod
    def parse(cls, spec: str, **kwargs) -> "Budget":
        """'KIND=VALUE' (VALUE may end in k, M or G; latency in ns, energy in pJ), e.g. 'mixer-params=116k'."""
        m = re.fullmatch(r"\s*([a-z-]+)\s*=\s*([0-9.eE+-]+)\s*([kKmMgG]?)\s*", spec or "")
        if not m:
            raise ConfigError(f"--budget takes KIND=VALUE with KIND one of {', '.join(BUDGET_KINDS)} "
                              f"(e.g. mixer-params=116000, arrays=300, latency=900000, energy=2.5e7), got {spec!r}")
        try:
            value = float(m.group(2)) * _SUFFIX[m.group(3).lower()]
        except ValueError:
            raise ConfigError(f"--budget {spec!r}: {m.group(2)!r} is not a number") from None
        return cls(m.group(1), value, **kwargs)

    @property
    def on_chip(self) -> bool:
        return self.kind not in ("params", "mixer-params")

    def format(self, value: float) -> str:
        unit = BUDGET_KINDS[self.kind][1]
        return f"{value:,.0f}{' ' + unit if unit else ''}"

    def __str__(self) -> str:
        return f"{self.kind} <= {self.format(self.value)}"


def budget_measure(model: nn.Module, budget: Budget) -> Callable[[Dict[str, torch.Tensor]], float]:
    """f(hidden sizes) -> the budget's quantity for the model with its FAR blocks' kept units replaced by
    {FAR module name: [2, H] kept units} (missing names keep their own)."""
    mods = dict(far_modules(model))
    if budget.kind in ("params", "mixer-params"):
        from far.models import param_counts

        counts = param_counts(model)
        base = counts["kept" if budget.kind == "params" else "mixer_kept"] - sum(m.num_lstm_params() for m in mods.values())
        return lambda hs: float(base + sum(m.num_lstm_params(hs.get(n)) for n, m in mods.items()))
    import far_kernels
    from far.imc.cost import HardwareSpec, model_cost, trace

    cfg = budget.cfg if budget.cfg is not None else far_kernels.CrossbarConfig()
    hw = budget.hw if budget.hw is not None else HardwareSpec()
    calls = trace(model, budget.input_size)

    def measure(hs):
        report = model_cost(model, cfg, hw, hidden_sizes=hs, calls=calls)
        if budget.kind == "latency":
            return report.totals["latency_us"] * 1e3
        if budget.kind == "energy":
            return report.totals["energy_uj"] * 1e6
        rows = [r for r in report.rows if budget.kind == "arrays" or r.kind in ("far", "attention", "reuse")]
        return float(sum(r.arrays + r.dynamic_arrays for r in rows))
    return measure


def array_units(budget: Budget) -> int:
    """Units whose gate columns fill one crossbar column block exactly: cols / (4 gates x weight slices x
    cells per weight) — 4 at the default 8-bit weights in 2-bit differential cells on 128 columns."""
    import far_kernels
    from far.imc.cost import HardwareSpec

    cfg = budget.cfg if budget.cfg is not None else far_kernels.CrossbarConfig()
    hw = budget.hw if budget.hw is not None else HardwareSpec()
    per_unit = 4 * cfg.n_weight_slices * (2 if cfg.encoding == "differential" else 1)
    return max(1, hw.cols // per_unit)


@dataclass
class BudgetPlan:
    """The pruning that meets a budget: keep masks per module, the threshold, and the budget's quantity
    before, after, and if one more group (or column block) were kept."""
    budget: Budget
    masks: List[torch.Tensor]
    threshold: float
    before: float
    achieved: float
    next_up: Optional[float]  # the quantity with the next-weakest pruned group kept too (None: nothing pruned)
    pruned_groups: int
    groups: int
    align: int
    min_units: int = 0
    keep_heads: bool = False

    @property
    def met(self) -> bool:
        return self.achieved <= self.budget.value

    def summary(self) -> str:
        b = self.budget
        head = (f"budget {b}: achieved {b.format(self.achieved)} ({100 * self.achieved / b.value:.1f}% of the budget; "
                f"{b.format(self.before)} before), {self.pruned_groups} of {self.groups} unit groups removed")
        floor = floor_text(self.min_units, self.keep_heads)
        if floor:
            head += f", {floor}"
        if self.align > 1:
            head += f", every (head, direction) a multiple of {self.align} units"
        if self.next_up is not None:
            head += f"; keeping one more group would give {b.format(self.next_up)}"
        return head


def check_budget(models: List[Tuple[str, FARAttention]], model: nn.Module, budget: Budget,
                 measure: Optional[Callable] = None, head_units: int = 0, align: int = 1,
                 groups: str = "far") -> float:
    """The budget's quantity with every unit of `models` removed (the least pruning can reach); ConfigError,
    saying by how much and why, when even that exceeds the budget. head_units > 0: every head keeps what
    keep_heads revives, head_units of its strongest direction's units (fewer where that direction has fewer),
    rounded down to `align` (plan_budget's masks with every group removed)."""
    measure = measure or budget_measure(model, budget)
    least = {}
    norms = finite_group_norms(models, groups) if head_units else [None] * len(models)
    for (name, m), g in zip(models, norms):
        keep = torch.zeros(m.num_heads, 2, m.width, dtype=torch.bool)
        if head_units:
            keep = _floor(keep, g, m.unit_mask(), head_units, heads=True)
            if align > 1:
                keep = _align(keep, g.cpu(), align)
        least[name] = keep.sum(-1).T.contiguous()
    lowest = measure(least)
    if lowest > budget.value and head_units:
        raise ConfigError(f"budget {budget} cannot be met with every head kept: with {head_units} units per head "
                          f"(fewer where its strongest direction has fewer) the model has {budget.format(lowest)} "
                          f"({budget.format(lowest - budget.value)} over); "
                          "drop keep_heads (--keep-heads) or raise the budget")
    if lowest > budget.value:
        b = budget
        why = {"params": "the parameters outside the LSTMs (patch embedding, MLPs, norms, pre_proj, proj, head)",
               "mixer-params": "pre_proj and proj of every FAR block (and any attention left)",
               "arrays": "the arrays of every layer that is not an LSTM",
               "mixer-arrays": "pre_proj's and proj's arrays (and any attention's)",
               "latency": "the layers around the LSTMs (and an LSTM step takes the same crossbar cycles however "
                          "many units it keeps: latency falls with whole heads and directions removed)",
               "energy": "the layers around the LSTMs"}[b.kind]
        raise ConfigError(f"budget {b} cannot be met by pruning units: with every unit removed the model still has "
                          f"{b.format(lowest)} ({b.format(lowest - b.value)} over, {100 * lowest / b.value:.1f}% of the "
                          f"budget) — that is {why}")
    return lowest


def plan_budget(models: List[Tuple[str, FARAttention]], model: nn.Module, budget: Budget, align: int = 1,
                groups: str = "far", balance: bool = False, min_units: int = 0,
                keep_heads: bool = False) -> BudgetPlan:
    """The fewest removed unit groups (weakest group norm first, over every block, head and direction; with
    `align` > 1 every (head, direction) then rounded down to a multiple of `align` kept units) whose model
    meets `budget`. balance=True ranks each group by its norm over the root-mean-square norm of its block's
    kept groups, so that a block whose weights are small overall is not emptied first (every block keeps
    units to reproduce its attention block with). min_units > 0: every (head, direction) left with fewer kept
    units than that, but some, keeps its `min_units` strongest (all it has, if fewer) before `align` rounds;
    the search then removes more elsewhere. keep_heads: no head loses all its units (_floor). Raises
    ConfigError, saying by how much and why, when even removing every unit cannot."""
    if align < 1:
        raise ConfigError(f"align must be >= 1, got {align}")
    check_min_units(min_units, align)
    measure = budget_measure(model, budget)
    alive = [m.unit_mask().contiguous() for _, m in models]
    norms = [g.cpu() for g in finite_group_norms(models, groups)]
    if balance:
        norms = [n / n[a].square().mean().sqrt().clamp_min(1e-30) if a.any() else n for n, a in zip(norms, alive)]
    where, vals = [], []  # every alive group: (module, flat position), its norm
    for i, (n, a) in enumerate(zip(norms, alive)):
        idx = a.flatten().nonzero().flatten()
        where.append(torch.stack([torch.full_like(idx, i), idx], 1))
        vals.append(n.flatten()[idx])
    vals = torch.cat(vals)
    perm = torch.sort(vals, stable=True).indices  # weakest first; ties in module order
    order, where = vals[perm], torch.cat(where)[perm].tolist()
    G = order.numel()

    def masks_for(j: int) -> List[torch.Tensor]:
        keep = [a.clone() for a in alive]
        for i, idx in where[:j]:
            keep[i].view(-1)[idx] = False
        if min_units > 1 or keep_heads:
            keep = [_floor(k, n, a, min_units, keep_heads, align) for k, n, a in zip(keep, norms, alive)]
        if align > 1:
            keep = [_align(k, n, align) for k, n in zip(keep, norms)]
        return keep

    def value(j: int) -> float:
        masks = masks_for(j)
        return measure({name: mk.sum(-1).T.contiguous() for (name, _), mk in zip(models, masks)})

    before = measure({})
    check_budget(models, model, budget, measure, head_floor(min_units, align) if keep_heads else 0, align, groups)
    lo, hi = 0, G  # value(hi) <= budget; find the smallest such j
    if before <= budget.value and align == 1 and min_units <= 1 and not keep_heads:
        hi = 0
    while lo < hi:
        mid = (lo + hi) // 2
        if value(mid) <= budget.value:
            hi = mid
        else:
            lo = mid + 1
    j = hi
    masks = masks_for(j)
    # (no alive group at all, G = 0: nothing to remove, threshold 0)
    thr = _between(order[j - 1], order[j]) if 0 < j < G else (float(order[-1]) + 1.0 if 0 < j == G else 0.0)
    return BudgetPlan(budget, masks, thr, before, value(j), value(j - 1) if j > 0 else None, j, G, align, min_units,
                      keep_heads)


def floor_text(min_units: int, keep_heads: bool) -> str:
    """The floors a prune keeps, in words: the one wording of the budget summary and the prune report ('' if none)."""
    return ", ".join(([f"every (head, direction) keeps 0 or at least {min_units} units"] if min_units > 1 else [])
                     + (["no head removed"] if keep_heads else []))


def check_min_units(min_units, align: int = 1, names: Tuple[str, str] = ("min_units", "align"),
                    models: Optional[List[FARAttention]] = None) -> None:
    """ConfigError unless `min_units` is an int >= 0 that `align` (> 1) divides; `names` are what the message
    calls the two (the command line passes its flags). With `models` (the FAR blocks to prune), also unless some
    (head, direction) has at least `min_units` units: a floor above every one's size would leave each (head,
    direction) all or nothing — what min_units = the largest size asks for plainly — and a ratio or threshold
    would then remove next to nothing (any (head, direction) keeping a unit keeps every unit)."""
    if isinstance(min_units, bool) or not isinstance(min_units, int) or min_units < 0:
        raise ConfigError(f"{names[0]} must be an int >= 0, got {min_units!r}")
    if align > 1 and min_units % align:
        raise ConfigError(f"{names[0]} ({min_units}) must be a multiple of {names[1]} ({align} units): rounding down "
                          "to whole column blocks would undercut the floor")
    largest = max((int(m.hidden_sizes.max()) for m in models or [] if m.hidden_sizes.numel()), default=None)
    if min_units > 1 and largest is not None and min_units > largest:
        raise ConfigError(f"{names[0]} ({min_units}) exceeds the units of every (head, direction) (the largest has "
                          f"{largest}): every one that kept a unit would keep all of them; give at most {largest} "
                          f"({largest}: each (head, direction) kept whole or removed)")


def _strongest(among: torch.Tensor, norms: torch.Tensor, k: int) -> torch.Tensor:
    """[n] bool: the k units of `among` (one (head, direction)'s mask) with the largest norms; of equal norms the
    later units, which plan_budget's weakest-first ranking (a stable sort) removes last (topk picks any)."""
    out = torch.zeros_like(among)
    if k:
        out[torch.sort(torch.where(among, norms, torch.full_like(norms, -1.0)), stable=True).indices[-k:]] = True
    return out


def head_floor(min_units: int, align: int = 1) -> int:
    """The units keep_heads leaves a head it revives: min_units, at least one column block (align), at least 1."""
    return max(min_units, align, 1)


def _floor(keep: torch.Tensor, norms: torch.Tensor, alive: torch.Tensor, min_units: int, heads: bool = False,
           align: int = 1) -> torch.Tensor:
    """Every (head, direction) keeping between 1 and min_units - 1 units keeps its min_units strongest alive
    units instead (all of them, if it has fewer); one keeping none or enough is unchanged. heads=True: a head
    that keeps no unit in either direction (but has alive units) keeps its max(min_units, align) strongest alive
    units in the direction of its strongest alive unit; with align > 1 so does a head with fewer than align
    units in each direction (min_units 0), which _align's rounding down would empty.

    Removing groups weakest first, the kept count of every (head, direction) stays monotone (never rises)
    under both floors: a head's last alive unit is its strongest, so the revived units are the ones it
    already kept — which keeps plan_budget's binary search exact."""
    out = keep.detach().cpu().clone()
    alive, norms = alive.detach().cpu(), norms.detach().cpu().double()
    count = out.sum(-1)
    for h, r in ((count > 0) & (count < min_units)).nonzero().tolist():
        out[h, r] = _strongest(alive[h, r], norms[h, r], min(min_units, int(alive[h, r].sum())))
    if heads:
        k = head_floor(min_units, align)
        # emptied: no direction keeps align units (fewer are rounded to none by _align, which runs after this)
        for h in ((out.sum(-1) < align).all(-1) & alive.any(-1).any(-1)).nonzero().flatten().tolist():
            best = torch.where(alive[h], norms[h], torch.full_like(norms[h], -1.0)).amax(-1)
            r = int(best[1] >= best[0])  # a tie: backward, whose unit the ranking removes last
            out[h, r] = _strongest(alive[h, r], norms[h, r], min(k, int(alive[h, r].sum())))
    return out.to(keep.device)


def _align(keep: torch.Tensor, norms: torch.Tensor, align: int) -> torch.Tensor:
    """Round each (head, direction)'s kept units down to a multiple of `align`, keeping the strongest."""
    out = torch.zeros_like(keep)
    for h in range(keep.shape[0]):
        for r in (0, 1):
            out[h, r] = _strongest(keep[h, r], norms[h, r], int(keep[h, r].sum()) // align * align)
    return out


# ---------------------------------------------------------------- tasks
class HoyerTask(Task):
    """CE + hoyer * sum over blocks of the Hoyer-square of the group norms."""

    name = "prune-reg"

    def __init__(self, model: nn.Module, cfg: TrainConfig, hoyer: float, scope: str = "block", groups: str = "far"):
        super().__init__(model, cfg)
        if hoyer < 0:
            raise ConfigError(f"--hoyer must be >= 0, got {hoyer}")
        self.hoyer, self.scope, self.groups = hoyer, scope, groups
        self.mods = [m for _, m in far_modules(model)]
        for p in model.parameters():
            p.requires_grad_(True)

    def loss(self, model, x, y):
        ce = classification_loss(model(x), y, self.cfg.label_smoothing)  # soft targets under mixup
        reg = torch.stack([hoyer_square(m, scope=self.scope, groups=self.groups) for m in self.mods]).sum()
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
        a, b = m.num_lstm_params(split=True)
        lstm, hp = lstm + a, hp + b
    return lstm, hp


# ---------------------------------------------------------------- the method
DEFAULT_PRUNE_RATIO = 0.3  # prune()'s ratio when neither a threshold nor a budget is given


def prune(model: nn.Module, train_data, *, eval_data=None, config: Optional[TrainConfig] = None,
          hoyer: float = 1e-3, prune_ratio: Optional[float] = None, threshold: Optional[float] = None,
          budget=None, align: int = 1, balance: bool = False, rounds: int = 1, hoyer_scope: str = "block",
          groups: str = "far", min_units: int = 0, keep_heads: bool = False,
          finetune_epochs: float = 1.0, finetune_lr: float = 2e-4, device: Optional[str] = None,
          identity: Optional[dict] = None, inplace: bool = False) -> nn.Module:
    """A pruned, compacted copy of the FAR model `model` (inplace=True prunes `model` itself), in padded
    storage (set_storage(result, "ragged") afterwards keeps only the kept units in memory).

    Steps: Hoyer-regularized training (config.epochs at config.lr; 0 epochs skips it) -> one global
    threshold (`threshold`, or the one that removes `prune_ratio` of all unit groups, or the weakest one
    that meets `budget`: a Budget or its 'KIND=VALUE' text; give one of the three, none means
    prune_ratio=DEFAULT_PRUNE_RATIO, 0.3) -> masked fine-tune (finetune_epochs at
    finetune_lr; 0 skips it) -> compaction (kept units only). align: with a budget, round every (head,
    direction) down to a multiple of this many units (array_units(budget): whole crossbar column blocks);
    balance: rank groups by their norm relative to their block's (plan_budget). min_units: every (head,
    direction) that keeps a unit keeps at least this many, its strongest (a budget is still met: more is
    removed elsewhere; a ratio or threshold then removes a little less than it says). keep_heads: no head
    loses every unit (its strongest max(min_units, align) kept instead; module docstring).
    rounds > 1 (with a budget or a ratio): steps 1-3 that many times, each round's budget (or ratio)
    shrinking geometrically to the target, each round with config.epochs and finetune_epochs of its own.
    hoyer_scope ("block" | "head-direction") and groups ("far" | "public"): module docstring and
    hoyer_square / group_sq_norms; the defaults are this implementation's, the alternatives the public
    code's.
    config.out_dir None writes nothing; with a folder, <out_dir>/reg, <out_dir>/finetune hold each
    stage's state and metrics and <out_dir>/masked.safetensors the masked model (<out_dir>/round<r>/...
    with rounds > 1), and config.resume continues an interrupted run. identity: extra settings a resumed
    run must match.
    Returns the model (eval mode) with `far_metadata` and `far_run` (see far.distill); with a budget,
    `far_budget` (the BudgetPlan of the last round: budget, achieved, the next group's value)."""
    cfg = config or TrainConfig()
    if cfg.epochs < 0 or finetune_epochs < 0:  # before validate, whose "epochs must be > 0" would hide that 0 skips
        raise ConfigError(f"the regularized and fine-tune epochs must be >= 0 (0 skips the stage), got "
                          f"{cfg.epochs} and {finetune_epochs}")
    dataclasses.replace(cfg, epochs=cfg.epochs or 1.0).validate()
    if isinstance(budget, str):
        budget = Budget.parse(budget)
    if isinstance(align, bool) or not isinstance(align, int) or align < 1:
        raise ConfigError(f"align must be an int >= 1, got {align!r}")
    check_min_units(min_units, align)
    if not isinstance(keep_heads, bool):
        raise ConfigError(f"keep_heads must be True or False, got {keep_heads!r}")
    if sum(v is not None for v in (budget, threshold, prune_ratio)) > 1:
        raise ConfigError("give one of prune_ratio, threshold and budget")
    if budget is None and threshold is None and prune_ratio is None:
        prune_ratio = DEFAULT_PRUNE_RATIO
    for name, v in (("hoyer", hoyer), ("finetune_epochs", finetune_epochs), ("finetune_lr", finetune_lr),
                    ("threshold", threshold), ("prune_ratio", prune_ratio)):
        if v is not None:
            finite_number(name, v)
    if threshold is not None and threshold < 0:
        raise ConfigError(f"threshold must be >= 0, got {threshold}")
    if prune_ratio is not None and not 0 <= prune_ratio < 1:
        raise ConfigError(f"prune_ratio must be in [0, 1), got {prune_ratio}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds must be an int >= 1, got {rounds!r}")
    if rounds > 1 and threshold is not None:
        raise ConfigError("rounds > 1 needs a budget or a prune ratio (a fixed threshold is one step)")
    if hoyer_scope not in HOYER_SCOPES:
        raise ConfigError(f"the Hoyer scope must be one of {', '.join(HOYER_SCOPES)}, got {hoyer_scope!r}")
    if groups not in GROUPS:
        raise ConfigError(f"groups must be one of {', '.join(GROUPS)}, got {groups!r}")
    named = far_modules(model)
    if not named:
        raise ConfigError("the model has no FAR blocks: prune a FAR student (far.distill makes one)")
    check_min_units(min_units, align, models=[m for _, m in named])
    finite_group_norms(named, groups)  # NaN or infinite weights: refused before any training
    if budget is not None:  # an impossible budget fails here, before any training
        check_budget(named, model, budget, head_units=head_floor(min_units, align) if keep_heads else 0,
                     align=align, groups=groups)
    check_fresh_run(cfg)  # every round's and stage's folder, before the first stage could overwrite its own
    check_resumable(cfg)  # a --resume with nothing to resume would start every stage over
    train_data, eval_data = limit_data(cfg, train_data, eval_data)
    d = setup_distributed(device)
    model = set_storage((model if inplace else copy.deepcopy(model)).to(d.device), "padded")  # masks need padding
    before = {name: m.hidden_sizes.clone() for name, m in far_modules(model)}
    params_before = lstm_param_count(model)
    ident = {**(identity or {}), "hoyer": hoyer, "hoyer_scope": hoyer_scope, "groups": groups,
             "budget": None if budget is None else str(budget), "align": align, "balance": balance, "rounds": rounds}
    if min_units > 1:  # only when set, so that runs started before the option existed still resume
        ident["min_units"] = min_units
    if keep_heads:
        ident["keep_heads"] = True
    ident.update(prune_ratio=prune_ratio, threshold=threshold)
    # what the masked model and each round's result were made with: a resumed run loads them only under these
    made = stage_identity("prune", cfg, {**ident, "finetune_epochs": finetune_epochs, "finetune_lr": finetune_lr,
                                         "world": d.world, "train_images": len(train_data)})
    start = budget_measure(model, budget)({}) if budget is not None else None
    histories: list = []
    seconds, steps = 0.0, 0
    record, thr, plan, result = [], None, None, None
    for r in range(1, rounds + 1):
        frac = r / rounds
        round_budget = None if budget is None else dataclasses.replace(
            budget, value=budget.value if r == rounds else max(budget.value, start * (budget.value / start) ** frac))
        # one round: the ratio itself (1 - (1 - p) ** 1 is p only up to rounding, which moves round(p * groups))
        round_ratio = (prune_ratio if prune_ratio is None or rounds == 1
                       else 1 - (1 - prune_ratio) ** (1 / rounds))
        out = cfg.out_dir if rounds == 1 or cfg.out_dir is None else os.path.join(cfg.out_dir, f"round{r}")
        rc = dataclasses.replace(cfg, out_dir=out)
        done_file = None if rounds == 1 or out is None else os.path.join(out, "done.safetensors")
        if cfg.resume and done_file is not None and os.path.isfile(done_file):
            model = load_finished_stage(done_file, made, d.device)
            record.append(model.far_checkpoint["metadata"]["round"])
            thr = record[-1].get("threshold")  # older files lack it: the summary then says n/a
            s, n, h = finished_stage_record(model)  # the round's training counts in the report
            seconds, steps = seconds + s, steps + n
            histories.extend(h)
            continue
        model, res, thr, plan, info = _prune_round(
            model, train_data, eval_data, rc, d, ident, hoyer, hoyer_scope, groups, round_ratio, threshold,
            round_budget, align, balance, finetune_epochs, finetune_lr, desc="" if rounds == 1 else f" (round {r}/{rounds})",
            min_units=min_units, keep_heads=keep_heads, made=made)
        result = res
        seconds += res.seconds
        steps += res.steps
        round_histories = info.pop("histories")
        histories.extend(round_histories)
        record.append(info)
        if not res.completed:
            break
        if done_file is not None and d.main:
            os.makedirs(out, exist_ok=True)
            save(model, done_file, metadata={"round": info, "run_identity": made,
                                             "result": stage_record(res.seconds, res.steps, round_histories)})
        d.barrier()
    completed = result is None or result.completed
    if completed:
        with torch.no_grad():
            for _, m in far_modules(model):
                compact_(m)
    final_acc = result.final_accuracy if result is not None else (record[-1].get("accuracy") if record else None)
    done = TrainResult(model, join_histories(*histories), final_acc, seconds, steps, None, completed)
    params_after = lstm_param_count(model)
    cut = 1 - params_after[0] / max(params_before[0], 1)
    cut_hp = 1 - sum(params_after) / max(sum(params_before), 1)
    from far.models import param_counts

    counts = param_counts(model)
    last = record[-1] if record else {}
    pruning = {"hoyer": hoyer, "hoyer_scope": hoyer_scope, "groups": groups, "reg_epochs": cfg.epochs,
               "prune_ratio": prune_ratio, "threshold": thr if completed else None, "finetune_epochs": finetune_epochs,
               "finetune_lr": finetune_lr, "masked_test_accuracy": last.get("masked_test_accuracy"),
               "lstm_params_before": params_before[0], "lstm_params_after": params_after[0],
               "head_proj_params_before": params_before[1], "head_proj_params_after": params_after[1],
               "params_kept": counts["kept"], "params_stored": counts["stored"],
               "mixer_params_kept": counts["mixer_kept"], "mixer_params_stored": counts["mixer_stored"],
               "rounds": rounds, "align": align, "balance": balance, "min_units": min_units,
               "keep_heads": keep_heads, "per_round": record}
    if budget is not None:
        pruning["budget"] = {"kind": budget.kind, "value": budget.value, "text": str(budget),
                             "achieved": last.get("achieved"), "before": start, "met": bool(completed and last.get("met")),
                             "next_group": last.get("next_group")}
    model.far_metadata = run_metadata("prune", cfg, d, done, **(identity or {}), pruning=pruning)
    rows = []
    if completed:
        rows = [("global threshold", f"{thr:.4g}" if thr is not None else "n/a"),
                ("LSTM params", f"{params_before[0]:,} -> {params_after[0]:,} ({100 * cut:.1f}% fewer)"),
                ("LSTM + head_proj", f"{sum(params_before):,} -> {sum(params_after):,} ({100 * cut_hp:.1f}% fewer)"),
                ("parameters kept / stored", f"{counts['kept']:,} / {counts['stored']:,} (token mixers "
                                             f"{counts['mixer_kept']:,} / {counts['mixer_stored']:,})")]
        for i, rec in enumerate(record, 1):
            tag = "" if rounds == 1 else f" (round {i})"
            if rec.get("budget_summary"):
                rows.append((f"budget{tag}", rec["budget_summary"]))
            acc = rec.get("masked_test_accuracy")
            rows.append((f"after masking{tag}", f"{100 * acc:.2f}%" if acc is not None else "n/a"))
        if (min_units > 1 or keep_heads) and budget is None:  # a budget's summary says it already
            rows.append(("floor", floor_text(min_units, keep_heads)))
    model.far_run = RunReport("prune", done.history, done.final_accuracy, seconds, steps, done.completed,
                              cfg.out_dir, rows=rows)
    model.far_pruned_from = before  # {block: hidden sizes before pruning}, for reports
    model.far_budget = plan
    return model.eval()


def _prune_round(model, train_data, eval_data, cfg, d, ident, hoyer, scope, groups, prune_ratio, threshold,
                 budget, align, balance, finetune_epochs, finetune_lr, desc="", min_units=0, keep_heads=False,
                 made=None):
    """One Hoyer -> threshold -> masked fine-tune round; the masked model is compacted before its fine-tune
    (as far.load gives back the masked file a resumed run continues from). made: the run's settings, recorded
    with the masked file and checked when a resumed run loads it. Returns (model, last TrainResult, threshold,
    BudgetPlan or None, record)."""
    histories: list = []
    seconds, steps = 0.0, 0
    masked_file = None if cfg.out_dir is None else os.path.join(cfg.out_dir, "masked.safetensors")
    result: Optional[TrainResult] = None
    plan = None
    info: dict = {}
    if cfg.resume and masked_file is not None and os.path.isfile(masked_file):
        model = load_finished_stage(masked_file, made or {}, d.device)
        info = dict(model.far_checkpoint["metadata"].get("round_info", {}))
        thr = float(model.far_checkpoint["metadata"]["threshold"])
        seconds, steps, histories = finished_stage_record(model)  # the Hoyer stage an earlier run trained
    else:
        if cfg.epochs > 0:
            c1 = stage_config(cfg, "reg")
            result = train(HoyerTask(model, c1, hoyer, scope, groups), train_data, eval_data, c1, d, identity=ident,
                           desc="prune: hoyer" + desc)
            seconds, steps = result.seconds, result.steps
            model = result.model
            histories.append(result.history)
        if result is None or result.completed:
            named = far_modules(model)
            mods = [m for _, m in named]
            finite_group_norms(named, groups)  # a non-finite weight (a diverged Hoyer stage): named, not ranked
            if budget is not None:
                plan = plan_budget(named, model, budget, align, groups, balance, min_units, keep_heads)
                thr, masks = plan.threshold, plan.masks
                info.update(budget=str(budget), achieved=plan.achieved, met=plan.met, next_group=plan.next_up,
                            budget_summary=plan.summary())
            else:
                thr = global_threshold(mods, prune_ratio, threshold, groups)
                masks = keep_masks(mods, thr, groups)
                if min_units > 1 or keep_heads:
                    with torch.no_grad():
                        masks = [_floor(k, group_norms(m, groups), m.unit_mask(), min_units, keep_heads)
                                 for k, m in zip(masks, mods)]
            with torch.no_grad():
                for m, keep in zip(mods, masks):
                    apply_keep_mask(m, keep)
                    compact_(m)
            info["hidden_sizes"] = {n: m.hidden_sizes.tolist() for n, m in named}
            info["threshold"] = thr
            if masked_file is not None and d.main:
                os.makedirs(cfg.out_dir, exist_ok=True)  # no Hoyer epoch: nothing has made the folder yet
                save(model, masked_file, metadata={"threshold": thr, "round_info": info,
                                                   "result": stage_record(seconds, steps, histories),
                                                   **({"run_identity": made} if made else {})})
            d.barrier()
    if result is None or result.completed:
        masked_acc = accuracy(model, eval_data, batch_size=cfg.eval_batch_size, device=d.device)
        info["masked_test_accuracy"] = masked_acc
        result = TrainResult(model, [], masked_acc, 0.0, 0, None, True)
        if finetune_epochs > 0:
            c2 = stage_config(cfg, "finetune", epochs=finetune_epochs, lr=finetune_lr,
                              min_lr=min(cfg.min_lr, finetune_lr),
                              warmup_epochs=min(cfg.warmup_epochs, finetune_epochs / 4))
            result = train(MaskedTask(model, c2), train_data, eval_data, c2, d, identity={**ident, "threshold": thr},
                           desc="prune: masked fine-tune" + desc)
            seconds += result.seconds
            steps += result.steps
            histories.append(result.history)
        model = result.model
        info["accuracy"] = result.final_accuracy
    result = TrainResult(model, [], result.final_accuracy, seconds, steps, None, result.completed)
    info["histories"] = histories
    return model, result, thr, plan, info
