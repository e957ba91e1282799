"""far.imc.cost: counts checked by hand on small layers, the constants against their sources, the
walk over attention / FAR / reuse models, and overrides."""
import json
import math
import os
import sys

import pytest
import torch
import torch.nn as nn

import far
from far.errors import ConfigError
from far.imc.cost import HardwareSpec, load_constants, model_cost
from far_kernels import CrossbarConfig


class OneLinear(nn.Module):
    """x [1, T, K] -> Linear(K, N): a model of one static layer."""

    def __init__(self, K, N, T):
        super().__init__()
        self.fc = nn.Linear(K, N)
        self.T = T
        self.pretrained_cfg = {"input_size": (T, K)}

    def forward(self, x):  # x [1, T, K]
        return self.fc(x)


def test_constants_reproduce_their_sources():
    c = load_constants()
    assert c["adc_8b"]["energy_pj"] == pytest.approx(16e-3 / (1.2e9 * 8) * 1e12)  # 16 mW / (8 ADCs x 1.2 GS/s)
    assert c["adc_8b"]["area_um2"] == pytest.approx(9600 / 8)
    assert c["adc_8b"]["latency_ns"] == pytest.approx(1 / 1.2)
    assert c["adc_6b"]["energy_pj"] == pytest.approx(c["adc_8b"]["energy_pj"] / 4)  # the library's 2x per bit
    assert c["dac_1b"]["energy_pj"] == pytest.approx(4e-3 / (128 * 8 * 1.2e7) * 1e12 * 128 / 100, rel=1e-4)
    assert c["dac_1b"]["area_um2"] == pytest.approx(170 / 128 / 8)
    assert c["shift_add"]["energy_pj"] == pytest.approx(0.2e-3 / (1.2 * 8e9) * 1e12, rel=1e-2)  # library: 0.021
    edram = (20.7e-3 / 12) * (16384 / ((128 * 8 * 1e7 * 1.2) * 100 / 128)) / ((16384 + 2048) * 2 / 256) * 1e12
    assert c["edram_access_256b"]["energy_pj"] == pytest.approx(edram, rel=1e-3)
    assert c["bus_256b"]["energy_pj"] == pytest.approx(256 * 0.054, rel=1e-3)
    assert c["crossbar_read"]["energy_pj"] == pytest.approx(2.4e-3 / 8 * 100e-9 * 1e12)  # 30 pJ
    assert all("source" in v for v in c.values())


def test_static_layer_counts_by_hand():
    """Linear(200 -> 50) over T = 3 tokens, 128-row arrays, 8-bit weights in 2-bit cells (S = 4 slices),
    differential pairs, 8-bit inputs through a 1-bit DAC (J = 7 slices), 8-bit ADC."""
    cfg, hw = CrossbarConfig(), HardwareSpec()
    r = model_cost(OneLinear(200, 50, 3), cfg, hw)
    row = r.rows[0]
    S, J, T = 4, 7, 3
    row_tiles, col_tiles = math.ceil(200 / 128), math.ceil(50 * S * 2 / 128)  # 2 x 4
    assert row.arrays == row_tiles * col_tiles == 8
    assert row.crossbar_reads == T * row_tiles * col_tiles * J
    assert row.adc_conversions == T * row_tiles * 50 * S * J  # one conversion per (tile, output, slice pair, input slice)
    assert row.dac_activations == T * 200 * col_tiles * J
    assert row.macs == T * 200 * 50
    c = load_constants()
    assert row.energy["adc"] == pytest.approx(row.adc_conversions * c["adc_8b"]["energy_pj"])
    assert row.energy["crossbar"] == pytest.approx(row.crossbar_reads * (c["crossbar_read"]["energy_pj"]
                                                                         + c["sample_hold"]["energy_pj"]))
    assert row.energy["buffer"] == pytest.approx(T * (200 * 8 + 50 * 16) * (c["edram_access_256b"]["energy_pj"]
                                                                           + c["bus_256b"]["energy_pj"]) / 256)
    # an ADC serves 128 columns = 64 differential pairs, one conversion each (as the energy counts them):
    # 64 / 1.2 GS/s = 53 ns < the 100 ns read
    assert row.latency_ns == pytest.approx(T * J * 100)
    assert r.totals["tops"] == pytest.approx(2 * row.macs / (row.latency_ns * 1e-9) / 1e12)
    # offset encoding: one column per weight slice, one conversion per column: 128 / 1.2 GS/s = 107 ns > 100 ns
    off = model_cost(OneLinear(200, 50, 3), CrossbarConfig(encoding="offset", weight_bits=8), hw).rows[0]
    assert off.arrays == row_tiles * math.ceil(50 * 4 / 128)
    assert off.adc_conversions == row.adc_conversions
    assert off.latency_ns == pytest.approx(T * J * 128 / 1.2)


