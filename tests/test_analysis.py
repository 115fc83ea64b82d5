"""jaxcnn.analysis: conv_cost against XLA's own counts and brute force; the rewrites against jaxcnn.ops."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcnn import analysis, ops

# (c_i, h, w, c_o, k, padding, stride, groups, bias): valid; padded and strided
# (XLA skips the padding taps); grouped, stride > kernel, with a bias.
XLA_CASES = [
    (3, 8, 8, 4, 3, 0, 1, 1, False),
    (2, 7, 9, 5, 3, 1, 2, 1, False),
    (4, 9, 9, 6, 2, 1, 3, 2, True),
]


def _normal(seed, *shapes):
    """Test data from NumPy: jax.random would compile anew for every shape."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape, dtype=np.float32) for shape in shapes]


def _conv(case):
    """The case as f(x, kernel[, b]), its arguments, and conv_cost's answer."""
    c_i, h, w, c_o, k, padding, stride, groups, bias = case
    args = tuple(_normal(0, (1, h, w, c_i), (k, k, c_i // groups, c_o), *([(c_o,)] if bias else [])))
    # XLA's own convolution, whose flops XLA counts: the CPU matmul lowering also multiplies padding.
    f = lambda *args: ops.conv2d(*args, stride=stride, padding=padding, groups=groups, lowering="xla")
    cost = analysis.conv_cost(c_i, h, w, c_o, k, k, padding=padding, stride=stride, groups=groups, bias=bias)
    return f, args, cost


@pytest.mark.parametrize("case", XLA_CASES)
def test_conv_cost_forward_matches_xla(case):
    f, args, cost = _conv(case)
    compiled = jax.jit(f).lower(*args).compile()
    out = cost["memory"]["output"]
    chex.assert_shape(f(*args), (1, *cost["output_hw"], case[3]))
    # XLA: 2 flops per multiply-add on real input, 1 per bias add.
    assert compiled.cost_analysis()["flops"] == 2 * cost["macs_unpadded"] + (out if case[-1] else 0)
    if case[5] == 0:
        assert cost["macs_unpadded"] == cost["macs"]
        # ... which is our multiplications and additions plus the add into each zero accumulator.
        assert 2 * cost["macs"] == cost["forward"]["mul"] + cost["forward"]["add"] + out
    else:
        assert cost["macs_unpadded"] < cost["macs"]
    memory = compiled.memory_analysis()
    assert memory.argument_size_in_bytes == sum(cost["bytes"][k] for k in ("input", "kernel", "bias"))
    assert memory.output_size_in_bytes == cost["bytes"]["output"]


@pytest.mark.parametrize("case", XLA_CASES)
def test_conv_cost_backward_matches_xla(case):
    f, args, cost = _conv(case)
    dy = jnp.ones((1, *cost["output_hw"], case[3]))
    vjp = lambda dy, *args: jax.vjp(f, *args)[1](dy)
    compiled = jax.jit(vjp).lower(dy, *args).compile()
    bias_grad = cost["memory"]["output"] - case[3] if case[-1] else 0
    # Two convolutions (dX, dW), each 2 flops per real multiply-add, plus db's reduction.
    assert compiled.cost_analysis()["flops"] == 4 * cost["macs_unpadded"] + bias_grad
    assert cost["backward"]["mul"] == 2 * cost["forward"]["mul"]
    memory = compiled.memory_analysis()
    # The backward pass reads exactly the saved input and kernel, and dY (b goes unused).
    assert memory.argument_size_in_bytes == cost["bytes"]["backward_saved"] + cost["bytes"]["output"]
    grads = sum(cost["bytes"][k] for k in ("input", "kernel", "bias"))
    assert 0 <= memory.output_size_in_bytes - grads <= 8 * len(args)  # plus XLA's tuple of pointers
    assert cost["bytes"]["backward"] == memory.argument_size_in_bytes + grads


@pytest.mark.parametrize("h, k, padding, stride", [(9, 2, 1, 3), (8, 3, 1, 2), (7, 3, 2, 1)])
def test_conv_cost_additions_by_brute_force(h, k, padding, stride):
    c_i, c_o, groups = 4, 6, 2
    cost = analysis.conv_cost(c_i, h, h, c_o, k, k, padding=padding, stride=stride, groups=groups, bias=True)
    h_o, w_o = cost["output_hw"]
    # Count the terms each padded input pixel receives in dX, window by window.
    terms = np.zeros((h + 2 * padding,) * 2, int)
    for i in range(h_o):
        for j in range(w_o):
            terms[i * stride : i * stride + k, j * stride : j * stride + k] += 1
    per_pixel = c_o // groups  # each covered pixel of each input channel sums this many terms per tap
    assert cost["grad_input"]["mul"] == c_i * per_pixel * terms.sum()
    assert cost["grad_input"]["add"] == c_i * (per_pixel * terms.sum() - (terms > 0).sum())
    outputs, fan_in = c_o * h_o * w_o, c_i // groups * k * k
    assert cost["forward"]["add"] == outputs * (fan_in - 1) + outputs  # the sums, then the bias
    assert cost["grad_kernel"]["add"] == c_o * fan_in * (h_o * w_o - 1)
    assert cost["backward"]["add"] - cost["grad_input"]["add"] - cost["grad_kernel"]["add"] == c_o * (h_o * w_o - 1)


def test_conv_cost_doubling_channels_and_padding():
    base = analysis.conv_cost(3, 8, 8, 4, 3, 3, padding=1)
    doubled = analysis.conv_cost(6, 8, 8, 8, 3, 3, padding=1)
    for key in ("macs", "macs_unpadded"):
        assert doubled[key] == 4 * base[key]
    for part in ("forward", "backward", "grad_input", "grad_kernel"):
        assert doubled[part]["mul"] == 4 * base[part]["mul"]
    assert doubled["memory"]["kernel"] == 4 * base["memory"]["kernel"]
    assert doubled["memory"]["input"] == 2 * base["memory"]["input"]
    # Doubling the padding only grows the output: the factor is the ratio of output areas.
    padded = analysis.conv_cost(3, 8, 8, 4, 3, 3, padding=2)
    (h1, w1), (h2, w2) = ops.conv_output_shape(8, 3, padding=1), ops.conv_output_shape(8, 3, padding=2)
    assert padded["macs"] * h1 * w1 == base["macs"] * h2 * w2
    assert (h2 * w2) / (h1 * w1) == pytest.approx(100 / 64)
    # The 1x1 exercise: c_i c_o h w multiply-adds.
    assert analysis.conv_cost(3, 8, 8, 4, 1, 1)["macs"] == 3 * 4 * 8 * 8


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((0, 8, 8, 4, 3, 3), {}, "conv_cost: c_i must be a positive int"),
        ((3, 8, 8, 4, 3, 3), {"groups": 2}, "conv_cost: c_i=3 and c_o=4 must both divide"),
        ((3, 2, 8, 4, 3, 3), {}, "conv_cost: kernel spans 3 along H"),
        ((3, 8, 8, 4, 3, 3), {"stride": 0}, "conv_cost: stride must be >= 1"),
        ((3, 8, 8, 4, 3, 3), {"padding": -1}, "conv_cost: padding must be >= 0"),
    ],
)
def test_conv_cost_rejects_bad_specs(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        analysis.conv_cost(*args, **kwargs)


def test_compose_kernels_single_channel():
    x, k1, k2 = _normal(1, (7, 8), (2, 3), (3, 2))
    k = analysis.compose_kernels(k1, k2)
    chex.assert_shape(k, (4, 4))
    np.testing.assert_allclose(ops.corr2d(x, k), ops.corr2d(ops.corr2d(x, k1), k2), rtol=1e-5, atol=1e-5)


def test_compose_kernels_multi_channel():
    x, k1, k2 = _normal(2, (2, 7, 8, 3), (2, 3, 3, 5), (3, 2, 5, 4))
    k = analysis.compose_kernels(k1, k2)
    chex.assert_shape(k, (4, 4, 3, 4))
    twice = ops.conv2d(ops.conv2d(x, k1), k2, precision="highest")
    np.testing.assert_allclose(ops.conv2d(x, k, precision="highest"), twice, rtol=1e-4, atol=1e-4)
    # One channel each way is the single-channel composition.
    single = analysis.compose_kernels(k1[:, :, 0, 0], k2[:, :, 0, 0])
    np.testing.assert_allclose(analysis.compose_kernels(k1[..., :1, :1], k2[..., :1, :1])[..., 0, 0], single, rtol=1e-5)


def test_compose_kernels_rejects_mismatches():
    with pytest.raises(ValueError, match="compose_kernels: k1 has 5 output channels but k2 expects 4"):
        analysis.compose_kernels(jnp.ones((2, 2, 3, 5)), jnp.ones((2, 2, 4, 1)))
    with pytest.raises(ValueError, match="compose_kernels: k1 and k2 must both be"):
        analysis.compose_kernels(jnp.ones((2, 2)), jnp.ones((2, 2, 1, 1)))


@settings(max_examples=10, deadline=None)
@given(
    n=st.integers(1, 2),
    h=st.integers(3, 7),
    w=st.integers(3, 7),
    c=st.integers(1, 3),
    o=st.integers(1, 3),
    kh=st.integers(1, 3),
    kw=st.integers(1, 3),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    padding=st.integers(0, 2),
    bias=st.booleans(),
)
def test_conv2d_im2col_matches_conv2d(n, h, w, c, o, kh, kw, stride, dilation, padding, bias):
    x, k, b = _normal(h * 7 + w, (n, h, w, c), (kh, kw, c, o), (o,))
    b = b if bias else None
    geometry = dict(stride=stride, padding=padding, dilation=dilation)
    if min(h - (kh - 1) * dilation, w - (kw - 1) * dilation) + 2 * padding < 1:
        with pytest.raises(ValueError, match="conv2d_im2col: kernel (with dilation .*)?spans"):
            analysis.conv2d_im2col(x, k, b, **geometry)
        return
    # One compile per shape, not one per slice.
    y = jax.jit(functools.partial(analysis.conv2d_im2col, **geometry))(x, k, b)
    chex.assert_shape(y, (n, *ops.conv_output_shape((h, w), (kh, kw), **geometry), o))
    np.testing.assert_allclose(y, ops.conv2d(x, k, b, precision="highest", **geometry), rtol=1e-4, atol=1e-4)


def test_im2col_rows_are_windows_in_hwio_order():
    x = jnp.arange(2 * 5 * 6 * 3, dtype=jnp.float32).reshape(2, 5, 6, 3)
    patches = analysis.im2col(x, (2, 3), stride=2, padding=1)
    chex.assert_shape(patches, (2, 3, 3, 2 * 3 * 3))
    xp = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
    np.testing.assert_array_equal(patches[1, 2, 1], xp[1, 4:6, 2:5].reshape(-1))


def test_conv2d_im2col_gradients_match_conv2d():
    x, k = _normal(3, (1, 6, 6, 2), (3, 3, 2, 3))
    loss = lambda conv: lambda x, k: jnp.sum(jnp.sin(conv(x, k, stride=2, padding=1)))
    ours = jax.jit(jax.grad(loss(analysis.conv2d_im2col), argnums=(0, 1)))(x, k)
    theirs = jax.jit(jax.grad(loss(ops.conv2d), argnums=(0, 1)))(x, k)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_im2col_rejects_bad_input():
    with pytest.raises(ValueError, match=r"im2col: x must have rank 4"):
        analysis.im2col(jnp.ones((5, 5)), 3)
    with pytest.raises(ValueError, match=r"conv2d_im2col: x must be \(N, H, W, 2\)"):
        analysis.conv2d_im2col(jnp.ones((1, 5, 5, 3)), jnp.ones((3, 3, 2, 4)))
    with pytest.raises(ValueError, match="conv2d_im2col: b must have shape"):
        analysis.conv2d_im2col(jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 4)), jnp.ones(3))


