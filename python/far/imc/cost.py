"""far.imc.cost: what a model costs on an ISAAC-like ReRAM in-memory-computing chip — energy, latency,
area, EDAP, TOPS/W, TOPS/mm² — counted layer by layer from the model itself.

    report = model_cost(model, CrossbarConfig(), HardwareSpec(dynamic="write"))
    print(report.table()); report.totals["energy_uj"], report.totals["edap"]

The chip (ISAAC, ISCA 2016; constants in cost_constants.json with their sources, generated from
Accelergy's hwcomponents-library by scripts/make_cost_constants.py; `HardwareSpec(constants=FILE)`
overrides any of them from a JSON or YAML file):
- Static weights (every nn.Linear, the patch-embedding convolution, FAR's pre_proj, W_ih, W_hh,
  head_proj per head and direction, kept units only) are programmed once into crossbars of
  cfg.tile_rows rows x hw.cols columns. A K x N matrix takes ceil(K / rows) x ceil(N * S * c / cols)
  arrays, S = cfg.n_weight_slices, c = 2 columns per weight (a differential pair, one ADC conversion per
  pair) or 1 (offset encoding, the offset removed digitally).
- One matrix-vector product (MVM) streams the J = cfg.n_input_slices input slices through the DACs: per
  slice every array of the matrix is read once (crossbar_read), every row's DAC of cfg.dac_bits fires (2^(b-1)
  times the 1-bit DAC's energy and area, the ADC rows' x2 per bit), every (row tile,
  output, weight slice) pair is converted by an ADC of cfg.adc_bits and shifted and added. The input is
  read from and the output written to the tile's eDRAM over its bus (input_bits per input, 16 bits per
  output). One MVM takes J crossbar cycles; a cycle is the longer of the read (100 ns) and the ADC's
  conversions of the outputs it serves (cols_per_adc columns: cols_per_adc / 2 differential pairs, or
  cols_per_adc offset-encoded columns, at its rate). A read also charges the columns' sample-and-hold.
  crossbar_read and sample_hold are ISAAC's for a 128 x 128 array: another geometry scales the cells' read energy
  and area by the cells (rows x cols / 128^2) and the sample-and-hold by the columns (cols / 128), first order.
- Dynamic products (attention's QKᵀ and S·V, per head; also those of timm's attention pools, global_pool "map"
  with its latent queries and "prr", T queries over T tokens) have no static weights:
  dynamic="write": K (as Kᵀ, d rows x T columns) and V (T rows x d columns) are written into dedicated
  crossbars for every image (cell_write energy per cell, rows written one after another within an array
  at cell_write latency, arrays in parallel), then read like weights; cell writes per inference and the
  chip's lifetime in images (endurance / writes per cell per image) are reported.
  dynamic="digital": an int8 MAC array of hw.digital_macs units at the clock does them.
- Digital work (biases, residual adds, LayerNorm, GELU, softmax, the LSTM gates and cell update, TReX's
  transformation blocks) runs on a vector unit of hw.vector_lanes fp16 lanes at the clock; a
  transcendental costs 4 multiplies + 4 adds (a polynomial).
- Timing, batch 1: layers run one after another (no inter-layer token pipelining); within a layer the
  T token MVMs stream back to back (T * J cycles); heads and directions run in parallel on their own
  arrays; a BiLSTM makes T sequential steps per direction, each one W_hh MVM (J cycles) plus the gate
  arithmetic; attention's writes precede its reads.
- Mapping (hw.packing): "none" gives every matrix (every LSTM of a head and direction, every head's
  head_proj) arrays of its own; "diagonal" lets matrices that are read in the same cycle (the 2H LSTMs of
  a FAR block at a step, its H head_projs, attention's per-head nothing: K/V arrays are written per image
  and are never packed) share an array when their row blocks and column blocks are disjoint — the cells
  off the diagonal blocks hold 0, so each column still sums its own matrix's rows only. A pruned LSTM's
  last, partly filled column block then fills another one's free columns. Array utilisation (cells that
  hold a weight / cells of the static arrays) is reported either way.
- Area: arrays (static and, with dynamic="write", the K/V arrays of every layer) with their periphery
  (ceil(cols / cols_per_adc) ADCs, one DAC per row, S+H, half a shift-and-add per array: 4 per 8-array IMA),
  plus per tile of hw.arrays_per_tile arrays an eDRAM, the eDRAM-IMA bus and a quarter router (the bus's area
  is given per IMA of 8 arrays: ceil(arrays_per_tile / 8) shares, 12 x 7500 um2 = ISAAC's 0.090 mm2 on its
  96-array tile); plus the vector unit and (dynamic="digital") the MAC array.
TOPS counts 2 operations per multiply-accumulate of every product (static, recurrent and dynamic).
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from far.errors import ConfigError
from far.imc.far_block import UnrolledFARAttention
from far.imc.layers import CrossbarGroupLinear, CrossbarLinear, QuantizedAttention
from far.models import attention_classes, attention_pool_classes, check_input, data_config
from far.nn import FARAttention, ReuseAttention
from far.nn.far_attention import as_hidden_sizes
from far.utils.env import eval_mode
from far.utils.fs import read_text

CONSTANTS_FILE = Path(__file__).resolve().parent / "cost_constants.json"
COMPONENTS = ("crossbar", "adc", "dac", "shift_add", "buffer", "writes", "digital")
DYNAMIC_MODES = ("write", "digital")
PACKINGS = ("none", "diagonal")
IMA_ARRAYS = 8  # crossbar arrays per ISAAC IMA (in-situ multiply-accumulate unit); 12 IMAs make a 96-array tile
ISAAC_ARRAY = (128, 128)  # rows x columns of the array that crossbar_read and sample_hold are given for


@dataclass(frozen=True)
class HardwareSpec:
    """The chip around the crossbars (crossbar geometry and bits: far_kernels.CrossbarConfig).

    cols: crossbar columns (rows = CrossbarConfig.tile_rows); cols_per_adc: columns one ADC converts per
    cycle (ISAAC: 128, one ADC per array); arrays_per_tile: arrays sharing a tile's eDRAM, bus and router
    (ISAAC: 12 IMAs x 8); vector_lanes: fp16 lanes of the digital vector unit; dynamic: "write" or
    "digital" (module docstring); digital_macs: int8 MAC units for dynamic="digital"; lstm_mapping: "fused"
    (each LSTM's [W_ih | W_hh] in one matrix read once per step with input [x_t; h_{t-1}], the usual
    crossbar mapping of an LSTM) or "separate" (W_ih over all tokens first, then W_hh per step, as
    far.imc's emulation computes it); write_verify: the
    program-and-verify factor on write energy and time (1 = a single pulse; the lifetime still counts one
    write per cell per image, the verify pulses are not counted as wear); endurance_cycles: writes a
    cell survives (None: the constants table's); constants: a JSON or YAML file of constants overriding
    the table, e.g. {"cell_write": {"energy_pj": 20}}; packing: "none" or "diagonal" (module docstring:
    Mapping)."""
    cols: int = 128
    cols_per_adc: int = 128
    arrays_per_tile: int = 96
    vector_lanes: int = 256
    dynamic: str = "write"
    digital_macs: int = 1024
    lstm_mapping: str = "fused"
    write_verify: float = 1.0
    endurance_cycles: Optional[float] = None
    constants: Optional[str] = None
    packing: str = "none"

    def __post_init__(self):
        if self.dynamic not in DYNAMIC_MODES:
            raise ConfigError(f"HardwareSpec.dynamic must be one of {', '.join(DYNAMIC_MODES)}, got {self.dynamic!r}")
        for name in ("cols", "cols_per_adc", "arrays_per_tile", "vector_lanes", "digital_macs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"HardwareSpec.{name} must be an int >= 1, got {v!r}")
        if self.packing not in PACKINGS:
            raise ConfigError(f"HardwareSpec.packing must be one of {', '.join(PACKINGS)}, got {self.packing!r}")
        if self.lstm_mapping not in ("fused", "separate"):
            raise ConfigError(f"HardwareSpec.lstm_mapping must be 'fused' or 'separate', got {self.lstm_mapping!r}")
        if self.cols_per_adc > self.cols:
            raise ConfigError(f"HardwareSpec.cols_per_adc ({self.cols_per_adc}) > cols ({self.cols})")
        if not self.write_verify >= 1:
            raise ConfigError(f"HardwareSpec.write_verify must be >= 1, got {self.write_verify}")
        if self.endurance_cycles is not None and not 0 < self.endurance_cycles < math.inf:
            raise ConfigError(f"HardwareSpec.endurance_cycles must be a finite number > 0, got {self.endurance_cycles}")

    def replace(self, **changes) -> "HardwareSpec":
        return dataclasses.replace(self, **changes)


def load_constants(path=None) -> dict:
    """The constants table (CONSTANTS_FILE), with the entries of `path` (JSON or YAML: {name: {field: value}})
    merged over it field by field."""
    table = json.loads(CONSTANTS_FILE.read_text())["constants"]
    if path is None:
        return table
    p = Path(path)
    try:
        text = read_text(p, "constants file")
    except OSError as e:
        raise ConfigError(f"constants file {path}: {e.strerror or e}") from None
    yaml_file = p.suffix.lower() in (".yaml", ".yml")
    if yaml_file:
        try:
            import yaml
        except ImportError:  # PyYAML is no dependency: the file is not at fault
            raise ConfigError(f"constants file {path}: reading YAML needs PyYAML (pip install pyyaml); "
                              "or write the file as JSON") from None
    try:
        if yaml_file:
            over = yaml.safe_load(text)
        else:
            over = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error is the file's
        raise ConfigError(f"constants file {path}: not valid {p.suffix[1:] or 'JSON'} ({e})") from None
    if not isinstance(over, dict):
        raise ConfigError(f"constants file {path}: expected a mapping of name -> fields")
    for name, fields in over.items():
        if name not in table or not isinstance(fields, dict):
            raise ConfigError(f"constants file {path}: unknown entry {name!r} (known: {', '.join(sorted(table))})")
        for k, v in fields.items():
            if k == "source":
                continue
            if k not in table[name]:  # a misspelt field would change nothing, silently
                known = ", ".join(f for f in table[name] if f != "source")
                raise ConfigError(f"constants file {path}: {name} has no field {k!r} (its fields: {known})")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"constants file {path}: {name}.{k} must be a finite number >= 0, got {v!r}")
            if k == "ghz" and v == 0:  # every digital time divides by the clock
                raise ConfigError(f"constants file {path}: {name}.{k} must be > 0")
        table[name] = {**table[name], **fields, "source": fields.get("source", f"overridden by {path}")}
    return table


# ---------------------------------------------------------------- the chip's unit costs
class _Chip:
    """Unit costs derived from the constants, the crossbar config and the hardware spec."""

    def __init__(self, cfg, hw: HardwareSpec):
        if cfg.adc_bits is None:
            raise ConfigError("the cost model needs an ADC: CrossbarConfig.adc_bits=None is an ideal readout")
        c = load_constants(hw.constants)
        adc_key = f"adc_{cfg.adc_bits}b"
        if adc_key not in c:
            raise ConfigError(f"no ADC of {cfg.adc_bits} bits in the constants table")
        self.cfg, self.hw, self.c = cfg, hw, c
        self.S, self.J, self.rows = cfg.n_weight_slices, cfg.n_input_slices, cfg.tile_rows
        self.pair = 2 if cfg.encoding == "differential" else 1
        adc = c[adc_key]
        # an array read: the cells' currents and the columns' sample-and-hold (ISAAC charges both per read)
        # (both given for ISAAC's 128 x 128 array: the cells' share scales with the cells, the S+H with the columns)
        cell_scale = self.rows * hw.cols / (ISAAC_ARRAY[0] * ISAAC_ARRAY[1])
        col_scale = hw.cols / ISAAC_ARRAY[1]
        self.e_read = c["crossbar_read"]["energy_pj"] * cell_scale + c["sample_hold"]["energy_pj"] * col_scale
        # a dac_bits-bit DAC: the 1-bit one's energy and area x2 per extra bit (hwcomponents-library's IsaacDAC
        # scales resolution as its IsaacADC does, the rule of the table's adc_*b rows)
        dac_scale = 2 ** (cfg.dac_bits - 1)
        self.e_adc, self.e_dac = adc["energy_pj"], c["dac_1b"]["energy_pj"] * dac_scale
        self.e_sa = c["shift_add"]["energy_pj"]
        self.e_bit = (c["edram_access_256b"]["energy_pj"] + c["bus_256b"]["energy_pj"]) / 256
        # one conversion per output (a differential pair's two columns are subtracted before the ADC, as the
        # energy counts them): an ADC serving cols_per_adc columns converts cols_per_adc / pair outputs a cycle
        self.conversions_per_cycle = math.ceil(hw.cols_per_adc / self.pair)
        self.cycle_ns = max(c["crossbar_read"]["latency_ns"], self.conversions_per_cycle * adc["latency_ns"])
        self.clock_ghz = c["clock"]["ghz"]
        self.e_write = c["cell_write"]["energy_pj"] * hw.write_verify
        self.t_write = c["cell_write"]["latency_ns"] * hw.write_verify
        self.endurance = hw.endurance_cycles if hw.endurance_cycles is not None else c["cell_write"]["endurance_cycles"]
        self.e_add, self.e_mul = c["fp16_add"]["energy_pj"], c["fp16_mult"]["energy_pj"]
        self.e_mac8 = c["int8_mult"]["energy_pj"] + c["int8_add"]["energy_pj"]
        per_array = (c["crossbar_read"]["area_um2"] * cell_scale
                     + math.ceil(hw.cols / hw.cols_per_adc) * adc["area_um2"]
                     + self.rows * c["dac_1b"]["area_um2"] * dac_scale + c["sample_hold"]["area_um2"] * col_scale
                     + 0.5 * c["shift_add"]["area_um2"])
        self.a_array = per_array
        # hwcomponents-library's IsaacEDRAMBus area is one IMA's share of the tile's bus ("Area reported per IMA. In
        # ISAAC, a bus connects 12 IMAs"): 7500 um2 x 12 = ISAAC's 0.090 mm2 per tile
        bus_shares = math.ceil(hw.arrays_per_tile / IMA_ARRAYS)
        self.a_tile = (c["edram_access_256b"]["area_um2"] + bus_shares * c["bus_256b"]["area_um2"]
                       + c["router_256b"]["area_um2"])
        self.a_lane = c["fp16_add"]["area_um2"] + c["fp16_mult"]["area_um2"]
        self.a_mac = c["int8_mult"]["area_um2"] + c["int8_add"]["area_um2"]

    def arrays(self, K: int, N: int) -> int:
        return math.ceil(K / self.rows) * math.ceil(N * self.S * self.pair / self.hw.cols)

    def blocks(self, K: int, N: int) -> List[tuple]:
        """The (rows, columns) pieces a K x N matrix is cut into: row tiles x column tiles of one array each."""
        cols = N * self.S * self.pair
        out = []
        for r0 in range(0, K, self.rows):
            for c0 in range(0, cols, self.hw.cols):
                out.append((min(self.rows, K - r0), min(self.hw.cols, cols - c0)))
        return out

    def packed_arrays(self, matrices: List[tuple]) -> int:
        """Arrays for matrices [(K, N)] read in the same cycle: one each per piece with packing "none"; with
        "diagonal", pieces share an array while their rows and their columns both fit (first fit, widest
        piece first)."""
        pieces = [b for K, N in matrices for b in self.blocks(K, N)]
        if self.hw.packing == "none":
            return len(pieces)
        bins: List[List[int]] = []  # [rows used, columns used]
        for r, c in sorted(pieces, key=lambda rc: (-rc[1], -rc[0])):
            for b in bins:
                if b[0] + r <= self.rows and b[1] + c <= self.hw.cols:
                    b[0] += r
                    b[1] += c
                    break
            else:
                bins.append([r, c])
        return len(bins)

    def cells(self, K: int, N: int) -> int:
        """Cells holding a K x N matrix's weights (every slice and both cells of a pair)."""
        return K * N * self.S * self.pair

    def mvm(self, K: int, N: int) -> dict:
        """Events and energy (pJ by component) of one K -> N matrix-vector product, and its time (ns)."""
        rt, ct = math.ceil(K / self.rows), math.ceil(N * self.S * self.pair / self.hw.cols)
        reads = rt * ct * self.J
        adc = rt * N * self.S * self.J
        dac = K * ct * self.J
        bits = K * self.cfg.input_bits + N * 16
        digital = N + (K if self.cfg.encoding == "offset" else 0)  # bias adds; offset correction
        return {"reads": reads, "adc": adc, "dac": dac, "bits": bits, "macs": K * N,
                "energy": {"crossbar": reads * self.e_read, "adc": adc * self.e_adc, "dac": dac * self.e_dac,
                           "shift_add": adc * self.e_sa, "buffer": bits * self.e_bit, "digital": digital * self.e_add},
                "ns": self.J * self.cycle_ns}

    def digital(self, adds: float = 0, mults: float = 0, nonlinear: float = 0) -> tuple:
        """(energy pJ, time ns) of elementwise work on the vector unit."""
        ops = adds + mults + 8 * nonlinear
        energy = adds * self.e_add + mults * self.e_mul + nonlinear * 4 * (self.e_add + self.e_mul)
        return energy, ops / self.hw.vector_lanes / self.clock_ghz


# ---------------------------------------------------------------- per-layer rows
@dataclass
class LayerCost:
    """One stage of the model: its arrays, events, energy by component (pJ), time (ns)."""
    name: str
    kind: str  # "static", "attention", "far", "reuse", "pool" (an attention pool's dynamic products), "digital"
    detail: str = ""
    arrays: int = 0
    dynamic_arrays: int = 0
    macs: float = 0.0
    adc_conversions: float = 0.0
    dac_activations: float = 0.0
    crossbar_reads: float = 0.0
    cell_writes: float = 0.0
    buffer_bits: float = 0.0
    digital_ops: float = 0.0
    weight_cells: float = 0.0  # cells of the static arrays that hold a weight (utilisation = / arrays' cells)
    energy: Dict[str, float] = field(default_factory=lambda: {k: 0.0 for k in COMPONENTS})
    latency_ns: float = 0.0

    def add_mvm(self, m: dict, count: float) -> None:
        """`count` MVMs of event dict `m` (no time: the caller composes time)."""
        self.macs += m["macs"] * count
        self.adc_conversions += m["adc"] * count
        self.dac_activations += m["dac"] * count
        self.crossbar_reads += m["reads"] * count
        self.buffer_bits += m["bits"] * count
        for k, v in m["energy"].items():
            self.energy[k] += v * count

    def add_digital(self, chip: _Chip, adds=0.0, mults=0.0, nonlinear=0.0) -> float:
        e, t = chip.digital(adds, mults, nonlinear)
        self.energy["digital"] += e
        self.digital_ops += adds + mults + nonlinear
        return t

    @property
    def energy_pj(self) -> float:
        return sum(self.energy.values())


def _static(chip: _Chip, row: LayerCost, K: int, N: int, T: int) -> float:
    """A static K -> N matrix applied to T vectors: arrays, events; returns its streaming time (ns)."""
    m = chip.mvm(K, N)
    row.arrays += chip.arrays(K, N)
    row.weight_cells += chip.cells(K, N)
    row.add_mvm(m, T)
    return T * m["ns"]


def _linear_row(chip, name, K, N, T) -> LayerCost:
    row = LayerCost(name, "static", f"{K} -> {N} x {T} tokens")
    row.latency_ns = _static(chip, row, K, N, T)
    return row


def _attention_row(chip: _Chip, name: str, attn: nn.Module, T: int) -> LayerCost:
    C, H, d = attn.qkv.in_features, attn.num_heads, attn.head_dim
    A = H * d
    row = LayerCost(name, "attention", f"{H} heads x d {d}, T {T}, dynamic {chip.hw.dynamic}")
    t = _static(chip, row, C, attn.qkv.out_features, T)  # qkv
    for norm, vectors, n in ((attn.q_norm, H * T, d), (attn.k_norm, H * T, d), (getattr(attn, "norm", None), T, A)):
        if norm is not None and not isinstance(norm, nn.Identity):  # qk_norm (per head), scale_norm: LayerNorms
            t += row.add_digital(chip, adds=3 * n * vectors, mults=2 * n * vectors, nonlinear=vectors)
    t += _dynamic(chip, row, H, d, T, T)
    t += _static(chip, row, A, attn.proj.out_features, T)  # proj
    row.latency_ns = t
    return row


def _dynamic(chip: _Chip, row: LayerCost, H: int, d: int, Tq: int, Tk: int) -> float:
    """Attention's dynamic products QK^T and S.V of H heads, Tq queries over Tk keys, and the softmax; returns
    their time (ns)."""
    dyn_macs = 2 * Tq * Tk * d  # QK^T and S.V, per head
    t = 0.0
    if chip.hw.dynamic == "write":
        k_arrays, v_arrays = chip.arrays(d, Tk), chip.arrays(Tk, d)  # K^T: d x Tk;  V: Tk x d
        cells = 2 * Tk * d * chip.S * chip.pair  # per head: both matrices, every cell (re)programmed
        row.dynamic_arrays += H * (k_arrays + v_arrays)
        row.cell_writes += H * cells
        row.energy["writes"] += H * cells * chip.e_write
        t_write_k = min(d, chip.rows) * chip.t_write  # rows one after another; row tiles in parallel
        t_write_v = min(Tk, chip.rows) * chip.t_write
        qk, sv = chip.mvm(d, Tk), chip.mvm(Tk, d)
        row.add_mvm(qk, H * Tq)
        row.add_mvm(sv, H * Tq)
        t += t_write_k + Tq * qk["ns"] + Tq * sv["ns"] + t_write_v  # writes of K then V are not hidden (batch 1)
    else:
        row.macs += H * dyn_macs
        row.energy["digital"] += H * dyn_macs * chip.e_mac8
        t += H * dyn_macs / chip.hw.digital_macs / chip.clock_ghz
    # softmax per head: Tq*Tk exp, adds (sums), multiplies (by 1/sum), the 1/sqrt(d) scale
    t += row.add_digital(chip, adds=H * Tq * Tk, mults=2 * H * Tq * Tk, nonlinear=H * Tq * Tk)
    return t


def _pool_row(chip: _Chip, name: str, pool: nn.Module, shape: tuple) -> LayerCost:
    """The dynamic products of a timm attention pool (global_pool "map": AttentionPoolLatent's latent queries over
    the tokens; "prr": AttentionPoolPrr's parameter-free self-attention); its Linears and norms are rows of
    their own."""
    H, d, N = pool.num_heads, pool.head_dim, shape[1]
    Tq = int(getattr(pool, "latent_len", N))  # "map": latent_len queries; "prr": every token queries
    row = LayerCost(name, "pool", f"attention pool: {H} heads x d {d}, {Tq} queries x {N} tokens, "
                                  f"dynamic {chip.hw.dynamic}")
    row.latency_ns = _dynamic(chip, row, H, d, Tq, N)
    return row


def _shared(chip: _Chip, row: LayerCost, matrices: List[tuple], count: float) -> None:
    """Arrays of `matrices` [(K, N)] read together `count` times, after their MVMs were added one by one:
    with packing, fewer arrays (and so fewer array reads) serve them."""
    pieces = sum(len(chip.blocks(K, N)) for K, N in matrices)
    packed = chip.packed_arrays(matrices)
    row.arrays += packed
    row.weight_cells += sum(chip.cells(K, N) for K, N in matrices)
    saved = (pieces - packed) * chip.J * count
    row.crossbar_reads -= saved
    row.energy["crossbar"] -= saved * chip.e_read


def _far_row(chip: _Chip, name: str, m: FARAttention, T: int, hidden_sizes=None) -> LayerCost:
    H, d = m.num_heads, m.head_dim
    try:
        hs = m.hidden_sizes if hidden_sizes is None else as_hidden_sizes(hidden_sizes, H, d)
    except ValueError as e:  # a negative count was costed as negative arrays and energy, a wrong shape crashed
        raise ConfigError(f"hidden_sizes[{name!r}]: {e}") from None
    row = LayerCost(name, "far", f"{H} heads x d {d}, kept units {hs.tolist()}, T {T}")
    t = _static(chip, row, m.dim, m.attn_dim, T)  # pre_proj
    fused = chip.hw.lstm_mapping == "fused"
    t_ih, t_hp, step_ns, gate_ops = 0.0, 0.0, 0.0, [0.0, 0.0, 0.0]
    steps, inputs, heads = [], [], []  # matrices read together: every LSTM step; every W_ih; every head_proj
    for head in range(H):
        kf, kb = int(hs[0, head]), int(hs[1, head])
        for k in (kf, kb):
            if k == 0:
                continue
            if fused:  # [W_ih | W_hh]: (d + k) -> 4k, read once per step
                step = chip.mvm(d + k, 4 * k)
                steps.append((d + k, 4 * k))
            else:  # W_ih streams every token first (bias folded in), then W_hh once per step
                m_ih = chip.mvm(d, 4 * k)
                row.add_mvm(m_ih, T)
                t_ih = max(t_ih, T * m_ih["ns"])
                inputs.append((d, 4 * k))
                step = chip.mvm(k, 4 * k)
                steps.append((k, 4 * k))
            row.add_mvm(step, T)  # heads and directions in parallel on their own arrays
            step_ns = max(step_ns, step["ns"])
            # per step and unit: 3 sigmoid + 2 tanh, f*c, i*g and o*tanh(c): 3 mult, and the add of f*c + i*g; the
            # 4 gate pre-activations' adds (bias; separate: + W_ih x_t) are the MVMs' output adds (mvm "digital")
            gate_ops[0] += k * T
            gate_ops[1] += 3 * k * T
            gate_ops[2] += 5 * k * T
        if kf + kb:
            m_hp = chip.mvm(kf + kb, d)  # head_proj per head
            row.add_mvm(m_hp, T)
            t_hp = max(t_hp, T * m_hp["ns"])
            heads.append((kf + kb, d))
    for group in (steps, inputs, heads):
        _shared(chip, row, group, T)
    e_gates, t_gates = chip.digital(*gate_ops)
    row.energy["digital"] += e_gates
    row.digital_ops += sum(gate_ops)
    t += t_ih + T * step_ns + t_gates  # T sequential steps; the gate arithmetic of a step after its W_hh read
    t += t_hp + _static(chip, row, m.attn_dim, m.proj.out_features, T)  # proj
    row.latency_ns = t
    return row


def _reuse_row(chip: _Chip, name: str, m: nn.Module, T: int) -> LayerCost:
    lin = m.transform.linear
    gelu = isinstance(m.transform.act, nn.GELU)  # the "ln-linear" transform has none
    row = LayerCost(name, "reuse", f"reuses block {m.source}'s attention output through LayerNorm -> "
                                   f"Linear({lin.in_features}, {lin.out_features})" + (" -> GELU" if gelu else ""))
    C = lin.in_features
    t = row.add_digital(chip, adds=3 * C * T, mults=2 * C * T, nonlinear=T)  # LayerNorm
    t += _static(chip, row, C, lin.out_features, T)
    if gelu:
        t += row.add_digital(chip, nonlinear=lin.out_features * T)
    row.latency_ns = t
    return row


# ---------------------------------------------------------------- the walk
@dataclass
class CostReport:
    """Rows per stage in forward order, totals, and the configuration they were computed under."""
    rows: List[LayerCost]
    totals: dict
    cfg: object
    hw: HardwareSpec

    def table(self) -> str:
        w = max([len(r.name) for r in self.rows] + [5])
        lines = [f"{'stage':<{w}}  {'kind':<9} {'arrays':>7} {'writes':>9} {'ADC conv':>10} {'energy nJ':>10} "
                 f"{'latency us':>10}"]
        for r in self.rows:
            lines.append(f"{r.name:<{w}}  {r.kind:<9} {r.arrays + r.dynamic_arrays:>7} {r.cell_writes:>9.3g} "
                         f"{r.adc_conversions:>10.3g} {r.energy_pj / 1e3:>10.2f} {r.latency_ns / 1e3:>10.2f}")
        t = self.totals
        util = f" ({100 * t['array_utilisation']:.0f}% of their cells used)" if t["array_utilisation"] else ""
        lines.append(f"total: {t['arrays']} static arrays{util} + {t['dynamic_arrays']} for K/V, {t['area_mm2']:.2f} mm2, "
                     f"{t['energy_uj']:.2f} uJ, {t['latency_us']:.1f} us per image, EDAP {t['edap']:.3g} J s mm2, "
                     f"{t['tops_per_w']:.2f} TOPS/W, {t['tops_per_mm2']:.3f} TOPS/mm2")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"config": dataclasses.asdict(self.cfg), "hardware": dataclasses.asdict(self.hw), "totals": self.totals,
                "rows": [{**dataclasses.asdict(r), "energy_pj": r.energy_pj} for r in self.rows]}


def _input_size(model: nn.Module, input_size) -> tuple:
    if input_size is not None:  # checked before the forward pass (timm's own errors are assertions)
        size = tuple(input_size)
        if len(size) != 3 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1
                                     for v in size):
            raise ConfigError(f"input_size must be 3 ints (C, H, W) >= 1, got {' '.join(map(str, size))}")
        size = tuple(int(v) for v in size)
        check_input(model, size, f"input_size {' '.join(map(str, size))}",
                    hint="leave input_size unset to use the model's")
        return size
    cfg = data_config(model)  # the patch embedding's size: timm keeps the default pretrained_cfg's at another img_size
    if "input_size" in cfg:
        return tuple(int(v) for v in cfg["input_size"])
    raise ConfigError(f"{type(model).__name__}: no patch embedding or pretrained_cfg input_size; "
                      "pass input_size=(C, H, W)")