@pytest.mark.parametrize("rows,cols", [(64, 128), (128, 128), (256, 128), (128, 64), (128, 256)])
def test_array_read_energy_and_area_scale_with_the_array(rows, cols):
    """crossbar_read and sample_hold are ISAAC's 128 x 128 array's: the same weights read through arrays of another
    size draw the same cell current (energy and cell area per cell, S+H per column), so a 256 x 64 matrix's cell
    and S+H energy does not depend on how many arrays it is cut into."""
    c = load_constants()
    r = model_cost(OneLinear(256, 64, 1), CrossbarConfig(tile_rows=rows), HardwareSpec(cols=cols, cols_per_adc=cols))
    row, J = r.rows[0], 7
    n_arrays = math.ceil(256 / rows) * math.ceil(64 * 8 / cols)
    assert row.arrays == n_arrays
    cells, columns = 256 * 64 * 8, n_arrays * cols  # every array here is full: rows x cols cells
    assert row.energy["crossbar"] == pytest.approx(J * (cells / 128 ** 2 * c["crossbar_read"]["energy_pj"]
                                                        + columns / 128 * c["sample_hold"]["energy_pj"]))
    per_array = (rows * cols / 128 ** 2 * c["crossbar_read"]["area_um2"] + c["adc_8b"]["area_um2"]
                 + rows * c["dac_1b"]["area_um2"] + cols / 128 * c["sample_hold"]["area_um2"]
                 + 0.5 * c["shift_add"]["area_um2"])
    assert r.totals["area_mm2_by_part"]["arrays"] == pytest.approx(n_arrays * per_array / 1e6)


def test_attention_dynamic_products_by_hand():
    """One attention block at T tokens: 'write' programs K^T (d x T) and V (T x d) per head every image."""
    torch.manual_seed(0)
    vit = far.create_model("fmnist_deit_tiny", far=False, embed_dim=32, depth=1, num_heads=2)
    T, d, H, S = 50, 16, 2, 4
    for dyn in ("write", "digital"):
        r = model_cost(vit, CrossbarConfig(), HardwareSpec(dynamic=dyn))
        attn = next(x for x in r.rows if x.kind == "attention")
        if dyn == "write":
            assert attn.cell_writes == H * 2 * T * d * S * 2
            assert attn.dynamic_arrays == H * (math.ceil(d / 128) * math.ceil(T * S * 2 / 128)
                                               + math.ceil(T / 128) * math.ceil(d * S * 2 / 128))
            assert r.totals["lifetime_images"] == load_constants()["cell_write"]["endurance_cycles"]
        else:
            assert attn.cell_writes == 0 and attn.dynamic_arrays == 0 and r.totals["lifetime_images"] is None
            assert attn.macs == T * 32 * 96 + H * 2 * T * T * d + T * 32 * 32  # qkv + QK^T, SV + proj