@pytest.mark.parametrize("window, stride, padding", [(2, None, 0), (3, 2, 1), ((2, 3), (2, 1), (1, 1))])
def test_avg_pool_as_conv_is_avg_pool(window, stride, padding):
    (x,) = _normal(5, (2, 6, 7, 3))
    y = analysis.avg_pool_as_conv(x, window, stride=stride, padding=padding)
    np.testing.assert_allclose(y, ops.avg_pool2d(x, window, stride=stride, padding=padding), rtol=1e-5, atol=1e-6)


def test_avg_pool_is_linear_and_max_pool_is_not():
    x, y = _normal(6, (1, 4, 4, 2), (1, 4, 4, 2))
    avg = lambda a: analysis.avg_pool_as_conv(a, 2)
    np.testing.assert_allclose(avg(2 * x - 3 * y), 2 * avg(x) - 3 * avg(y), rtol=1e-5, atol=1e-5)
    # max(x + y) != max(x) + max(y), so no kernel can make a convolution compute max pooling.
    a, b = jnp.array([1.0, 0.0]).reshape(1, 1, 2, 1), jnp.array([0.0, 1.0]).reshape(1, 1, 2, 1)
    mp = lambda v: ops.max_pool2d(v, (1, 2))
    assert float(mp(a + b)[0, 0, 0, 0]) == 1.0
    assert float((mp(a) + mp(b))[0, 0, 0, 0]) == 2.0


