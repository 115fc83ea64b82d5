"""ResNet (d2l 8.6): residual blocks with batch norm between a stem and a global-pool head."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcnn import layers

# (num_residuals, num_channels) per stage.
RESNET18_ARCH = ((2, 64), (2, 128), (2, 256), (2, 512))
STEM_CHANNELS = 64


def check_shortcut(fn: str, in_channels: int, num_channels: int, use_1x1conv: bool, strides: int) -> None:
    """The identity shortcut only adds up when the block keeps x's shape."""
    if not use_1x1conv and (in_channels != num_channels or strides != 1):
        raise ValueError(
            f"{fn}: in_channels={in_channels} -> num_channels={num_channels} with strides={strides} "
            "changes the shape, so the shortcut needs use_1x1conv=True"
        )


class Residual(nnx.Module):
    """relu(bn2(conv3x3(relu(bn1(conv3x3(x))))) + shortcut(x)).

    The shortcut is x itself, or a strided 1x1 conv when use_1x1conv (needed
    whenever the channels or the stride change).
    """

    def __init__(
        self,
        in_channels: int,
        num_channels: int,
        use_1x1conv: bool = False,
        strides: int = 1,
        *,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        check_shortcut("Residual", in_channels, num_channels, use_1x1conv, strides)
        conv = lambda cin, k, s: layers.Conv2D(cin, num_channels, k, stride=s, padding=k // 2, dtype=dtype, rngs=rngs)
        self.conv1 = conv(in_channels, 3, strides)
        self.conv2 = conv(num_channels, 3, 1)
        self.conv3 = conv(in_channels, 1, strides) if use_1x1conv else None
        self.bn1 = layers.batch_norm(num_channels, dtype=dtype, rngs=rngs)
        self.bn2 = layers.batch_norm(num_channels, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.conv3 is not None:
            x = self.conv3(x)
        return jax.nn.relu(y + x)


def b1(in_channels: int, *, dtype=None, rngs: nnx.Rngs) -> nnx.Sequential:
    """The stem: 7x7/2 conv (64, padding 3), BN, ReLU, 3x3/2 max pool (padding 1): H and W / 4."""
    return nnx.Sequential(
        layers.Conv2D(in_channels, STEM_CHANNELS, 7, stride=2, padding=3, dtype=dtype, rngs=rngs),
        layers.batch_norm(STEM_CHANNELS, dtype=dtype, rngs=rngs),
        jax.nn.relu,
        layers.MaxPool2D(3, stride=2, padding=1),
    )


def head(in_channels: int, num_classes: int, *, dtype=None, rngs: nnx.Rngs) -> nnx.Sequential:
    """Global average pool, flatten, dense: (N, H, W, C) -> (N, num_classes)."""
    return nnx.Sequential(
        layers.GlobalAvgPool2D(), layers.Flatten(), layers.linear(in_channels, num_classes, dtype=dtype, rngs=rngs)
    )


def stages(arch: Sequence[tuple[int, int]], block) -> list[nnx.Sequential]:
    """One nnx.Sequential of blocks per (num_blocks, num_channels) in arch, after the stem.

    block(in_channels, num_channels, use_1x1conv, strides) builds one block.
    The first stage keeps the resolution; each later one starts with a
    strided block. A block that changes the shape gets the 1x1 shortcut (in
    the first stage only if its channels differ from the stem's 64, which
    d2l's code would need too).
    """
    result, channels = [], STEM_CHANNELS
    for i, (num_blocks, num_channels) in enumerate(arch):
        blocks = []
        for j in range(num_blocks):
            strides = 2 if j == 0 and i > 0 else 1
            blocks.append(block(channels, num_channels, strides != 1 or channels != num_channels, strides))
            channels = num_channels
        result.append(nnx.Sequential(*blocks))
    return result


class ResNet(nnx.Module):
    """b1, one nnx.Sequential of Residual blocks per stage, head.

    The first stage keeps the stem's resolution; each later stage starts with
    Residual(use_1x1conv=True, strides=2), halving H and W. Any image_size
    works (the head pools globally); it is kept for the registry's sake.
    """

    def __init__(
        self,
        arch: Sequence[tuple[int, int]],
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 96,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        self.in_channels = in_channels
        stem = b1(in_channels, dtype=dtype, rngs=rngs)
        body = stages(arch, lambda *args: self.block(*args, dtype=dtype, rngs=rngs))
        self.net = nnx.Sequential(stem, *body, head(arch[-1][1], num_classes, dtype=dtype, rngs=rngs))

    def block(self, cin, cout, use_1x1conv, strides, *, dtype, rngs) -> nnx.Module:
        """One block of a stage; ResNeXt overrides it."""
        return Residual(cin, cout, use_1x1conv, strides, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        layers.check_input(type(self).__name__, x, self.in_channels)
        return self.net(x, rngs=rngs).astype(jnp.float32)
