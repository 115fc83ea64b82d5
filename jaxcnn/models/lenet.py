"""LeNet-5 (d2l 7.6) and its batch-normalised variant (d2l's BNLeNet, 8.5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcnn import layers

ACTIVATIONS = {"sigmoid": jax.nn.sigmoid, "relu": jax.nn.relu}
POOLINGS = {"avg": layers.AvgPool2D, "max": layers.MaxPool2D}


class LeNet(nnx.Module):
    """conv5x5(6, pad 2) act pool2 conv5x5(16) act pool2 flatten dense120 act dense84 act dense.

    activation ("sigmoid", "relu") and pooling ("avg", "max") are the
    chapter's exercises. batch_norm puts BatchNorm after each conv and the
    first two dense layers, before the activation, as d2l's BNLeNet; unlike
    BNLeNet, conv1 keeps LeNet's padding 2, so both variants have the same
    feature-map shapes (BNLeNet's dense layer sees 16x4x4, this one 16x5x5).
    """

    def __init__(
        self,
        batch_norm: bool = False,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        activation: str = "sigmoid",
        pooling: str = "avg",
        dtype=None,
        rngs: nnx.Rngs,
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(f"LeNet: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"LeNet: pooling must be one of {sorted(POOLINGS)}, got {pooling!r}")
        side = (image_size // 2 - 4) // 2  # pad-2 conv keeps the size, pool halves, 5x5 conv takes 4
        if side < 1:
            raise ValueError(f"LeNet: image_size must be at least 12, got {image_size}")
        self.in_channels, self.image_size = in_channels, image_size
        act, pool = ACTIVATIONS[activation], POOLINGS[pooling]
        norm = (lambda n: [layers.BatchNorm(n, dtype=dtype, rngs=rngs)]) if batch_norm else (lambda n: [])
        self.net = nnx.Sequential(
            layers.Conv2D(in_channels, 6, 5, padding=2, dtype=dtype, rngs=rngs), *norm(6), act,
            pool(2, stride=2),
            layers.Conv2D(6, 16, 5, dtype=dtype, rngs=rngs), *norm(16), act,
            pool(2, stride=2),
            layers.Flatten(),
            layers.linear(16 * side * side, 120, dtype=dtype, rngs=rngs), *norm(120), act,
            layers.linear(120, 84, dtype=dtype, rngs=rngs), *norm(84), act,
            layers.linear(84, num_classes, dtype=dtype, rngs=rngs),
        )  # fmt: skip

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        layers.check_input("LeNet", x, self.in_channels, self.image_size)
        return self.net(x, rngs=rngs).astype(jnp.float32)
