"""Network in Network (d2l 8.3): NiN blocks (a conv, then two 1x1 convs) and global average pooling, no dense layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcnn import _checks, layers, ops

# 11x11/4 conv (no padding): (s - 11) // 4 + 1, then three 3x3/2 pools need 15, 7, 3 rows: s >= 67.
MIN_IMAGE_SIZE = 67


def nin_block(
    in_channels: int, out_channels: int, kernel_size: int, strides: int, padding: ops.Padding, *, dtype=None,
    rngs: nnx.Rngs,
) -> nnx.Sequential:  # fmt: skip
    """conv (kernel_size, strides, padding), ReLU, then two 1x1 convs with ReLU: per-pixel dense layers."""
    conv = lambda cin, k, s=1, p=0: layers.Conv2D(cin, out_channels, k, stride=s, padding=p, dtype=dtype, rngs=rngs)
    return nnx.Sequential(
        conv(in_channels, kernel_size, strides, padding), jax.nn.relu,
        conv(out_channels, 1), jax.nn.relu,
        conv(out_channels, 1), jax.nn.relu,
    )  # fmt: skip


class NiN(nnx.Module):
    """nin_block 96 11x11/4, pool 3/2; nin_block 256 5x5 (pad 2), pool 3/2; nin_block 384 3x3 (pad 1),
    pool 3/2; dropout; nin_block num_classes 3x3 (pad 1); global average pool; flatten.

    The last NiN block has one channel per class, and pooling them gives the
    logits. Any image_size of at least 67 works (the head pools globally);
    it is kept for the registry's sake.
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
        _checks.fraction("NiN", "dropout", dropout)
        if image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"NiN: image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")
        self.in_channels = in_channels
        block = lambda *args: nin_block(*args, dtype=dtype, rngs=rngs)
        self.net = nnx.Sequential(
            block(in_channels, 96, 11, 4, 0), layers.MaxPool2D(3, stride=2),
            block(96, 256, 5, 1, 2), layers.MaxPool2D(3, stride=2),
            block(256, 384, 3, 1, 1), layers.MaxPool2D(3, stride=2),
            nnx.Dropout(dropout),
            block(384, num_classes, 3, 1, 1),
            layers.GlobalAvgPool2D(),
            layers.Flatten(),
        )  # fmt: skip

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        layers.check_input("NiN", x, self.in_channels)
        return self.net(x, rngs=rngs).astype(jnp.float32)
