"""jaxcnn.layers: Conv2D against flax's nnx.Conv, the notes' initialisation, pooling, flatten, batch norm."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcnn import layers

X = jax.random.normal(jax.random.key(0), (2, 9, 8, 4))


@pytest.mark.parametrize(
    "kernel, stride, padding, dilation, groups",
    [
        (3, 1, 1, 1, 1),
        (3, 2, 1, 1, 1),
        ((3, 2), (2, 1), (2, 0), 1, 2),
        (3, 1, 2, 2, 1),
        (1, 2, 0, 1, 4),
    ],
)
def test_conv2d_matches_flax_conv(kernel, stride, padding, dilation, groups):
    ours = layers.Conv2D(
        4, 8, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, rngs=nnx.Rngs(1)
    )
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    kernel_hw = (kernel, kernel) if isinstance(kernel, int) else kernel  # flax reads an int as a 1-D kernel
    flax_conv = nnx.Conv(
        4, 8, kernel_hw, strides=stride, padding=((ph, ph), (pw, pw)), kernel_dilation=dilation,
        feature_group_count=groups, rngs=nnx.Rngs(2),
    )  # fmt: skip
    chex.assert_equal_shape([ours.kernel[...], flax_conv.kernel[...]])
    flax_conv.kernel[...] = ours.kernel[...]
    flax_conv.bias[...] = jax.random.normal(jax.random.key(3), (8,))
    ours.bias[...] = flax_conv.bias[...]
    y = ours(X)
    chex.assert_shape(y, flax_conv(X).shape)
    np.testing.assert_allclose(y, flax_conv(X), rtol=1e-5, atol=1e-5)


def test_same_padding_is_tensorflows_not_symmetric():
    """For stride 2 on an even size, "SAME" pads (0, 1): equal to flax's SAME, not to padding=1."""
    x = X[:, :8]
    same = layers.Conv2D(4, 3, 3, stride=2, padding="SAME", rngs=nnx.Rngs(0))
    sym = layers.Conv2D(4, 3, 3, stride=2, padding=1, rngs=nnx.Rngs(0))
    flax_same = nnx.Conv(4, 3, (3, 3), strides=2, padding="SAME", rngs=nnx.Rngs(0))
    flax_same.kernel[...] = same.kernel[...]
    np.testing.assert_allclose(same(x), flax_same(x), rtol=1e-5, atol=1e-5)
    chex.assert_equal_shape([same(x), sym(x)])
    assert not np.allclose(same(x), sym(x))


def _torch_xavier_limit(shape_oihw):
    # torch.nn.init._calculate_fan_in_and_fan_out on a conv weight (O, I/groups, kh, kw).
    o, i, kh, kw = shape_oihw
    return np.sqrt(6.0 / (i * kh * kw + o * kh * kw))


def test_conv_init_is_torch_xavier_uniform_with_groups():
    conv = layers.Conv2D(64, 64, 3, groups=32, rngs=nnx.Rngs(0))
    w = np.asarray(conv.kernel[...])
    chex.assert_shape(w, (3, 3, 2, 64))
    limit = _torch_xavier_limit((64, 2, 3, 3))  # fan_out is out * kh * kw, not divided by groups
    assert np.abs(w).max() <= limit
    assert np.abs(w).max() > 0.95 * limit  # 1,152 uniform draws reach the bound
    np.testing.assert_array_equal(conv.bias[...], np.zeros(64))


def test_linear_init_is_xavier_uniform_zero_bias():
    dense = layers.linear(300, 100, rngs=nnx.Rngs(0))
    w = np.asarray(dense.kernel[...])
    limit = np.sqrt(6.0 / 400)
    assert limit * 0.95 < np.abs(w).max() <= limit
    np.testing.assert_array_equal(dense.bias[...], np.zeros(100))


