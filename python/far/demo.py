"""`far demo`: the README's main job on the bundled default.

Until the model zoo lands (training issue), it builds the small DeiT-style Fashion-MNIST ViT
(fmnist_deit_tiny, seeded), converts it to FAR, and runs real Fashion-MNIST test images through
every available backend: outputs compared with the reference (torch) backend, images/s, a table
and a PNG. The models are untrained, so accuracy is not the point here; agreement and speed are.
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


def _time_model(model, x, batch_size: int, reps: int = 3) -> float:
    """Median seconds of one pass over x in batches (after one warm-up batch)."""
    with torch.inference_mode():
        model(x[:batch_size])
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for i in range(0, len(x), batch_size):
                model(x[i:i + batch_size])
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def run_demo(num_images: int = 1000, batch_size: int = 100, seed: int = 0, out_dir: str = "far-demo",
             data_root: Optional[str] = None, plot: bool = True) -> dict:
    import far
    from far.data import fashion_mnist

    torch.manual_seed(seed)
    x, y = fashion_mnist("test", root=data_root, limit=num_images).tensors()

    teacher = far.create_model("fmnist_deit_tiny", far=False).eval()
    student = far.create_model("fmnist_deit_tiny", far=False).eval()
    student.load_state_dict(teacher.state_dict())
    far.convert(student)

    rows = []
    with torch.inference_mode():
        t_att = _time_model(teacher, x, batch_size)
        rows.append({"model": "attention (timm)", "backend": "-", "images_per_s": len(x) / t_att,
                     "max_abs_diff_vs_torch": None, "top1": (teacher(x).argmax(1) == y).float().mean().item()})
        far.set_backend(student, "torch")
        ref = student(x)
        for backend in far_kernels.BACKENDS:
            why = SCAN_OP.reason(backend, "cpu")
            if why is not None:
                rows.append({"model": "FAR", "backend": backend, "unavailable": why})
                continue
            far.set_backend(student, backend)
            out = student(x)
            t = _time_model(student, x, batch_size)
            rows.append({"model": "FAR", "backend": backend, "images_per_s": len(x) / t,
                         "max_abs_diff_vs_torch": (out - ref).abs().max().item(),
                         "top1": (out.argmax(1) == y).float().mean().item()})
    result = {"num_images": len(x), "batch_size": batch_size, "threads": torch.get_num_threads(),
              "params": {"attention_blocks": student.far_conversion.attention_total,
                         "far_blocks": student.far_conversion.far_total},
              "note": "untrained models (no zoo yet): compares backends, not accuracy", "rows": rows}
    os.makedirs(out_dir, exist_ok=True)
    Path(out_dir, "demo.json").write_text(json.dumps(result, indent=2))
    if plot:
        result["plot"] = _plot(rows, Path(out_dir, "demo.png"))
    return result


def format_table(result: dict) -> str:
    lines = [f"{'model':<18} {'backend':<8} {'images/s':>10} {'max|diff| vs torch':>19} {'top-1':>6}"]
    for r in result["rows"]:
        if "unavailable" in r:
            lines.append(f"{r['model']:<18} {r['backend']:<8} unavailable: {r['unavailable']}")
            continue
        diff = "-" if r["max_abs_diff_vs_torch"] is None else f"{r['max_abs_diff_vs_torch']:.2e}"
        lines.append(f"{r['model']:<18} {r['backend']:<8} {r['images_per_s']:>10.1f} {diff:>19} {100 * r['top1']:>5.1f}%")
    return "\n".join(lines)


def _plot(rows, path: Path) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in rows if "images_per_s" in r]
    labels = [r["model"] if r["backend"] == "-" else f"FAR / {r['backend']}" for r in ok]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.barh(labels, [r["images_per_s"] for r in ok], color=["#888"] + ["#3a7"] * (len(ok) - 1))
    ax.set_xlabel("images / s (CPU, higher is better)")
    ax.set_title("Fashion-MNIST ViT: attention vs FAR backends")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
