"""AlexNet (d2l 8.1): five convolutions, three overlapping max pools, two dropout dense layers of 4096."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcnn import _checks, layers

# 11x11/4 conv (padding 1): (s - 9) // 4 + 1, then three 3x3/2 pools need 15, 7, 3 rows: s >= 65.
MIN_IMAGE_SIZE = 65


class AlexNet(nnx.Module):
    """conv 96 11x11/4 (pad 1), ReLU, pool 3/2; conv 256 5x5 (pad 2), ReLU, pool 3/2; convs 384, 384, 256
    3x3 (pad 1) with ReLU; pool 3/2; flatten; dense 4096, ReLU, dropout; dense 4096, ReLU, dropout; dense.

    The first dense layer's input (256 * 5 * 5 at 224) follows from
    image_size, as NNX has no lazy shapes.
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 224,
        dropout: float = 0.5,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        _checks.fraction("AlexNet", "dropout", dropout)
        if image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"AlexNet: image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")
        side = (image_size - 9) // 4 + 1  # the 11x11/4 conv; the 5x5 and 3x3 convs keep the size
        for _ in range(3):
            side = (side - 3) // 2 + 1  # 3x3/2 max pool: 5 at 224
        self.in_channels, self.image_size = in_channels, image_size
        conv = lambda cin, cout, k, **kw: layers.Conv2D(cin, cout, k, dtype=dtype, rngs=rngs, **kw)
        dense = lambda fan_in, out: layers.linear(fan_in, out, dtype=dtype, rngs=rngs)
        relu = jax.nn.relu
        self.net = nnx.Sequential(
            conv(in_channels, 96, 11, stride=4, padding=1), relu, layers.MaxPool2D(3, stride=2),
            conv(96, 256, 5, padding=2), relu, layers.MaxPool2D(3, stride=2),
            conv(256, 384, 3, padding=1), relu,
            conv(384, 384, 3, padding=1), relu,
            conv(384, 256, 3, padding=1), relu, layers.MaxPool2D(3, stride=2),
            layers.Flatten(),
            dense(256 * side * side, 4096), relu, nnx.Dropout(dropout),
            dense(4096, 4096), relu, nnx.Dropout(dropout),
            dense(4096, num_classes),
        )  # fmt: skip

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        layers.check_input("AlexNet", x, self.in_channels, self.image_size)
        return self.net(x, rngs=rngs).astype(jnp.float32)