def test_conv2d_dtype_computes_in_bf16_keeps_params_f32():
    conv = layers.Conv2D(4, 8, 3, padding=1, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    y = conv(X)
    chex.assert_type([conv.kernel[...], conv.bias[...]], jnp.float32)
    chex.assert_type(y, jnp.bfloat16)
    chex.assert_shape(y, (2, 9, 8, 8))


def test_conv2d_bad_arguments():
    with pytest.raises(ValueError, match=r"Conv2D: .*divide by groups=3"):
        layers.Conv2D(4, 8, 3, groups=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"Conv2D: kernel_size must be >= 1"):
        layers.Conv2D(4, 8, 0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"Conv2D: out_features must be a positive int"):
        layers.Conv2D(4, 0, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"conv2d: w expects 3"):
        layers.Conv2D(3, 8, 3, rngs=nnx.Rngs(0))(X)


def test_pool_layers():
    mx, avg = layers.MaxPool2D(2)(X), layers.AvgPool2D(2)(X)  # stride defaults to the window
    chex.assert_shape([mx, avg], (2, 4, 4, 4))
    blocks = np.asarray(X)[:, :8].reshape(2, 4, 2, 4, 2, 4)
    np.testing.assert_allclose(mx, blocks.max(axis=(2, 4)), rtol=1e-6)
    np.testing.assert_allclose(avg, blocks.mean(axis=(2, 4)), rtol=1e-5, atol=1e-6)
    # ResNet's stem pool: 3x3/2 with padding 1 (padding is -inf for max).
    chex.assert_shape(layers.MaxPool2D(3, stride=2, padding=1)(X), (2, 5, 4, 4))
    # count_include_pad=False divides a corner window by the 1 real element it covers.
    corner = layers.AvgPool2D(2, padding=1, count_include_pad=False)(X)[:, 0, 0]
    np.testing.assert_allclose(corner, X[:, 0, 0], rtol=1e-6)
    with pytest.raises(ValueError, match=r"MaxPool2D: window must be >= 1"):
        layers.MaxPool2D(0)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: layers.MaxPool2D(2, ceil_mode="yes"), "MaxPool2D: ceil_mode must be a bool, got 'yes'"),
        (lambda: layers.AvgPool2D(2, count_include_pad=1), "AvgPool2D: count_include_pad must be a bool, got 1"),
        (lambda: layers.BatchNorm(0, rngs=nnx.Rngs(0)), "BatchNorm: num_features must be"),
        (
            lambda: layers.BatchNorm(4, momentum=1.5, rngs=nnx.Rngs(0)),
            r"BatchNorm: momentum must be in \[0, 1\], got 1.5",
        ),
        (
            lambda: layers.BatchNorm(4, epsilon=0, rngs=nnx.Rngs(0)),
            "BatchNorm: epsilon must be a positive finite number",
        ),
        (
            lambda: layers.BatchNorm(4, use_running_average="no", rngs=nnx.Rngs(0)),
            "BatchNorm: use_running_average must be a bool",
        ),
    ],
)
def test_layers_check_their_arguments_when_built(build, message):
    with pytest.raises(ValueError, match=message) as error:
        build()
    assert "\n" not in str(error.value)


def test_global_avg_pool_and_flatten():
    g = layers.GlobalAvgPool2D()(X)
    chex.assert_shape(g, (2, 1, 1, 4))
    np.testing.assert_allclose(g[:, 0, 0], X.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    flat = layers.Flatten()(X)
    chex.assert_shape(flat, (2, 9 * 8 * 4))
    # NHWC order (h, w, c): PyTorch's NCHW flatten is the same numbers permuted.
    np.testing.assert_array_equal(flat[:, (3 * 8 + 5) * 4 + 2], X[:, 3, 5, 2])
    torch_flat = np.asarray(X).transpose(0, 3, 1, 2).reshape(2, -1)
    assert not np.array_equal(flat, torch_flat)
    np.testing.assert_array_equal(np.sort(flat, axis=1), np.sort(torch_flat, axis=1))


def test_batch_norm_uses_torch_momentum():
    bn = layers.BatchNorm(4, rngs=nnx.Rngs(0))
    y = bn(X)  # train mode: normalise with batch statistics, update running ones
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0, atol=1e-5)
    # running = 0.9 * running + 0.1 * batch, from mean 0 and var 1; torch's unbiased variance (ddof=1).
    np.testing.assert_allclose(bn.mean[...], 0.1 * X.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * np.var(X, axis=(0, 1, 2), ddof=1), rtol=1e-5)
    bn.eval()
    expected = (X - bn.mean[...]) / np.sqrt(bn.var[...] + 1e-5)
    np.testing.assert_allclose(bn(X), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(3, 5, 4, 6), (2, 6)])  # NHWC for BatchNorm2d; (N, F) for BatchNorm1d