def test_far_block_counts_and_pruning_shrinks_the_chip():
    torch.manual_seed(0)
    m = far.create_model("fmnist_deit_tiny", embed_dim=32, depth=1, num_heads=2, hidden_sizes=[[[16, 5], [0, 16]]])
    for mapping in ("fused", "separate"):
        r = model_cost(m, CrossbarConfig(), HardwareSpec(lstm_mapping=mapping))
        blk = next(x for x in r.rows if x.kind == "far")
        units = [16, 5, 16]  # kept units of the (head, direction)s with any
        if mapping == "fused":  # [W_ih | W_hh]: (d + k) -> 4k per (head, direction)
            lstm = sum(math.ceil((16 + k) / 128) * math.ceil(4 * k * 8 / 128) for k in units)
        else:
            lstm = 2 * sum(math.ceil(4 * k * 8 / 128) for k in units)
        head_proj = math.ceil(21 / 128) * math.ceil(16 * 8 / 128) + math.ceil(16 / 128) * math.ceil(16 * 8 / 128)
        pre_proj = proj = math.ceil(32 / 128) * math.ceil(32 * 8 / 128)
        assert blk.arrays == pre_proj + lstm + head_proj + proj
        assert blk.cell_writes == 0 and blk.dynamic_arrays == 0
    full = far.create_model("fmnist_deit_tiny", embed_dim=32, depth=1, num_heads=2)
    assert model_cost(full).totals["energy_uj"] > model_cost(m).totals["energy_uj"]


def test_lstm_gate_arithmetic_by_hand():
    """Per step and kept unit the cell does 3 sigmoids + 2 tanh, 3 multiplies (f*c, i*g, o*tanh c) and one add
    (f*c + i*g); the 4 gate pre-activations' adds (bias, and with the separate mapping W_ih x_t + W_hh h) are
    the MVMs' output adds, charged once per output, not again as gate adds."""
    torch.manual_seed(0)
    m = far.create_model("fmnist_deit_tiny", embed_dim=32, depth=1, num_heads=2)  # d = k = 16, T = 50
    c = load_constants()
    add, mul = c["fp16_add"]["energy_pj"], c["fp16_mult"]["energy_pj"]
    H, d, k, T, C = 2, 16, 16, 50, 32
    for mapping, lstm_outputs in (("fused", 4 * k), ("separate", 2 * 4 * k)):  # separate: W_ih's and W_hh's
        blk = next(x for x in model_cost(m, hw=HardwareSpec(lstm_mapping=mapping)).rows if x.kind == "far")
        units = 2 * H * k * T  # (head, direction) x kept units x steps
        assert blk.digital_ops == units * (1 + 3 + 5)
        output_adds = T * (C + 2 * H * lstm_outputs + H * d + C)  # pre_proj, LSTMs, head_proj, proj
        gates = units * (1 * add + 3 * mul + 5 * 4 * (add + mul))
        assert blk.energy["digital"] == pytest.approx(output_adds * add + gates)


def test_reuse_block_is_costed_as_its_transform():
    torch.manual_seed(0)
    vit = far.create_model("fmnist_deit_tiny", far=False, embed_dim=32, depth=3, num_heads=2)
    base = model_cost(vit).totals
    far.nn.apply_reuse(vit, {2: 1})
    r = model_cost(vit)
    reuse = [x for x in r.rows if x.kind == "reuse"]
    assert len(reuse) == 1 and reuse[0].arrays == math.ceil(32 / 128) * math.ceil(32 * 8 / 128)
    assert r.totals["latency_us"] < base["latency_us"] and r.totals["cell_writes"] < base["cell_writes"]


