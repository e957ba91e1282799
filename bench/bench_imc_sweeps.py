"""Emulated-IMC accuracy of the zoo models under ADC resolution and read noise (JSON + plot).

Runs `far imc-eval` (ISAAC-like defaults: 8-bit weights in 2-bit cells, 1-bit DAC, 128-row tiles,
differential pairs) once per model and sweep, each with its own incremental JSON in a work folder, then
merges them into one result and plots accuracy against adc_bits for each ADC range of --adc-ranges ("max":
step p_max/L; "granular": step 1, clipped), noise-free, and against read_noise (σ of each partial sum
relative to the full-scale p_max, mean ± std over --seeds seeds, 8-bit ADC with --noise-adc-range). The
teacher's sweeps run with attention's dynamic products digital and on crossbars (K and V written per
image). Every run's images/s is kept, so the figures double as a speed record.

    python bench/bench_imc_sweeps.py                                   # about 1.5 h on 2 CPU cores
    python bench/bench_imc_sweeps.py --adc-images 200 --noise-images 100 --seeds 2   # a quick look
    python bench/bench_imc_sweeps.py --models fmnist_far_tiny --out far.json          # one model per process,
    python bench/bench_imc_sweeps.py --merge teacher.json far.json pruned.json        # then one result

The committed result (bench/results/imc_sweeps-*) ran the full test set for the ADC sweeps, two processes
of one thread each (teacher, then fmnist_far_tiny_wide with --noise-images 0; the two other FAR models),
merged with --merge:

    S="--adc-images 10000 --noise-images 2000 --read-noise 0.0005,0.001,0.002,0.005,0.01 --threads 1"
    python bench/bench_imc_sweeps.py --models fmnist_deit_tiny $S --out teacher.json
    python bench/bench_imc_sweeps.py --models fmnist_far_tiny_wide $S --noise-images 0 --out wide.json
    python bench/bench_imc_sweeps.py --models fmnist_far_tiny fmnist_far_tiny_pruned $S --out far.json
    python bench/bench_imc_sweeps.py --merge teacher.json far.json wide.json

The read-noise sweep on the full test set (bench/results/imc_sweeps_noise10k-*) ran σ/p_max 0.001, 0.002, 0.005
(3 seeds each) in one process per model, fmnist_far_tiny_pruned's levels split over two; the teacher's and
fmnist_far_tiny's runs were asked for 0.01 too and stopped before it, so their --work files (which keep every
finished setting) were merged:

    S="--adc-images 0 --noise-images 10000 --seeds 3 --threads 1"
    python bench/bench_imc_sweeps.py --models fmnist_deit_tiny $S --read-noise 0.001,0.002,0.005 --work wA
    python bench/bench_imc_sweeps.py --models fmnist_far_tiny $S --read-noise 0.001,0.002,0.005 --work wB
    python bench/bench_imc_sweeps.py --models fmnist_far_tiny_pruned $S --read-noise 0.001,0.002 --work wP1
    python bench/bench_imc_sweeps.py --models fmnist_far_tiny_pruned $S --read-noise 0.005 --work wP2
    python bench/bench_imc_sweeps.py --merge wA/*.json wB/*.json wP1/*.json wP2/*.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from far.utils.env import environment, result_filename
from far.errors import ConfigError
from far.utils.fs import read_json, write_json
from far.utils.plot import pyplot, save_figure

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("fmnist_deit_tiny", "fmnist_far_tiny", "fmnist_far_tiny_pruned")
TEACHERS = ("fmnist_deit_tiny",)  # models with attention: both dynamic modes


def sweeps(args) -> list:
    """(model, sweep name, imc-eval arguments) in the order they run."""
    out = []
    for model in args.models:
        dyn = ["--dynamic", "digital,crossbar"] if model in TEACHERS else []
        if args.adc_images:
            out.append((model, "adc", ["--sweep", f"adc_bits={args.adc_bits}", "--sweep", f"adc_range={args.adc_ranges}",
                                       "--limit", str(args.adc_images), *dyn]))
        if args.noise_images:
            out.append((model, "read_noise", ["--sweep", f"read_noise={args.read_noise}", "--seeds", str(args.seeds),
                                              "--set", f"adc_range={args.noise_adc_range}",
                                              "--limit", str(args.noise_images), *dyn]))
    return out


def run(model: str, name: str, extra: list, work: Path, args) -> dict:
    path = work / f"{model}-{name}.json"
    cmd = [sys.executable, "-m", "far.cli", "imc-eval", model, "--data", "fashion-mnist", "--threads",
           str(args.threads), "--json", str(path), "-f", *(["-q"] if args.quiet else []), *extra]
    print("$", " ".join(cmd[2:]), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    r = json.loads(path.read_text())
    return {"model": model, "sweep": name, "arguments": extra, "wall_s": time.perf_counter() - t0, **r}


def wrap_imc_eval(r: dict, name: str) -> dict:
    """A run record (as `run` makes) from an `far imc-eval --json` file, e.g. a work-folder file of a sweep that
    was stopped: imc-eval rewrites its JSON after every setting, so the settings it finished are kept."""
    keys = {s["key"] for s in r.get("sweeps", [])}
    if not keys or not keys <= {"adc_bits", "adc_range", "read_noise"}:
        raise SystemExit(f"{name}: an imc-eval result of a sweep over {sorted(keys) or 'nothing'}; this bench "
                         "merges adc_bits/adc_range or read_noise sweeps")
    sweep = "read_noise" if "read_noise" in keys else "adc"
    return {"model": r["model"], "sweep": sweep, "arguments": None, "from_imc_eval": name,
            "wall_s": sum(x.get("seconds", 0.0) for x in r["results"]), **r}


def combine(runs: list) -> list:
    """Runs of one model, sweep, dynamic modes and image count with different settings (e.g. one sweep's levels
    split over processes) become one run: the first one's record with every setting, in order of the swept
    value, one digital row. Runs that repeat a setting stay apart."""
    out, index = [], {}
    settings = lambda r: {(x["setting"], x["dynamic"]) for x in r["results"] if x["setting"] != "digital"}  # noqa: E731
    for r in runs:
        key = (r["model"], r["sweep"], tuple(r.get("dynamic") or ()), r["num_images"])
        if key not in index or settings(out[index[key]]) & settings(r):
            index[key] = len(out)
            out.append({**r, "results": list(r["results"])})
            continue
        first = out[index[key]]
        first["results"] += [x for x in r["results"] if x["setting"] != "digital"]
        first["combined_from"] = first.get("combined_from", [first.get("from_imc_eval")]) + [r.get("from_imc_eval")]
        first["wall_s"] = first.get("wall_s", 0.0) + r.get("wall_s", 0.0)
    for r in out:
        if "combined_from" in r:
            digital = [x for x in r["results"] if x["setting"] == "digital"]
            rest = [x for x in r["results"] if x["setting"] != "digital"]
            r["results"] = digital[:1] + sorted(rest, key=lambda x: (sorted(x["values"].items()), x["dynamic"] or ""))
    return out


def _adc_range(x: dict) -> str:
    """The ADC range a result ran with (results written before the range was swept lack it in "values")."""
    return x["values"].get("adc_range") or x.get("config", {}).get("adc_range", "max")


def plot(result: dict, path: Path):
    """One panel per ADC range of the ADC sweeps (accuracy vs adc_bits, noise-free), then accuracy vs read noise."""
    plt = pyplot()
    if plt is None:
        return None
    runs = result["runs"]
    ranges = list(dict.fromkeys(_adc_range(x) for r in runs if r["sweep"] == "adc" for x in r["results"] if x["values"]))
    noisy = [r for r in runs if r["sweep"] == "read_noise"]
    panels = [("adc", rng) for rng in ranges] + ([("read_noise", None)] if noisy else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.4, 5.2 * len(panels)), 4.4), squeeze=False)
    axes = dict(zip(panels, axes[0]))
    colors = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(r["model"] for r in runs))}
    counts = {sweep: sorted({r["num_images"] for r in runs if r["sweep"] == sweep}) for sweep in ("adc", "read_noise")}
    for r in runs:
        digital = next(x for x in r["results"] if x["setting"] == "digital")
        key = "adc_bits" if r["sweep"] == "adc" else "read_noise"
        for panel, ax in axes.items():
            if panel[0] != r["sweep"]:
                continue
            for dyn, style in (("digital", "o-"), ("crossbar", "s--")):
                rows = [x for x in r["results"] if x["setting"] != "digital" and x["dynamic"] == dyn
                        and (panel[1] is None or _adc_range(x) == panel[1])]
                if not rows:
                    continue
                label = r["model"] + (f" (attention {dyn})" if len(r["dynamic"] or []) > 1 else "")
                if len(counts[r["sweep"]]) > 1:  # runs on different image counts share the panel: say which
                    label += f", {r['num_images']} images"
                ax.errorbar([x["values"][key] for x in rows], [100 * x["accuracy"] for x in rows],
                            yerr=[100 * x["accuracy_std"] for x in rows], fmt=style, color=colors[r["model"]],
                            capsize=3, label=label)
            ax.axhline(100 * digital["accuracy"], color=colors[r["model"]], ls=":", lw=1)
    for (sweep, rng), ax in axes.items():
        rows = [x for r in runs if r["sweep"] == sweep for x in r["results"] if x["values"]]
        n = "/".join(map(str, counts[sweep]))
        if sweep == "adc":
            ax.set_xticks(sorted({x["values"]["adc_bits"] for x in rows}))
            ax.set_xlabel("ADC bits (no noise)")
            ax.set_title(f'"{rng}" ADC range, {n} test images; dotted: digital', fontsize=10)
        else:
            noise = sorted({x["values"]["read_noise"] for x in rows})
            bits = sorted({x["config"]["adc_bits"] for x in rows if "config" in x}) or [8]
            nrng = sorted({_adc_range(x) for x in rows})
            ax.set_xscale("log")
            ax.set_xticks(noise, [f"{v:g}" for v in noise])
            ax.minorticks_off()
            ax.set_xlabel(f"read noise σ / p_max ({'/'.join(map(str, bits))}-bit {'/'.join(nrng)} ADC)")
            seeds = "/".join(map(str, sorted({r.get("seeds") or result["args"].get("seeds") for r in runs
                                              if r["sweep"] == sweep})))
            ax.set_title(f"{n} test images, mean ± std over {seeds} seeds", fontsize=10)
        ax.set_ylabel("Fashion-MNIST top-1 (%)")
        ax.grid(alpha=0.3)
    adc_axes = [ax for (sweep, _), ax in axes.items() if sweep == "adc"]
    if adc_axes:  # one y scale for the ADC panels, so that the ranges compare at a glance
        lo = min(ax.get_ylim()[0] for ax in adc_axes)
        hi = max(ax.get_ylim()[1] for ax in adc_axes)
        for ax in adc_axes:
            ax.set_ylim(lo, hi)
    legend = {}  # every model once, wherever its runs are drawn
    for ax in axes.values():
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    list(axes.values())[-1].legend(legend.values(), legend.keys(), fontsize=7)
    fig.suptitle("emulated ReRAM crossbars (ISAAC-like defaults): the zoo models")
    save_figure(fig, path, dpi=110)
    return str(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--adc-bits", default="6,8,10")
    p.add_argument("--read-noise", default="0.002,0.005,0.01,0.02,0.05")
    p.add_argument("--adc-ranges", default="max,granular",
                   help="ADC ranges of the ADC sweep, a grid with --adc-bits (default: max,granular)")
    p.add_argument("--noise-adc-range", default="granular",
                   help="ADC range of the read-noise sweep (default: granular, so that noise, not ADC step, is measured)")
    p.add_argument("--adc-images", type=int, default=2000, help="0: no ADC sweep")
    p.add_argument("--noise-images", type=int, default=500, help="0: no read-noise sweep")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=None, help="folder of the per-run JSON (default: a temporary one; the merged --out holds them all)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                   help="run nothing: merge the runs of these results of this script (e.g. one per model, run in "
                        "parallel) into --out and plot them; a `far imc-eval --json` file (such as a --work file of a "
                        "stopped sweep: the settings it finished) counts as one run")
    args = p.parse_args(argv)
    out = args.out or RESULTS / result_filename("imc_sweeps")
    if args.merge:
        parts = []
        for f in args.merge:  # all read and checked before anything is written
            try:
                part = read_json(f, "--merge file")
            except ConfigError as e:
                raise SystemExit(str(e)) from None
            if not (isinstance(part, dict) and isinstance(part.get("runs", part.get("results")), list)):
                raise SystemExit(f"{f}: neither a result of this benchmark ('runs') nor a far imc-eval JSON "
                                 "('results')")
            parts.append(part)
        for i, (f, part) in enumerate(zip(args.merge, parts)):
            if "runs" not in part and "results" in part:  # one imc-eval JSON (a work-folder file)
                parts[i] = {"args": None, "environment": None, "runs": [wrap_imc_eval(part, f.name)]}
        base = next((part for part in parts if part["args"] is not None), None)
        if base is None:  # only imc-eval files: each run records its own settings; no sweep options to report
            base = {"benchmark": "imc_sweeps", "description": __doc__.split("\n\n")[0],
                    "args": {"merge": [str(f) for f in args.merge], "out": str(out)},
                    "environment": environment(threads=max(r.get("threads", 1) for part in parts
                                                           for r in part["runs"]))}
        result = {**base, "runs": combine([r for part in parts for r in part["runs"]]),
                  "merged": [{"file": f.name, "args": part["args"], "environment": part["environment"]}
                             for f, part in zip(args.merge, parts)]}
        write_json(out, result)
        print("wrote", out, plot(result, out.with_suffix(".png")) or "(no plot: matplotlib missing)")
        return 0
    if not sweeps(args):  # nothing to run: the plot had no panel (matplotlib raised) and no JSON was written
        p.error("--adc-images 0 and --noise-images 0 leave no sweep to run")
    work = args.work or Path(tempfile.mkdtemp(prefix="far_imc_sweeps_"))
    work.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "imc_sweeps", "description": __doc__.split("\n\n")[0],
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "environment": environment(threads=args.threads), "runs": []}
    for model, name, extra in sweeps(args):
        result["runs"].append(run(model, name, extra, work, args))
        write_json(out, result)  # after every run: a cut-short sweep keeps what it measured
    print("wrote", out, plot(result, out.with_suffix(".png")) or "(no plot: matplotlib missing)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