@pytest.mark.parametrize("window, stride, padding", [(2, None, 0), (3, 2, 1)])
def test_max_pool_as_limit_converges_to_max_pool(window, stride, padding):
    x = np.random.default_rng(7).uniform(0.1, 1.0, (2, 6, 6, 3)).astype(np.float32)
    target = ops.max_pool2d(x, window, stride=stride, padding=padding)
    geometry = dict(stride=stride, padding=padding)
    np.testing.assert_allclose(
        analysis.max_pool_as_limit(x, window, 1, **geometry), ops.avg_pool2d(x, window, **geometry), rtol=1e-5
    )
    n = window**2  # padding counts as zeros in the window
    errors = []
    for p in (1, 2, 4, 8, 16, 32):
        y = analysis.max_pool_as_limit(x, window, p, **geometry)
        chex.assert_equal_shape([y, target])
        error = target - y
        assert float(error.min()) >= -1e-5
        assert np.all(error <= target * (1 - n ** (-1 / p)) + 1e-5)
        errors.append(float(error.max()))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.075


def test_pooling_rewrites_reject_bad_input():
    with pytest.raises(ValueError, match="max_pool_as_limit: p must be a positive finite number"):
        analysis.max_pool_as_limit(jnp.ones((1, 4, 4, 1)), 2, 0)
    with pytest.raises(ValueError, match="avg_pool_as_conv: x must have rank 4"):
        analysis.avg_pool_as_conv(jnp.ones((4, 4)), 2)
    with pytest.raises(ValueError, match="avg_pool_as_conv: kernel spans 5 along H"):
        analysis.avg_pool_as_conv(jnp.ones((1, 4, 4, 1)), 5)
