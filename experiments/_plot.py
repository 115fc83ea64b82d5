"""The notes' small arrays drawn as annotated cells, all at one cell size, on colour scales shared across panels.

Images are drawn in grey with 0 black and 1 white, as the notes' words say;
kernels and the maps they produce on one diverging scale, symmetric about
zero, so that +1 and -1 edges read the same in every panel.
"""

from __future__ import annotations

import numpy as np

# Lazy and backend-free throughout: a bare Figure renders PNGs with Agg, and
# importing matplotlib costs nothing for callers that never draw.

DPI = 100
FONT_SIZE = 9  # points, for titles and values in cells; matplotlib's default of 10 elsewhere
IMAGE_CMAP = "gray"
SIGNED_CMAP = "coolwarm"


def image_norm():
    from matplotlib.colors import Normalize

    return Normalize(0.0, 1.0)


def signed_norm(*arrays):
    """One scale for all of arrays: symmetric about zero, reaching the largest magnitude (at least 1)."""
    from matplotlib.colors import Normalize

    vmax = max(1.0, *(float(np.abs(a).max()) for a in arrays))
    return Normalize(-vmax, vmax)


def canvas_of(*arrays) -> tuple[int, int]:
    """The (rows, cols) of cells that holds every one of arrays."""
    return max(np.shape(a)[0] for a in arrays), max(np.shape(a)[1] for a in arrays)


def draw_array(ax, a, *, title: str, cmap: str, norm, canvas: tuple[int, int], annotate: bool = True) -> None:
    """Draw the 2-D a centred on a canvas of (rows, cols) cells, its shape after the title's first line.

    Every panel drawn on the same canvas, in equally sized axes, has the same
    cell size, so a 1x2 kernel shows at its true size beside a 6x8 image.
    Annotated cells print their value, in black or white to stand out
    against the cell's colour.
    """
    from matplotlib import colormaps

    a = np.asarray(a, np.float64)
    rows, cols = canvas
    if a.shape[0] > rows or a.shape[1] > cols:
        raise ValueError(f"array of shape {a.shape} does not fit a canvas of {canvas}")
    top, left = (rows - a.shape[0]) / 2, (cols - a.shape[1]) / 2
    ax.imshow(a, cmap=cmap, norm=norm, extent=(left, left + a.shape[1], top + a.shape[0], top), interpolation="nearest")
    ax.set_xlim(-0.1, cols + 0.1)  # the margin keeps the outer cell borders whole
    ax.set_ylim(rows + 0.1, -0.1)
    ax.set_aspect("equal")
    ax.set_axis_off()
    # Cell borders, so that white cells show on the white page.
    bottom, right = top + a.shape[0], left + a.shape[1]
    ax.hlines(top + np.arange(a.shape[0] + 1), left, right, colors="0.6", linewidths=0.6)
    ax.vlines(left + np.arange(a.shape[1] + 1), top, bottom, colors="0.6", linewidths=0.6)
    name, *more = title.split("\n", 1)
    ax.set_title("\n".join([f"{name} ({a.shape[0]}x{a.shape[1]})", *more]), fontsize=FONT_SIZE)
    if annotate:
        colours = colormaps[cmap](norm(a))
        for (i, j), v in np.ndenumerate(a):
            luminance = colours[i, j, :3] @ (0.299, 0.587, 0.114)
            text = f"{v + 0.0:.3g}"  # + 0.0 turns -0.0 into 0
            colour = "white" if luminance < 0.5 else "black"
            # in_layout=False: inside the axes anyway, and measuring hundreds of them slows the layout down.
            kwargs = dict(ha="center", va="center", fontsize=FONT_SIZE, color=colour, in_layout=False)
            ax.text(left + j + 0.5, top + i + 0.5, text, **kwargs)


def colour_bar(fig, axes, *, cmap: str, norm, label: str, location: str = "right") -> None:
    """One colour bar for every panel in axes, which must share cmap and norm."""
    from matplotlib.cm import ScalarMappable

    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, location=location, shrink=0.8, aspect=20)
    bar.set_label(label)


def save(fig, path) -> None:
    fig.savefig(path, dpi=DPI)
