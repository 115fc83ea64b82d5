"""Pooling side by side, and how much it blunts a convolution's sensitivity to a one-pixel shift.

    python -m experiments.pooling

Part 1: max, average, min and soft (log-mean-exp) pooling of the notes' 4x4
input with one window, stride and padding (default the notes' 3, 2, 1).

Part 2: the notes' band image shifted by --shift pixels left and right
(wrapping around). With --shift 1 the [1, -1] edge map changes wherever an
edge moved (24 of 42 entries). Stride-1 2x2 pooling changes in fewer places
(max: 5 or 10 of 30); stride-2 pooling changes nowhere when every edge stays
inside its pooling window (shift -1) but everywhere or nearly when edges
cross into the next one (+1): pooling buys invariance only to shifts within
its window. Max pooling of the signed edge map also drops the -1 edge (the
max of -1 and 0 is 0), so its invariance might seem to come from that loss;
average pooling keeps the edge (as -0.5), as does max pooling of the edge
magnitude |conv|, and both are just as unchanged under -1.

Writes results.json and pooling.png to a new runs/pooling-DATE-TIME/ (or --workdir).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from experiments import _outputs, _plot, runner
from experiments.edge_detection import EDGE_KERNEL, band_image
from jaxcnn import ops

OUTPUTS = ("results.json", "pooling.png")
# The stages after the edge map compared under a shift, each on the (1, H, W, 1) edge map.
SHIFT_STAGES = {
    "max 2x2 stride 1": lambda y: ops.max_pool2d(y, 2, stride=1),
    "max 2x2 stride 2": lambda y: ops.max_pool2d(y, 2, stride=2),
    "avg 2x2 stride 1": lambda y: ops.avg_pool2d(y, 2, stride=1),
    "avg 2x2 stride 2": lambda y: ops.avg_pool2d(y, 2, stride=2),
    "max 2x2 stride 2 of |conv|": lambda y: ops.max_pool2d(jnp.abs(y), 2, stride=2),
}
# The stages whose maps the figure draws; it draws every stage's counts.
DRAWN_STAGES = ("conv", "max 2x2 stride 2", "avg 2x2 stride 2", "max 2x2 stride 2 of |conv|")


def pool_all(x, window: int, stride: int, padding: int, temperature: float) -> dict[str, np.ndarray]:
    """Max, average, min and soft pooling of a 2-D x with the same geometry."""
    x4 = np.asarray(x, np.float32)[None, :, :, None]
    geometry = dict(stride=stride, padding=padding)
    pools = {
        "max": ops.max_pool2d(x4, window, **geometry),
        "avg": ops.avg_pool2d(x4, window, **geometry),
        "min": ops.min_pool2d(x4, window, **geometry),
        f"soft T={temperature:g}": ops.soft_pool2d(x4, window, temperature=temperature, **geometry),
    }
    return {name: np.asarray(y)[0, :, :, 0] for name, y in pools.items()}


def shift_sensitivity(x, shift: int) -> tuple[list[dict], dict[str, dict[int, np.ndarray]]]:
    """How many entries of the edge map, and of each pooling of it, change when x moves by +-shift columns.

    Returns the counts and every map, by stage and then shift (0: unmoved).
    """

    def stages(image):
        y = ops.corr2d(image, EDGE_KERNEL)[None, :, :, None]
        out = {"conv": y}
        out.update({name: stage(y) for name, stage in SHIFT_STAGES.items()})
        return {name: np.asarray(a)[0, :, :, 0] for name, a in out.items()}

    maps = {s: stages(np.roll(x, s, axis=1)) for s in (0, -shift, shift)}
    rows = [
        {"shift": s, "stage": name, "changed": int((np.abs(a - maps[0][name]) > 1e-6).sum()), "total": a.size}
        for s in (-shift, shift)
        for name, a in maps[s].items()
    ]
    return rows, {name: {s: maps[s][name] for s in maps} for name in maps[0]}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.pooling",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[2:4]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--window", type=int, default=3, help="pooling window (square) for part 1 (default: %(default)s)"
    )
    parser.add_argument("--stride", type=int, default=2, help="pooling stride for part 1 (default: %(default)s)")
    parser.add_argument(
        "--padding", type=int, default=1, help="pooling padding for part 1, at most window // 2 (default: %(default)s)"
    )
    parser.add_argument(
        "--temperature",
        type=runner._positive_float,
        default=1.0,
        help="soft pooling temperature, > 0 (default: %(default)g)",
    )
    parser.add_argument(
        "--shift", type=int, default=1, help="pixels the band image moves in part 2, 1 to 7 (default: %(default)s)"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where results.json and pooling.png go (default: a new runs/pooling-DATE-TIME/); "
        "one that already holds them is refused unless --overwrite",
    )
    _outputs.add_overwrite_flag(parser)
    args = parser.parse_args(argv)
    if not 1 <= args.shift < band_image().shape[1]:
        parser.error(f"--shift must be between 1 and {band_image().shape[1] - 1}, got {args.shift}")
    try:
        ops.pool_output_shape(4, args.window, stride=args.stride, padding=args.padding)
    except ValueError as e:
        parser.error(f"--window {args.window} --stride {args.stride} --padding {args.padding}: {e}")
    args.workdir = args.workdir or _outputs.dated("runs/pooling")
    _outputs.refuse_earlier_outputs(parser, "--workdir", args.workdir, OUTPUTS, args.overwrite)
    return args


def figure(x, pools: dict, band, shift: int, rows: list[dict], maps: dict, geometry: str):
    """Part 1's pools at their true size beside x; part 2's shifted maps, and the counts of what changed, as bars."""
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 13.5), layout="constrained")
    part1, part2, counts = fig.subfigures(3, 1, height_ratios=(2.3, 6.4, 3.2))

    arrays = [x, *pools.values()]
    values = Normalize(min(a.min() for a in arrays), max(a.max() for a in arrays))
    axes = part1.subplots(1, len(arrays))
    for ax, (title, a) in zip(axes, [("X", x), *pools.items()]):
        _plot.draw_array(ax, a, title=title, cmap="viridis", norm=values, canvas=_plot.canvas_of(*arrays))
    _plot.colour_bar(part1, axes, cmap="viridis", norm=values, label="value")
    part1.suptitle(f"1. pooling X with a {geometry}, on one colour scale", fontsize="large")

    changed = {(r["shift"], r["stage"]): r for r in rows}
    shifts = (-shift, 0, shift)
    drawn = [np.asarray(maps[stage][s]) for stage in DRAWN_STAGES for s in shifts]
    canvas, norm = _plot.canvas_of(band, *drawn), _plot.signed_norm(*drawn)
    axes = part2.subplots(len(shifts), 1 + len(DRAWN_STAGES))
    for r, s in enumerate(shifts):
        moved = f"shift {s:+d}" if s else "unshifted"
        image = np.roll(band, s, axis=1)
        _plot.draw_array(
            axes[r, 0], image, title=f"band X, {moved}", cmap=_plot.IMAGE_CMAP, norm=_plot.image_norm(), canvas=canvas
        )
        for c, stage in enumerate(DRAWN_STAGES, start=1):
            note = f"{changed[s, stage]['changed']} of {changed[s, stage]['total']} changed" if s else "unshifted"
            _plot.draw_array(
                axes[r, c], maps[stage][s], title=f"{stage}\n{note}", cmap=_plot.SIGNED_CMAP, norm=norm, canvas=canvas
            )
    _plot.colour_bar(
        part2,
        axes[:, 0],
        cmap=_plot.IMAGE_CMAP,
        norm=_plot.image_norm(),
        label="pixel: 0 black, 1 white",
        location="left",
    )
    _plot.colour_bar(part2, axes[:, 1:], cmap=_plot.SIGNED_CMAP, norm=norm, label="edge map and pooled values")
    part2.suptitle(
        f"2. the band image moved {shift} pixel(s) left and right: its [1, -1] edge map, and that map pooled",
        fontsize="large",
    )

    ax = counts.subplots()
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    width = 0.38
    for i, (s, colour) in enumerate(((-shift, "tab:blue"), (shift, "tab:orange"))):
        fractions = [changed[s, stage]["changed"] / changed[s, stage]["total"] for stage in stages]
        bars = ax.bar(np.arange(len(stages)) + (i - 0.5) * width, fractions, width, color=colour, label=f"shift {s:+d}")
        labels = [f"{changed[s, stage]['changed']}/{changed[s, stage]['total']}" for stage in stages]
        ax.bar_label(bars, labels)
    ax.set_xticks(np.arange(len(stages)), stages)
    ax.set(ylim=(0, 1.15), ylabel="fraction of entries changed")
    ax.legend()
    counts.suptitle("3. how much of each stage's output the shift changes", fontsize="large")
    return fig


def main(argv=None) -> dict:
    args = parse_args(argv)
    np.set_printoptions(precision=3, suppress=True)
    x = np.arange(16, dtype=np.float32).reshape(4, 4)
    pools = pool_all(x, args.window, args.stride, args.padding, args.temperature)
    print(f"X:\n{x}")
    geometry = f"{args.window}x{args.window} window, stride {args.stride}, padding {args.padding}"
    print(f"pooling with a {geometry}:")
    for name, y in pools.items():
        print(f"{name}:\n{y}")

    band = band_image()
    rows, maps = shift_sensitivity(band, args.shift)
    print(f"entries that change when the band image moves by {args.shift} column(s):")
    for r in rows:
        print(f"  shift {r['shift']:+d}  {r['stage']:<26} {r['changed']:>2} / {r['total']}")

    results = {
        "input": x.tolist(),
        "window": args.window,
        "stride": args.stride,
        "padding": args.padding,
        "temperature": args.temperature,
        "pools": {name: y.tolist() for name, y in pools.items()},
        "shift": rows,
    }
    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / "results.json").write_text(json.dumps(results, indent=1))
    _plot.save(figure(x, pools, band, args.shift, rows, maps, geometry), args.workdir / "pooling.png")
    print(f"wrote {args.workdir / 'results.json'} and {args.workdir / 'pooling.png'}")
    return results


if __name__ == "__main__":
    main()
