"""VGG (d2l 8.2): blocks of 3x3 convolutions, each block ending in a 2x2 max pool."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcnn import _checks, layers

# (num_convs, out_channels) per block.
VGG11_ARCH = ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512))


def vgg_block(num_convs: int, in_channels: int, out_channels: int, *, dtype=None, rngs: nnx.Rngs) -> nnx.Sequential:
    """num_convs x (3x3 conv, padding 1, ReLU), then 2x2 max pool with stride 2: halves H and W."""
    convs = []
    for _ in range(num_convs):
        convs += [layers.Conv2D(in_channels, out_channels, 3, padding=1, dtype=dtype, rngs=rngs), jax.nn.relu]
        in_channels = out_channels
    return nnx.Sequential(*convs, layers.MaxPool2D(2, stride=2))


class VGG(nnx.Module):
    """VGG blocks, flatten, dense 4096 ReLU dropout, dense 4096 ReLU dropout, dense.

    width_divisor divides every block's channels (the notes train VGG-11 at
    a quarter width, 4); the dense layers keep 4096 units. The first dense
    layer's input size follows from image_size, as NNX has no lazy shapes.
    """

    def __init__(
        self,
        arch: Sequence[tuple[int, int]],
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 224,
        width_divisor: int = 1,
        dropout: float = 0.5,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        _checks.positive_int("VGG", "width_divisor", width_divisor)
        _checks.fraction("VGG", "dropout", dropout)
        side = image_size // 2 ** len(arch)
        if side < 1:
            raise ValueError(
                f"VGG: image_size must be at least {2 ** len(arch)} for {len(arch)} blocks, got {image_size}"
            )
        self.in_channels, self.image_size = in_channels, image_size
        blocks, channels = [], in_channels
        for num_convs, out_channels in arch:
            if out_channels < width_divisor:
                raise ValueError(f"VGG: width_divisor {width_divisor} leaves no channels of {out_channels}")
            blocks.append(vgg_block(num_convs, channels, out_channels // width_divisor, dtype=dtype, rngs=rngs))
            channels = out_channels // width_divisor
        self.net = nnx.Sequential(
            *blocks,
            layers.Flatten(),
            layers.linear(channels * side * side, 4096, dtype=dtype, rngs=rngs), jax.nn.relu, nnx.Dropout(dropout),
            layers.linear(4096, 4096, dtype=dtype, rngs=rngs), jax.nn.relu, nnx.Dropout(dropout),
            layers.linear(4096, num_classes, dtype=dtype, rngs=rngs),
        )  # fmt: skip

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        layers.check_input("VGG", x, self.in_channels, self.image_size)
        return self.net(x, rngs=rngs).astype(jnp.float32)