def test_batch_norm_matches_torch(shape):
    """Outputs, input and parameter gradients, and running statistics as torch's over three train-mode
    calls, then eval-mode outputs. (2, 6): n = 2, where the unbiased variance is twice the biased one."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    to_torch = (lambda a: a.transpose(0, 3, 1, 2)) if len(shape) == 4 else (lambda a: a)
    from_torch = (lambda a: a.transpose(0, 2, 3, 1)) if len(shape) == 4 else (lambda a: a)
    twin = (torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d)(6).double()
    bn = layers.BatchNorm(6, rngs=nnx.Rngs(0))
    scale, bias = rng.normal(1, 0.5, 6).astype(np.float32), rng.normal(0, 0.5, 6).astype(np.float32)
    bn.scale[...], bn.bias[...] = scale, bias
    with torch.no_grad():
        twin.weight.copy_(torch.from_numpy(scale)), twin.bias.copy_(torch.from_numpy(bias))
    cotangent = rng.normal(size=shape).astype(np.float32)

    def loss(bn, x):
        return jnp.sum(bn(x) * cotangent)

    for call in range(3):
        x = (rng.normal(size=shape) * (call + 1) + call).astype(np.float32)
        x_torch = torch.from_numpy(to_torch(x).astype(np.float64)).requires_grad_()
        y_torch = twin(x_torch)
        (y_torch * torch.from_numpy(to_torch(cotangent).astype(np.float64))).sum().backward()
        if call == 0:
            grads, dx = nnx.grad(loss, argnums=(0, 1))(bn, jnp.asarray(x))
            np.testing.assert_allclose(dx, from_torch(x_torch.grad.numpy()), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(grads.scale[...], twin.weight.grad.numpy(), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(grads.bias[...], twin.bias.grad.numpy(), rtol=1e-4, atol=1e-5)
        else:
            y = bn(jnp.asarray(x))
            np.testing.assert_allclose(y, from_torch(y_torch.detach().numpy()), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(bn.mean[...], twin.running_mean.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bn.var[...], twin.running_var.numpy(), rtol=1e-5)
    bn.eval(), twin.eval()
    x = rng.normal(size=shape).astype(np.float32)
    expected = from_torch(twin(torch.from_numpy(to_torch(x).astype(np.float64))).detach().numpy())
    np.testing.assert_allclose(bn(jnp.asarray(x)), expected, rtol=1e-4, atol=1e-5)


def test_batch_norm_is_exact_far_from_zero():
    """Std 1 at mean 1000: E[x^2] - E[x]^2 in float32 leaves outputs off by about 1, a mean rounded to
    float32 (an ulp at 1000 is 6e-5) by about 5e-5; the corrected two-pass gets the float64 result."""
    x = (1000 + np.random.default_rng(0).standard_normal((32, 8, 8, 4))).astype(np.float32)
    bn = layers.BatchNorm(4, rngs=nnx.Rngs(0))
    y = nnx.jit(lambda bn, x: bn(x))(bn, jnp.asarray(x))
    x64 = x.astype(np.float64)
    expected = (x64 - x64.mean(axis=(0, 1, 2))) / np.sqrt(x64.var(axis=(0, 1, 2)) + 1e-5)
    np.testing.assert_allclose(y, expected, atol=1e-5)
    np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * x64.var(axis=(0, 1, 2), ddof=1), rtol=1e-6)


def test_batch_norm_train_mode_needs_more_than_one_value_per_channel():
    bn = layers.BatchNorm(6, rngs=nnx.Rngs(0))
    one = jnp.ones((1, 6))
    with pytest.raises(ValueError, match=r"more than 1 value per channel, got shape \(1, 6\)"):
        bn(one)  # as torch: a single value has no spread to normalise by
    np.testing.assert_allclose(nnx.view(bn, use_running_average=True)(one), 1 / np.sqrt(1 + 1e-5), rtol=1e-6)
    assert bn.use_running_average is False  # nnx.view left bn as it was


def test_check_input():
    layers.check_input("M", X, 4)
    layers.check_input("M", X[:, :8], 4, 8)
    with pytest.raises(ValueError, match=r"M: x must be \(N, 8, 8, 4\) NHWC, got shape \(2, 9, 8, 4\)"):
        layers.check_input("M", X, 4, 8)
    with pytest.raises(ValueError, match=r"M: x must be \(N, H, W, 1\)"):
        layers.check_input("M", X, 1)
