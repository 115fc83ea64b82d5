"""The notes' edge detection: the [1, -1] kernel finds vertical edges, and
gradient descent on squared error learns it back from a random start.

    python -m experiments.edge_detection

Writes results.json (every array, loss and kernel along the way) and
edge_detection.png to a new runs/edge_detection-DATE-TIME/ (or --workdir).

--steps defaults to 14, not the notes' 10: from torch's init (uniform in
+-1/sqrt(2), used here) the slow direction of this quadratic, k0 = k1, shrinks
only by |1 - 60 lr| = 0.8 per step at lr 3e-2, so 10 steps leave up to 0.09
error for unlucky starts; 14 bring every start within 0.035 of [1, -1].
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments import _outputs, _plot, runner
from jaxcnn import ops

EDGE_KERNEL = np.array([[1.0, -1.0]], np.float32)
OUTPUTS = ("results.json", "edge_detection.png")


def band_image() -> np.ndarray:
    """The notes' 6x8 image: ones, with a black vertical band in columns 2:6."""
    x = np.ones((6, 8), np.float32)
    x[:, 2:6] = 0
    return x


def diagonal_image() -> np.ndarray:
    """The exercise's image with a diagonal edge: ones on and below the diagonal."""
    return np.tril(np.ones((6, 8), np.float32))


def squared_error(kernel, x, y):
    return jnp.sum((ops.corr2d(x, kernel) - y) ** 2)


@jax.jit
def train_step(kernel, x, y, lr):
    loss, grad = jax.value_and_grad(squared_error)(kernel, x, y)
    return kernel - lr * grad, loss


def learn_kernel(x, y, *, seed: int, lr: float, steps: int, log_every: int = 2):
    """Gradient descent on a (1, 2) kernel from a random start.

    Returns the kernels, (steps + 1, 1, 2): the start and the kernel after
    each step; and the losses, one a step: the loss that step descends from.
    """
    bound = 1 / np.sqrt(EDGE_KERNEL.size)  # torch's default Conv2d init: U(+-1/sqrt(fan_in))
    kernel = jax.random.uniform(jax.random.key(seed), EDGE_KERNEL.shape, minval=-bound, maxval=bound)
    kernels, losses = [np.asarray(kernel)], []
    for i in range(steps):
        kernel, loss = train_step(kernel, x, y, lr)
        kernels.append(np.asarray(kernel))
        losses.append(float(loss))
        if (i + 1) % log_every == 0:
            print(f"step {i + 1}, loss {loss:.3f}")
    return np.stack(kernels), losses


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.edge_detection",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 3)[3],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="PRNG seed of the kernel's random start (default: %(default)s)"
    )
    parser.add_argument(
        "--lr",
        type=runner._positive_float,
        default=3e-2,
        help="gradient descent step size (default: %(default)g, the notes' value)",
    )
    parser.add_argument(
        "--steps",
        type=runner._positive_int,
        default=14,
        help="gradient descent steps (default: %(default)s; the notes take 10, see below)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where results.json and edge_detection.png go (default: a new runs/edge_detection-DATE-TIME/); "
        "one that already holds them is refused unless --overwrite",
    )
    _outputs.add_overwrite_flag(parser)
    args = parser.parse_args(argv)
    args.workdir = args.workdir or _outputs.dated("runs/edge_detection")
    _outputs.refuse_earlier_outputs(parser, "--workdir", args.workdir, OUTPUTS, args.overwrite)
    return args


