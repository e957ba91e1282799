"""Programming a crossbar (weights quantized, sliced, written once with their non-idealities) and the
argument checks shared by every backend of crossbar_matmul.

Plain PyTorch, importable without Triton or the extension.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch.utils.weak import WeakIdKeyDictionary

from far_kernels.ops.crossbar_matmul.config import PROGRAM_FIELDS, CrossbarConfig

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MASK64 = (1 << 64) - 1
INT32 = 2 ** 31
TRITON_MAX_N = 65535 * 128  # the crossbar kernel's grid: (ceil(M / 64), ceil(N / 128)) on a GPU


# ---- quantization (fp32 math; round = half to even) ----
def exact_divisor(d, like: torch.Tensor):
    """d as the divisor of `like` that divides with IEEE rounding on its device: d itself on the CPU, a 0-dim tensor
    on another device. ATen's CUDA division by a Python number multiplies by the number's fp32 reciprocal instead
    ("may lose one bit", div_true_kernel_cuda): max|x| / 127 moved ~4% of input scales by an ulp, so a GPU run
    differed from the CPU's, and "max" ADC ties (p L / p_max = k + 1/2) rounded the wrong way in ~7% of
    configurations (e.g. tile_rows=30, 1-bit cells and DAC, 5-bit ADC: p = 5)."""
    return d if like.device.type == "cpu" else torch.full((), float(d), dtype=like.dtype, device=like.device)


def quantize_weights(w: torch.Tensor, cfg: CrossbarConfig):
    """Symmetric weight quantization. w: [N, K] float -> (w_q [N, K] int32, s_w [N] fp32).

    s_w = max|w| / (2^(weight_bits-1) - 1) per row ("channel") or over the matrix ("tensor"), and
    w_q = clip(round(w / s_w), ±(2^(weight_bits-1) - 1)). An all-zero row (or matrix) gets s_w = 0
    and w_q = 0, so its output is exactly 0 (+ bias)."""
    w = w.detach().float()
    a = w.abs().amax(dim=1) if cfg.weight_scale == "channel" else w.abs().amax().expand(w.shape[0])
    s = a / exact_divisor(cfg.w_qmax, a)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    wq = torch.round(w / safe[:, None]).clamp_(-cfg.w_qmax, cfg.w_qmax)
    wq = torch.where((s > 0)[:, None], wq, torch.zeros_like(wq))
    return wq.to(torch.int32), s.contiguous()


def input_scales(x2d: torch.Tensor, cfg: CrossbarConfig):
    """Input scales of x2d [M, K] (fp32): (s_x [M], divisor [M]). s_x = max|x| / (2^(input_bits-1) - 1)
    per row ("row") or over the tensor ("tensor"), NaN where that data holds a non-finite value (its
    outputs are NaN); `divisor` is s_x where it is a positive finite number, else 1 (what x is divided by)."""
    M = x2d.shape[0]
    if cfg.input_scale == "row":
        a = x2d.abs().amax(dim=1) if x2d.shape[1] else x2d.new_zeros(M)
    else:
        a = (x2d.abs().amax() if x2d.numel() else x2d.new_zeros(())).expand(M)
    s = a / exact_divisor(cfg.x_qmax, a)
    s = torch.where(torch.isfinite(s), s, torch.full_like(s, float("nan")))
    div = torch.where((s > 0) & torch.isfinite(s), s, torch.ones_like(s))
    return s.contiguous(), div.contiguous()


def quantize_inputs(x2d: torch.Tensor, cfg: CrossbarConfig):
    """x2d [M, K] float -> (x_q [M, K] int32, s_x [M] fp32): x_q = clip(round(x / s_x), ±(2^(input_bits-1) - 1)),
    0 where x is NaN (such rows give NaN outputs through s_x)."""
    x2d = x2d.detach().float()
    s, div = input_scales(x2d, cfg)
    xq = torch.round(x2d / div[:, None]).clamp_(-cfg.x_qmax, cfg.x_qmax)
    xq = torch.nan_to_num(xq, nan=0.0)
    return xq.to(torch.int32), s


# ---- programmed crossbar ----
class ProgrammedCrossbar:
    """Weights written to crossbars once (program_crossbar) and read by every crossbar_matmul.

    levels: [S, N, K] effective signed cell level of weight slice i (least significant first) of
        weight n at row k: G+ - G- for "differential" (in [-(2^cell_bits-1), 2^cell_bits-1]), the
        unsigned level G for "offset". int8 when there is no programming noise, float32 otherwise.
    w_scale: [N] fp32 weight scale s_w (equal entries for weight_scale="tensor").
    cfg: the config it was programmed with; N, K: the weight's shape.
    adc_range: None, a float, or a [S] fp32 tensor (per weight slice): the ADC range r for
        adc_range="calibrated" (set by calibration; far_kernels.crossbar_partial_sum_absmax helps).
    reads: number of read-noisy products done so far (keys the read noise, so a sequence of calls
        is reproducible from cfg.seed and each call gets fresh noise).
    """

    def __init__(self, levels: torch.Tensor, w_scale: torch.Tensor, cfg: CrossbarConfig, N: int, K: int,
                 adc_range=None, reads: int = 0):
        S = cfg.n_weight_slices
        if tuple(levels.shape) != (S, N, K) or levels.dtype not in (torch.int8, torch.float32):
            raise ValueError(f"ProgrammedCrossbar: levels must be an int8/float32 [S, N, K] = [{S}, {N}, {K}] tensor, "
                             f"got {levels.dtype} {list(levels.shape)}")
        if tuple(w_scale.shape) != (N,) or w_scale.dtype != torch.float32 or w_scale.device != levels.device:
            raise ValueError(f"ProgrammedCrossbar: w_scale must be a float32 [{N}] tensor on {levels.device}")
        self.levels, self.w_scale, self.cfg, self.N, self.K = levels, w_scale, cfg, N, K
        self.adc_range = adc_range
        self.reads = reads

    @property
    def device(self) -> torch.device:
        return self.levels.device

    @property
    def noisy(self) -> bool:
        """True when the levels are not integers (programming noise)."""
        return self.levels.dtype != torch.int8

    def to(self, device) -> "ProgrammedCrossbar":
        """A copy on `device` (same levels, scales, adc_range and read counter)."""
        r = self.adc_range.to(device) if isinstance(self.adc_range, torch.Tensor) else self.adc_range
        return ProgrammedCrossbar(self.levels.to(device), self.w_scale.to(device), self.cfg, self.N, self.K, r, self.reads)

    def weight(self) -> torch.Tensor:
        """[N, K] fp32: the weight the cells represent, s_w * (Σ_i 2^(i·cell_bits) levels_i - offset)."""
        cfg = self.cfg
        acc = torch.zeros(self.N, self.K, dtype=torch.float64, device=self.device)
        for i in range(cfg.n_weight_slices):
            acc += self.levels[i].double() * float(1 << (i * cfg.cell_bits))
        return ((acc - cfg.offset) * self.w_scale.double()[:, None]).float()

    def __repr__(self) -> str:
        return (f"ProgrammedCrossbar(N={self.N}, K={self.K}, slices={self.cfg.n_weight_slices}, "
                f"levels={self.levels.dtype}, device={self.device}, adc_range={self.adc_range!r})")


def program_crossbar(w: torch.Tensor, cfg: Optional[CrossbarConfig] = None) -> ProgrammedCrossbar:
    """Quantize, slice and program a weight matrix once (programming noise and stuck-at faults drawn
    here, seeded by cfg.seed, on the CPU so that every device gets the same cells).

    Args:
        w: [N, K] float32/float16/bfloat16/float64 weight (nn.Linear layout), finite.
        cfg: CrossbarConfig (default CrossbarConfig()).
    Returns:
        ProgrammedCrossbar on w's device. Differential: slice i of |w_q| goes to the w+ cell when
        w_q > 0 and the w- cell when w_q < 0; both cells of a pair get their own noise and faults.
        Offset: slice i of w_q + 2^(weight_bits-1) in one cell. Noise: level + N(0, (prog_noise *
        (2^cell_bits-1))^2), not clipped; stuck cells sit exactly at 0 or 2^cell_bits-1.
    """
    cfg = CrossbarConfig() if cfg is None else cfg
    if not isinstance(cfg, CrossbarConfig):
        raise TypeError(f"program_crossbar: cfg must be a CrossbarConfig, got {type(cfg).__name__}")
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"program_crossbar: w must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in _FLOATS:
        raise TypeError(f"program_crossbar: w must be float32/float16/bfloat16/float64, got {w.dtype}")
    if w.dim() != 2 or w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"program_crossbar: w must be [N, K] with N, K >= 1, got {list(w.shape)}")
    if not bool(torch.isfinite(w.float()).all()):  # float64 values beyond float32's range are inf where w is quantized
        raise ValueError("program_crossbar: w holds NaN or inf values (in float32, where weights are quantized)")
    N, K = w.shape
    wq, s_w = quantize_weights(w, cfg)
    S, cb, cmax = cfg.n_weight_slices, cfg.cell_bits, cfg.cell_max
    shifts = (torch.arange(S, device=w.device, dtype=torch.int32) * cb)[:, None, None]
    if cfg.encoding == "differential":
        mag = (wq.abs()[None] >> shifts) & cmax  # [S, N, K]
        cells = torch.stack((torch.where(wq > 0, mag, 0), torch.where(wq < 0, mag, 0)))  # [2, S, N, K]
    else:
        cells = (((wq + cfg.offset)[None] >> shifts) & cmax)[None]  # [1, S, N, K]
    p0, p1 = cfg.stuck_at
    if cfg.prog_noise == 0 and p0 == 0 and p1 == 0:
        cells_f = cells
    else:
        g = torch.Generator(device="cpu").manual_seed(cfg.seed)
        cells_f = cells.cpu().float()
        if cfg.prog_noise > 0:
            cells_f = cells_f + torch.randn(cells_f.shape, generator=g) * (cfg.prog_noise * cmax)
        if p0 > 0 or p1 > 0:
            u = torch.rand(cells_f.shape, generator=g)
            cells_f = torch.where(u < p0, 0.0, torch.where(u < p0 + p1, float(cmax), cells_f))
        cells_f = cells_f.to(w.device)
        if cfg.prog_noise == 0:
            cells_f = cells_f.to(torch.int32)
    levels = cells_f[0] - cells_f[1] if cfg.encoding == "differential" else cells_f[0]
    levels = levels.to(torch.int8 if cfg.prog_noise == 0 else torch.float32).contiguous()
    return ProgrammedCrossbar(levels, s_w, cfg, N, K)


# ---- one call's normalized arguments (shared by every backend) ----
@dataclass
class AdcPlan:
    """mode: "none" | "granular" | "max" | "calibrated"; L: levels (0 for none); step: fp32 scalar
    tensor ("max": p_max / L, "granular"/"none": 1); steps/mults: [S] fp32 ("calibrated": r_i / L and
    steps_i * 2^(i·cell_bits)), None otherwise."""
    mode: str
    L: int
    step: torch.Tensor
    steps: Optional[torch.Tensor] = None
    mults: Optional[torch.Tensor] = None
    step_value: float = 1.0  # `step` as a Python float (the same fp32 value): a launch reads it without a GPU sync


@dataclass
class CrossbarCall:
    x2d: torch.Tensor           # [M, K] input as given (contiguous), any float dtype
    lead: tuple                 # x's leading shape
    prog: ProgrammedCrossbar
    cfg: CrossbarConfig         # read-side config (programming fields equal prog.cfg's)
    bias: Optional[torch.Tensor]  # [N] fp32 or None
    adc: AdcPlan
    read_key: int               # 63-bit key of this call's read noise (0 when read_noise == 0)
    float_path: bool            # partial sums are not integers (programming or read noise)


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def read_noise_key(seed: int, reads: int) -> int:
    """A 62-bit key (>= 2^40) for the read noise of call number `reads` of a crossbar seeded with `seed`."""
    return (_splitmix64(_splitmix64(seed) ^ reads) >> 2) | (1 << 40)


INT64_LIMIT = 1 << 63


def code_bound(cfg: CrossbarConfig, plan: AdcPlan, float_path: bool) -> int:
    """The largest |ADC code| one tile's read can give (without an ADC: the largest |partial sum|, p_max). A
    granular code is the partial sum itself, so min(L, p_max), but only for integer partial sums: noisy ones
    (float_path) can pass p_max, and their codes reach L, as "max" and "calibrated" codes do. The bounds of
    check_int64_totals, acc_bound (triton's int32) and batched.acc_bound (fp32 sums) all start here."""
    if plan.mode == "none":
        return cfg.p_max
    L = max(plan.L, 1)
    return min(L, cfg.p_max) if plan.mode == "granular" and not float_path else L


def check_int64_totals(cfg: CrossbarConfig, plan: AdcPlan, K: int, float_path: bool, op: str) -> None:
    """ValueError when the digital shift-and-add of a call could pass int64: its totals are up to tiles x the
    largest code x sum_j 2^(j dac_bits) x sum_i 2^(i cell_bits) (+ the offset encoding's correction), summed in
    int64 by every backend and the reference (which would wrap around silently). Without an ADC on noisy
    partial sums the totals are floats: nothing to check."""
    if plan.mode == "none" and float_path:
        return
    tiles = -(-K // cfg.tile_rows)
    total = tiles * code_bound(cfg, plan, float_path) * sum(1 << (j * cfg.dac_bits) for j in range(cfg.n_input_slices)) \
        * sum(1 << (i * cfg.cell_bits) for i in range(cfg.n_weight_slices)) + cfg.offset * K * cfg.x_qmax
    if total >= INT64_LIMIT:
        raise ValueError(f"{op}: with these bits (weight {cfg.weight_bits}, cell {cfg.cell_bits}, input "
                         f"{cfg.input_bits}, DAC {cfg.dac_bits}, ADC {cfg.adc_bits}) and K = {K} the digital "
                         f"shift-and-add totals reach {total:.3g} >= 2^63 and would overflow int64; use fewer bits "
                         "or a coarser ADC")


_VALID_RANGES = WeakIdKeyDictionary()  # adc_range tensors found positive and finite -> their _version then


def adc_plan(cfg: CrossbarConfig, adc_range=None, device="cpu", op: str = "crossbar_matmul") -> AdcPlan:
    """The ADC steps of a call (one place, so every backend uses the same fp32 numbers)."""
    one = torch.ones((), dtype=torch.float32, device=device)
    if cfg.adc_bits is None:
        return AdcPlan("none", 0, one)
    L = cfg.adc_levels
    if cfg.adc_range == "granular":
        return AdcPlan("granular", L, one)
    if cfg.adc_range == "max":
        step = struct.unpack("f", struct.pack("f", cfg.p_max / L))[0]  # fp32 rounding (to nearest even) on the host
        # torch.full, not torch.tensor: a host-to-device copy of a Python value waits for the GPU (fill does not)
        return AdcPlan("max", L, torch.full((), step, dtype=torch.float32, device=device), step_value=step)
    S = cfg.n_weight_slices
    if adc_range is None:
        raise ValueError(f"{op}: adc_range='calibrated' needs a range: calibrate the ProgrammedCrossbar (set its "
                         "adc_range, e.g. from crossbar_partial_sum_absmax) or pass adc_range=")
    r = torch.as_tensor(adc_range, dtype=torch.float32).to(device)
    if r.dim() == 0:
        r = r.expand(S)
    if tuple(r.shape) != (S,):
        raise ValueError(f"{op}: adc_range must be a scalar or have one entry per weight slice ([{S}]), got {list(r.shape)}")
    steps = (r / torch.full((), float(L), dtype=torch.float32, device=device)).contiguous()
    powers = torch.ones(S, dtype=torch.int64, device=device) << (torch.arange(S, device=device) * cfg.cell_bits)
    mults = (steps * powers.float()).contiguous()  # steps_i · 2^(i·cell_bits): integer shifts, exact
    if not (isinstance(adc_range, torch.Tensor) and _VALID_RANGES.get(adc_range) == adc_range._version):
        # reading r on the host waits for the GPU: a range (calibrate's, on x's device) is checked once per version
        if not bool(torch.isfinite(r).all()) or not bool((r > 0).all()):
            raise ValueError(f"{op}: adc_range must be positive and finite, got {r.tolist()}")
        # a step of 0 makes p/step NaN for p = 0, a shifted step of inf makes C_i·step NaN for C_i = 0
        if not bool((steps > 0).all()) or not bool(torch.isfinite(mults).all()):
            raise ValueError(f"{op}: adc_range {r.tolist()} gives ADC steps r/L (L = {L}) of 0 or shifted steps "
                             f"r/L·2^(i·cell_bits) beyond float32's range")
        if isinstance(adc_range, torch.Tensor):
            _VALID_RANGES[adc_range] = adc_range._version
    return AdcPlan("calibrated", L, one, steps, mults)


def prepare_call(x, w, cfg=None, bias=None, adc_range=None, op: str = "crossbar_matmul",
                 consume_read: bool = True) -> CrossbarCall:
    """Validate crossbar_matmul's arguments (clear errors, nothing computed yet) and normalize them."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{op}: x must be float32/float16/bfloat16/float64, got {x.dtype}")
    if cfg is not None and not isinstance(cfg, CrossbarConfig):
        raise TypeError(f"{op}: cfg must be a CrossbarConfig, got {type(cfg).__name__}")
    if isinstance(w, ProgrammedCrossbar):
        prog = w
        if cfg is None:
            cfg = prog.cfg
        elif cfg.program_key() != prog.cfg.program_key():
            diff = [f for f in PROGRAM_FIELDS if getattr(cfg, f) != getattr(prog.cfg, f)]
            raise ValueError(f"{op}: cfg differs from the one the crossbar was programmed with in {', '.join(diff)}; "
                             "program the weights again (program_crossbar) to change these")
    elif isinstance(w, torch.Tensor):
        if w.dim() != 2:
            raise ValueError(f"{op}: w must be [N, K], got {list(w.shape)}")
        if w.device != x.device:
            raise ValueError(f"{op}: x is on {x.device} but w is on {w.device}")
        cfg = CrossbarConfig() if cfg is None else cfg
        prog = program_crossbar(w, cfg)
    else:
        raise TypeError(f"{op}: w must be a [N, K] tensor or a ProgrammedCrossbar, got {type(w).__name__}")
    if x.dim() < 1 or x.shape[-1] != prog.K:
        raise ValueError(f"{op}: x must be [..., K] with K = {prog.K}, got {list(x.shape)}")
    if prog.device != x.device:
        raise ValueError(f"{op}: x is on {x.device} but the programmed crossbar is on {prog.device} (use .to(device))")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype not in _FLOATS:
            raise TypeError(f"{op}: bias must be a float tensor, got {getattr(bias, 'dtype', type(bias).__name__)}")
        if tuple(bias.shape) != (prog.N,):
            raise ValueError(f"{op}: bias must be [N] = [{prog.N}], got {list(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"{op}: x is on {x.device} but bias is on {bias.device}")
        bias = bias.detach().float().contiguous()
    if adc_range is not None and cfg.adc_range != "calibrated":
        raise ValueError(f"{op}: adc_range= is only used with adc_range='calibrated' (cfg has {cfg.adc_range!r})")
    r = adc_range if adc_range is not None else prog.adc_range
    plan = adc_plan(cfg, r if cfg.adc_range == "calibrated" else None, x.device, op)
    key = 0
    if cfg.read_noise > 0:
        key = read_noise_key(cfg.seed, prog.reads)
        if consume_read:
            prog.reads += 1
    check_int64_totals(cfg, plan, prog.K, prog.noisy or cfg.read_noise > 0, op)
    lead = tuple(x.shape[:-1])
    x2d = x.detach().reshape(math.prod(lead), prog.K).contiguous()
    return CrossbarCall(x2d, lead, prog, cfg, bias, plan, key, prog.noisy or cfg.read_noise > 0)


def as_programmed(w: Union[torch.Tensor, ProgrammedCrossbar], cfg: Optional[CrossbarConfig]) -> ProgrammedCrossbar:
    return w if isinstance(w, ProgrammedCrossbar) else program_crossbar(w, cfg)


# ---- limits of the Triton kernel (pure Python, so the dispatcher can ask without importing triton) ----
def acc_bound(call: CrossbarCall) -> int:
    """An upper bound of |int32 accumulator| for this call (Python ints)."""
    cfg = call.cfg
    K = call.prog.K
    T = -(-K // cfg.tile_rows)
    c_max = code_bound(cfg, call.adc, call.float_path)
    gi = sum(1 << (i * cfg.cell_bits) for i in range(cfg.n_weight_slices))
    gj = sum(1 << (j * cfg.dac_bits) for j in range(cfg.n_input_slices))
    off = cfg.offset * K * cfg.x_qmax
    return T * c_max * gi * gj + off


def triton_unsupported(call: CrossbarCall) -> Optional[str]:
    """None if the Triton kernel can run this call, else why not (the torch backend always can)."""
    if not (call.adc.mode == "none" and call.float_path) and acc_bound(call) >= INT32:
        return ("its int32 accumulators could overflow for this config and K (bound "
                f"{acc_bound(call)} >= 2^31); use backend='torch'")
    if call.cfg.read_noise > 0 and call.x2d.shape[0] * call.prog.N >= INT32:
        return "read noise needs M * N < 2^31 (counter-based RNG offsets); use backend='torch' or split x"
    M, N, K, S = call.x2d.shape[0], call.prog.N, call.prog.K, call.cfg.n_weight_slices
    if max(M * max(call.x2d.stride(0), K), M * N, S * N * K) >= INT32:
        return ("the kernel addresses x, y and the levels with int32 offsets, which M, N, K overflow (M*K, M*N or "
                "S*N*K >= 2^31); use backend='torch' or split x")
    if K + call.cfg.tile_rows + 2 * 128 >= INT32:  # row indices run up to a tile and two 128-row blocks past K
        return f"its int32 row indices pass 2^31 at K = {K}; use backend='torch'"
    if N > TRITON_MAX_N:
        return (f"its grid's second axis holds ceil(N / 128) <= 65535 column blocks on a GPU, N = {N} needs more; "
                "use backend='torch'")
    return None
