"""Groups of programmed crossbars read together: one call computes G independent products
y_g = x_g @ w_g.T + b_g (e.g. every head and direction of a FAR block's recurrent W_hh at one time
step), each exactly as crossbar_matmul computes it alone.

The members share one CrossbarConfig; their weights may differ in shape (pruned heads): the group stacks
their programmed levels zero-padded to the largest [N, K]. Inputs are [G, M, K] (padded columns must be
zero, as FAR's padded units are), outputs [G, M, N] (padded outputs are zero, bias included). A
member's padded rows and columns are not emulated: they take no partial sums, no ADC conversions and
no read noise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch

from far_kernels.ops.crossbar_matmul.config import PROGRAM_FIELDS, CrossbarConfig, check_seed
from far_kernels.ops.crossbar_matmul.program import (AdcPlan, ProgrammedCrossbar, adc_plan, check_int64_totals,
                                                     exact_divisor, program_crossbar, read_noise_key)

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_CELL_FIELDS = tuple(f for f in PROGRAM_FIELDS if f != "seed")  # members may have their own programming seeds


def _cells_key(cfg: CrossbarConfig) -> tuple:
    return tuple(getattr(cfg, f) for f in _CELL_FIELDS)


def _version(t: torch.Tensor) -> int:
    """t's in-place modification counter; -1 for an inference tensor, which keeps none (cells programmed inside
    torch.inference_mode and modified in place inside it again are not seen by CrossbarGroup.of_one's cache)."""
    return -1 if t.is_inference() else t._version


