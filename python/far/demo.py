"""`far demo`: the README's main job on the bundled model zoo.

Evaluates the attention teacher (fmnist_deit_tiny), its FAR student (fmnist_far_tiny) and the pruned
FAR student (fmnist_far_tiny_pruned) on the Fashion-MNIST test set: top-1 accuracy, parameters (all,
and those of the token mixers: attention vs LSTM + head_proj), CPU throughput per backend, and the
agreement of every backend with the torch reference. Prints a table, writes demo.json and demo.png.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

import torch

import far_kernels
from far_kernels.ops.bilstm_scan import OP as SCAN_OP

MODELS = (("teacher (attention)", "fmnist_deit_tiny"), ("FAR", "fmnist_far_tiny"),
          ("FAR pruned", "fmnist_far_tiny_pruned"))


def _timed_predict(model, x, batch_size: int):
    """(logits, images/s): one pass in batches; the first batch is a warm-up and is not timed
    (unless it is the only one)."""
    outs, timed, n_timed = [], 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            t0 = time.perf_counter()
            outs.append(model(x[i:i + batch_size]))
            if i > 0 or len(x) <= batch_size:
                timed += time.perf_counter() - t0
                n_timed += len(outs[-1])
    return torch.cat(outs), n_timed / max(timed, 1e-9)


def _stored_params(model) -> int:
    """Parameters as stored by far.save: kept LSTM units only (no padding of pruned heads)."""
    from far.io import _checkpoint_tensors

    return sum(t.numel() for t in _checkpoint_tensors(model).values())


def _mixer_params(model) -> int:
    """Parameters of the token mixers: attention (qkv, proj) or FAR (pre_proj, LSTMs, head_proj, proj),
    kept units only."""
    import far

    mods = list(far.far_modules(model))
    if mods:
        return sum(m.num_lstm_params() + sum(p.numel() for p in (*m.pre_proj.parameters(), *m.proj.parameters()))
                   for _, m in mods)
    return sum(p.numel() for b in model.blocks for p in b.attn.parameters())


def run_demo(num_images: int = 10000, bench_images: int = 500, batch_size: int = 250, out_dir: str = "far-demo",
             data_root: Optional[str] = None, plot: bool = True, progress: bool = True) -> dict:
    import far
    from far.data import fashion_mnist
    from far.models.zoo import zoo_path

    x, y = fashion_mnist("test", root=data_root, limit=num_images).tensors()
    xb = x[:bench_images]
    models = [(label, name, far.load(zoo_path(name))) for label, name in MODELS]
    steps = sum(2 if any(True for _ in far.far_modules(m)) else 1 for _, _, m in models)
    bar = None
    if progress:
        import sys

        from tqdm import tqdm

        bar = tqdm(total=steps, desc="demo", unit="run", file=sys.stderr, dynamic_ncols=True, leave=False)
    rows = []
    for label, name, model in models:
        is_far = any(True for _ in far.far_modules(model))
        meta = model.far_checkpoint.get("metadata", {})
        base = {"model": label, "name": name, "params": _stored_params(model),
                "mixer_params": _mixer_params(model),
                "hidden_sizes": [m.hidden_sizes.tolist() for _, m in far.far_modules(model)] if is_far else None,
                "trained": meta.get("training", {}).get("command"), "num_images": len(x)}
        if is_far:
            far.set_backend(model, None)
        auto = SCAN_OP.resolve(None, "cpu") if is_far else "-"
        logits, ips = _timed_predict(model, x, batch_size)  # accuracy on every image, auto backend (fastest)
        base["top1"] = (logits.argmax(1) == y).float().mean().item()
        if bar is not None:
            bar.update(1)
        if not is_far:
            rows.append({**base, "backend": "-", "images_per_s": ips})
            continue
        far.set_backend(model, "torch")
        ref, ref_ips = _timed_predict(model, xb, batch_size)  # the reference, on the speed subset
        for backend in far_kernels.BACKENDS:
            why = SCAN_OP.reason(backend, "cpu")
            if why is not None:
                rows.append({**base, "backend": backend, "unavailable": why})
                continue
            if backend == "torch":
                out, speed = ref, ref_ips
            elif backend == auto:
                out, speed = logits[:len(xb)], ips
            else:
                far.set_backend(model, backend)
                out, speed = _timed_predict(model, xb, batch_size)
            rows.append({**base, "backend": backend, "images_per_s": speed,
                         "max_abs_diff_vs_torch": (out - ref).abs().max().item(),
                         "top1_agreement_vs_torch": (out.argmax(1) == ref.argmax(1)).float().mean().item()})
        far.set_backend(model, None)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    result = {"num_images": len(x), "bench_images": len(xb), "batch_size": batch_size,
              "threads": torch.get_num_threads(), "rows": rows}
    os.makedirs(out_dir, exist_ok=True)
    tmp = Path(out_dir, ".demo.json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, Path(out_dir, "demo.json"))
    if plot:
        result["plot"] = _plot(rows, Path(out_dir, "demo.png"))
    return result


def format_table(result: dict) -> str:
    head = (f"{'model':<20} {'top-1':>7} {'params':>9} {'mixer params':>13} {'backend':<8} {'images/s':>9} "
            f"{'max|diff| vs torch':>19}")
    lines = [head, "-" * len(head)]
    last = None
    for r in result["rows"]:
        first = r["name"] != last
        last = r["name"]
        lead = (f"{r['model']:<20} {100 * r['top1']:>6.2f}% {r['params']:>9,} {r['mixer_params']:>13,}" if first
                else " " * 53)
        if "unavailable" in r:
            lines.append(f"{lead} {r['backend']:<8} unavailable: {r['unavailable'][:70]}")
            continue
        diff = r.get("max_abs_diff_vs_torch")
        diff = "-" if diff is None else f"{diff:.2e}"
        lines.append(f"{lead} {r['backend']:<8} {r['images_per_s']:>9.0f} {diff:>19}")
    return "\n".join(lines)


def _plot(rows, path: Path) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    firsts = {}
    for r in rows:
        firsts.setdefault(r["name"], r)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1, 1.4]})
    names = list(firsts)
    accs = [100 * firsts[n]["top1"] for n in names]
    labels = [firsts[n]["model"] for n in names]
    colors = ["#888", "#3a7", "#27a"][:len(names)]
    a.barh(labels, accs, color=colors)
    for i, (acc, n) in enumerate(zip(accs, names)):
        a.text(acc, i, f" {acc:.2f}%  ({firsts[n]['mixer_params'] / 1e3:.0f}k mixer params)", va="center", fontsize=8)
    a.set_xlim(min(accs) - 5, 100)
    a.set_xlabel(f"Fashion-MNIST test top-1 (%), {rows[0]['num_images']} images")
    a.invert_yaxis()
    ok = [r for r in rows if "images_per_s" in r]
    blabels = [r["model"] if r["backend"] == "-" else f"{r['model']} / {r['backend']}" for r in ok]
    b.barh(blabels, [r["images_per_s"] for r in ok],
           color=[colors[names.index(r["name"])] for r in ok])
    b.set_xlabel("images / s (CPU, higher is better)")
    b.invert_yaxis()
    fig.suptitle("FAR model zoo: attention teacher vs FAR student vs pruned FAR")
    from far.train.engine import save_figure

    save_figure(fig, path, dpi=120)
    return str(path)
