"""Flax NNX layers whose convolution and pooling are `jaxcnn.ops`.

Layout is NHWC throughout, kernels HWIO. Dense and dropout layers are
Flax's own, `linear` fixing the notes' `init_cnn`; `BatchNorm` is torch's
(unbiased running variance, a two-pass batch variance), where nnx.BatchNorm
is not.
"""

from __future__ import annotations

import math

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
        _checks.groups_divide(fn, groups, in_features=in_features, out_features=out_features)
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
        self.ceil_mode = _checks.boolean("MaxPool2D", "ceil_mode", ceil_mode)

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
        self.ceil_mode = _checks.boolean("AvgPool2D", "ceil_mode", ceil_mode)
        self.count_include_pad = _checks.boolean("AvgPool2D", "count_include_pad", count_include_pad)

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


class BatchNorm(nnx.Module):
    """torch.nn.BatchNorm2d on NHWC input, BatchNorm1d on (N, F): over the last (channel) axis.

    Train mode (`use_running_average=False`, what `.train()` sets) normalises
    with the batch's mean and biased variance and updates the running ones as
    torch does, with the unbiased variance (times n / (n - 1), n the values per
    channel: N * H * W): running = momentum * running + (1 - momentum) * batch,
    so momentum=0.9 here is torch's momentum=0.1. As in torch, train mode
    needs n > 1: one value per channel has no spread, so ValueError. Eval mode
    (`.eval()`) normalises with the running statistics.

    The statistics are float32 whatever the compute dtype (bfloat16 keeps 8
    bits: too few for a variance), over the whole (global, when sharded)
    batch, and two-pass: Flax's E[x^2] - E[x]^2 loses the variance of inputs
    far from 0 (std 1 at mean 1000: outputs off by 1). Variables are named as
    nnx.BatchNorm's: scale, bias (Param), mean, var (BatchStat).
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool = False,
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        fn = "BatchNorm"
        self.num_features = _checks.positive_int(fn, "num_features", num_features)
        self.use_running_average = _checks.boolean(fn, "use_running_average", use_running_average)
        self.momentum = _checks.fraction(fn, "momentum", momentum, closed=True)
        self.epsilon, self.dtype = _checks.positive_number(fn, "epsilon", epsilon), dtype
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

    def set_view(self, use_running_average: bool | None = None):
        """What nnx.view(model, use_running_average=...) calls, as for nnx.BatchNorm."""
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        if use_running_average is None:
            use_running_average = self.use_running_average
        out_dtype = jnp.result_type(x, self.scale[...], self.bias[...]) if self.dtype is None else self.dtype
        x32 = jnp.asarray(x, jnp.promote_types(x.dtype, jnp.float32))
        axes = tuple(range(x.ndim - 1))
        if use_running_average:
            centred, var = x32 - self.mean[...], self.var[...]
        else:
            n = math.prod(x.shape[:-1])
            if n < 2:
                raise ValueError(f"BatchNorm: train mode needs more than 1 value per channel, got shape {x.shape}")
            # The corrected two-pass algorithm (Chan, Golub and LeVeque): the
            # first mean, rounded in float32 (an ulp at 1000 is 6e-5), is only a
            # shift; the mean of the shifted values corrects it and their
            # variance is exact up to that correction squared. The output does
            # not depend on the shift, so no gradient goes through it.
            shift = jax.lax.stop_gradient(x32.mean(axes))
            shifted = x32 - shift
            correction = shifted.mean(axes)
            var = jnp.maximum((shifted * shifted).mean(axes) - correction * correction, 0.0)
            centred = shifted - correction
            keep = self.momentum  # running statistics are state, not differentiated
            self.mean[...] = jax.lax.stop_gradient(keep * self.mean[...] + (1 - keep) * (shift + correction))
            self.var[...] = jax.lax.stop_gradient(keep * self.var[...] + (1 - keep) * var * (n / (n - 1)))
        y = centred * (jax.lax.rsqrt(var + self.epsilon) * self.scale[...]) + self.bias[...]
        return y.astype(out_dtype)


def check_input(fn: str, x, in_channels: int, image_size: int | None = None) -> None:
    """Raises ValueError unless x is (N, image_size, image_size, in_channels).

    image_size None accepts any height and width (models ending in global pooling).
    """
    shape = tuple(jnp.shape(x))
    hw_ok = image_size is None or shape[1:3] == (image_size, image_size)
    if len(shape) != 4 or shape[3] != in_channels or not hw_ok:
        size = "H, W" if image_size is None else f"{image_size}, {image_size}"
        raise ValueError(f"{fn}: x must be (N, {size}, {in_channels}) NHWC, got shape {shape}")
