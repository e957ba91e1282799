"""Figures: matplotlib (Agg) when installed, written through the atomic writer."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from far.utils.fs import atomic_write


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, path, dpi: int = 110, *, force: bool = True) -> Path:
    """Lay out and write a matplotlib figure atomically (format from the suffix, PNG by default), then close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fmt = path.suffix[1:].lower() or "png"
    try:
        fig.tight_layout()
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=fmt), force=force)
    finally:
        plt.close(fig)


def grouped_bars(path, xlabels, series: dict, ylabel: str, title: str, width_per_group: float = 0.6,
                 height: float = 4.5, xlabel_size: int = 7, log: bool = True) -> Optional[str]:
    """A grouped bar chart (a bar per series in every group; log scale by default) written to `path`.
    Returns the path, or None when matplotlib is missing. Missing values (None, 0, NaN, inf) draw no bar;
    every series has one value per label (ValueError otherwise: matplotlib would repeat a single value)."""
    n = len(xlabels)
    for name, vals in series.items():
        if len(vals) != n:
            raise ValueError(f"grouped_bars: series {name!r} has {len(vals)} values for {n} labels")
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(max(6, n * width_per_group), height))
    width = 0.8 / max(len(series), 1)
    for i, (name, vals) in enumerate(series.items()):
        # NaN/inf: no bar (an all-NaN series on a log axis made matplotlib refuse the whole figure)
        ax.bar([j + i * width for j in range(n)], [v if v and math.isfinite(v) else 0 for v in vals], width,
               label=name)
    ax.set_xticks([j + 0.4 for j in range(n)])
    ax.set_xticklabels(xlabels, fontsize=xlabel_size)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    if series:  # else matplotlib warns that there is nothing to put in a legend
        ax.legend(fontsize=7)
    ax.set_title(title)
    save_figure(fig, path, dpi=120)
    return str(path)