def trace(model: nn.Module, input_size=None) -> list:
    """[(name, module, input shape)] of the modules the cost model knows, in the order one forward pass
    calls them (batch 1, zero input; weights do not matter). input_size: (C, H, W), default the model's own
    (its patch embedding's img_size and in_chans, else its pretrained_cfg: far.models.data_config)."""
    input_size = _input_size(model, input_size)
    kinds = ((nn.Linear, nn.Conv2d, nn.LayerNorm, nn.GELU, FARAttention, ReuseAttention) + attention_classes()
             + attention_pool_classes())
    names = {id(m): n for n, m in model.named_modules()}
    calls, handles = [], []
    for m in model.modules():
        if isinstance(m, kinds) or type(m).__name__ == "Block":
            handles.append(m.register_forward_pre_hook(
                lambda mod, args: calls.append((names[id(mod)], mod, tuple(args[0].shape)))))
    try:
        p = next(model.parameters())
        with torch.no_grad(), eval_mode(model):
            model(torch.zeros((1, *input_size), dtype=p.dtype, device=p.device))
    finally:
        for h in handles:
            h.remove()
    return calls


def model_cost(model: nn.Module, cfg=None, hw: Optional[HardwareSpec] = None, input_size=None,
               hidden_sizes: Optional[Dict[str, torch.Tensor]] = None, calls: Optional[list] = None) -> CostReport:
    """The cost of one image through `model` (a timm ViT, FAR or TReX model) on the chip (module
    docstring). cfg: far_kernels.CrossbarConfig (default ISAAC-like); hw: HardwareSpec; input_size:
    (C, H, W) (default: the model's own, as trace). hidden_sizes: {FAR module name: [2, H] kept units}
    to cost instead of the modules' own (what pruning to a budget asks of candidate masks); calls: the
    result of trace(model, input_size), reused across calls (the forward pass that finds the layers)."""
    import far_kernels

    cfg = cfg if cfg is not None else far_kernels.CrossbarConfig()
    hw = hw if hw is not None else HardwareSpec()
    chip = _Chip(cfg, hw)
    emulated = next((n for n, m in model.named_modules() if isinstance(
        m, (CrossbarLinear, CrossbarGroupLinear, QuantizedAttention, UnrolledFARAttention))), None)
    if emulated is not None:  # its crossbar modules are no nn.Linear / FARAttention / Attention: costed as absent
        raise ConfigError(f"model_cost: {type(model).__name__} is an emulated model ({emulated or 'the model'} is "
                          f"{type(model.get_submodule(emulated)).__name__}, from far.imc.emulate); cost the float "
                          "model, which the cost model maps onto crossbars itself")
    composite = (FARAttention,) + attention_classes()
    rows: List[LayerCost] = []
    inside: List[str] = []  # names of composite modules already costed: their children are theirs
    hidden_sizes = hidden_sizes or {}
    calls = calls if calls is not None else trace(model, input_size)
    # a reusing pre-norm block computes norm1(x) only for its attention, which ignores it (it transforms the
    # source's stored output): a chip skips that LayerNorm
    dead = {name[:-len("attn")] + "norm1" for name, m, _ in calls
            if isinstance(m, ReuseAttention) and name.endswith(".attn")
            and type(model.get_submodule(name[:-len(".attn")])).__name__ == "Block"}
    for name, m, shape in calls:
        if any(name.startswith(p + ".") for p in inside) or name in dead:
            continue
        T = int(math.prod(shape[1:-1])) if len(shape) > 2 else 1
        if isinstance(m, FARAttention):
            rows.append(_far_row(chip, name, m, T, hidden_sizes.get(name)))
            inside.append(name)
        elif isinstance(m, composite):
            rows.append(_attention_row(chip, name, m, T))
            inside.append(name)
        elif isinstance(m, ReuseAttention):
            rows.append(_reuse_row(chip, name, m, T))
            inside.append(name)
        elif isinstance(m, attention_pool_classes()):  # its dynamic products; its Linears and norms follow
            rows.append(_pool_row(chip, name, m, shape))
        elif isinstance(m, nn.Conv2d):
            Cin, kh, kw = m.in_channels // m.groups, *m.kernel_size
            H_out = (shape[2] + 2 * m.padding[0] - kh) // m.stride[0] + 1
            W_out = (shape[3] + 2 * m.padding[1] - kw) // m.stride[1] + 1
            rows.append(_linear_row(chip, name, Cin * kh * kw, m.out_channels, H_out * W_out))
        elif isinstance(m, nn.Linear):
            rows.append(_linear_row(chip, name, m.in_features, m.out_features, T))
        elif isinstance(m, nn.LayerNorm):
            C = shape[-1]
            row = LayerCost(name, "digital", f"LayerNorm {C} x {T}")
            row.latency_ns = row.add_digital(chip, adds=3 * C * T, mults=2 * C * T, nonlinear=T)
            rows.append(row)
        elif isinstance(m, nn.GELU):
            n = int(math.prod(shape[1:]))
            row = LayerCost(name, "digital", f"GELU x {n}")
            row.latency_ns = row.add_digital(chip, nonlinear=n)
            rows.append(row)
        else:  # a transformer block: its two residual adds
            n = int(math.prod(shape[1:]))
            row = LayerCost(name + ".residual", "digital", f"2 residual adds x {n}")
            row.latency_ns = row.add_digital(chip, adds=2 * n)
            rows.append(row)
    unknown = set(hidden_sizes) - {r.name for r in rows if r.kind == "far"}
    if unknown:  # a misspelt name would cost the module's own units, silently
        raise ConfigError(f"hidden_sizes: no FAR module {', '.join(map(repr, sorted(unknown)))} in "
                          f"{type(model).__name__} (its FAR modules: "
                          f"{', '.join(r.name for r in rows if r.kind == 'far') or 'none'})")
    return CostReport(rows, _totals(rows, chip), cfg, hw)


