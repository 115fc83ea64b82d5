"""Flax NNX layers whose convolution and pooling are `jaxcnn.ops`.

Layout is NHWC throughout, kernels HWIO. Dense, batch-norm and dropout
layers are Flax's own; `linear` and `batch_norm` only fix the chapters'
defaults (the notes' `init_cnn` and PyTorch's BatchNorm2d).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype

from jaxcnn import _checks, ops

# The notes' init_cnn: nn.init.xavier_uniform_ on every conv and dense weight.
# With in_axis=-2, out_axis=-1 on an HWIO kernel, JAX takes the receptive
# field as kh * kw, so fan_in = (in / groups) * kh * kw and fan_out = out * kh * kw:
# exactly torch's fans on the OIHW weight (torch does not divide fan_out by
# groups either). For a dense (in, out) kernel the fans are in and out.
xavier_uniform = jax.nn.initializers.xavier_uniform(in_axis=-2, out_axis=-1)
zeros = jax.nn.initializers.zeros


class Conv2D(nnx.Module):
    """2-D convolution as torch.nn.Conv2d, on NHWC input, calling `ops.conv2d`.

    kernel: (kh, kw, in_features // groups, out_features). padding: int or
    (ph, pw) pads symmetrically as PyTorch (padding=1 adds one pixel on every
    side); "SAME" is TensorFlow's, which for stride 2 on even sizes pads
    (0, 1), so it gives different values from PyTorch's symmetric padding.
    dtype is the computation dtype (None: inferred from inputs and params);
    parameters are kept in param_dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: ops.Pair,
        *,
        stride: ops.Pair = 1,
        padding: ops.Padding = 0,
        dilation: ops.Pair = 1,
        groups: int = 1,
        use_bias: bool = True,
        dtype=None,
        param_dtype=jnp.float32,
        kernel_init=xavier_uniform,
        bias_init=zeros,
        rngs: nnx.Rngs,
    ):
        fn = "Conv2D"
        for name, value in (("in_features", in_features), ("out_features", out_features), ("groups", groups)):
            _checks.positive_int(fn, name, value)
        if in_features % groups or out_features % groups:
            raise ValueError(
                f"{fn}: in_features={in_features} and out_features={out_features} must both divide by groups={groups}"
            )
        kh, kw = _checks.pair(fn, "kernel_size", kernel_size, minimum=1)
        self.stride = _checks.pair(fn, "stride", stride, minimum=1)
        self.dilation = _checks.pair(fn, "dilation", dilation, minimum=1)
        self.padding = padding
        self.groups = groups
        self.dtype = dtype
        self.kernel = nnx.Param(kernel_init(rngs.params(), (kh, kw, in_features // groups, out_features), param_dtype))
        self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = None if self.bias is None else self.bias[...]
        x, kernel, bias = promote_dtype((x, self.kernel[...], bias), dtype=self.dtype)
        return ops.conv2d(
            x, kernel, bias, stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups
        )


class MaxPool2D(nnx.Module):
    """torch.nn.MaxPool2d on NHWC input: stride defaults to the window."""

    def __init__(self, window: ops.Pair, *, stride: ops.Pair | None = None, padding: ops.Pair = 0, ceil_mode=False):
        # Checked when the layer is built, not at its first call.
        self.window, self.stride, self.padding = _checks.pool_pairs("MaxPool2D", window, stride, padding)
        self.ceil_mode = ceil_mode

    def __call__(self, x: jax.Array) -> jax.Array:
        return ops.max_pool2d(x, self.window, stride=self.stride, padding=self.padding, ceil_mode=self.ceil_mode)


class AvgPool2D(nnx.Module):
    """torch.nn.AvgPool2d on NHWC input: stride defaults to the window."""

    def __init__(
        self,
        window: ops.Pair,
        *,
        stride: ops.Pair | None = None,
        padding: ops.Pair = 0,
        ceil_mode=False,
        count_include_pad=True,
    ):
        self.window, self.stride, self.padding = _checks.pool_pairs("AvgPool2D", window, stride, padding)
        self.ceil_mode, self.count_include_pad = ceil_mode, count_include_pad

    def __call__(self, x: jax.Array) -> jax.Array:
        return ops.avg_pool2d(
            x,
            self.window,
            stride=self.stride,
            padding=self.padding,
            ceil_mode=self.ceil_mode,
            count_include_pad=self.count_include_pad,
        )


class GlobalAvgPool2D(nnx.Module):
    """torch.nn.AdaptiveAvgPool2d((1, 1)): (N, H, W, C) -> (N, 1, 1, C)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        if jnp.ndim(x) != 4:
            raise ValueError(f"GlobalAvgPool2D: x must have rank 4 (N, H, W, C), got shape {jnp.shape(x)}")
        return ops.avg_pool2d(x, x.shape[1:3])


class Flatten(nnx.Module):
    """(N, ...) -> (N, prod(...)).

    On NHWC input the features come out in (h, w, c) order, not PyTorch's
    (c, h, w): the same function, but porting a dense layer's weights from
    PyTorch needs its input rows permuted.
    """

    def __call__(self, x: jax.Array) -> jax.Array:
        return x.reshape(x.shape[0], -1)


def linear(in_features: int, out_features: int, *, dtype=None, rngs: nnx.Rngs) -> nnx.Linear:
    """nnx.Linear with the notes' init_cnn: Xavier-uniform kernel, zero bias."""
    return nnx.Linear(
        in_features, out_features, kernel_init=xavier_uniform, bias_init=zeros,
        dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
    )  # fmt: skip


def batch_norm(num_features: int, *, dtype=None, rngs: nnx.Rngs) -> nnx.BatchNorm:
    """nnx.BatchNorm as torch's BatchNorm: running = 0.9 * running + 0.1 * batch.

    Over the last (channel) axis, so it is BatchNorm2d on NHWC and BatchNorm1d
    on (N, F). One difference from torch: Flax updates the running variance
    with the biased batch variance, torch with the unbiased one.
    """
    return nnx.BatchNorm(num_features, momentum=0.9, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def check_input(fn: str, x, in_channels: int, image_size: int | None = None) -> None:
    """Raises ValueError unless x is (N, image_size, image_size, in_channels).

    image_size None accepts any height and width (models ending in global pooling).
    """
    shape = tuple(jnp.shape(x))
    hw_ok = image_size is None or shape[1:3] == (image_size, image_size)
    if len(shape) != 4 or shape[3] != in_channels or not hw_ok:
        size = "H, W" if image_size is None else f"{image_size}, {image_size}"
        raise ValueError(f"{fn}: x must be (N, {size}, {in_channels}) NHWC, got shape {shape}")