@pytest.mark.parametrize("dynamic", ["write", "digital"])
def test_reuse_row_is_exactly_its_transform_and_nothing_of_the_attention(dynamic):
    """Block 2 reusing block 1: its row costs exactly a LayerNorm over C x T (the same model's norm2 row), a
    Linear(C, C) over T tokens (a ViT whose MLP is C -> C -> C gives that row) and a GELU over C x T (a quarter of
    the MLP's GELU over 4C x T) — no qkv, K/V writes, dynamic products, softmax or proj; every other row is
    unchanged, so the totals drop by exactly (attention + norm1 - transform)."""
    hw = HardwareSpec(dynamic=dynamic)
    torch.manual_seed(0)
    vit = far.create_model("fmnist_deit_tiny", far=False, embed_dim=32, depth=3, num_heads=2)
    before = {r.name: r for r in model_cost(vit, hw=hw).rows}
    far.nn.apply_reuse(vit, {2: 1})
    report = model_cost(vit, hw=hw)
    after = {r.name: r for r in report.rows}
    narrow = far.create_model("fmnist_deit_tiny", far=False, embed_dim=32, depth=1, num_heads=2, mlp_ratio=1.0)
    lin = next(r for r in model_cost(narrow, hw=hw).rows if r.name == "blocks.0.mlp.fc1")
    assert lin.detail == "32 -> 32 x 50 tokens"
    ln, gelu, row = before["blocks.2.norm2"], before["blocks.2.mlp.act"], after["blocks.2.attn"]
    assert row.kind == "reuse" and row.cell_writes == 0 and row.dynamic_arrays == 0
    for field in ("arrays", "macs", "adc_conversions", "dac_activations", "crossbar_reads", "buffer_bits"):
        assert getattr(row, field) == getattr(lin, field), field
    assert row.digital_ops == ln.digital_ops + lin.digital_ops + gelu.digital_ops / 4
    assert row.energy_pj == pytest.approx(ln.energy_pj + lin.energy_pj + gelu.energy_pj / 4, rel=1e-12)
    assert row.latency_ns == pytest.approx(ln.latency_ns + lin.latency_ns + gelu.latency_ns / 4, rel=1e-12)
    assert set(before) - set(after) == {"blocks.2.norm1"} and set(after) <= set(before)
    for name, r in after.items():
        if name != "blocks.2.attn":
            assert r.energy_pj == before[name].energy_pj and r.latency_ns == before[name].latency_ns, name
    saved = before["blocks.2.attn"].energy_pj + before["blocks.2.norm1"].energy_pj - row.energy_pj
    assert sum(r.energy_pj for r in before.values()) - sum(r.energy_pj for r in after.values()) == pytest.approx(
        saved, rel=1e-12)


def test_reusing_block_is_not_charged_the_layernorm_its_attention_ignores():
    """A reusing block's norm1 feeds only its ReuseAttention, which transforms the source's stored output: the chip
    skips it. Reuse removes exactly that LayerNorm row (and the attention row becomes a reuse row); the source
    block's norm1 and every other LayerNorm stay."""
    torch.manual_seed(0)
    vit = far.create_model("fmnist_deit_tiny", far=False, embed_dim=32, depth=3, num_heads=2)
    before = [x.name for x in model_cost(vit).rows]
    far.nn.apply_reuse(vit, {2: 1})
    after = [x.name for x in model_cost(vit).rows]
    assert "blocks.2.norm1" in before and "blocks.2.norm1" not in after
    assert [n for n in before if n != "blocks.2.norm1"] == after
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():  # the skipped LayerNorm is indeed dead: changing it does not change the output
        y = vit.eval()(x)
        vit.blocks[2].norm1.weight.mul_(3.0).add_(1.0)
        assert torch.equal(vit(x), y)


def test_reuse_transform_without_gelu_is_not_charged_one():
    """The "ln-linear" transform (far reuse --transform ln-linear) has no GELU: its row is the "ln-linear-gelu"
    row less exactly the GELU's C x T transcendentals (4 adds + 4 multiplies each) and their time."""
    rows = {}
    for kind in ("ln-linear-gelu", "ln-linear"):
        torch.manual_seed(0)
        vit = far.create_model("fmnist_deit_tiny", far=False, embed_dim=32, depth=3, num_heads=2)
        far.nn.apply_reuse(vit, {2: 1}, kind=kind)
        rows[kind] = next(x for x in model_cost(vit).rows if x.kind == "reuse")
    c, T, C = load_constants(), 50, 32
    gelu_pj = C * T * 4 * (c["fp16_add"]["energy_pj"] + c["fp16_mult"]["energy_pj"])
    gelu_ns = C * T * 8 / HardwareSpec().vector_lanes / c["clock"]["ghz"]
    full, bare = rows["ln-linear-gelu"], rows["ln-linear"]
    assert full.energy["digital"] - bare.energy["digital"] == pytest.approx(gelu_pj)
    assert full.latency_ns - bare.latency_ns == pytest.approx(gelu_ns)
    assert full.detail.endswith("-> GELU") and "GELU" not in bare.detail