def _totals(rows: List[LayerCost], chip: _Chip) -> dict:
    hw = chip.hw
    has_dynamic = any(r.kind in ("attention", "pool") for r in rows)
    arrays = sum(r.arrays for r in rows)
    dyn = sum(r.dynamic_arrays for r in rows)
    array_cells = chip.rows * hw.cols
    tiles = math.ceil((arrays + dyn) / hw.arrays_per_tile) if arrays + dyn else 0
    area = {"arrays": (arrays + dyn) * chip.a_array, "tiles": tiles * chip.a_tile,
            "vector_unit": hw.vector_lanes * chip.a_lane,
            "mac_unit": hw.digital_macs * chip.a_mac if hw.dynamic == "digital" and has_dynamic else 0.0}
    area_mm2 = sum(area.values()) / 1e6
    energy = {k: sum(r.energy[k] for r in rows) for k in COMPONENTS}
    energy_pj = sum(energy.values())
    latency_ns = sum(r.latency_ns for r in rows)
    macs = sum(r.macs for r in rows)
    ops = 2 * macs
    writes = sum(r.cell_writes for r in rows)
    tops = ops / (latency_ns * 1e-9) / 1e12
    images_per_s = 1e9 / latency_ns
    lifetime = chip.endurance if writes else None  # every written cell is written once per image
    return {
        "arrays": arrays, "dynamic_arrays": dyn, "tiles": tiles, "area_mm2": area_mm2,
        "array_utilisation": sum(r.weight_cells for r in rows) / (arrays * array_cells) if arrays else None,
        "area_mm2_by_part": {k: v / 1e6 for k, v in area.items()},
        "energy_uj": energy_pj / 1e6, "energy_uj_by_component": {k: v / 1e6 for k, v in energy.items()},
        "latency_us": latency_ns / 1e3, "images_per_s": images_per_s,
        "edap": energy_pj * 1e-12 * latency_ns * 1e-9 * area_mm2, "macs": macs,
        "tops": tops, "tops_per_w": ops / (energy_pj * 1e-12) / 1e12, "tops_per_mm2": tops / area_mm2,
        "adc_conversions": sum(r.adc_conversions for r in rows), "dac_activations": sum(r.dac_activations for r in rows),
        "crossbar_reads": sum(r.crossbar_reads for r in rows), "cell_writes": writes,
        "buffer_bits": sum(r.buffer_bits for r in rows), "digital_ops": sum(r.digital_ops for r in rows),
        "lifetime_images": lifetime,
        "lifetime_hours": lifetime / images_per_s / 3600 if lifetime else None,
    }


__all__ = ["CONSTANTS_FILE", "PACKINGS", "CostReport", "HardwareSpec", "LayerCost", "load_constants", "model_cost",
           "trace"]
