"""What a trained LeNet's two convolution layers respond to: their activations on test images.

    python -m experiments.lenet --dataset mnist_10k --workdir runs/lenet
    python -m experiments.feature_maps --workdir runs/lenet --images 0,1,2

The LeNet chapter's exercise: the outputs of the first and second
convolution layers after their activation function (after batch norm too,
for lenet_bn), for chosen test images of the run's dataset (config.json
says which). Writes conv1.png and conv2.png to a new
RUN_DIR/feature_maps-DATE-TIME/ (or --out): a row per image, the input
first, then a column per channel, each channel on its own colour scale,
shared by the images.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from experiments import _outputs, _plot

LENETS = ("lenet", "lenet_bn")
LAYERS = 2  # the first and second convolution layers
OUTPUTS = tuple(f"conv{i}.png" for i in range(1, LAYERS + 1))


def _indices(text: str) -> list[int]:
    try:
        indices = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated indices such as 0,1,2, got {text!r}") from None
    if any(i < 0 for i in indices):
        raise argparse.ArgumentTypeError(f"indices must be >= 0, got {text!r}")
    return indices


def parse_args(argv=None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m experiments.feature_maps", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workdir",
        type=Path,
        required=True,
        help="a finished LeNet run of python -m experiments.lenet (config.json and model/)",
    )
    parser.add_argument(
        "--images",
        type=_indices,
        default=[0, 1, 2],
        help="test images to show, by index into the dataset's test split (default: 0,1,2)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where conv1.png and conv2.png go (default: a new WORKDIR/feature_maps-DATE-TIME/); "
        "one that already holds them is refused unless --overwrite",
    )
    _outputs.add_overwrite_flag(parser)
    args = parser.parse_args(argv)
    args.out = args.out or _outputs.dated(args.workdir / "feature_maps")
    _outputs.refuse_earlier_outputs(parser, "--out", args.out, OUTPUTS, args.overwrite)
    return parser, args


def conv_activations(model, x) -> dict[str, np.ndarray]:
    """{"conv1": ..., "conv2": ...}: each convolution's output after the activation function that follows it.

    Walks model.net.layers in order; batch norm between the convolution and
    its activation (lenet_bn) is applied too.
    """
    from flax import nnx

    from jaxcnn import layers

    maps, convs, pending = {}, 0, False
    for layer in model.net.layers:
        x = layer(x)
        if isinstance(layer, layers.Conv2D):
            convs, pending = convs + 1, True
        elif pending and not isinstance(layer, nnx.Module):  # the activation: jax.nn.sigmoid or relu
            maps[f"conv{convs}"], pending = np.asarray(x), False
            if convs == LAYERS:
                break
    return maps


def figure(inputs: np.ndarray, maps: np.ndarray, row_labels: list[str], title: str):
    """inputs (N, H, W, C) in [0, 1], maps (N, h, w, K): a row per image, the input then each channel.

    Each channel has its own colour scale (its range over the images, in
    the column's title): channels differ in offset far more than in space.
    """
    from matplotlib.figure import Figure

    n, k = maps.shape[0], maps.shape[-1]
    fig = Figure(figsize=(1.1 * (k + 1) + 0.5, 1.1 * n + 1.0), layout="constrained")
    axes = fig.subplots(n, k + 1, squeeze=False)
    lo, hi = maps.min(axis=(0, 1, 2)), maps.max(axis=(0, 1, 2))
    for r in range(n):
        image = inputs[r, :, :, 0] if inputs.shape[-1] == 1 else inputs[r]
        axes[r, 0].imshow(image, cmap=_plot.IMAGE_CMAP, vmin=0, vmax=1)
        axes[r, 0].set_ylabel(row_labels[r], fontsize=_plot.FONT_SIZE)
        for c in range(k):
            axes[r, c + 1].imshow(maps[r, :, :, c], cmap="viridis", vmin=lo[c], vmax=hi[c])
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_title("input", fontsize=_plot.FONT_SIZE)
    for c in range(k):
        axes[0, c + 1].set_title(f"ch {c}\n{lo[c]:.2f}..{hi[c]:.2f}", fontsize=_plot.FONT_SIZE)
    fig.suptitle(title, fontsize=_plot.FONT_SIZE + 1)
    return fig


def main(argv=None) -> dict:
    parser, args = parse_args(argv)
    from jaxcnn import checkpoint, data

    config_path = args.workdir / "config.json"
    if config_path.exists():
        try:
            model_name = json.loads(config_path.read_text()).get("model")
        except (json.JSONDecodeError, AttributeError) as error:
            parser.error(f"--workdir {args.workdir}: config.json is not a runner's config ({error})")
        if model_name not in LENETS:
            parser.error(
                f"--workdir {args.workdir} holds a {model_name!r} run; feature maps need a LeNet ({', '.join(LENETS)})"
            )
    try:
        model, config = checkpoint.load_model(args.workdir)
    except ValueError:
        parser.error(
            f"--workdir {args.workdir} holds no finished run: it needs config.json and model/, "
            "which python -m experiments.lenet writes when it completes"
        )
    try:
        test = data.load(config["dataset"], data_dir=config.get("data_dir")).test
    except ValueError as error:
        parser.error(f"the run's dataset {config['dataset']!r} cannot be loaded here: {error}")
    bad = [i for i in args.images if i >= len(test.labels)]
    if bad:
        parser.error(f"--images {bad} outside the {len(test.labels)} test images of {config['dataset']}")

    x = data.preprocess(test.images[args.images], config["image_size"])
    maps = conv_activations(model, x)
    args.out.mkdir(parents=True, exist_ok=True)
    labels = [f"#{i} (label {test.labels[i]})" for i in args.images]
    activation = config["model_options"].get("activation", "sigmoid")
    files = {}
    for name, a in maps.items():
        files[name] = args.out / f"{name}.png"
        title = f"{config['model']} {name} after {activation}: {a.shape[1]}x{a.shape[2]}, {a.shape[3]} channels"
        _plot.save(figure(np.asarray(x), a, labels, title), files[name])
        shape, lo, hi = tuple(a.shape[1:]), a.min(), a.max()
        print(f"{name}: activations {shape} per image, range [{lo:.3g}, {hi:.3g}] -> {files[name]}")
    return {
        "images": args.images,
        "labels": [int(test.labels[i]) for i in args.images],
        "activations": maps,
        "shapes": {name: tuple(a.shape[1:]) for name, a in maps.items()},
        "files": {name: str(path) for name, path in files.items()},
    }


if __name__ == "__main__":
    main()
