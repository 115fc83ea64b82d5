"""AnyNet and RegNetX-32 (d2l 8.8): a stem, stages of ResNeXt blocks, and a head, each stage set by four numbers."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcnn import layers
from jaxcnn.models.resnet import head
from jaxcnn.models.resnext import ResNeXtBlock

# (depth, num_channels, groups, bot_mul) per stage: d2l's RegNetX-32 (groups: channels per group, as ResNeXtBlock).
REGNETX32_ARCH = ((4, 32, 16, 1.0), (6, 80, 16, 1.0))
REGNETX32_STEM_CHANNELS = 32


def stem(in_channels: int, num_channels: int, *, dtype=None, rngs: nnx.Rngs) -> nnx.Sequential:
    """3x3/2 conv (padding 1), BatchNorm, ReLU: half the H and W."""
    return nnx.Sequential(
        layers.Conv2D(in_channels, num_channels, 3, stride=2, padding=1, dtype=dtype, rngs=rngs),
        layers.BatchNorm(num_channels, dtype=dtype, rngs=rngs),
        jax.nn.relu,
    )


def stage(
    depth: int, in_channels: int, num_channels: int, groups: int, bot_mul: float, *, dtype=None, rngs: nnx.Rngs
) -> nnx.Sequential:
    """depth ResNeXt blocks; the first halves H and W (stride 2, with the 1x1 shortcut), whatever the channels."""
    blocks = []
    for i in range(depth):
        cin, strides = (in_channels, 2) if i == 0 else (num_channels, 1)
        blocks.append(ResNeXtBlock(cin, num_channels, groups, bot_mul, i == 0, strides, dtype=dtype, rngs=rngs))
    return nnx.Sequential(*blocks)


class AnyNet(nnx.Module):
    """stem, one stage per (depth, num_channels, groups, bot_mul) in arch, head (global average pool,
    flatten, dense): d2l's AnyNet design space. Each stage halves H and W.

    Any image_size works (the head pools globally); it is kept for the registry's sake.
    """

    def __init__(
        self,
        arch: Sequence[tuple[int, int, int, float]],
        stem_channels: int,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 96,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        self.in_channels = in_channels
        body, channels = [], stem_channels
        for depth, num_channels, groups, bot_mul in arch:
            body.append(stage(depth, channels, num_channels, groups, bot_mul, dtype=dtype, rngs=rngs))
            channels = num_channels
        self.net = nnx.Sequential(
            stem(in_channels, stem_channels, dtype=dtype, rngs=rngs),
            *body,
            head(channels, num_classes, dtype=dtype, rngs=rngs),
        )

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        layers.check_input("AnyNet", x, self.in_channels)
        return self.net(x, rngs=rngs).astype(jnp.float32)
