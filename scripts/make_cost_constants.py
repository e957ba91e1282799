"""Writes python/far/imc/cost_constants.json: the constants of far.imc.cost, each with its value, unit and source.

Component energies, latencies and areas of the ISAAC chip come from Accelergy's maintained component
library (hwcomponents-library, class by class, at 32 nm), queried here rather than copied by hand; the
few figures the library does not model (the memristor array's read power and area, ReRAM cell writes,
endurance, digital arithmetic) are listed below with their sources. The runtime reads only the JSON, so
far needs neither Python 3.12 nor hwcomponents.

    python3.12 -m venv /tmp/hwc && /tmp/hwc/bin/pip install hwcomponents hwcomponents-library hwcomponents-neurosim
    /tmp/hwc/bin/python scripts/make_cost_constants.py            # rewrites the JSON (commit it)
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata as md
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "python" / "far" / "imc" / "cost_constants.json"
TECH = 32e-9
ISAAC = "Shafiee et al., ISAAC, ISCA 2016 (doi 10.1109/ISCA.2016.12)"
HORO = "Horowitz, 'Computing's energy problem', ISSCC 2014 (doi 10.1109/ISSCC.2014.6757323), 45 nm, 0.9 V"


def library_entries() -> dict:
    from hwcomponents_library.library import isaac

    lib = f"hwcomponents-library {md.version('hwcomponents-library')} (hwcomponents {md.version('hwcomponents')})"

    def cost(obj, action):
        c = getattr(obj, action)()
        return c.energy * 1e12, c.latency * 1e9

    out = {}
    for bits in range(2, 13):
        adc = isaac.IsaacADC(tech_node=TECH, resolution=bits)
        e, lat = cost(adc, "convert")
        out[f"adc_{bits}b"] = {"energy_pj": e, "latency_ns": lat, "area_um2": adc.area * 1e12,
                               "source": f"{lib} IsaacADC(tech_node=32nm, resolution={bits}): the 8-bit SAR ADC of "
                                         f"{ISAAC} (Kull et al., ISSCC 2013: 3.1 mW, 1.2 GS/s), energy and area x2 "
                                         "per bit"}
    dac = isaac.IsaacDAC(tech_node=TECH)
    e, lat = cost(dac, "convert")
    out["dac_1b"] = {"energy_pj": e, "area_um2": dac.area * 1e12,
                     "source": f"{lib} IsaacDAC(tech_node=32nm): {ISAAC}, 1-bit DAC, 4 mW for 8x128 DACs"}
    sa = isaac.IsaacShiftAdd(tech_node=TECH)
    e, lat = cost(sa, "shift_add" if hasattr(sa, "shift_add") else "read")
    out["shift_add"] = {"energy_pj": e, "latency_ns": lat, "area_um2": sa.area * 1e12,
                        "source": f"{lib} IsaacShiftAdd(tech_node=32nm): {ISAAC}, 16-bit shift-and-add, 0.2 mW"}
    ed = isaac.IsaacEDRAM(tech_node=TECH, width=256, depth=2048)
    e, _ = cost(ed, "read")
    out["edram_access_256b"] = {"energy_pj": e, "area_um2": ed.area * 1e12,
                                "source": f"{lib} IsaacEDRAM(tech_node=32nm, width=256, depth=2048): {ISAAC}, the "
                                          "64 KB tile buffer; energy per 256-bit read or write"}
    bus = isaac.IsaacEDRAMBus(tech_node=TECH, width=256)
    e, _ = cost(bus, "read")
    out["bus_256b"] = {"energy_pj": e, "area_um2": bus.area * 1e12,
                       "source": f"{lib} IsaacEDRAMBus(tech_node=32nm, width=256): {ISAAC}, eDRAM-IMA bus, 7 mW; "
                                 "area per IMA (the library's: ISAAC's 0.090 mm2 tile bus / 12 IMAs)"}
    rt = isaac.IsaacRouterSharedByFour(tech_node=TECH, width=256)
    e, _ = cost(rt, "read")
    out["router_256b"] = {"energy_pj": e, "area_um2": rt.area * 1e12,
                          "source": f"{lib} IsaacRouterSharedByFour(tech_node=32nm, width=256): {ISAAC}, 42 mW "
                                    "router shared by 4 tiles (area per tile)"}
    return out


HAND = {
    "crossbar_read": {
        "energy_pj": 2.4e-3 / 8 * 100e-9 * 1e12, "area_um2": 0.0002e6 / 8, "latency_ns": 100.0,
        "source": f"{ISAAC}, Table: 8 memristor arrays (128x128, 2 b/cell) per IMA draw 2.4 mW in 0.0002 mm2; one "
                  "read = one 100 ns crossbar cycle: 2.4 mW / 8 x 100 ns = 30 pJ per array read, 25 um2 per array. "
                  "Not in hwcomponents-library (its ISAAC models stop at the periphery)"},
    "sample_hold": {
        "energy_pj": 10e-6 / 8 * 100e-9 * 1e12, "area_um2": 0.00004e6 / 8,
        "source": f"{ISAAC}, Table: sample-and-hold 8x128 per IMA, 10 uW, 0.00004 mm2 (per array, per read)"},
    "cell_write": {
        "energy_pj": 8.0, "latency_ns": 50.0, "endurance_cycles": 1e9,
        "source": "ReRAM SET: 8 pJ per cell (CiMLoop rram cell models' SetEnergy, github.com/mit-emze/cimloop "
                  "workspace/models/memory_cells/*.cell.yaml; V^2/R t gives 2-33 pJ for 2 V, 50 ns, 100 k-6 kOhm); "
                  "50 ns SET pulse (NeuroSim V2.1 Param.cpp, CiMLoop rram_neurosim_default); endurance 1e9 "
                  "cycles (ITRS 2011 memristor prototypes 1e6-1e12: a mid value; vary it)"},
    "int8_add": {"energy_pj": 0.03, "area_um2": 36.0, "source": HORO},
    "int8_mult": {"energy_pj": 0.2, "area_um2": 282.0, "source": HORO},
    "fp16_add": {"energy_pj": 0.4, "area_um2": 137.0,
                 "source": HORO + " (area: the 32-bit integer adder's, no fp16 figure given)"},
    "fp16_mult": {"energy_pj": 1.1, "area_um2": 3495.0 / 4,
                  "source": HORO + " (area: a quarter of the 32-bit multiplier's, no fp16 figure given)"},
    "sram_read_32b": {"energy_pj": 5.0, "source": HORO + ", 8 KB SRAM, 32-bit read"},
    "clock": {"ghz": 1.2, "source": f"{ISAAC}: 1.2 GHz digital clock (ADC sampling 1.2 GS/s)"},
}


def main() -> int:
    if sys.version_info < (3, 12):
        sys.exit("make_cost_constants.py needs Python >= 3.12 with hwcomponents-library installed (see the docstring)")
    table = {**library_entries(), **HAND}
    doc = {"description": "constants of far.imc.cost (energy pJ, latency ns, area um2 at 32 nm unless said); "
                          "generated by scripts/make_cost_constants.py",
           "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "packages": {p: md.version(p) for p in ("hwcomponents", "hwcomponents-library", "hwcomponents-neurosim")},
           "constants": table}
    OUT.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT} ({len(table)} entries)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
