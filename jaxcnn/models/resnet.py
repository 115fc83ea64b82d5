"""ResNet (d2l 8.6): residual blocks with batch norm between a stem and a global-pool head.

`ResNet(arch, block)` builds any member: d2l's ResNet-18 from `Residual`, and
torchvision's ResNet-34 and ResNet-50 from `BasicBlock` and `Bottleneck`
(bias-free convs, a 1x1 conv and BatchNorm on the downsampling shortcut, and
ResNet-50's stride on the 3x3 conv: "v1.5"). ResNeXt-18 passes ResNeXtBlocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcnn import layers

# (num_residuals, num_channels) per stage; a Bottleneck's num_channels is its output, 4x its 3x3 conv's.
RESNET18_ARCH = ((2, 64), (2, 128), (2, 256), (2, 512))
RESNET34_ARCH = ((3, 64), (4, 128), (6, 256), (3, 512))
RESNET50_ARCH = ((3, 256), (4, 512), (6, 1024), (3, 2048))
BOTTLENECK_EXPANSION = 4
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

    # The attribute paths whose outputs the block adds (jaxcnn.analysis walks them); None is the identity.
    branches = (("conv1", "conv2"), ("conv3",))

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
        self.bn1 = layers.BatchNorm(num_channels, dtype=dtype, rngs=rngs)
        self.bn2 = layers.BatchNorm(num_channels, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.conv3 is not None:
            x = self.conv3(x)
        return jax.nn.relu(y + x)


class BasicBlock(nnx.Module):
    """torchvision's ResNet-18/34 block: relu(bn2(conv3x3(relu(bn1(conv3x3(x))))) + downsample(x)).

    As Residual, but no conv has a bias (BatchNorm follows each) and the
    shortcut, when use_1x1conv, is a strided 1x1 conv followed by BatchNorm.
    Attribute names are torchvision's.
    """

    branches = (("conv1", "conv2"), ("downsample",))

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
        check_shortcut("BasicBlock", in_channels, num_channels, use_1x1conv, strides)
        self.conv1 = _conv(in_channels, num_channels, 3, strides, dtype=dtype, rngs=rngs)
        self.bn1 = layers.BatchNorm(num_channels, dtype=dtype, rngs=rngs)
        self.conv2 = _conv(num_channels, num_channels, 3, 1, dtype=dtype, rngs=rngs)
        self.bn2 = layers.BatchNorm(num_channels, dtype=dtype, rngs=rngs)
        self.downsample = _downsample(in_channels, num_channels, strides, dtype, rngs) if use_1x1conv else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.downsample is not None:
            x = self.downsample(x)
        return jax.nn.relu(y + x)


class Bottleneck(nnx.Module):
    """torchvision's ResNet-50 block: 1x1 conv to num_channels / 4, 3x3 conv (strided), 1x1 conv to
    num_channels, each followed by BatchNorm (and ReLU but the last), plus the shortcut, then ReLU.

    The stride sits on the 3x3 conv, as in torchvision ("ResNet v1.5"; the
    paper's v1 strides the first 1x1 conv). No conv has a bias; the shortcut,
    when use_1x1conv, is a strided 1x1 conv and BatchNorm. As d2l's
    ResNeXtBlock with bot_mul=1/4, a single group and no biases.
    """

    branches = (("conv1", "conv2", "conv3"), ("downsample",))

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
        fn = "Bottleneck"
        if num_channels % BOTTLENECK_EXPANSION:
            raise ValueError(f"{fn}: num_channels must divide by {BOTTLENECK_EXPANSION}, got {num_channels}")
        check_shortcut(fn, in_channels, num_channels, use_1x1conv, strides)
        width = num_channels // BOTTLENECK_EXPANSION
        self.conv1 = _conv(in_channels, width, 1, 1, dtype=dtype, rngs=rngs)
        self.bn1 = layers.BatchNorm(width, dtype=dtype, rngs=rngs)
        self.conv2 = _conv(width, width, 3, strides, dtype=dtype, rngs=rngs)
        self.bn2 = layers.BatchNorm(width, dtype=dtype, rngs=rngs)
        self.conv3 = _conv(width, num_channels, 1, 1, dtype=dtype, rngs=rngs)
        self.bn3 = layers.BatchNorm(num_channels, dtype=dtype, rngs=rngs)
        self.downsample = _downsample(in_channels, num_channels, strides, dtype, rngs) if use_1x1conv else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = jax.nn.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        if self.downsample is not None:
            x = self.downsample(x)
        return jax.nn.relu(y + x)


def _conv(cin: int, cout: int, k: int, stride: int, *, dtype, rngs) -> layers.Conv2D:
    """torchvision's conv3x3 / conv1x1: padding k // 2, no bias."""
    return layers.Conv2D(cin, cout, k, stride=stride, padding=k // 2, use_bias=False, dtype=dtype, rngs=rngs)


def _downsample(cin: int, cout: int, stride: int, dtype, rngs) -> nnx.Sequential:
    """torchvision's shortcut: strided 1x1 conv, BatchNorm."""
    return nnx.Sequential(
        _conv(cin, cout, 1, stride, dtype=dtype, rngs=rngs), layers.BatchNorm(cout, dtype=dtype, rngs=rngs)
    )


def b1(in_channels: int, *, bias: bool = True, dtype=None, rngs: nnx.Rngs) -> nnx.Sequential:
    """The stem: 7x7/2 conv (64, padding 3), BN, ReLU, 3x3/2 max pool (padding 1): H and W / 4.

    d2l's conv has a bias; torchvision's (bias=False) does not, as BatchNorm follows.
    """
    return nnx.Sequential(
        layers.Conv2D(in_channels, STEM_CHANNELS, 7, stride=2, padding=3, use_bias=bias, dtype=dtype, rngs=rngs),
        layers.BatchNorm(STEM_CHANNELS, dtype=dtype, rngs=rngs),
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

    block(in_channels, num_channels, use_1x1conv=..., strides=...) builds one
    block. The first stage keeps the resolution; each later one starts with a
    strided block. A block that changes the shape gets the 1x1 shortcut (in
    the first stage only if its channels differ from the stem's 64, which
    d2l's code would need too, and torchvision's ResNet-50 has).
    """
    result, channels = [], STEM_CHANNELS
    for i, (num_blocks, num_channels) in enumerate(arch):
        blocks = []
        for j in range(num_blocks):
            strides = 2 if j == 0 and i > 0 else 1
            use_1x1conv = strides != 1 or channels != num_channels
            blocks.append(block(channels, num_channels, use_1x1conv=use_1x1conv, strides=strides))
            channels = num_channels
        result.append(nnx.Sequential(*blocks))
    return result


class ResNet(nnx.Module):
    """b1, one nnx.Sequential of blocks per stage, head.

    block builds each block as block(in_channels, num_channels, use_1x1conv=,
    strides=, dtype=, rngs=): Residual (d2l's ResNet), BasicBlock or
    Bottleneck (torchvision's), or a functools.partial of ResNeXtBlock. The
    first stage keeps the stem's resolution; each later stage starts with a
    block with use_1x1conv=True, strides=2, halving H and W. stem_bias: the
    stem's conv has a bias (d2l) or not (torchvision). Any image_size works
    (the head pools globally); it is kept for the registry's sake.
    """

    def __init__(
        self,
        arch: Sequence[tuple[int, int]],
        block=Residual,
        stem_bias: bool = True,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 96,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        self.in_channels = in_channels
        stem = b1(in_channels, bias=stem_bias, dtype=dtype, rngs=rngs)
        body = stages(arch, lambda *args, **kw: block(*args, **kw, dtype=dtype, rngs=rngs))
        self.net = nnx.Sequential(stem, *body, head(arch[-1][1], num_classes, dtype=dtype, rngs=rngs))

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        layers.check_input(type(self).__name__, x, self.in_channels)
        return self.net(x, rngs=rngs).astype(jnp.float32)
