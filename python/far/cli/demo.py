"""`far demo`: the README's main job on the bundled model zoo.

Evaluates the attention teacher (fmnist_deit_tiny), its FAR student (fmnist_far_tiny), the pruned
FAR students (fmnist_far_tiny_pruned: 30% of the units; fmnist_far_tiny_xs: pruned to a parameter budget
below the teacher attention's) and the rival method's model (fmnist_trex_tiny: TReX-style
attention reuse) on the Fashion-MNIST test set: top-1 accuracy, parameters (all, and those of the
token mixers: attention vs LSTM + head_proj), what one image costs on the IMC chip of far.imc.cost
(ISAAC-like defaults, attention's K and V written into crossbars: energy, latency, EDAP relative to the
teacher), CPU throughput per backend, and the agreement of every backend with the torch reference.
Prints a table, writes demo.json and demo.png (without a plot, an older demo.png in the folder is removed:
it would show another run than demo.json).
"""
from __future__ import annotations

import os
import statistics
import sys
import textwrap
from pathlib import Path
from typing import Optional

import torch

import far_kernels
from far.data import fashion_mnist
from far.evaluate import evaluate
from far.imc.cost import model_cost
from far.models import far_modules, is_far, load, param_counts, set_backend, zoo_path
from far.utils.fs import write_json
from far.utils.plot import pyplot, save_figure

MODELS = (("teacher (attention)", "fmnist_deit_tiny"), ("FAR", "fmnist_far_tiny"),
          ("FAR pruned", "fmnist_far_tiny_pruned"), ("FAR xs (budget)", "fmnist_far_tiny_xs"),
          ("TReX reuse", "fmnist_trex_tiny"))
FAR_OP = far_kernels.ops.bilstm_fused_scan.OP  # what a FAR block runs
SPEED_PASSES = 3  # images/s is the median of this many passes over the speed subset (single passes reordered the models)


def run_demo(num_images: int = 10000, bench_images: int = 500, batch_size: int = 250, out_dir: str = "far-demo",
             data_root: Optional[str] = None, plot: bool = True, progress: bool = True) -> dict:
    test = fashion_mnist("test", root=data_root, limit=num_images)
    # the speed subset is the first images of the test set (their logits are compared): never more than it
    bench = fashion_mnist("test", root=data_root, limit=min(bench_images, len(test)))
    y = test.targets
    models = [(label, name, load(zoo_path(name))) for label, name in MODELS]
    steps = sum(2 if is_far(m) else 1 for _, _, m in models)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="demo", unit="run", file=sys.stderr, dynamic_ncols=True, leave=False)

    def run(model, data, passes=SPEED_PASSES):
        r = evaluate(model, data, batch_size=batch_size, device="cpu", keep_logits=True)
        speeds = [r["images_per_s"]] if data is bench else []
        while len(speeds) < passes:
            speeds.append(evaluate(model, bench, batch_size=batch_size, device="cpu")["images_per_s"])
        return r["logits"], statistics.median(speeds)

    rows = []
    for label, name, model in models:
        meta = model.far_checkpoint.get("metadata", {})
        counts = param_counts(model)
        base = {"model": label, "name": name, "params": counts["kept"], "params_stored": counts["stored"],
                "mixer_params": counts["mixer_kept"], "mixer_params_stored": counts["mixer_stored"],
                "hidden_sizes": [m.hidden_sizes.tolist() for _, m in far_modules(model)] if is_far(model) else None,
                "trained": meta.get("training", {}).get("command"), "num_images": len(test)}
        cost = model_cost(model).totals
        base.update(imc_energy_uj=cost["energy_uj"], imc_latency_us=cost["latency_us"], imc_edap=cost["edap"])
        set_backend(model, None)
        auto = far_kernels.dispatch.select(FAR_OP, None, "cpu") if is_far(model) else "-"
        logits, ips = run(model, test)  # accuracy on every image, auto backend (fastest)
        base["top1"] = (logits.argmax(1) == y).float().mean().item()
        if bar is not None:
            bar.update(1)
        if not is_far(model):
            rows.append({**base, "backend": "-", "images_per_s": ips})
            continue
        set_backend(model, "torch")
        ref, ref_ips = run(model, bench)  # the reference, on the speed subset
        for backend in far_kernels.BACKENDS:
            why = FAR_OP.reason(backend, "cpu")
            if why is not None:
                rows.append({**base, "backend": backend, "unavailable": why})
                continue
            if backend == "torch":
                out, speed = ref, ref_ips
            elif backend == auto:
                out, speed = logits[:len(bench)], ips
            else:
                set_backend(model, backend)
                # on CPU tensors Triton runs in its interpreter (TRITON_INTERPRET=1): one pass checks agreement,
                # and its images/s says nothing about the kernel, so no more passes are spent timing it
                out, speed = run(model, bench, passes=1 if backend == "triton" else SPEED_PASSES)
            rows.append({**base, "backend": backend, "images_per_s": speed,
                         "max_abs_diff_vs_torch": (out - ref).abs().max().item(),
                         "top1_agreement_vs_torch": (out.argmax(1) == ref.argmax(1)).float().mean().item(),
                         **({"interpreted": True} if backend == "triton" else {})})
        set_backend(model, None)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    for r in rows:
        r["imc_edap_vs_teacher"] = r["imc_edap"] / rows[0]["imc_edap"]
    result = {"num_images": len(test), "bench_images": len(bench), "batch_size": batch_size,
              "threads": torch.get_num_threads(), "rows": rows}
    os.makedirs(out_dir, exist_ok=True)
    png = Path(out_dir, "demo.png")
    if not (plot and pyplot() is not None) and png.is_file():  # an older demo's figure would not match demo.json
        png.unlink()
        result["removed"] = str(png)
    write_json(Path(out_dir, "demo.json"), result)
    if plot:
        result["plot"] = _plot(rows, Path(out_dir, "demo.png"))
    return result