class CrossbarGroup:
    """G ProgrammedCrossbars of one config (each may have its own programming seed), stacked for one read: levels [G, S, N, K] (N, K the largest
    member's; zero-padded; int8 without programming noise, float32 with), w_scale [G, N] (0 where padded),
    sizes [(N_g, K_g)]. Calibrated ADC ranges stay on the members (member.adc_range). `reads` counts the
    group's read-noisy calls (keys its noise). The members' cells are copied when the group is built: a member
    reprogrammed later needs a new group."""

    def __init__(self, members: Sequence[ProgrammedCrossbar]):
        members = list(members)
        if not members:
            raise ValueError("CrossbarGroup: no members")
        cfg = members[0].cfg
        for m in members:
            if not isinstance(m, ProgrammedCrossbar):
                raise TypeError(f"CrossbarGroup: members must be ProgrammedCrossbars, got {type(m).__name__}")
            if _cells_key(m.cfg) != _cells_key(cfg):
                diff = [f for f in _CELL_FIELDS if getattr(m.cfg, f) != getattr(cfg, f)]
                raise ValueError(f"CrossbarGroup: members were programmed with different configs ({', '.join(diff)})")
            if m.device != members[0].device:
                raise ValueError("CrossbarGroup: members are on different devices")
        self.members = members
        self.cfg = cfg
        self.sizes = [(m.N, m.K) for m in members]
        self.N = max(n for n, _ in self.sizes)
        self.K = max(k for _, k in self.sizes)
        noisy = any(m.noisy for m in members)
        S = cfg.n_weight_slices
        dev = members[0].device
        self.levels = torch.zeros(len(members), S, self.N, self.K, dtype=torch.float32 if noisy else torch.int8,
                                  device=dev)
        self.w_scale = torch.zeros(len(members), self.N, dtype=torch.float32, device=dev)
        for g, m in enumerate(members):
            self.levels[g, :, :m.N, :m.K] = m.levels.to(self.levels.dtype)
            self.w_scale[g, :m.N] = m.w_scale
        self.reads = 0
        self._tiles_cache = None  # (tile_rows, [G*T, tr, S*N] fp32 levels, [G, T] tile validity)

    @classmethod
    def of_one(cls, prog: ProgrammedCrossbar) -> "CrossbarGroup":
        """A group of `prog` alone (how the torch and cpp backends run one product), cached on `prog` while
        its cells stay the same tensors, unmodified: cells reprogrammed in place (drift, faults) or replaced
        are copied again, as every backend and the reference read them at each call."""
        key = (prog.levels, _version(prog.levels), prog.w_scale, _version(prog.w_scale))
        cached = prog.__dict__.get("_as_group")
        if cached is not None and all(a is b if isinstance(a, torch.Tensor) else a == b
                                      for a, b in zip(cached[0], key)):
            return cached[1]
        group = cls([prog])
        prog.__dict__["_as_group"] = (key, group)
        return group

    @property
    def G(self) -> int:
        return len(self.members)

    def padded_inputs(self) -> torch.Tensor:
        """[G, 1, K] bool: True at the input columns k >= K_g no member g reads (cached)."""
        mask = self.__dict__.get("_padded_inputs")
        if mask is None:
            k = torch.arange(self.K, device=self.device)
            mask = torch.stack([k >= kg for _, kg in self.sizes])[:, None, :]
            self.__dict__["_padded_inputs"] = mask
        return mask

    @property
    def device(self) -> torch.device:
        return self.levels.device

    @property
    def noisy(self) -> bool:
        return self.levels.dtype != torch.int8

    def tiles(self, tile_rows: int):
        """(levels as [G * T, tr, S * N] fp32 tiles, [G, T] bool: tile t holds rows of member g), cached."""
        if self._tiles_cache is None or self._tiles_cache[0] != tile_rows:
            G, S, N, K = self.levels.shape
            T = max(1, -(-K // tile_rows))
            tr = tile_rows if T > 1 else max(K, 1)
            lev = torch.nn.functional.pad(self.levels.float(), (0, T * tr - K))  # [G, S, N, T*tr]
            lev = lev.view(G, S, N, T, tr).permute(0, 3, 4, 1, 2).reshape(G * T, tr, S * N).contiguous()
            valid = torch.tensor([[t * tile_rows < max(k, 1) for t in range(T)] for _, k in self.sizes],
                                 device=self.device)
            self._tiles_cache = (tile_rows, lev, valid)
        return self._tiles_cache[1], self._tiles_cache[2]

    @classmethod
    def from_stacked(cls, levels: torch.Tensor, w_scale: torch.Tensor, cfg: CrossbarConfig) -> "CrossbarGroup":
        """A group of G same-shaped members from stacked levels [G, S, N, K] and scales [G, N] (no
        copies; members are views)."""
        G, S, N, K = levels.shape
        self = cls.__new__(cls)
        self.members = [ProgrammedCrossbar(levels[g], w_scale[g], cfg, N, K) for g in range(G)]
        self.cfg, self.sizes, self.N, self.K = cfg, [(N, K)] * G, N, K
        self.levels, self.w_scale = levels, w_scale
        self.reads = 0
        self._tiles_cache = None
        return self

    def to(self, device) -> "CrossbarGroup":
        g = CrossbarGroup([m.to(device) for m in self.members])
        g.reads = self.reads
        return g

    def __repr__(self) -> str:
        return (f"CrossbarGroup(G={self.G}, N={self.N}, K={self.K}, slices={self.cfg.n_weight_slices}, "
                f"levels={self.levels.dtype}, device={self.device})")


def program_group(weights: Sequence[Union[torch.Tensor, ProgrammedCrossbar]], cfg: Optional[CrossbarConfig] = None,
                  seeds: Optional[Sequence[int]] = None) -> CrossbarGroup:
    """Program every weight [N_g, K_g] (or take it as programmed) into one CrossbarGroup. seeds: each
    member's programming seed (default cfg.seed + g, so members get independent noise and faults)."""
    cfg = CrossbarConfig() if cfg is None else cfg
    weights = list(weights)
    if seeds is not None and len(seeds) != len(weights):
        raise ValueError(f"program_group: {len(weights)} weights but {len(seeds)} seeds")
    members = []
    for g, w in enumerate(weights):
        if isinstance(w, ProgrammedCrossbar):
            members.append(w)
        else:
            seed = seeds[g] if seeds is not None else cfg.seed + g
            members.append(program_crossbar(w, cfg.replace(seed=seed)))
    return CrossbarGroup(members)


def program_stacked(w: torch.Tensor, cfg: Optional[CrossbarConfig] = None, seed: Optional[int] = None) -> CrossbarGroup:
    """Program G same-shaped weights w [G, N, K] at once: the dynamic products of attention, whose K and
    V are written into crossbars for every input.

    Without programming noise or faults member g's cells are exactly program_crossbar(w[g], cfg)'s. Noise
    and stuck-at faults have program_crossbar's distributions but are drawn on w's device from one
    generator seeded by `seed` (default cfg.seed; an int in [0, 2^64)), for the whole stack at once. A member
    whose weight holds NaN or inf is programmed from its finite values with a NaN scale, so its outputs are
    NaN (as a non-finite input row's are)."""
    cfg = CrossbarConfig() if cfg is None else cfg
    if not isinstance(cfg, CrossbarConfig):
        raise TypeError(f"program_stacked: cfg must be a CrossbarConfig, got {type(cfg).__name__}")
    if not isinstance(w, torch.Tensor) or w.dtype not in _FLOATS:
        raise TypeError(f"program_stacked: w must be a float tensor, got {getattr(w, 'dtype', type(w).__name__)}")
    if w.dim() != 3 or 0 in w.shape:
        raise ValueError(f"program_stacked: w must be [G, N, K] with G, N, K >= 1, got {list(w.shape)}")
    check_seed(seed, "program_stacked: seed", allow_none=True)
    w = w.detach().float()
    finite = torch.isfinite(w).flatten(1).all(dim=1)  # [G]
    w = torch.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0)
    G, N, K = w.shape
    # quantize_weights per member, the same fp32 operations
    a = w.abs().amax(dim=2) if cfg.weight_scale == "channel" else w.abs().amax(dim=(1, 2))[:, None].expand(G, N)
    s_w = a / exact_divisor(cfg.w_qmax, a)
    safe = torch.where(s_w > 0, s_w, torch.ones_like(s_w))
    wq = torch.round(w / safe[..., None]).clamp_(-cfg.w_qmax, cfg.w_qmax)
    wq = torch.where((s_w > 0)[..., None], wq, torch.zeros_like(wq)).to(torch.int32)
    s_w = torch.where(finite[:, None], s_w, torch.full_like(s_w, float("nan"))).contiguous()
    S, cmax = cfg.n_weight_slices, cfg.cell_max
    shifts = (torch.arange(S, device=w.device, dtype=torch.int32) * cfg.cell_bits).view(1, S, 1, 1)
    if cfg.encoding == "differential":
        mag = (wq.abs()[:, None] >> shifts) & cmax  # [G, S, N, K]
        cells = [torch.where(wq[:, None] > 0, mag, 0), torch.where(wq[:, None] < 0, mag, 0)]
    else:
        cells = [((wq + cfg.offset)[:, None] >> shifts) & cmax]
    p0, p1 = cfg.stuck_at
    if cfg.prog_noise == 0 and p0 == 0 and p1 == 0:
        levels = (cells[0] - cells[1] if len(cells) == 2 else cells[0]).to(torch.int8)
    else:
        gen = torch.Generator(device=w.device).manual_seed(cfg.seed if seed is None else seed)
        out = []
        for c in cells:
            c = c.float()
            if cfg.prog_noise > 0:
                c = c + torch.randn(c.shape, generator=gen, device=w.device) * (cfg.prog_noise * cmax)
            if p0 > 0 or p1 > 0:
                u = torch.rand(c.shape, generator=gen, device=w.device)
                c = torch.where(u < p0, 0.0, torch.where(u < p0 + p1, float(cmax), c))
            out.append(c)
        levels = out[0] - out[1] if len(out) == 2 else out[0]
        levels = levels.to(torch.int8) if cfg.prog_noise == 0 else levels
    return CrossbarGroup.from_stacked(levels.contiguous(), s_w, cfg)


@dataclass
class GroupCall:
    x: torch.Tensor               # [G, M, K] as given (contiguous)
    group: CrossbarGroup
    cfg: CrossbarConfig
    bias: Optional[torch.Tensor]  # [G, N] fp32 or None
    adc: AdcPlan                  # mode, L, step; steps/mults [G, S] for calibrated
    read_key: int
    float_path: bool


def prepare_group_call(x, group, cfg=None, bias=None, op: str = "crossbar_matmul_group") -> GroupCall:
    """Validate crossbar_matmul_group's arguments and normalize them (the read-noise key is taken, not consumed)."""
    if not isinstance(group, CrossbarGroup):
        raise TypeError(f"{op}: group must be a CrossbarGroup (far_kernels.program_group), got {type(group).__name__}")
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOATS:
        raise TypeError(f"{op}: x must be a float tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    cfg = group.cfg if cfg is None else cfg
    if not isinstance(cfg, CrossbarConfig):
        raise TypeError(f"{op}: cfg must be a CrossbarConfig, got {type(cfg).__name__}")
    if _cells_key(cfg) != _cells_key(group.cfg):
        diff = [f for f in _CELL_FIELDS if getattr(cfg, f) != getattr(group.cfg, f)]
        raise ValueError(f"{op}: cfg differs from the one the group was programmed with in {', '.join(diff)}")
    if x.dim() != 3 or x.shape[0] != group.G or x.shape[2] != group.K:
        raise ValueError(f"{op}: x must be [G, M, K] = [{group.G}, M, {group.K}], got {list(x.shape)}")
    if x.device != group.device:
        raise ValueError(f"{op}: x is on {x.device} but the group is on {group.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype not in _FLOATS:  # as crossbar_matmul
            raise TypeError(f"{op}: bias must be a float tensor, got {getattr(bias, 'dtype', type(bias).__name__)}")
        if tuple(bias.shape) != (group.G, group.N) or bias.device != x.device:
            raise ValueError(f"{op}: bias must be a [G, N] = [{group.G}, {group.N}] tensor on {x.device}")
        bias = bias.detach().float().clone()
        for g, (n, _) in enumerate(group.sizes):
            bias[g, n:] = 0  # a member's padded outputs stay zero
    plan = adc_plan(cfg, None, x.device, op) if cfg.adc_range != "calibrated" or cfg.adc_bits is None else None
    if plan is None:  # calibrated: every member's own range
        S = cfg.n_weight_slices
        plans = [adc_plan(cfg, m.adc_range, x.device, f"{op} (member {g})") for g, m in enumerate(group.members)]
        plan = AdcPlan("calibrated", plans[0].L, plans[0].step, torch.stack([p.steps for p in plans]).view(-1, S),
                       torch.stack([p.mults for p in plans]).view(-1, S))
    check_int64_totals(cfg, plan, group.K, group.noisy or cfg.read_noise > 0, op)
    key = read_noise_key(cfg.seed, group.reads) if cfg.read_noise > 0 else 0
    x = x.detach().contiguous()
    if any(k < group.K for _, k in group.sizes):  # a member's padded input columns are no input of it: zeroed
        x = x.masked_fill(group.padded_inputs(), 0)  # (the batched backends quantize whole rows)
    return GroupCall(x, group, cfg, bias, plan, key, group.noisy or cfg.read_noise > 0)


def group_call_members(call: GroupCall) -> List[tuple]:
    """[(x_g [M, K_g], ProgrammedCrossbar, bias_g or None)]: the call as G separate products."""
    out = []
    for g, (m, (n, k)) in enumerate(zip(call.group.members, call.group.sizes)):
        out.append((call.x[g, :, :k], m, None if call.bias is None else call.bias[g, :n]))
    return out


def chunk_rows(M: int, per_row: int, budget: int = 1 << 24) -> int:
    return max(1, min(M, budget // max(1, per_row))) if M else 1


__all__ = ["CrossbarGroup", "GroupCall", "chunk_rows", "group_call_members", "prepare_group_call", "program_group",
           "program_stacked"]