def test_overrides_and_errors(tmp_path):
    f = tmp_path / "chip.json"
    f.write_text(json.dumps({"cell_write": {"energy_pj": 80.0}}))
    torch.manual_seed(0)
    vit = far.create_model("fmnist_deit_tiny", far=False, embed_dim=32, depth=1, num_heads=2)
    a = model_cost(vit).totals["energy_uj_by_component"]["writes"]
    b = model_cost(vit, hw=HardwareSpec(constants=str(f))).totals["energy_uj_by_component"]["writes"]
    assert b == pytest.approx(10 * a)
    assert load_constants(f)["cell_write"]["source"].startswith("overridden by")
    y = tmp_path / "chip.yaml"
    y.write_text("adc_8b:\n  energy_pj: 3.0\n")
    assert load_constants(y)["adc_8b"]["energy_pj"] == 3.0
    for bad, msg in (('{"nope": {}}', "unknown entry"), ('{"adc_8b": {"energy_pj": -1}}', "finite number"),
                     ("[1]", "mapping"), ('{"adc_8b": {"energy": 3.0}}', "adc_8b has no field 'energy'"),
                     ('{"clock": {"ghz": 0}}', "clock.ghz must be > 0")):
        f.write_text(bad)
        with pytest.raises(ConfigError, match=msg):
            load_constants(f)
    for raw, msg in ((b"\xff\xfe{}", rf"{f}: not UTF-8 text \(byte 0xff at offset 0\)"),
                     (b'{"adc_8b": {"energy_pj": 3.0}}\n\x00\x81', rf"{f}: not UTF-8 text \(byte 0x81 at offset 32\)")):
        f.write_bytes(raw)  # e.g. a checkpoint given by mistake: the file named, not a bare codec error
        with pytest.raises(ConfigError, match=msg):
            load_constants(f)
    with pytest.raises(ConfigError, match="is a folder"):
        load_constants(tmp_path)
    fifo = tmp_path / "chip.fifo"
    os.mkfifo(fifo)  # refused, never waited on (read_text opened it, and blocked until a writer came)
    with pytest.raises(ConfigError, match=r"named pipe \(FIFO\), not a regular constants file"):
        load_constants(fifo)
    with pytest.raises(ConfigError, match="dynamic"):
        HardwareSpec(dynamic="magic")
    with pytest.raises(ConfigError, match="needs an ADC"):
        model_cost(vit, CrossbarConfig(adc_bits=None))


