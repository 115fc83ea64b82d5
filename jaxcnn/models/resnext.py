"""ResNeXt (d2l 8.6.5): bottleneck blocks with a grouped 3x3 convolution.

ResNeXt-18 is `ResNet(RESNEXT18_ARCH, functools.partial(ResNeXtBlock,
groups=..., bot_mul=...))` (the registry's resnext18); RegNet's AnyNet stages
are made of the same blocks.
"""

from __future__ import annotations

import jax
from flax import nnx

from jaxcnn import _checks, layers
from jaxcnn.models.resnet import RESNET18_ARCH, check_shortcut

# d2l's ResNeXt settings (its RegNetX-32 in 8.8): groups=16, bot_mul=1,
# here on ResNet-18's stages so that it compares with ResNet-18.
RESNEXT18_ARCH = RESNET18_ARCH
RESNEXT18_GROUPS, RESNEXT18_BOT_MUL = 16, 1.0


class ResNeXtBlock(nnx.Module):
    """1x1 conv to bot_channels, BN, ReLU, grouped 3x3 conv, BN, ReLU, 1x1 conv to num_channels, BN,
    plus the shortcut (1x1 conv and BN when use_1x1conv), then ReLU.

    bot_channels = round(num_channels * bot_mul). As in d2l's code, `groups`
    is the number of channels per group: the 3x3 conv has
    bot_channels // groups groups.
    """

    branches = (("conv1", "conv2", "conv3"), ("conv4",))

    def __init__(
        self,
        in_channels: int,
        num_channels: int,
        groups: int,
        bot_mul: float,
        use_1x1conv: bool = False,
        strides: int = 1,
        *,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        fn = "ResNeXtBlock"
        groups = _checks.positive_int(fn, "groups", groups)
        bot_channels = round(num_channels * bot_mul)
        if bot_channels < 1 or bot_channels % groups:
            raise ValueError(
                f"{fn}: groups={groups!r} (channels per group) must divide "
                f"bot_channels=round({num_channels} * {bot_mul}) = {bot_channels}"
            )
        check_shortcut(fn, in_channels, num_channels, use_1x1conv, strides)
        conv = lambda cin, cout, k, s=1, g=1: layers.Conv2D(
            cin, cout, k, stride=s, padding=k // 2, groups=g, dtype=dtype, rngs=rngs
        )
        norm = lambda c: layers.BatchNorm(c, dtype=dtype, rngs=rngs)
        self.conv1, self.bn1 = conv(in_channels, bot_channels, 1), norm(bot_channels)
        self.conv2, self.bn2 = conv(bot_channels, bot_channels, 3, strides, bot_channels // groups), norm(bot_channels)
        self.conv3, self.bn3 = conv(bot_channels, num_channels, 1), norm(num_channels)
        if use_1x1conv:
            self.conv4, self.bn4 = conv(in_channels, num_channels, 1, strides), norm(num_channels)
        else:
            self.conv4 = self.bn4 = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = jax.nn.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        if self.conv4 is not None:
            x = self.bn4(self.conv4(x))
        return jax.nn.relu(y + x)
