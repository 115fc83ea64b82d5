"""GoogLeNet (d2l 8.4): Inception blocks of four parallel branches, concatenated along channels."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcnn import layers

# Inception(c1, c2, c3, c4) per block of b3, b4 and b5; a 3x3/2 max pool ends b3 and b4.
B3 = ((64, (96, 128), (16, 32), 32), (128, (128, 192), (32, 96), 64))
B4 = (
    (192, (96, 208), (16, 48), 64),
    (160, (112, 224), (24, 64), 64),
    (128, (128, 256), (24, 64), 64),
    (112, (144, 288), (32, 64), 64),
    (256, (160, 320), (32, 128), 128),
)
B5 = ((256, (160, 320), (32, 128), 128), (384, (192, 384), (48, 128), 128))


class Inception(nnx.Module):
    """Four branches on the same input, each ending in ReLU, concatenated along channels:
    1x1 conv (c1); 1x1 conv (c2[0]), 3x3 conv (c2[1]); 1x1 conv (c3[0]), 5x5 conv (c3[1]);
    3x3/1 max pool, 1x1 conv (c4). Padding keeps H and W; out_channels = c1 + c2[1] + c3[1] + c4.
    """

    branches = (("b1_1",), ("b2_1", "b2_2"), ("b3_1", "b3_2"), ("b4_1", "b4_2"))

    def __init__(
        self,
        in_channels: int,
        c1: int,
        c2: Sequence[int],
        c3: Sequence[int],
        c4: int,
        *,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        conv = lambda cin, cout, k: layers.Conv2D(cin, cout, k, padding=k // 2, dtype=dtype, rngs=rngs)
        self.b1_1 = conv(in_channels, c1, 1)
        self.b2_1, self.b2_2 = conv(in_channels, c2[0], 1), conv(c2[0], c2[1], 3)
        self.b3_1, self.b3_2 = conv(in_channels, c3[0], 1), conv(c3[0], c3[1], 5)
        self.b4_1, self.b4_2 = layers.MaxPool2D(3, stride=1, padding=1), conv(in_channels, c4, 1)
        self.out_channels = c1 + c2[1] + c3[1] + c4

    def __call__(self, x: jax.Array) -> jax.Array:
        relu = jax.nn.relu
        b1 = relu(self.b1_1(x))
        b2 = relu(self.b2_2(relu(self.b2_1(x))))
        b3 = relu(self.b3_2(relu(self.b3_1(x))))
        b4 = relu(self.b4_2(self.b4_1(x)))
        return jnp.concatenate((b1, b2, b3, b4), axis=-1)


def inceptions(in_channels: int, specs, *, dtype=None, rngs: nnx.Rngs) -> list[Inception]:
    """One Inception per (c1, c2, c3, c4) in specs, each fed by the one before."""
    blocks = []
    for spec in specs:
        blocks.append(Inception(in_channels, *spec, dtype=dtype, rngs=rngs))
        in_channels = blocks[-1].out_channels
    return blocks


class GoogLeNet(nnx.Module):
    """b1: 7x7/2 conv 64, ReLU, 3x3/2 pool; b2: 1x1 conv 64, 3x3 conv 192, pool; b3: 2 Inceptions (480
    channels), pool; b4: 5 Inceptions (832), pool; b5: 2 Inceptions (1024), global average pool,
    flatten; dense. Each pool is 3x3/2 with padding 1, halving H and W (rounding up): 96 -> 3.

    Any image_size works (the head pools globally); it is kept for the registry's sake.
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 96,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        self.in_channels = in_channels
        conv = lambda cin, cout, k, **kw: layers.Conv2D(cin, cout, k, dtype=dtype, rngs=rngs, **kw)
        pool = lambda: layers.MaxPool2D(3, stride=2, padding=1)
        block = lambda cin, specs: inceptions(cin, specs, dtype=dtype, rngs=rngs)
        b3 = block(192, B3)
        b4 = block(b3[-1].out_channels, B4)
        b5 = block(b4[-1].out_channels, B5)
        self.net = nnx.Sequential(
            nnx.Sequential(conv(in_channels, 64, 7, stride=2, padding=3), jax.nn.relu, pool()),
            nnx.Sequential(conv(64, 64, 1), jax.nn.relu, conv(64, 192, 3, padding=1), jax.nn.relu, pool()),
            nnx.Sequential(*b3, pool()),
            nnx.Sequential(*b4, pool()),
            nnx.Sequential(*b5, layers.GlobalAvgPool2D(), layers.Flatten()),
            layers.linear(b5[-1].out_channels, num_classes, dtype=dtype, rngs=rngs),
        )

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        layers.check_input("GoogLeNet", x, self.in_channels)
        return self.net(x, rngs=rngs).astype(jnp.float32)
