"""Pooling side by side, and how much it blunts a convolution's sensitivity to a one-pixel shift.

    python -m experiments.pooling --workdir runs/pooling

Part 1: max, average, min and soft (log-mean-exp) pooling of the notes' 4x4
input with one window, stride and padding (default the notes' 3, 2, 1).
Part 2: the notes' band image shifted by --shift pixels left and right
(wrapping around). With --shift 1 the [1, -1] edge map changes wherever an edge moved (24 of
42 entries). Stride-1 2x2 max pooling changes in fewer places (5 or 10 of 30);
stride-2 pooling changes nowhere when every edge stays inside its pooling
window (shift -1) but in most places when edges cross into the next one
(+1): pooling buys invariance only to shifts within its window.
Writes results.json and pooling.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from experiments import runner
from experiments._plot import save_heatmaps
from experiments.edge_detection import EDGE_KERNEL, band_image
from jaxcnn import ops

# The stages after the edge map compared under a shift: (name, pool, stride).
SHIFT_POOLS = (
    ("max 2x2 stride 1", ops.max_pool2d, 1),
    ("max 2x2 stride 2", ops.max_pool2d, 2),
    ("avg 2x2 stride 1", ops.avg_pool2d, 1),
    ("avg 2x2 stride 2", ops.avg_pool2d, 2),
)


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
        out.update({name: pool(y, 2, stride=s) for name, pool, s in SHIFT_POOLS})
        return {name: np.asarray(a)[0, :, :, 0] for name, a in out.items()}

    maps = {s: stages(np.roll(x, s, axis=1)) for s in (0, -shift, shift)}
    rows = [
        {"shift": s, "stage": name, "changed": int((np.abs(a - maps[0][name]) > 1e-6).sum()), "total": a.size}
        for s in (-shift, shift)
        for name, a in maps[s].items()
    ]
    return rows, {name: {s: maps[s][name] for s in maps} for name in maps[0]}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.pooling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=int, default=3, help="pooling window (square) for part 1")
    parser.add_argument("--stride", type=int, default=2, help="pooling stride for part 1")
    parser.add_argument("--padding", type=int, default=1, help="pooling padding for part 1 (at most window // 2)")
    parser.add_argument(
        "--temperature", type=runner._positive_float, default=1.0, help="soft pooling temperature (> 0)"
    )
    parser.add_argument("--shift", type=int, default=1, help="pixels the band image moves in part 2 (1 to 7)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/pooling"), help="where to write results")
    args = parser.parse_args(argv)
    if not 1 <= args.shift < band_image().shape[1]:
        parser.error(f"--shift must be between 1 and {band_image().shape[1] - 1}, got {args.shift}")
    try:
        ops.pool_output_shape(4, args.window, stride=args.stride, padding=args.padding)
    except ValueError as e:
        parser.error(f"--window {args.window} --stride {args.stride} --padding {args.padding}: {e}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    np.set_printoptions(precision=3, suppress=True)
    x = np.arange(16, dtype=np.float32).reshape(4, 4)
    pools = pool_all(x, args.window, args.stride, args.padding, args.temperature)
    print(f"X:\n{x}")
    print(f"{args.window}x{args.window} pooling, stride {args.stride}, padding {args.padding}:")
    for name, y in pools.items():
        print(f"{name}:\n{y}")

    band = band_image()
    rows, maps = shift_sensitivity(band, args.shift)
    print(f"entries that change when the band image moves by {args.shift} column(s):")
    for r in rows:
        print(f"  shift {r['shift']:+d}  {r['stage']:<17} {r['changed']:>2} / {r['total']}")

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
    save_heatmaps(
        args.workdir / "pooling.png",
        [
            [("X", x), *pools.items()],
            [("band X", band), *((f"conv, shift {s:+d}", a) for s, a in maps["conv"].items())],
            [None, *((f"max 2x2 s2, shift {s:+d}", a) for s, a in maps["max 2x2 stride 2"].items())],
        ],
        title=f"{args.window}x{args.window} pooling, stride {args.stride}, padding {args.padding}; "
        f"edge maps under a {args.shift}-pixel shift",
    )
    print(f"wrote {args.workdir / 'results.json'} and {args.workdir / 'pooling.png'}")
    return results


if __name__ == "__main__":
    main()
