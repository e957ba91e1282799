#!/usr/bin/env python
"""The side-by-side that shows why FAR exists: what attention, TReX-style reuse, FAR and pruned FAR cost on an
ISAAC-like ReRAM chip (far.imc.cost), per image, under both ways of doing attention's dynamic products
(write: K and V written into crossbars every image; digital: an int8 MAC unit).

Two tables:
  zoo     the bundled Fashion-MNIST models (fmnist_deit_tiny, fmnist_trex_tiny, fmnist_far_tiny,
          fmnist_far_tiny_pruned, fmnist_far_tiny_xs, fmnist_far_tiny_wide), with their digital top-1 on the 10k
          test set (--data)
  deit    DeiT-tiny/small/base shapes at 224x224 (T = 197), random weights (the cost does not depend on them):
          attention; FAR (n = d); FAR with 30% of the LSTM units pruned (n = 0.7 d, the zoo's pruning ratio);
          TReX-style reuse: a quarter and a half of the encoders reuse the previous encoder's attention output
          (adjacent pairs from the last down; a half is the most adjacent pairs allow, the reuse rule itself up to
          L - 1: every later encoder reusing the first)

plus a write-verify sweep (how the write-mode costs of attention grow with program-and-verify pulses, which FAR
never pays). Every figure comes from far.imc.cost with CrossbarConfig() and HardwareSpec() defaults; the
constants and their sources are in python/far/imc/cost_constants.json. Writes JSON + PNG under bench/results/.

Examples:
  python bench/bench_imc_cost.py                 # both tables, zoo top-1 on the 10k test set
  python bench/bench_imc_cost.py --no-data       # costs only (seconds)
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

import far
from far.imc.cost import HardwareSpec, model_cost
from far.models import ZOO, data_config, is_far, load_model, mixer_params, resolve, stored_tensors
from far.nn.reuse import apply_reuse, reuse_plan
from far.utils.env import environment, result_filename
from far.utils.fs import write_json
from far.utils.plot import pyplot, save_figure
from far_kernels import CrossbarConfig

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("write", "digital")
DEIT = ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224")
METRICS = ("energy_uj", "latency_us", "area_mm2", "edap", "tops_per_w", "tops_per_mm2")


def params(model) -> int:
    return sum(t.numel() for t in stored_tensors(model).values())


def costs(model, hw_base: HardwareSpec) -> dict:
    return {m: model_cost(model, CrossbarConfig(), hw_base.replace(dynamic=m)).totals for m in MODES}


def row(name: str, kind: str, model, hw: HardwareSpec, **extra) -> dict:
    return {"model": name, "kind": kind, "params": params(model), "mixer_params": mixer_params(model),
            "cost": costs(model, hw), **extra}


def ratios(rows: list) -> None:
    """Each row's metrics relative to the first row (the attention model), per mode."""
    base = rows[0]["cost"]
    for r in rows:
        r["vs_attention"] = {m: {k: r["cost"][m][k] / base[m][k] for k in METRICS if base[m][k]} for m in MODES}


def zoo_table(args, hw: HardwareSpec) -> list:
    from far.data import make_dataset
    from far.evaluate import evaluate

    names = ["fmnist_deit_tiny"] + [n for n in ("fmnist_trex_tiny",) if n in ZOO] + \
        ["fmnist_far_tiny", "fmnist_far_tiny_pruned"] + \
        [n for n in ("fmnist_far_tiny_xs", "fmnist_far_tiny_wide") if n in ZOO]
    rows = []
    for name in names:
        model, _ = load_model(resolve(name))
        model.eval()
        kind = "trex" if reuse_plan(model) else ("far" if is_far(model) else "attention")
        r = row(name, kind, model, hw)
        if kind == "trex":
            r["plan"] = reuse_plan(model)
        if not args.no_data:
            data = make_dataset("fashion-mnist", "test", data_config(model), train=False)
            r["top1"] = evaluate(model, data, batch_size=500)["accuracy"]
            print(f"  {name}: top-1 {100 * r['top1']:.2f}%", flush=True)
        rows.append(r)
    ratios(rows)
    return rows


def trex_plan(L: int, n: int) -> dict:
    """n encoders reuse the attention output of the encoder before them, from the last pair down:
    {L-1: L-2, L-3: L-4, ...} (a source never reuses; at most L // 2 reusers). Without data to measure
    which attention outputs are alike, adjacent encoders are the usual choice; the paper's own choice for
    DeiT could not be read (../shared/notes/imc-cost-anchors.md)."""
    if not 0 <= n <= L // 2:
        raise ValueError(f"{n} reusing encoders of {L}: at most {L // 2}")
    return {L - 1 - 2 * k: L - 2 - 2 * k for k in range(n)}


