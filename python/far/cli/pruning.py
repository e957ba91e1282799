"""Reports of a pruning run: kept units per block, direction and head, as text and as a heatmap; the
argument handling of `far prune` that needs more than argparse's defaults."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn as nn

from far.models import far_modules
from far.utils.plot import pyplot, save_figure


class Once(argparse.Action):
    """An option given at most once (`far prune --budget`): a second one is a usage error (exit 2) instead of
    silently replacing the first."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = getattr(namespace, self.dest, None)
        if seen is not None and seen is not self.default:
            raise argparse.ArgumentError(self, f"given twice ({seen} and {values}): give one")
        setattr(namespace, self.dest, values)


def format_kept(model: nn.Module, before: Optional[Dict[str, torch.Tensor]] = None) -> str:
    """Text table: blocks as rows, (direction, head) as columns, kept/original units."""
    mods = far_modules(model)
    if not mods:
        return "(no FAR blocks)"
    H = mods[0][1].num_heads
    cols = [f"{'fwd' if r == 0 else 'bwd'}{h}" for r in (0, 1) for h in range(H)]
    w = max(len(n) for n, _ in mods)
    lines = [" " * w + "  " + "  ".join(c.rjust(7) for c in cols)]
    for name, m in mods:
        ref = before.get(name) if before else None
        cells = []
        for r in (0, 1):
            for h in range(m.num_heads):
                k = int(m.hidden_sizes[r, h])
                o = int(ref[r, h]) if ref is not None else None
                cells.append((f"{k}/{o}" if o is not None else str(k)).rjust(7))
        lines.append(name.ljust(w) + "  " + "  ".join(cells))
    return "\n".join(lines)


def plot_kept(model: nn.Module, path: Path, before: Optional[Dict[str, torch.Tensor]] = None,
              title: str = "kept LSTM units") -> Optional[str]:
    """Heatmap PNG: blocks x (direction, head), colour and label = kept units. None or why not written."""
    plt = pyplot()
    if plt is None:
        return "matplotlib is not installed"
    mods = far_modules(model)
    if not mods:
        return "no FAR blocks"
    H = mods[0][1].num_heads
    grid = torch.tensor([[int(m.hidden_sizes[r, h]) for r in (0, 1) for h in range(m.num_heads)] for _, m in mods])
    full = torch.tensor([[int(before[n][r, h]) if before else m.head_dim for r in (0, 1) for h in range(m.num_heads)]
                         for n, m in mods])
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * 2 * H, 1.0 + 0.5 * len(mods)))
    im = ax.imshow((grid / full.clamp_min(1)).numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{int(grid[i, j])}/{int(full[i, j])}", ha="center", va="center", fontsize=8,
                    color="white" if grid[i, j] < 0.6 * full[i, j] else "black")
    ax.set_xticks(range(2 * H), [f"{'fwd' if r == 0 else 'bwd'} h{h}" for r in (0, 1) for h in range(H)])
    ax.set_yticks(range(len(mods)), [n for n, _ in mods])
    fig.colorbar(im, ax=ax, label="kept fraction")
    ax.set_title(title)
    save_figure(fig, path)
    return None
