"""CrossbarConfig: the emulated ReRAM crossbar (ISAAC-like defaults), validated once at construction.

The semantics each field controls are in docs/design.md ("Crossbar emulation") and in the
docstring of far_kernels.crossbar_matmul.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Tuple

ADC_RANGES = ("max", "granular", "calibrated")
ENCODINGS = ("differential", "offset")
WEIGHT_SCALES = ("channel", "tensor")
INPUT_SCALES = ("row", "tensor")

# Fields fixed when weights are programmed (program_crossbar); the rest are read-side settings that a
# ProgrammedCrossbar can be read with under another config (e.g. an ADC sweep without reprogramming).
def check_seed(seed, what: str, allow_none: bool = False) -> None:
    """ValueError unless `seed` is an int in [0, 2^64) (or None, when allowed): torch.Generator.manual_seed, which
    draws the programming noise and faults, takes 64 bits (a larger seed died there with 'Overflow when unpacking
    long long')."""
    if allow_none and seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 64:
        raise ValueError(f"{what} must be {'None or ' if allow_none else ''}an int in [0, 2^64), got {seed!r}")


PROGRAM_FIELDS = ("weight_bits", "cell_bits", "encoding", "weight_scale", "prog_noise", "stuck_at", "seed")

# Limits that keep every backend exact: slices fit int8 (tl.dot on int8), partial sums are integers
# that fp32 represents exactly (< 2**24), quantized values fit fp32's integer range.
MAX_WEIGHT_BITS = 16
MAX_INPUT_BITS = 16
MAX_CELL_BITS = 7
MAX_DAC_BITS = 7
MAX_ADC_BITS = 24
MAX_P = 2 ** 24


@dataclass(frozen=True)
class CrossbarConfig:
    """A bit-sliced ReRAM crossbar accelerator (ISAAC-like defaults).

    weight_bits: signed weight precision (w_q in ±(2^(weight_bits-1) - 1)); cell_bits: bits per cell
    (slice width); input_bits: signed input precision; dac_bits: input bits applied per read (slice
    width); adc_bits: ADC resolution (2^adc_bits - 1 signed levels), None = ideal (no ADC);
    adc_range: "max" (full range p_max), "granular" (step 1), "calibrated" (range from data; ignored
    without an ADC);
    tile_rows: crossbar rows (K is cut into tiles of this many rows); encoding: "differential"
    (column pair per weight) or "offset" (one unsigned column, offset removed digitally);
    weight_scale: "channel" (per output row) or "tensor"; input_scale: "row" or "tensor";
    prog_noise: σ of the Gaussian added to each programmed cell level, relative to the max level;
    read_noise: σ of the Gaussian added to each partial sum, relative to p_max;
    stuck_at: (p0, p1) fractions of cells stuck at level 0 / the max level; seed: seeds all noise.
    """

    weight_bits: int = 8
    cell_bits: int = 2
    input_bits: int = 8
    dac_bits: int = 1
    adc_bits: Optional[int] = 8
    adc_range: str = "max"
    tile_rows: int = 128
    encoding: str = "differential"
    weight_scale: str = "channel"
    input_scale: str = "row"
    prog_noise: float = 0.0
    read_noise: float = 0.0
    stuck_at: Tuple[float, float] = (0.0, 0.0)
    seed: int = 0

    def __post_init__(self):
        def need_int(name, lo, hi):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"CrossbarConfig.{name} must be an int, got {v!r}")
            if not lo <= v <= hi:
                raise ValueError(f"CrossbarConfig.{name} must lie in [{lo}, {hi}], got {v}")

        def need_choice(name, choices):
            v = getattr(self, name)
            if v not in choices:
                raise ValueError(f"CrossbarConfig.{name} must be one of {', '.join(map(repr, choices))}, got {v!r}")

        need_int("weight_bits", 2, MAX_WEIGHT_BITS)
        need_int("input_bits", 2, MAX_INPUT_BITS)
        need_int("cell_bits", 1, MAX_CELL_BITS)
        need_int("dac_bits", 1, MAX_DAC_BITS)
        if self.cell_bits > self.weight_bits:
            raise ValueError(f"CrossbarConfig: cell_bits ({self.cell_bits}) > weight_bits ({self.weight_bits})")
        if self.dac_bits > self.input_bits:
            raise ValueError(f"CrossbarConfig: dac_bits ({self.dac_bits}) > input_bits ({self.input_bits})")
        if self.adc_bits is not None:
            need_int("adc_bits", 2, MAX_ADC_BITS)
        need_int("tile_rows", 1, 1 << 20)
        check_seed(self.seed, "CrossbarConfig.seed")
        need_choice("adc_range", ADC_RANGES)
        need_choice("encoding", ENCODINGS)
        need_choice("weight_scale", WEIGHT_SCALES)
        need_choice("input_scale", INPUT_SCALES)
        for name in ("prog_noise", "read_noise"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"CrossbarConfig.{name} must be a finite number >= 0, got {v!r}")
        try:
            p0, p1 = self.stuck_at
            p0, p1 = float(p0), float(p1)
        except (TypeError, ValueError):
            raise ValueError(f"CrossbarConfig.stuck_at must be a pair (p0, p1) of fractions, got {self.stuck_at!r}") from None
        if not (0.0 <= p0 <= 1.0 and 0.0 <= p1 <= 1.0) or p0 + p1 > 1.0:
            raise ValueError(f"CrossbarConfig.stuck_at fractions must lie in [0, 1] and sum to <= 1, got {self.stuck_at!r}")
        object.__setattr__(self, "stuck_at", (p0, p1))
        object.__setattr__(self, "prog_noise", float(self.prog_noise))
        object.__setattr__(self, "read_noise", float(self.read_noise))
        if self.p_max >= MAX_P:
            raise ValueError(f"CrossbarConfig: the largest partial sum p_max = tile_rows * (2^dac_bits - 1) * "
                             f"(2^cell_bits - 1) = {self.p_max} must stay below 2^24 (exact in fp32); use fewer "
                             "tile_rows, dac_bits or cell_bits")

    # ---- derived quantities ----
    @property
    def w_qmax(self) -> int:
        """Largest |w_q|: 2^(weight_bits-1) - 1."""
        return (1 << (self.weight_bits - 1)) - 1

    @property
    def x_qmax(self) -> int:
        """Largest |x_q|: 2^(input_bits-1) - 1."""
        return (1 << (self.input_bits - 1)) - 1

    @property
    def stored_weight_bits(self) -> int:
        """Bits that are sliced: the magnitude (weight_bits-1) for differential, weight_bits for offset."""
        return self.weight_bits - 1 if self.encoding == "differential" else self.weight_bits

    @property
    def n_weight_slices(self) -> int:
        """S = ceil(stored_weight_bits / cell_bits)."""
        return -(-self.stored_weight_bits // self.cell_bits)

    @property
    def n_input_slices(self) -> int:
        """J = ceil((input_bits-1) / dac_bits)."""
        return -(-(self.input_bits - 1) // self.dac_bits)

    @property
    def cell_max(self) -> int:
        """Max cell level 2^cell_bits - 1."""
        return (1 << self.cell_bits) - 1

    @property
    def dac_max(self) -> int:
        """Max input slice magnitude 2^dac_bits - 1."""
        return (1 << self.dac_bits) - 1

    @property
    def p_max(self) -> int:
        """Largest |partial sum| of one tile: tile_rows * (2^dac_bits - 1) * (2^cell_bits - 1)."""
        return self.tile_rows * self.dac_max * self.cell_max

    @property
    def adc_levels(self) -> Optional[int]:
        """L = 2^(adc_bits-1) - 1 (the ADC outputs integers in [-L, L] times the step); None without ADC."""
        return None if self.adc_bits is None else (1 << (self.adc_bits - 1)) - 1

    @property
    def offset(self) -> int:
        """The offset 2^(weight_bits-1) of the offset encoding (0 for differential)."""
        return (1 << (self.weight_bits - 1)) if self.encoding == "offset" else 0

    @property
    def is_exact(self) -> bool:
        """True when the emulation equals the integer product x_q @ w_q.T (no noise, no faults, and no
        ADC or a granular ADC with L >= p_max): the exactness law."""
        noiseless = self.prog_noise == 0 and self.read_noise == 0 and self.stuck_at == (0.0, 0.0)
        adc_ok = self.adc_bits is None or (self.adc_range == "granular" and self.adc_levels >= self.p_max)
        return noiseless and adc_ok

    def replace(self, **changes) -> "CrossbarConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def program_key(self) -> tuple:
        """The fields that programming depends on (see PROGRAM_FIELDS)."""
        return tuple(getattr(self, f) for f in PROGRAM_FIELDS)
