"""Small annotated heatmaps, the notes' way of showing tiny images, kernels and outputs."""

from __future__ import annotations

import numpy as np


def save_heatmaps(path, rows, *, title: str | None = None) -> None:
    """Save a grid of heatmaps to a PNG: rows is a list of rows of (title, 2-D array) or None (an empty cell).

    Colours are symmetric about zero, so positive and negative edges read
    differently; arrays of up to 8x8 cells also print their values.
    """
    # Lazy and backend-free: a bare Figure renders PNGs with Agg, and importing
    # matplotlib costs nothing for callers that never draw.
    from matplotlib.figure import Figure

    ncols = max(len(row) for row in rows)
    fig = Figure(figsize=(2.4 * ncols, 2.2 * len(rows) + (0.4 if title else 0)), layout="constrained")
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            if cell is None:
                continue
            name, a = cell
            a = np.asarray(a, dtype=np.float64)
            a = a.reshape(1, -1) if a.ndim == 1 else a
            ax = axes[r, c]
            vmax = float(np.abs(a).max()) or 1.0
            ax.imshow(a, cmap="coolwarm", vmin=-vmax, vmax=vmax)
            ax.set_title(f"{name} {a.shape}", fontsize=8)
            if max(a.shape) <= 8:
                for (i, j), v in np.ndenumerate(a):
                    ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