def figure(results: dict):
    """The arrays on one cell size (the kernel at its true size beside the image) and the kernel's learning curve."""
    from matplotlib.figure import Figure

    x, k, d = (np.asarray(results[name]) for name in ("X", "K", "diagonal_X"))
    kernels, losses = np.asarray(results["kernels"]), results["losses"]
    learned = kernels[-1]
    images = [("X", x), ("diagonal X", d)]
    signed = [
        [
            ("K", k),
            ("corr2d(X, K)", results["Y"]),
            ("corr2d(X.T, K)", results["Y_transposed_X"]),
            (f"learned K after {len(losses)} steps\n[{learned[0, 0]:.3f}, {learned[0, 1]:.3f}]", learned),
        ],
        [
            ("corr2d(X, K)", results["diagonal_corr_K"]),
            ("K.T", k.T),
            ("corr2d(X, K.T)", results["diagonal_corr_K_T"]),
            ("corr2d(X.T, K)", results["diagonal_transposed_corr_K"]),
        ],
    ]
    arrays = [np.asarray(a) for _, a in images] + [np.asarray(a) for row in signed for _, a in row]
    canvas, norm = _plot.canvas_of(*arrays), _plot.signed_norm(*arrays[len(images) :])

    fig = Figure(figsize=(12, 8.5), layout="constrained")
    fig.suptitle(
        "edge detection with K = [1, -1]: corr2d(X, K) is 1 where white turns black, -1 where black turns white",
        fontsize="large",
    )
    grid, curves = fig.subfigures(2, 1, height_ratios=(2.2, 1))
    axes = grid.subplots(2, 5)
    for r, (name, image) in enumerate(images):
        _plot.draw_array(axes[r, 0], image, title=name, cmap=_plot.IMAGE_CMAP, norm=_plot.image_norm(), canvas=canvas)
        for c, (title, a) in enumerate(signed[r], start=1):
            whole = np.array_equal(a, np.round(a))  # the learned kernel's values are in its title: they overflow a cell
            _plot.draw_array(
                axes[r, c], a, title=title, cmap=_plot.SIGNED_CMAP, norm=norm, canvas=canvas, annotate=whole
            )
    _plot.colour_bar(
        grid,
        axes[:, 0],
        cmap=_plot.IMAGE_CMAP,
        norm=_plot.image_norm(),
        label="pixel: 0 black, 1 white",
        location="left",
    )
    _plot.colour_bar(grid, axes[:, 1:], cmap=_plot.SIGNED_CMAP, norm=norm, label="kernel and output values")

    loss_ax, kernel_ax = curves.subplots(1, 2)
    steps = np.arange(1, len(losses) + 1)
    loss_ax.semilogy(steps, losses, "o-")
    loss_ax.set(xlabel="step", ylabel="squared error (before the step)", title=f"learning K, lr {results['lr']:g}")
    for j, colour in enumerate(("tab:red", "tab:blue")):
        kernel_ax.plot(np.arange(len(kernels)), kernels[:, 0, j], "o-", color=colour, label=f"K[0, {j}]")
        kernel_ax.axhline(k[0, j], color=colour, linestyle="--", linewidth=1)
    kernel_ax.set(
        xlabel="step", ylabel="kernel entry", title=f"from a random start (seed {results['seed']}) to [1, -1]"
    )
    kernel_ax.legend()
    return fig


def main(argv=None) -> dict:
    args = parse_args(argv)
    np.set_printoptions(precision=3, suppress=True)
    x, k = band_image(), EDGE_KERNEL
    y = np.asarray(ops.corr2d(x, k))
    y_t = np.asarray(ops.corr2d(x.T, k))
    print(f"X:\n{x}\nK:\n{k}\nY = corr2d(X, K): 1 where white turns black, -1 back:\n{y}")
    print(f"corr2d(X.T, K): the kernel sees no horizontal edge:\n{y_t}")

    kernels, losses = learn_kernel(x, y, seed=args.seed, lr=args.lr, steps=args.steps)
    print(f"learned kernel after {args.steps} steps: {kernels[-1]}")

    d = diagonal_image()
    d_k, d_kt, d_tk = (np.asarray(ops.corr2d(a, b)) for a, b in ((d, k), (d, k.T), (d.T, k)))
    print(f"diagonal X:\n{d}\ncorr2d(X, K): the diagonal edge, seen horizontally:\n{d_k}")
    print(f"corr2d(X, K.T): the same edge, seen vertically (sign flipped):\n{d_kt}")
    print(f"corr2d(X.T, K): transposing X gives corr2d(X, K.T).T:\n{d_tk}")

    results = {
        "seed": args.seed,
        "lr": args.lr,
        "steps": args.steps,
        "X": x.tolist(),
        "K": k.tolist(),
        "Y": y.tolist(),
        "Y_transposed_X": y_t.tolist(),
        "losses": losses,
        "kernels": kernels.tolist(),
        "learned_kernel": kernels[-1].tolist(),
        "diagonal_X": d.tolist(),
        "diagonal_corr_K": d_k.tolist(),
        "diagonal_corr_K_T": d_kt.tolist(),
        "diagonal_transposed_corr_K": d_tk.tolist(),
    }
    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / "results.json").write_text(json.dumps(results, indent=1))
    _plot.save(figure(results), args.workdir / "edge_detection.png")
    print(f"wrote {args.workdir / 'results.json'} and {args.workdir / 'edge_detection.png'}")
    return results


if __name__ == "__main__":
    main()