def test_yaml_constants_without_pyyaml_say_so(tmp_path, monkeypatch):
    """PyYAML is no dependency: without it a valid YAML file is not called invalid."""
    y = tmp_path / "chip.yaml"
    y.write_text("adc_8b:\n  energy_pj: 3.0\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml raises ImportError
    with pytest.raises(ConfigError, match=r"chip.yaml: reading YAML needs PyYAML \(pip install pyyaml\)"):
        load_constants(y)


@pytest.mark.parametrize("cols_per_adc,adcs", [(128, 1), (96, 2), (64, 2), (48, 3)])
def test_every_column_has_an_adc(cols_per_adc, adcs):
    """An array of 128 columns needs ceil(128 / cols_per_adc) ADCs: with 96 columns per ADC the last 32
    columns need a second one (the area counted floor(128 / 96) = 1)."""
    from far.imc.cost import _Chip

    c = load_constants()
    chip = _Chip(CrossbarConfig(), HardwareSpec(cols_per_adc=cols_per_adc))
    periphery = (c["crossbar_read"]["area_um2"] + 128 * c["dac_1b"]["area_um2"] + c["sample_hold"]["area_um2"]
                 + 0.5 * c["shift_add"]["area_um2"])
    assert chip.a_array == pytest.approx(periphery + adcs * c["adc_8b"]["area_um2"])


@pytest.mark.parametrize("dac_bits", [1, 2, 4, 7])
def test_multibit_dac_costs_more_per_activation(dac_bits):
    """A dac_bits-bit DAC was priced as the 1-bit one (dac_bits=7: 7x fewer input slices at no DAC cost): its
    energy and area are now 2^(dac_bits-1) 1-bit DACs', the library's x2 per bit (as the adc_*b rows)."""
    from far.imc.cost import _Chip

    c = load_constants()
    r = model_cost(OneLinear(200, 50, 3), CrossbarConfig(dac_bits=dac_bits), HardwareSpec()).rows[0]
    J = math.ceil(7 / dac_bits)
    assert r.dac_activations == 3 * 200 * math.ceil(50 * 4 * 2 / 128) * J
    assert r.energy["dac"] == pytest.approx(r.dac_activations * c["dac_1b"]["energy_pj"] * 2 ** (dac_bits - 1))
    one, this = (_Chip(CrossbarConfig(dac_bits=b), HardwareSpec()) for b in (1, dac_bits))
    assert this.a_array - one.a_array == pytest.approx(128 * c["dac_1b"]["area_um2"] * (2 ** (dac_bits - 1) - 1))


@pytest.mark.parametrize("arrays_per_tile,imas", [(96, 12), (48, 6), (100, 13)])
def test_tile_bus_area_is_per_ima(arrays_per_tile, imas):
    """hwcomponents-library's IsaacEDRAMBus area (7500 um2) is one IMA's share of ISAAC's tile bus ("Area
    reported per IMA. In ISAAC, a bus connects 12 IMAs"): a 96-array tile of 12 8-array IMAs has
    12 x 7500 um2 = 0.090 mm2 of bus (ISAAC's table), not 7500 um2."""
    from far.imc.cost import _Chip

    c = load_constants()
    chip = _Chip(CrossbarConfig(), HardwareSpec(arrays_per_tile=arrays_per_tile))
    assert chip.a_tile == pytest.approx(c["edram_access_256b"]["area_um2"] + imas * c["bus_256b"]["area_um2"]
                                        + c["router_256b"]["area_um2"])
    if arrays_per_tile == 96:
        assert imas * c["bus_256b"]["area_um2"] == pytest.approx(0.090e6)


@pytest.mark.parametrize("bad", [0, -5, float("inf"), float("nan")])
def test_endurance_must_be_positive(bad):
    with pytest.raises(ConfigError, match="endurance_cycles must be a finite number > 0"):
        HardwareSpec(endurance_cycles=bad)  # was accepted: lifetime_images -5, lifetime_hours negative


def test_diagonal_packing_by_hand():
    from far.imc.cost import _Chip

    chip = _Chip(CrossbarConfig(), HardwareSpec(packing="diagonal"))
    plain = _Chip(CrossbarConfig(), HardwareSpec())
    # 24 outputs x 4 slices x 2 cells = 192 columns: a full 128-column piece and a 64-column one, 40 rows each
    assert chip.blocks(40, 24) == [(40, 128), (40, 64)]
    assert plain.packed_arrays([(40, 24), (40, 24)]) == 4
    assert chip.packed_arrays([(40, 24), (40, 24)]) == 3  # the two 40 x 64 halves share one array
    assert chip.packed_arrays([(100, 8), (40, 8)]) == 2  # 64 + 64 columns fit, 100 + 40 rows do not
    assert chip.packed_arrays([(30, 4)] * 4) == 1  # 4 x 30 rows, 4 x 32 columns
    assert chip.packed_arrays([(30, 4)] * 5) == 2
    assert chip.packed_arrays([(200, 8)]) == 2  # one matrix's own row tiles are never packed together


def test_utilisation_by_hand():
    rep = model_cost(OneLinear(100, 20, 3), CrossbarConfig(), HardwareSpec())
    assert rep.totals["arrays"] == 2  # 160 columns
    assert rep.totals["array_utilisation"] == pytest.approx(100 * 20 * 8 / (2 * 128 * 128))


def test_far_cost_with_kept_units_override_and_packing():
    from far.methods.prune import apply_keep_mask, compact_

    torch.manual_seed(0)
    model = far.create_model("fmnist_deit_tiny", embed_dim=48, depth=2, num_heads=2).eval()
    sizes = {}
    pruned = far.create_model("fmnist_deit_tiny", embed_dim=48, depth=2, num_heads=2).eval()
    for i, (name, m) in enumerate(far.far_modules(pruned)):
        keep = torch.zeros(2, 2, m.width, dtype=torch.bool)
        for h, r, k in ((0, 0, 5), (0, 1, 24), (1, 0, 0), (1, 1, 13 + i)):
            keep[h, r, :k] = True
        apply_keep_mask(m, keep)
        compact_(m)
        sizes[name] = m.hidden_sizes.clone()
    for packing in ("none", "diagonal"):
        hw = HardwareSpec(packing=packing)
        a = model_cost(model, CrossbarConfig(), hw, hidden_sizes=sizes)
        b = model_cost(pruned, CrossbarConfig(), hw)
        assert a.totals == b.totals
    none = model_cost(pruned, CrossbarConfig(), HardwareSpec())
    diag = model_cost(pruned, CrossbarConfig(), HardwareSpec(packing="diagonal"))
    assert diag.totals["arrays"] < none.totals["arrays"]
    assert diag.totals["array_utilisation"] > none.totals["array_utilisation"]
    # packing saves array reads only: the same ADC conversions, fewer crossbar reads, the same latency
    assert diag.totals["adc_conversions"] == none.totals["adc_conversions"]
    assert diag.totals["crossbar_reads"] < none.totals["crossbar_reads"]
    assert diag.totals["latency_us"] == none.totals["latency_us"]
    with pytest.raises(ConfigError, match="packing"):
        HardwareSpec(packing="dense")


@pytest.mark.parametrize("sizes,needle", [
    ({"blocks.0.atn": [[1, 1], [1, 1]]}, r"no FAR module 'blocks.0.atn' in VisionTransformer"),
    ({"blocks.0.attn": [[-24, 24], [24, 24]]}, r"hidden_sizes\['blocks.0.attn'\]: hidden_sizes must be >= 0"),
    ({"blocks.0.attn": [24, 24, 24]}, r"hidden_sizes\['blocks.0.attn'\]: .*shape \[2, num_heads\]"),
    ({"blocks.0.attn": [[2.5, 24], [24, 24]]}, r"whole numbers"),
])
def test_kept_units_override_is_checked(sizes, needle):
    """model_cost(hidden_sizes=...) names FAR modules and gives each [2, H] counts >= 0: a misspelt name was
    ignored (the module's own units costed), a negative count lowered the cost, a wrong shape raised IndexError."""
    torch.manual_seed(0)
    m = far.create_model("fmnist_deit_tiny", embed_dim=48, depth=1, num_heads=2).eval()
    with pytest.raises(ConfigError, match=needle):
        model_cost(m, hidden_sizes=sizes)
    own = model_cost(m).totals
    assert model_cost(m, hidden_sizes={"blocks.0.attn": [[24, 24], [24, 24]]}).totals == own
    assert model_cost(m, hidden_sizes={"blocks.0.attn": torch.tensor([[24, 24], [24, 24]])}).totals == own


def test_default_input_size_is_the_models_own():
    """A timm ViT built at img_size=112 keeps its default pretrained_cfg's (3, 224, 224): the default size came
    from there and the forward pass died in timm's AssertionError; it is now the patch embedding's."""
    torch.manual_seed(0)
    m = far.create_model("deit_tiny_patch16_224", far=False, img_size=112, depth=1)
    assert m.pretrained_cfg["input_size"] == (3, 224, 224)
    r = model_cost(m)
    assert next(x for x in r.rows if x.kind == "attention").detail.endswith("T 50, dynamic write")  # 7 x 7 + 1
    assert r.totals == model_cost(m, input_size=(3, 112, 112)).totals


@pytest.mark.parametrize("size,needle", [
    ((3, 224, 224), "input_size 3 224 224 has 224x224x3 images but fmnist_deit_tiny takes 28x28x1"),
    ((1, 0, 28), r"input_size must be 3 ints \(C, H, W\) >= 1, got 1 0 28"),
    ((-1, 28, 28), r"input_size must be 3 ints \(C, H, W\) >= 1, got -1 28 28"),
    ((28, 28), r"input_size must be 3 ints \(C, H, W\) >= 1, got 28 28"),
])
def test_input_size_that_does_not_fit_the_model(size, needle):
    from far.imc.cost import trace

    vit = far.create_model("fmnist_deit_tiny", far=False, embed_dim=16, depth=1, num_heads=2)
    with pytest.raises(ConfigError, match=needle):  # was timm's AssertionError / torch's RuntimeError
        model_cost(vit, input_size=size)
    with pytest.raises(ConfigError, match=needle):
        trace(vit, size)
    assert model_cost(vit, input_size=(1, 28, 28)).totals == model_cost(vit).totals


@pytest.mark.parametrize("what", ["vit", "vit-mlp-only", "far"])
def test_an_emulated_model_is_refused(what):
    """far.imc.emulate's modules (CrossbarLinear, grouped products, QuantizedAttention, UnrolledFARAttention) are no
    nn.Linear, Attention or FARAttention, so model_cost(emulate(model, cfg)) used to cost them as absent: a tiny ViT
    came out at 1 array (the patch embedding) and a tenth of its energy, silently. It is refused by name; the float
    model is costed as before."""
    from far.imc import emulate

    torch.manual_seed(0)
    vit = far.create_model("fmnist_deit_tiny", far=False, embed_dim=32, depth=1, num_heads=2)
    model = far.convert(vit, hidden_sizes=[[[16, 3], [0, 2]]]) if what == "far" else vit
    want = model_cost(model).totals
    emu = emulate(model, CrossbarConfig(), include="*.mlp.*" if what == "vit-mlp-only" else None)
    with pytest.raises(ConfigError, match=r"emulated model \(blocks\.0\.\w+(\.fc1)? is \w+, from far\.imc\.emulate\)"):
        model_cost(emu)
    assert model_cost(model).totals == want


@pytest.mark.parametrize("pool", ["map", "prr"])
def test_attention_pool_dynamic_products_by_hand(pool):
    """timm's attention pools (global_pool "map": one latent query over the patch tokens; "prr": every token over
    every token) hold q@k^T and attn@v of their own; the cost model used to leave them out: a "prr" head's
    2·H·N²·d MACs, as much as an attention block's, cost nothing. Every MAC of the model counted by hand."""
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=5,
                            global_pool=pool).eval()
    H, d, S = 2, 16, 4
    N = 4 if pool == "map" else 5  # "map" pools the 4 patch tokens, "prr" the class token too
    Tq = 1 if pool == "map" else N
    for dyn in ("write", "digital"):
        r = model_cost(vit, CrossbarConfig(), HardwareSpec(dynamic=dyn))
        rows = [x for x in r.rows if x.kind == "pool"]
        assert [x.name for x in rows] == ["attn_pool"]
        row = rows[0]
        assert row.macs == H * 2 * Tq * N * d
        if dyn == "write":
            assert row.cell_writes == H * 2 * N * d * S * 2
            assert row.dynamic_arrays == H * (math.ceil(N * S * 2 / 128) + math.ceil(d * S * 2 / 128))
        else:
            assert row.cell_writes == 0 and row.dynamic_arrays == 0 and row.energy["digital"] > 0
        # tokens each Linear reads: the 5 of the blocks; "map": kv the 4 patch tokens, the rest the one latent
        tokens = {"head": 1, "attn_pool.kv": N}
        static = sum(m.in_features * m.out_features * tokens.get(name, 1 if name.startswith("attn_pool") else 5)
                     for name, m in vit.named_modules() if isinstance(m, nn.Linear))
        by_hand = static + 4 * 3 * 8 * 8 * 32 + H * 2 * 5 * 5 * d + H * 2 * Tq * N * d  # + conv, attention, pool
        assert r.totals["macs"] == by_hand


def test_layernorms_inside_attention_are_charged():
    """qk_norm (a LayerNorm of every head's q and k) and scale_norm (one over the attention output) sit inside the
    attention, whose row used to skip its children's digital work: the same model with them cost the same."""
    from timm.models.vision_transformer import VisionTransformer

    kw = dict(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=5)
    T, H, d, C = 5, 2, 16, 32

    def attn_row(**extra):
        r = model_cost(VisionTransformer(**kw, **extra).eval(), CrossbarConfig(), HardwareSpec())
        return next(x for x in r.rows if x.kind == "attention")

    base = attn_row()
    qk = attn_row(qk_norm=True)
    assert qk.digital_ops - base.digital_ops == 2 * H * T * (5 * d + 1)  # 3 adds, 2 mults per value, 1 nonlinear
    assert qk.energy["digital"] > base.energy["digital"] and qk.latency_ns > base.latency_ns
    assert qk.macs == base.macs and qk.arrays == base.arrays
    sn = attn_row(scale_attn_norm=True)
    assert sn.digital_ops - base.digital_ops == T * (5 * C + 1)
