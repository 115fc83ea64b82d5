"""DenseNet (d2l 8.7): dense blocks, whose every conv block sees all the maps before it, and transition blocks."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcnn import _checks, layers
from jaxcnn.models.resnet import STEM_CHANNELS, b1

DENSENET_ARCH = (4, 4, 4, 4)  # conv blocks per dense block
GROWTH_RATE = 32


def conv_block(in_channels: int, num_channels: int, *, dtype=None, rngs: nnx.Rngs) -> nnx.Sequential:
    """BatchNorm, ReLU, 3x3 conv (padding 1) to num_channels: ResNet's later "pre-activation" order."""
    return nnx.Sequential(
        layers.BatchNorm(in_channels, dtype=dtype, rngs=rngs),
        jax.nn.relu,
        layers.Conv2D(in_channels, num_channels, 3, padding=1, dtype=dtype, rngs=rngs),
    )


class DenseBlock(nnx.Module):
    """num_convs conv blocks; each one's output is concatenated (channels last) to its input.

    Each block adds num_channels (the growth rate): out_channels =
    in_channels + num_convs * num_channels, at the input's H and W.
    """

    # Its output concatenates the input (the empty path) and what the conv blocks add; each conv block's
    # field holds its input's, so the last one's is the whole block's (jaxcnn.analysis).
    branches = (("net",), ())

    def __init__(self, num_convs: int, in_channels: int, num_channels: int, *, dtype=None, rngs: nnx.Rngs):
        self.net = nnx.Sequential(
            *(
                conv_block(in_channels + i * num_channels, num_channels, dtype=dtype, rngs=rngs)
                for i in range(num_convs)
            )
        )
        self.out_channels = in_channels + num_convs * num_channels

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.net.layers:
            x = jnp.concatenate((x, block(x)), axis=-1)
        return x


def transition_block(in_channels: int, num_channels: int, *, dtype=None, rngs: nnx.Rngs) -> nnx.Sequential:
    """BatchNorm, ReLU, 1x1 conv to num_channels, 2x2/2 average pool: fewer channels, half the H and W."""
    return nnx.Sequential(
        layers.BatchNorm(in_channels, dtype=dtype, rngs=rngs),
        jax.nn.relu,
        layers.Conv2D(in_channels, num_channels, 1, dtype=dtype, rngs=rngs),
        layers.AvgPool2D(2, stride=2),
    )


class DenseNet(nnx.Module):
    """ResNet's stem b1; per entry of arch a DenseBlock of that many conv blocks, with a
    transition block halving the channels and H and W between two dense blocks; BatchNorm,
    ReLU, global average pool, flatten, dense.

    As d2l's DenseNet(num_channels=64, growth_rate, arch): the stem has 64
    channels. Any image_size works that the transitions can halve (29 for
    four dense blocks); it is kept for the registry's sake.
    """

    def __init__(
        self,
        arch: Sequence[int] = DENSENET_ARCH,
        growth_rate: int = GROWTH_RATE,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 96,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        fn = "DenseNet"
        _checks.positive_ints(fn, "arch", arch)
        _checks.positive_int(fn, "growth_rate", growth_rate)
        # The stem's padded 7x7/2 conv and 3x3/2 pool round up; each transition's 2x2/2 pool rounds down.
        if -(-image_size // 4) < 2 ** (len(arch) - 1):
            minimum = 4 * (2 ** (len(arch) - 1) - 1) + 1
            raise ValueError(
                f"{fn}: image_size must be at least {minimum} for {len(arch)} dense blocks, got {image_size}"
            )
        self.in_channels = in_channels
        body, channels = [], STEM_CHANNELS
        for i, num_convs in enumerate(arch):
            body.append(DenseBlock(num_convs, channels, growth_rate, dtype=dtype, rngs=rngs))
            channels = body[-1].out_channels
            if i != len(arch) - 1:
                body.append(transition_block(channels, channels // 2, dtype=dtype, rngs=rngs))
                channels //= 2
        self.net = nnx.Sequential(
            b1(in_channels, dtype=dtype, rngs=rngs),
            *body,
            nnx.Sequential(
                layers.BatchNorm(channels, dtype=dtype, rngs=rngs),
                jax.nn.relu,
                layers.GlobalAvgPool2D(),
                layers.Flatten(),
                layers.linear(channels, num_classes, dtype=dtype, rngs=rngs),
            ),
        )

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        layers.check_input("DenseNet", x, self.in_channels)
        return self.net(x, rngs=rngs).astype(jnp.float32)