def format_table(result: dict) -> str:
    head = (f"{'model':<20} {'top-1':>7} {'params':>9} {'mixer params':>13} {'IMC uJ':>7} {'IMC us':>7} "
            f"{'EDAP':>5} {'backend':<8} {'images/s':>9} {'max|diff| vs torch':>19}")
    lines = [head, "-" * len(head)]
    last = None
    for r in result["rows"]:
        first = r["name"] != last
        last = r["name"]
        lead = (f"{r['model']:<20} {100 * r['top1']:>6.2f}% {r['params']:>9,} {r['mixer_params']:>13,} "
                f"{r['imc_energy_uj']:>7.1f} {r['imc_latency_us']:>7.0f} {r['imc_edap_vs_teacher']:>5.2f}" if first
                else " " * 75)
        if "unavailable" in r:
            why = textwrap.shorten(r["unavailable"], 70, placeholder=" ... (demo.json has it all)")
            lines.append(f"{lead} {r['backend']:<8} unavailable: {why}")
            continue
        diff = r.get("max_abs_diff_vs_torch")
        diff = "-" if diff is None else f"{diff:.2e}"
        lines.append(f"{lead} {r['backend']:<8} {r['images_per_s']:>9.0f} {diff:>19}"
                     + ("  (Triton's CPU interpreter: not a kernel speed)" if r.get("interpreted") else ""))
    lines.append("IMC: one image on the ISAAC-like chip of far.imc.cost (attention's K and V written into crossbars); "
                 "EDAP relative to the teacher (`far imc-cost` for the breakdown)")
    padded = [r for r in result["rows"] if r.get("params_stored", r["params"]) != r["params"]]
    for r in {r["name"]: r for r in padded}.values():
        lines.append(f"params: kept units only; {r['model']} holds {r['params_stored']:,} "
                     f"({r['mixer_params_stored']:,} in its token mixers) in memory, its tensors padded to each "
                     "block's widest head and direction (far eval --storage ragged: kept units only)")
    return "\n".join(lines)


def _plot(rows, path: Path) -> Optional[str]:
    plt = pyplot()
    if plt is None:
        return None
    firsts = {}
    for r in rows:
        firsts.setdefault(r["name"], r)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 1.6 + 0.65 * len(firsts)), gridspec_kw={"width_ratios": [1, 1.4]})
    names = list(firsts)
    accs = [100 * firsts[n]["top1"] for n in names]
    labels = [firsts[n]["model"] for n in names]
    palette = ["#888", "#3a7", "#27a", "#5ac", "#c73", "#a5c", "#cc4"]
    colors = [palette[i % len(palette)] for i in range(len(names))]
    a.barh(labels, accs, color=colors)
    # the figures in the tick labels: they never collide with the bars or the other panel
    ticks = [f"{firsts[n]['model']}\n{acc:.2f}%, {firsts[n]['mixer_params'] / 1e3:.0f}k mixer params,\n"
             f"IMC EDAP x{firsts[n]['imc_edap_vs_teacher']:.2f}" for acc, n in zip(accs, names)]
    a.set_yticks(range(len(names)), ticks, fontsize=8)
    a.set_xlim(min(accs) - 5, 100)
    a.set_xlabel(f"Fashion-MNIST test top-1 (%), {rows[0]['num_images']} images")
    a.invert_yaxis()
    ok = [r for r in rows if "images_per_s" in r]
    blabels = [r["model"] if r["backend"] == "-" else
               f"{r['model']} / {r['backend']}" + (" (interpreter)" if r.get("interpreted") else "") for r in ok]
    b.barh(blabels, [r["images_per_s"] for r in ok], color=[colors[names.index(r["name"])] for r in ok])
    b.set_xlabel("images / s (CPU, higher is better)")
    b.invert_yaxis()
    fig.suptitle("FAR model zoo: attention teacher vs FAR student vs pruned FAR students vs TReX-style reuse")
    save_figure(fig, path, dpi=120)
    return str(path)