def deit_table(hw: HardwareSpec) -> list:
    out = []
    for name in DEIT:
        torch.manual_seed(0)
        attn = far.create_model(name, far=False).eval()
        d = attn.blocks[0].attn.head_dim
        far_full = far.create_model(name, far=True).eval()
        far_pruned = far.create_model(name, far=True, hidden_sizes=int(round(0.7 * d))).eval()
        rows = [row(name, "attention", attn, hw), row(name, "far", far_full, hw),
                row(name, "far-pruned-30%", far_pruned, hw)]
        L = len(attn.blocks)
        for n in (L // 4, L // 2):
            plan = trex_plan(L, n)
            rows.append(row(name, f"trex-{n}-of-{L}", apply_reuse(copy.deepcopy(attn), plan), hw, plan=plan))
        ratios(rows)
        out.append({"shape": name, "tokens": 197, "rows": rows})
        print(f"  {name}: " + ", ".join(f"{r['kind']} EDAP(write)x{r['vs_attention']['write']['edap']:.2f}"
                                         for r in rows[1:]), flush=True)
    return out


def write_verify_sweep(hw: HardwareSpec, factors=(1, 2, 4, 8)) -> list:
    out = []
    for name in ("deit_small_patch16_224",):
        torch.manual_seed(0)
        attn = far.create_model(name, far=False).eval()
        farm = far.create_model(name, far=True).eval()
        for f in factors:
            h = hw.replace(dynamic="write", write_verify=float(f))
            a = model_cost(attn, CrossbarConfig(), h).totals
            b = model_cost(farm, CrossbarConfig(), h).totals
            out.append({"shape": name, "write_verify": f, "attention": a, "far": b,
                        "far_vs_attention": {k: b[k] / a[k] for k in METRICS if a[k]}})
    return out


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        print("matplotlib missing: no plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for col, m in enumerate(MODES):
        ax = axes[0][col]
        groups = result["deit"]
        kinds = [r["kind"] for r in groups[0]["rows"][1:]]
        width = 0.8 / len(kinds)
        for k, kind in enumerate(kinds):
            vals = [next(r for r in g["rows"] if r["kind"] == kind)["vs_attention"][m]["edap"] for g in groups]
            ax.bar([i + (k - (len(kinds) - 1) / 2) * width for i in range(len(groups))], vals, width,
                   label=kind)
        ax.axhline(1.0, color="#555", ls="--", lw=1)
        ax.set_xticks(range(len(groups)), [g["shape"].split("_patch")[0] for g in groups])
        ax.set_ylabel("EDAP / attention's (lower is better)")
        ax.set_title(f"DeiT shapes, 224x224: dynamic products '{m}'", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    zoo = result.get("zoo") or []
    if zoo:
        ax = axes[1][0]
        metrics = ("energy_uj", "latency_us", "area_mm2", "edap")
        width = 0.8 / len(zoo)
        for k, r in enumerate(zoo):
            ax.bar([i + (k - (len(zoo) - 1) / 2) * width for i in range(len(metrics))],
                   [r["vs_attention"]["write"][mm] for mm in metrics], width, label=r["model"])
        ax.axhline(1.0, color="#555", ls="--", lw=1)
        ax.set_xticks(range(len(metrics)), metrics)
        ax.set_title("zoo (28x28 Fashion-MNIST), write mode, vs the attention teacher", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
        if all("top1" in r for r in zoo):
            ax = axes[1][1]
            for m, marker, size in zip(MODES, "os", (90, 30)):  # write: open circles around digital's squares
                for i, r in enumerate(zoo):
                    face = "none" if m == "write" else f"C{i}"
                    ax.scatter(r["cost"][m]["edap"], 100 * r["top1"], marker=marker, s=size, facecolors=face,
                               edgecolors=f"C{i}", label=f"{r['model']} ({m})")
            ax.set_xscale("log")
            ax.set_xlabel("EDAP per image (J s mm2)")
            ax.set_ylabel("top-1 (%), 10k test images")
            ax.legend(fontsize=6, loc="center left")
            ax.grid(alpha=0.3)
    wv = result["write_verify"]
    if not (zoo and all("top1" in r for r in zoo)):
        ax = axes[1][1]
        ax.plot([w["write_verify"] for w in wv], [w["far_vs_attention"]["edap"] for w in wv], "o-")
        ax.set_xlabel("write-verify pulses per cell write")
        ax.set_ylabel("FAR EDAP / attention EDAP (DeiT-S, write)")
        ax.grid(alpha=0.3)
    env = result["environment"]
    fig.suptitle(f"far.imc.cost, ISAAC-like chip, CrossbarConfig() defaults; commit {str(env.get('git_commit'))[:8]}",
                 fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--no-data", action="store_true", help="skip the zoo's top-1 (costs only)")
    ap.add_argument("--out", type=Path, help="JSON path (default bench/results/imc_cost-<host>-<date>.json)")
    ap.add_argument("--quick", action="store_true", help="write to a temporary folder")
    args = ap.parse_args(argv)
    out = args.out or (Path(tempfile.mkdtemp()) / "imc_cost.json" if args.quick
                       else RESULTS / result_filename("imc_cost"))
    hw = HardwareSpec()
    print("zoo ...", flush=True)
    zoo = zoo_table(args, hw)
    print("DeiT shapes ...", flush=True)
    deit = deit_table(hw)
    result = {"benchmark": "imc_cost", "crossbar_config": "CrossbarConfig() (ISAAC defaults)",
              "hardware": "HardwareSpec() defaults, dynamic per row", "environment": environment(),
              "zoo": zoo, "deit": deit, "write_verify": write_verify_sweep(hw)}
    write_json(out, result)
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
