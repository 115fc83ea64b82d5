"""jaxcnn.ops against the notes' worked numbers, the NumPy twins in
jaxcnn.reference, scipy, the chapters' identities, finite-difference gradients
and every argument check."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jax import lax
from jax.test_util import check_grads

from jaxcnn import _checks, _lowering, ops, reference

# float32 ops against float64 twins. Each output sums at most ~50 products of
# O(1) numbers, so float32 rounding stays near 1e-6; 1e-5 leaves room for that
# and still catches a single wrong tap, pad value or divisor.
RTOL = ATOL = 1e-5
# GPUs default to TF32 convolutions; the tolerances above assume full float32.
HIGHEST = lax.Precision.HIGHEST
# Every new array shape is a fresh XLA compile: few examples, tiny shapes.
PROPERTY = settings(max_examples=20, deadline=None)

assert_close = functools.partial(np.testing.assert_allclose, rtol=RTOL, atol=ATOL)


def to_layout(nchw, layout):
    """(N, C, H, W) -> the layout's order."""
    x = np.asarray(nchw)
    return x if layout == "NCHW" else x.transpose(0, 2, 3, 1)


def from_layout(y, layout):
    y = np.asarray(y)
    return y if layout == "NCHW" else y.transpose(0, 3, 1, 2)


def spatial(shape, layout):
    return tuple(shape[2:]) if layout == "NCHW" else tuple(shape[1:3])


def as_hw(v):
    return (v, v) if isinstance(v, int) else tuple(v)


RNG = np.random.default_rng(0)


def normal(*shape):
    return RNG.normal(size=shape).astype(np.float32)


# --------------------------------------------------------------------------
# The notes' worked numbers.

X = np.arange(9.0).reshape(3, 3)
K = np.array([[0.0, 1.0], [2.0, 3.0]])
X2 = np.stack([X, X + 1])  # the notes' two-channel input ...
K2 = np.stack([K, K + 1])  # ... and kernel


def edge_image():
    x = np.ones((6, 8))
    x[:, 2:6] = 0
    return x


def test_corr2d_notes():
    np.testing.assert_array_equal(ops.corr2d(X, K), [[19, 25], [37, 43]])


def test_edge_detection_notes():
    y = ops.corr2d(edge_image(), [[1.0, -1.0]])
    expected = np.zeros((6, 7))
    expected[:, 1], expected[:, 5] = 1, -1
    np.testing.assert_array_equal(y, expected)
    # The kernel sees no horizontal edges.
    y_t = ops.corr2d(edge_image().T, [[1.0, -1.0]])
    chex.assert_shape(y_t, (8, 5))
    np.testing.assert_array_equal(y_t, 0)


def test_multi_channel_notes():
    np.testing.assert_array_equal(ops.corr2d_multi_in(X2, K2), [[56, 72], [104, 120]])
    y = ops.corr2d_multi_in_out(X2, np.stack([K2, K2 + 1, K2 + 2]))
    expected = [[[56, 72], [104, 120]], [[76, 100], [148, 172]], [[96, 128], [192, 224]]]
    np.testing.assert_array_equal(y, expected)


def test_pool2d_notes():
    np.testing.assert_array_equal(ops.pool2d(X, (2, 2)), [[4, 5], [7, 8]])
    np.testing.assert_array_equal(ops.pool2d(X, (2, 2), "avg"), [[2, 3], [5, 6]])


@pytest.mark.parametrize("layout", ops.LAYOUTS)
@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(window=3), [[10]]),
        (dict(window=3, padding=1, stride=2), [[5, 7], [13, 15]]),
        (dict(window=(2, 3), stride=(2, 3), padding=(0, 1)), [[5, 7], [13, 15]]),
    ],
)
def test_max_pool2d_notes(layout, kwargs, expected):
    x = to_layout(np.arange(16.0).reshape(1, 1, 4, 4), layout)
    y = from_layout(ops.max_pool2d(x, layout=layout, **kwargs), layout)
    np.testing.assert_array_equal(y, np.asarray(expected)[None, None])


@pytest.mark.parametrize("layout", ops.LAYOUTS)
def test_max_pool2d_two_channels_notes(layout):
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    x = to_layout(np.concatenate([x, x + 1], axis=1), layout)
    y = from_layout(ops.max_pool2d(x, 3, padding=1, stride=2, layout=layout), layout)
    np.testing.assert_array_equal(y, [[[[5, 7], [13, 15]], [[6, 8], [14, 16]]]])


@pytest.mark.parametrize(
    "kernel, padding, stride, expected",
    [(3, 1, 1, (8, 8)), ((5, 3), (2, 1), 1, (8, 8)), (3, 1, 2, (4, 4)), ((3, 5), (0, 1), (3, 4), (2, 2))],
)
def test_output_shape_notes(kernel, padding, stride, expected):
    assert ops.conv_output_shape(8, kernel, stride=stride, padding=padding) == expected
    y = ops.conv2d(
        np.ones((1, 1, 8, 8)), np.ones((1, 1, *as_hw(kernel))), stride=stride, padding=padding, layout="NCHW"
    )
    chex.assert_shape(y, (1, 1, *expected))


def test_learning_a_kernel_notes():
    """The notes' loop: a random 1x2 kernel learns the edge detector [1, -1]."""
    x = edge_image().reshape(1, 1, 6, 8)
    y = ops.conv2d(x, np.array([1.0, -1.0]).reshape(1, 1, 1, 2), layout="NCHW")
    loss = lambda w: jnp.sum((ops.conv2d(x, w, layout="NCHW") - y) ** 2)
    step = jax.jit(lambda w: w - 3e-2 * jax.grad(loss)(w))
    w = jax.random.uniform(jax.random.key(0), (1, 1, 1, 2), minval=-1, maxval=1)
    assert np.abs(np.ravel(w) - [1, -1]).max() > 0.5  # starts far from the answer
    for _ in range(20):
        w = step(w)
    np.testing.assert_allclose(np.ravel(w), [1, -1], atol=0.05)


# --------------------------------------------------------------------------
# Properties: every op against its twin, with and without jit.


def pair(lo, hi):
    """An int or an (h, w) pair: both forms are accepted."""
    ints = st.integers(lo, hi)
    return st.one_of(ints, st.tuples(ints, ints))


PAD = st.integers(0, 2)
PADDINGS = st.one_of(
    PAD,
    st.tuples(PAD, PAD),
    st.tuples(st.tuples(PAD, PAD), st.tuples(PAD, PAD)),
    st.sampled_from(["SAME", "VALID", "same"]),
)


def total_padding(padding):
    """Padding summed over both sides, per axis; SAME is None (it always fits)."""
    if isinstance(padding, str):
        return None if padding.upper() == "SAME" else (0, 0)
    if isinstance(padding, int):
        return (2 * padding,) * 2
    if isinstance(padding[0], int):
        return (2 * padding[0], 2 * padding[1])
    return (sum(padding[0]), sum(padding[1]))


@st.composite
def conv_cases(draw):
    groups = draw(st.integers(1, 3))
    cin, cout = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    (kh, kw), dilation = as_hw(draw(pair(1, 3))), draw(pair(1, 2))
    padding, layout = draw(PADDINGS), draw(st.sampled_from(ops.LAYOUTS))
    spans = [(k - 1) * d + 1 for k, d in zip((kh, kw), as_hw(dilation))]
    totals = total_padding(padding) or [s - 1 for s in spans]
    h, w = (draw(st.integers(max(1, s - t), max(1, s - t) + 3)) for s, t in zip(spans, totals))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = to_layout(rng.normal(size=(draw(st.integers(1, 2)), cin, h, w)), layout).astype(np.float32)
    wgt = rng.normal(size=(kh, kw, cin // groups, cout)).astype(np.float32)
    wgt = wgt if layout == "NHWC" else wgt.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    b = rng.normal(size=cout).astype(np.float32) if draw(st.booleans()) else None
    kwargs = dict(stride=draw(pair(1, 3)), padding=padding, dilation=dilation, groups=groups, layout=layout)
    return x, wgt, b, (kh, kw), kwargs


def pytorch_windows(n, k, s, p, ceil_mode):
    """Pooling windows along one axis, counted one by one as PyTorch's rule reads:
    every window inside the padded input, and with ceil_mode one partial window
    more if the last full one stops short of the end and the new one starts
    inside the input or its left padding."""
    count, start = 0, -p
    while start + k <= n + p:
        count, start = count + 1, start + s
    if ceil_mode and start - s + k < n + p and start < n:
        count += 1
    return count


POOLS = ("max", "avg", "min", "soft")


def pool_case(kind, window, stride, padding, hw, ceil_mode, layout, seed=0, batch=1, channels=2, **extra):
    """Negative inputs for max/avg/soft and positive ones for min, so that a
    zero pad value, rather than -inf/+inf or not counting, changes the result."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.5, 2.0, size=(batch, channels, *hw)) * (1 if kind == "min" else -1)
    kwargs = dict(stride=stride, padding=padding, ceil_mode=ceil_mode, layout=layout, **extra)
    return kind, to_layout(x, layout).astype(np.float32), window, kwargs


@st.composite
def pool_cases(draw):
    kind = draw(st.sampled_from(POOLS))
    window = draw(pair(1, 4))
    (kh, kw), stride = as_hw(window), draw(st.one_of(st.none(), pair(1, 3)))
    padding = draw(
        st.one_of(st.integers(0, min(kh, kw) // 2), st.tuples(st.integers(0, kh // 2), st.integers(0, kw // 2)))
    )
    hw = [draw(st.integers(max(1, k - 2 * p), k + 4)) for k, p in zip((kh, kw), as_hw(padding))]
    extra = {}
    if kind == "avg":
        extra["count_include_pad"] = draw(st.booleans())
    if kind == "soft":
        extra["temperature"] = draw(st.sampled_from([0.3, 1.0, 3.0]))
    return pool_case(
        kind,
        window,
        stride,
        padding,
        hw,
        draw(st.booleans()),
        draw(st.sampled_from(ops.LAYOUTS)),
        seed=draw(st.integers(0, 2**32 - 1)),
        batch=draw(st.integers(1, 2)),
        channels=draw(st.integers(1, 3)),
        **extra,
    )


@st.composite
def image_cases(draw):
    c, o = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    h, w = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    kh, kw = draw(st.integers(1, h)), draw(st.integers(1, w))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
    return normal(c, h, w), normal(o, c, kh, kw), normal(o, c, 1, 1)


class PropertyTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @PROPERTY
    @given(conv_cases())
    def test_conv2d_matches_reference(self, case):
        x, w, b, kernel, kwargs = case
        y = self.variant(functools.partial(ops.conv2d, precision=HIGHEST, **kwargs))(x, w, b)
        expected = reference.conv2d(x, w, b, **kwargs)
        chex.assert_shape(y, expected.shape)
        assert_close(y, expected)
        # The shape formula agrees with what lax actually returned.
        shape_args = {k: kwargs[k] for k in ("stride", "padding", "dilation")}
        assert ops.conv_output_shape(spatial(x.shape, kwargs["layout"]), kernel, **shape_args) == spatial(
            y.shape, kwargs["layout"]
        )

    @chex.variants(with_jit=True, without_jit=True)
    @PROPERTY
    @given(pool_cases())
    # ceil_mode adds a partial window (5 -> 3 windows, not 2) ...
    @example(pool_case("avg", 2, 2, 0, (5, 5), True, "NHWC", count_include_pad=True))
    @example(pool_case("soft", 2, 2, 0, (5, 4), True, "NCHW", temperature=1.0))
    # ... and PyTorch's rule drops the one that would start in the right padding.
    @example(pool_case("max", 2, 2, 1, (5, 5), True, "NCHW"))
    @example(pool_case("avg", (2, 3), 2, (1, 1), (5, 4), True, "NHWC", count_include_pad=True))
    def test_pools_match_reference(self, case):
        kind, x, window, kwargs = case
        y = self.variant(functools.partial(getattr(ops, f"{kind}_pool2d"), window=window, **kwargs))(x)
        expected = getattr(reference, f"{kind}_pool2d")(x, window, **kwargs)
        chex.assert_shape(y, expected.shape)
        assert_close(y, expected)
        # pool_output_shape, the op's real output shape and PyTorch's rule agree.
        layout, stride = kwargs["layout"], kwargs["stride"] or window
        hw = spatial(x.shape, layout)
        out_hw = ops.pool_output_shape(
            hw, window, stride=kwargs["stride"], padding=kwargs["padding"], ceil_mode=kwargs["ceil_mode"]
        )
        assert out_hw == spatial(y.shape, layout)
        geometry = zip(hw, as_hw(window), as_hw(stride), as_hw(kwargs["padding"]))
        assert out_hw == tuple(pytorch_windows(n, k, s, p, kwargs["ceil_mode"]) for n, k, s, p in geometry)

    @chex.variants(with_jit=True, without_jit=True)
    @settings(max_examples=10, deadline=None)  # six ops, so six compiles, per example
    @given(image_cases(), st.sampled_from(["valid", "full", "same"]), st.sampled_from(ops.POOL2D_MODES))
    def test_chapter_ops_match_reference(self, case, conv_mode, pool_mode):
        x, k, k1x1 = case
        pairs = [
            (ops.corr2d, reference.corr2d, (x[0], k[0, 0])),
            (
                functools.partial(ops.convolve2d, mode=conv_mode),
                functools.partial(reference.convolve2d, mode=conv_mode),
                (x[0], k[0, 0]),
            ),
            (ops.corr2d_multi_in, reference.corr2d_multi_in, (x, k[0])),
            (ops.corr2d_multi_in_out, reference.corr2d_multi_in_out, (x, k)),
            (ops.corr2d_multi_in_out_1x1, reference.corr2d_multi_in_out_1x1, (x, k1x1)),
            (
                functools.partial(ops.pool2d, pool_size=k.shape[2:], mode=pool_mode),
                functools.partial(reference.pool2d, pool_size=k.shape[2:], mode=pool_mode),
                (x[0],),
            ),
        ]
        for op, twin, args in pairs:
            y, expected = self.variant(op)(*args), twin(*args)
            chex.assert_shape(y, expected.shape)
            assert_close(y, expected)


def test_same_padding_is_tensorflows():
    """The twins share _checks.padding_pairs, so check "SAME" against lax's own:
    output ceil(n / stride), the odd pixel at the bottom/right."""
    for n in range(1, 8):
        for k in range(1, 5):
            for s in range(1, 4):
                for d in (1, 2):
                    pads = _checks.padding_pairs("test", "SAME", (n, n), (k, k), (s, s), (d, d))
                    assert list(pads) == lax.padtype_to_pads((n, n), ((k - 1) * d + 1,) * 2, (s, s), "SAME")
    x, w = normal(1, 4, 6, 2), normal(3, 2, 2, 3)  # stride 2 on even sizes: asymmetric padding
    y = ops.conv2d(x, w, stride=2, padding="SAME", precision=HIGHEST)
    expected = lax.conv_general_dilated(
        x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST
    )
    chex.assert_shape(y, (1, 2, 3, 3))
    assert_close(y, expected)


def test_ceil_mode_windows_follow_pytorch():
    """pool_output_shape against the window count, over every small geometry;
    the scan must include both ceil_mode edge cases to mean anything."""
    added = dropped = 0
    for n in range(1, 9):
        for k in range(1, 5):
            for s in range(1, 5):
                for p in range(k // 2 + 1):
                    if k > n + 2 * p:
                        continue
                    floor = pytorch_windows(n, k, s, p, False)
                    ceil = pytorch_windows(n, k, s, p, True)
                    assert ops.pool_output_shape((n, 1), (k, 1), stride=(s, 1), padding=(p, 0))[0] == floor
                    assert (
                        ops.pool_output_shape((n, 1), (k, 1), stride=(s, 1), padding=(p, 0), ceil_mode=True)[0] == ceil
                    )
                    added += ceil > floor
                    dropped += ceil == floor and -(-(n + 2 * p - k) // s) > (n + 2 * p - k) // s
    assert added and dropped


# --------------------------------------------------------------------------
# Identities from the chapters.


class IdentityTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_1x1_conv_is_matrix_product(self):
        x, k = normal(3, 3, 3), normal(2, 3, 1, 1)
        y = self.variant(ops.corr2d_multi_in_out_1x1)(x, k)
        chex.assert_shape(y, (2, 3, 3))
        assert_close(y, ops.corr2d_multi_in_out(x, k))
        assert_close(y, np.einsum("oc,chw->ohw", k[:, :, 0, 0], x))

    @chex.variants(with_jit=True, without_jit=True)
    def test_convolve2d_is_corr2d_with_flipped_kernel(self):
        x, k = normal(5, 6), normal(3, 2)
        assert_close(self.variant(ops.convolve2d)(x, k), ops.corr2d(x, k[::-1, ::-1]))
        for mode in ("valid", "full", "same"):  # and agrees with scipy, even kernel included
            assert_close(
                self.variant(functools.partial(ops.convolve2d, mode=mode))(x, k), scipy.signal.convolve2d(x, k, mode)
            )

    @chex.variants(with_jit=True, without_jit=True)
    def test_full_convolution_commutes(self):
        f, g = normal(3, 5), normal(4, 2)  # neither fits inside the other
        full = self.variant(functools.partial(ops.convolve2d, mode="full"))
        chex.assert_shape(full(f, g), (6, 6))
        assert_close(full(f, g), full(g, f))

    @chex.variants(with_jit=True, without_jit=True)
    def test_avg_pool_is_depthwise_conv(self):
        x, c = normal(2, 5, 6, 3), 3
        kwargs = dict(stride=2, padding=(1, 1))
        y = self.variant(functools.partial(ops.avg_pool2d, window=(3, 2), **kwargs))(x)
        w = np.full((3, 2, 1, c), 1 / 6, np.float32)
        assert_close(y, ops.conv2d(x, w, groups=c, precision=HIGHEST, **kwargs))

    @chex.variants(with_jit=True, without_jit=True)
    def test_min_pool_is_negated_max_pool(self):
        x = normal(2, 5, 5, 2)
        kwargs = dict(window=3, stride=2, padding=1, ceil_mode=True)
        y = self.variant(functools.partial(ops.min_pool2d, **kwargs))(x)
        np.testing.assert_array_equal(y, -ops.max_pool2d(-x, **kwargs))

    @chex.variants(with_jit=True, without_jit=True)
    def test_soft_pool_between_avg_and_max(self):
        x = RNG.uniform(-1, 1, size=(1, 5, 5, 2)).astype(np.float32)
        kwargs = dict(window=3, stride=2, padding=1, ceil_mode=True)  # partial windows included
        mx = ops.max_pool2d(x, **kwargs)
        avg = ops.avg_pool2d(x, count_include_pad=False, **kwargs)
        soft = {
            t: self.variant(functools.partial(ops.soft_pool2d, temperature=t, **kwargs))(x) for t in (0.01, 1.0, 100.0)
        }
        for y in soft.values():
            assert np.all(avg - ATOL <= y) and np.all(y <= mx + ATOL)
        # Log-mean-exp grows as T falls (a power mean), with exact bounds at the ends:
        # max - T log(window size) <= soft, and by Hoeffding's lemma
        # soft - avg <= range^2 / (8 T) (range <= 2 here). The slack is float32
        # logsumexp rounding, multiplied by T.
        assert np.all(soft[0.01] >= soft[1.0] - ATOL) and np.all(soft[1.0] >= soft[100.0] - ATOL)
        np.testing.assert_array_less(mx - soft[0.01], 0.01 * math.log(9) + ATOL)
        np.testing.assert_array_less(np.abs(soft[100.0] - avg), 4 / (8 * 100.0) + 1e-4)


# --------------------------------------------------------------------------
# Gradients against finite differences, in float64 so the differences are exact enough.


class GradientTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_conv2d_grads(self):
        rng = np.random.default_rng(1)
        args = rng.normal(size=(1, 5, 5, 4)), rng.normal(size=(3, 3, 2, 4)), rng.normal(size=4)
        conv = self.variant(functools.partial(ops.conv2d, stride=2, padding=1, dilation=(1, 2), groups=2))
        with jax.enable_x64(True):
            check_grads(conv, args, order=2, modes=("fwd", "rev"))

    # Jit only and first order: eager float64 soft pooling compiles every primitive
    # on its own and second order doubles that; the jaxprs are the same.
    @chex.variants(with_jit=True)
    def test_pool_grads(self):
        # Distinct values 0.1 apart: no ties for max/min for the finite differences to straddle.
        x = np.random.default_rng(2).permutation(50).reshape(1, 5, 5, 2) / 10.0
        for kind in POOLS:
            pool = self.variant(
                functools.partial(getattr(ops, f"{kind}_pool2d"), window=3, stride=2, padding=1, ceil_mode=True)
            )
            with jax.enable_x64(True):
                check_grads(pool, (x,), order=1, modes=("fwd", "rev"))


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_avg_pool_over_tiling_windows_is_reduce_windows_value_and_gradient(layout, monkeypatch):
    """Non-overlapping windows take _lowering.tiled_sum: on maps they do not divide (the remainder
    dropped, as PyTorch does), its value and gradient are a reduce_window sum's over the window size."""
    tiled = []
    tiled_sum = _lowering.tiled_sum
    monkeypatch.setattr(_lowering, "tiled_sum", lambda *a: tiled.append(a[1]) or tiled_sum(*a))
    x = normal(2, 3, 7, 9) if layout == "NCHW" else normal(2, 7, 9, 3)
    dims = (0, 1, 2, 3) if layout == "NCHW" else (0, 3, 1, 2)  # N, C, H, W
    for window in ((2, 2), (3, 2)):
        win = tuple(np.array([1, 1, *window])[np.argsort(dims)])
        pool = functools.partial(ops.avg_pool2d, window=window, layout=layout)
        windowed = lambda x: lax.reduce_window(x, 0.0, lax.add, win, win, "VALID") / math.prod(window)  # noqa: B023
        y, pool_vjp = jax.vjp(pool, x)
        y_ref, windowed_vjp = jax.vjp(windowed, x)
        dy = normal(*y.shape)
        np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(pool_vjp(dy)[0], windowed_vjp(dy)[0])
        dx = normal(*x.shape)
        np.testing.assert_allclose(
            jax.jvp(pool, (x,), (dx,))[1], jax.jvp(windowed, (x,), (dx,))[1], rtol=1e-6, atol=1e-7
        )
    assert set(tiled) == {(2, 2), (3, 2)}  # the tiled path ran, not reduce_window against itself


# --------------------------------------------------------------------------
# jit, vmap and dtypes.


def test_vmap():
    xs, k = normal(4, 5, 6), normal(2, 3)
    assert_close(jax.vmap(ops.corr2d, in_axes=(0, None))(xs, k), np.stack([ops.corr2d(x, k) for x in xs]))
    x, ws = normal(2, 6, 6, 3), normal(4, 3, 3, 3, 2)  # a batch of kernels
    conv = jax.vmap(functools.partial(ops.conv2d, padding=1), in_axes=(None, 0))
    assert_close(conv(x, ws), np.stack([ops.conv2d(x, w, padding=1) for w in ws]))
    x5 = normal(3, 2, 5, 5, 2)  # an extra leading axis
    pool = jax.vmap(functools.partial(ops.max_pool2d, window=2, ceil_mode=True))
    assert_close(pool(x5), np.stack([ops.max_pool2d(x, 2, ceil_mode=True) for x in x5]))


def test_checks_run_under_jit():
    """Shapes are static: a bad call fails with ValueError at trace time, not in XLA."""
    with pytest.raises(ValueError, match=r"^conv2d: .*channels"):
        jax.jit(ops.conv2d)(normal(1, 4, 4, 3), normal(3, 3, 2, 4))
    with pytest.raises(ValueError, match=r"^avg_pool2d: window"):
        jax.jit(functools.partial(ops.avg_pool2d, window=5))(normal(1, 4, 4, 3))


INT_CASES = {
    "conv2d": (lambda x: ops.conv2d(x, np.ones((2, 2, 1, 1), np.int32), padding=1), (1, 4, 4, 1)),
    "max_pool2d": (lambda x: ops.max_pool2d(x, 3, stride=2, padding=1), (1, 4, 4, 1)),
    "avg_pool2d": (lambda x: ops.avg_pool2d(x, 3, stride=2, padding=1), (1, 4, 4, 1)),
    "min_pool2d": (lambda x: ops.min_pool2d(x, 3, stride=2, padding=1), (1, 4, 4, 1)),
    "soft_pool2d": (lambda x: ops.soft_pool2d(x, 3, stride=2, padding=1), (1, 4, 4, 1)),
    "corr2d": (lambda x: ops.corr2d(x, np.array([[1, -2]])), (4, 4)),
    "convolve2d": (lambda x: ops.convolve2d(x, np.array([[1, -2]]), "full"), (4, 4)),
    "pool2d": (lambda x: ops.pool2d(x, 2, "avg"), (4, 4)),
    "corr2d_multi_in_out_1x1": (lambda x: ops.corr2d_multi_in_out_1x1(x, np.ones((2, 4, 1, 1), np.int32)), (4, 2, 2)),
}


@pytest.mark.parametrize("name", INT_CASES)
def test_integer_inputs_are_promoted_to_float(name):
    op, shape = INT_CASES[name]
    x = np.arange(math.prod(shape), dtype=np.int32).reshape(shape) - 5
    y = op(x)
    assert y.dtype == jnp.float32
    assert_close(y, op(x.astype(np.float32)))


@pytest.mark.parametrize("op", [ops.max_pool2d, ops.avg_pool2d, ops.soft_pool2d])
def test_pools_keep_low_precision_dtypes(op):
    assert op(jnp.ones((1, 4, 4, 1), jnp.bfloat16), 2, padding=1).dtype == jnp.bfloat16


def test_conv2d_keeps_low_precision_dtypes():
    x, w = jnp.ones((1, 4, 4, 1), jnp.bfloat16), jnp.ones((3, 3, 1, 2), jnp.bfloat16)
    assert ops.conv2d(x, w, jnp.ones(2, jnp.bfloat16), padding=1).dtype == jnp.bfloat16


def test_conv2d_promotes_mixed_dtypes():
    y = ops.conv2d(np.ones((1, 3, 3, 1), np.float32), jnp.ones((1, 1, 1, 1), jnp.bfloat16))
    assert y.dtype == jnp.promote_types(jnp.float32, jnp.bfloat16)


# --------------------------------------------------------------------------
# Every argument check: a ValueError naming the function and what is wrong.

x4 = np.zeros((1, 4, 4, 2), np.float32)  # NHWC, C=2
w4 = np.zeros((3, 3, 2, 4), np.float32)  # HWIO, 2 -> 4
img, img3 = np.zeros((4, 4)), np.zeros((2, 4, 4))

ERRORS = {
    # conv2d
    "conv2d x rank": (lambda: ops.conv2d(x4[0], w4), r"^conv2d: x must have rank 4"),
    "conv2d w rank": (lambda: ops.conv2d(x4, w4[0]), r"^conv2d: w must have rank 4"),
    "conv2d channels": (
        lambda: ops.conv2d(x4, w4[:, :, :1]),
        r"^conv2d: w expects 1 x groups=1 = 1 input channels but x has 2",
    ),
    "conv2d groups C": (
        lambda: ops.conv2d(np.zeros((1, 4, 4, 3)), np.zeros((3, 3, 1, 4)), groups=2),
        r"^conv2d: input_channels=3 .* groups=2",
    ),
    "conv2d groups O": (
        lambda: ops.conv2d(x4, np.zeros((3, 3, 1, 3)), groups=2),
        r"^conv2d: .*output_channels=3 must both divide by groups=2",
    ),
    "conv2d groups 0": (lambda: ops.conv2d(x4, w4, groups=0), r"^conv2d: groups must be a positive int"),
    "conv2d groups float": (lambda: ops.conv2d(x4, w4, groups=1.0), r"^conv2d: groups must be a positive int"),
    "conv2d bias": (lambda: ops.conv2d(x4, w4, np.zeros(2)), r"^conv2d: b must have shape \(4,\)"),
    "conv2d kernel too big": (
        lambda: ops.conv2d(x4, np.zeros((5, 3, 2, 4))),
        r"^conv2d: kernel .* spans 5 along H .* only 4",
    ),
    "conv2d dilated too big": (
        lambda: ops.conv2d(x4, w4, dilation=(1, 2), padding=(0, 0)),
        r"^conv2d: .*spans 5 along W",
    ),
    "conv2d stride 0": (lambda: ops.conv2d(x4, w4, stride=0), r"^conv2d: stride must be >= 1"),
    "conv2d stride triple": (lambda: ops.conv2d(x4, w4, stride=(1, 2, 3)), r"^conv2d: stride must be an int or a pair"),
    "conv2d stride bool": (lambda: ops.conv2d(x4, w4, stride=True), r"^conv2d: stride must be an int or a pair"),
    "conv2d dilation 0": (lambda: ops.conv2d(x4, w4, dilation=(1, 0)), r"^conv2d: dilation must be >= 1"),
    "conv2d padding -1": (lambda: ops.conv2d(x4, w4, padding=-1), r"^conv2d: padding must be >= 0"),
    "conv2d padding pair -1": (lambda: ops.conv2d(x4, w4, padding=((0, 0), (1, -1))), r"^conv2d: padding must be >= 0"),
    "conv2d padding string": (lambda: ops.conv2d(x4, w4, padding="FULL"), r"^conv2d: padding must be .* got 'FULL'"),
    "conv2d padding form": (lambda: ops.conv2d(x4, w4, padding=(1, 1, 1)), r"^conv2d: padding must be an int, a pair"),
    "conv2d padding float": (lambda: ops.conv2d(x4, w4, padding=1.5), r"^conv2d: padding must be an int, a pair"),
    "conv2d layout": (lambda: ops.conv2d(x4, w4, layout="HWCN"), r"^conv2d: layout must be one of"),
    # the shape formulas
    "conv_output_shape input": (lambda: ops.conv_output_shape(0, 3), r"^conv_output_shape: input_hw must be >= 1"),
    "conv_output_shape kernel": (
        lambda: ops.conv_output_shape(8, (3, 0)),
        r"^conv_output_shape: kernel_hw must be >= 1",
    ),
    "conv_output_shape stride": (
        lambda: ops.conv_output_shape(8, 3, stride=0),
        r"^conv_output_shape: stride must be >= 1",
    ),
    "conv_output_shape dilation": (
        lambda: ops.conv_output_shape(8, 3, dilation=0),
        r"^conv_output_shape: dilation must be >= 1",
    ),
    "conv_output_shape padding": (
        lambda: ops.conv_output_shape(8, 3, padding="full"),
        r"^conv_output_shape: padding must be",
    ),
    "conv_output_shape fits": (lambda: ops.conv_output_shape(2, 3, padding=0), r"^conv_output_shape: kernel spans 3"),
    "pool_output_shape input": (lambda: ops.pool_output_shape((4, 0), 2), r"^pool_output_shape: input_hw must be >= 1"),
    "pool_output_shape window": (lambda: ops.pool_output_shape(4, 0), r"^pool_output_shape: window must be >= 1"),
    "pool_output_shape padding": (
        lambda: ops.pool_output_shape(4, 2, padding=2),
        r"^pool_output_shape: padding 2 along H must be at most half",
    ),
    "pool_output_shape fits": (lambda: ops.pool_output_shape(4, 5), r"^pool_output_shape: window spans 5"),
    # the chapters' ops
    "corr2d x rank": (lambda: ops.corr2d(img3, K), r"^corr2d: x must have rank 2"),
    "corr2d k rank": (lambda: ops.corr2d(img, K2), r"^corr2d: k must have rank 2"),
    "corr2d too big": (
        lambda: ops.corr2d(X, np.zeros((4, 1))),
        r"^corr2d: kernel \(4, 1\) is larger than the input \(3, 3\)",
    ),
    "convolve2d x rank": (lambda: ops.convolve2d(img3, K), r"^convolve2d: x must have rank 2"),
    "convolve2d k rank": (lambda: ops.convolve2d(img, K2), r"^convolve2d: k must have rank 2"),
    "convolve2d mode": (
        lambda: ops.convolve2d(img, K, "circular"),
        r"^convolve2d: mode must be one of \('valid', 'full', 'same'\)",
    ),
    "convolve2d too big": (lambda: ops.convolve2d(X, np.zeros((1, 4))), r"^convolve2d: kernel \(1, 4\) is larger"),
    "corr2d_multi_in x rank": (lambda: ops.corr2d_multi_in(img, K2), r"^corr2d_multi_in: x must have rank 3"),
    "corr2d_multi_in k rank": (lambda: ops.corr2d_multi_in(img3, K), r"^corr2d_multi_in: k must have rank 3"),
    "corr2d_multi_in channels": (
        lambda: ops.corr2d_multi_in(img3, K2[:1]),
        r"^corr2d_multi_in: x has 2 channels but k has 1",
    ),
    "corr2d_multi_in too big": (
        lambda: ops.corr2d_multi_in(X2, np.zeros((2, 4, 4))),
        r"^corr2d_multi_in: kernel .* larger",
    ),
    "corr2d_multi_in_out x rank": (
        lambda: ops.corr2d_multi_in_out(img, K2[None]),
        r"^corr2d_multi_in_out: x must have rank 3",
    ),
    "corr2d_multi_in_out k rank": (
        lambda: ops.corr2d_multi_in_out(img3, K2),
        r"^corr2d_multi_in_out: k must have rank 4",
    ),
    "corr2d_multi_in_out channels": (
        lambda: ops.corr2d_multi_in_out(img3, np.zeros((3, 1, 2, 2))),
        r"^corr2d_multi_in_out: x has 2 channels but k expects 1",
    ),
    "corr2d_multi_in_out too big": (
        lambda: ops.corr2d_multi_in_out(X2, np.zeros((1, 2, 1, 4))),
        r"^corr2d_multi_in_out: kernel .* larger",
    ),
    "1x1 x rank": (
        lambda: ops.corr2d_multi_in_out_1x1(img, np.zeros((1, 4, 1, 1))),
        r"^corr2d_multi_in_out_1x1: x must have rank 3",
    ),
    "1x1 k rank": (
        lambda: ops.corr2d_multi_in_out_1x1(img3, np.zeros((1, 2, 1))),
        r"^corr2d_multi_in_out_1x1: k must have rank 4",
    ),
    "1x1 kernel": (
        lambda: ops.corr2d_multi_in_out_1x1(img3, np.zeros((1, 2, 2, 2))),
        r"^corr2d_multi_in_out_1x1: k must be a 1x1 kernel",
    ),
    "1x1 channels": (
        lambda: ops.corr2d_multi_in_out_1x1(img3, np.zeros((1, 3, 1, 1))),
        r"^corr2d_multi_in_out_1x1: x has 2 channels but k expects 3",
    ),
    "pool2d rank": (lambda: ops.pool2d(img3, 2), r"^pool2d: x must have rank 2"),
    "pool2d mode": (lambda: ops.pool2d(img, 2, "median"), r"^pool2d: mode must be one of"),
    "pool2d size": (lambda: ops.pool2d(img, (2, 0)), r"^pool2d: pool_size must be >= 1"),
    "pool2d too big": (lambda: ops.pool2d(X, (2, 4)), r"^pool2d: kernel \(2, 4\) is larger than the input \(3, 3\)"),
}
for _name in ("max_pool2d", "avg_pool2d", "soft_pool2d"):
    _pool = getattr(ops, _name)
    ERRORS |= {
        f"{_name} rank": (lambda p=_pool: p(x4[0], 2), rf"^{_name}: x must have rank 4"),
        f"{_name} layout": (lambda p=_pool: p(x4, 2, layout="CHWN"), rf"^{_name}: layout must be one of"),
        f"{_name} window 0": (lambda p=_pool: p(x4, (2, 0)), rf"^{_name}: window must be >= 1"),
        f"{_name} window form": (lambda p=_pool: p(x4, [2.0, 2.0]), rf"^{_name}: window must be an int or a pair"),
        f"{_name} stride 0": (lambda p=_pool: p(x4, 2, stride=0), rf"^{_name}: stride must be >= 1"),
        f"{_name} padding -1": (lambda p=_pool: p(x4, 2, padding=-1), rf"^{_name}: padding must be >= 0"),
        f"{_name} padding string": (
            lambda p=_pool: p(x4, 2, padding="SAME"),
            rf"^{_name}: padding must be an int or a pair",
        ),
        f"{_name} padding > half": (
            lambda p=_pool: p(x4, (3, 2), padding=(1, 2)),
            rf"^{_name}: padding 2 along W must be at most half the window \(2\)",
        ),
        f"{_name} too big": (
            lambda p=_pool: p(x4, 5),
            rf"^{_name}: window spans 5 along H but the padded input has only 4",
        ),
    }
ERRORS |= {
    f"soft_pool2d temperature {t}": (
        lambda t=t: ops.soft_pool2d(x4, 2, temperature=t),
        r"^soft_pool2d: temperature must be a positive finite number",
    )
    for t in (0.0, -1.0, float("nan"))
}


# Issue 15: inputs that got through (complex numbers, bools as ints, truthy strings as bools, zero
# channels, infinite temperature) or failed with an error naming the wrong thing or lax's internals.
z4 = x4.astype(np.complex64)
ERRORS |= {
    "conv2d complex x": (lambda: ops.conv2d(z4, w4), r"^conv2d: x must be real, got dtype complex64"),
    "conv2d complex w": (lambda: ops.conv2d(x4, w4.astype(np.complex64)), r"^conv2d: w must be real"),
    "max_pool2d complex": (lambda: ops.max_pool2d(z4, 2), r"^max_pool2d: x must be real"),
    "avg_pool2d complex": (lambda: ops.avg_pool2d(z4, 2), r"^avg_pool2d: x must be real"),
    "min_pool2d complex": (lambda: ops.min_pool2d(z4, 2), r"^min_pool2d: x must be real"),
    "corr2d complex": (lambda: ops.corr2d(img.astype(complex), K), r"^corr2d: x must be real"),
    "pool2d complex": (lambda: ops.pool2d(img.astype(complex), 2), r"^pool2d: x must be real"),
    "conv2d groups bool": (lambda: ops.conv2d(x4, w4, groups=True), r"^conv2d: groups must be a positive int"),
    "conv2d padding bool": (lambda: ops.conv2d(x4, w4, padding=True), r"^conv2d: padding must be an int, a pair"),
    "conv2d padding pair bool": (
        lambda: ops.conv2d(x4, w4, padding=((0, True), (0, 0))),
        r"^conv2d: padding must be an int, a pair",
    ),
    "conv_output_shape padding bool": (
        lambda: ops.conv_output_shape(4, 1, padding=(True, 0)),
        r"^conv_output_shape: padding must be an int, a pair",
    ),
    "max_pool2d ceil_mode str": (
        lambda: ops.max_pool2d(x4, 2, ceil_mode="no"),
        r"^max_pool2d: ceil_mode must be a bool",
    ),
    "avg_pool2d count_include_pad str": (
        lambda: ops.avg_pool2d(x4, 2, count_include_pad="no"),
        r"^avg_pool2d: count_include_pad must be a bool",
    ),
    "pool_output_shape ceil_mode str": (
        lambda: ops.pool_output_shape(4, 2, ceil_mode="no"),
        r"^pool_output_shape: ceil_mode must be a bool",
    ),
    "conv2d empty kernel": (lambda: ops.conv2d(x4, w4[:0]), r"^conv2d: w is an empty kernel: 0x3"),
    "convolve2d empty kernel": (lambda: ops.convolve2d(img, np.zeros((0, 0)), "full"), r"^convolve2d: kernel .* empty"),
    "corr2d empty kernel": (lambda: ops.corr2d(img, np.zeros((0, 2))), r"^corr2d: kernel \(0, 2\) is empty"),
    "conv2d NCHW x, HWIO w": (
        lambda: ops.conv2d(np.zeros((1, 3, 5, 5)), np.zeros((3, 3, 3, 8)), np.zeros(8), layout="NCHW"),
        r"^conv2d: w \(3, 3, 3, 8\) looks like an HWIO kernel, but layout NCHW takes OIHW",
    ),
    "conv2d NCHW x as NHWC": (
        lambda: ops.conv2d(np.zeros((1, 2, 5, 5)), w4),
        r"^conv2d: w expects 2 .* but x has 5 \(.*layout NHWC; x looks NCHW\)$",
    ),
    "conv2d precision": (lambda: ops.conv2d(x4, w4, precision="bogus"), r"^conv2d: precision must be None, .*'bogus'$"),
    "conv2d huge stride": (lambda: ops.conv2d(x4, w4, stride=10**30), r"^conv2d: stride must be at most 2\*\*31 - 1"),
    "max_pool2d huge stride": (
        lambda: ops.max_pool2d(x4, 2, stride=10**30),
        r"^max_pool2d: stride must be at most 2\*\*31 - 1",
    ),
    "soft_pool2d temperature str": (
        lambda: ops.soft_pool2d(x4, 2, temperature="a"),
        r"^soft_pool2d: temperature must be a positive finite number",
    ),
    "soft_pool2d temperature inf": (
        lambda: ops.soft_pool2d(x4, 2, temperature=float("inf")),
        r"^soft_pool2d: temperature must be a positive finite number",
    ),
}
ERRORS |= {
    f"conv2d {lowering} {c} -> {o} channels": (
        lambda c=c, o=o, lowering=lowering: ops.conv2d(x4[..., :c], np.zeros((3, 3, c, o)), lowering=lowering),
        rf"^conv2d: input and output channels must be >= 1, got {c} and {o}",
    )
    for lowering in ("matmul",)  # checked before any lowering is chosen
    for c, o in ((0, 4), (2, 0))
}


@pytest.mark.parametrize("name", ERRORS)
def test_bad_arguments_raise_value_error(name):
    call, message = ERRORS[name]
    with pytest.raises(ValueError, match=message) as error:
        call()
    assert "\n" not in str(error.value)  # one line


@pytest.mark.parametrize("call", [lambda: ops.min_pool2d(x4, 0), lambda: ops.min_pool2d(x4, 2, layout="CHWN")])
def test_min_pool2d_errors_name_min_pool2d(call):
    with pytest.raises(ValueError, match=r"^min_pool2d: "):
        call()


MAX_POOL_PATHS = [
    # (window, stride, padding, ceil_mode): the reshape path for non-overlapping windows ...
    (2, None, 0, False),
    ((2, 3), None, 0, False),
    # ... and the strided views for overlapping ones: ResNet's, rectangular, and partial windows
    # (ceil_mode overhanging the 7x8 input).
    (3, 2, 1, False),
    ((3, 2), (1, 2), (1, 0), False),
    (2, 1, 0, False),
    (3, 2, 0, True),
    (3, 2, 1, True),
]


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("window, stride, padding, ceil_mode", MAX_POOL_PATHS)
def test_max_pool_derivatives_are_reduce_windows(layout, window, stride, padding, ceil_mode):
    """max_pool2d's own derivatives (every path): reduce_window's where no window holds NaN, ties included."""
    x = np.random.default_rng(0).normal(size=(2, 7, 8, 3)).astype(np.float32)
    x[:, :4, :4, :] = 0.0  # all-zero windows, as after a ReLU: the first element takes the gradient
    if layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    geometry = dict(stride=stride, padding=padding, ceil_mode=ceil_mode, layout=layout)
    pool = jax.jit(lambda x: ops.max_pool2d(x, window, **geometry))
    # The window, strides and padding reduce_window needs; padding is checked against the twin elsewhere.
    _, dims, strides, pads, _ = ops._pool_setup("max_pool2d", x, window, stride, padding, ceil_mode, layout)
    pool_ref = lambda x: lax.reduce_window(x, -jnp.inf, lax.max, dims, strides, pads)  # noqa: E731
    rng = np.random.default_rng(1)
    cotangent = jnp.asarray(rng.normal(size=pool_ref(x).shape), jnp.float32)
    tangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    def derivatives(f):
        y, pullback = jax.vjp(f, jnp.asarray(x))
        return y, pullback(cotangent)[0], jax.jvp(f, (jnp.asarray(x),), (tangent,))[1]

    # Equal but for the order in which overlapping windows' shares are added (an ulp or so):
    # one share routed to another tap would differ by O(1).
    chex.assert_trees_all_close(derivatives(pool), derivatives(pool_ref), rtol=1e-6, atol=1e-6)
    # And the gradient is max_pool2d's own, not reduce_window's select-and-scatter.
    hlo = jax.jit(jax.grad(lambda x: jnp.sum(pool(x)))).lower(x).compile().as_text()
    assert "select-and-scatter" not in hlo


@pytest.mark.parametrize("window, stride", [(2, 2), (2, 1)])  # the reshape and strided-view paths
def test_max_pool_gradient_goes_to_the_last_nan(window, stride):
    """A window holding NaN pools to NaN, and its gradient goes to its last NaN, as PyTorch's does."""
    x = jnp.array([1.0, np.nan, 0.0, np.nan]).reshape(1, 2, 2, 1)
    y, pullback = jax.vjp(lambda x: ops.max_pool2d(x, window, stride=stride), x)
    assert np.isnan(y).all()
    np.testing.assert_array_equal(pullback(jnp.ones_like(y))[0].ravel(), [0, 0, 0, 1])


def test_max_pool_gradient_of_a_large_window_goes_to_its_last_nan():
    """Windows over MAX_SLICED_TAPS taps (reduce_window's value) follow the same rule."""
    x = np.arange(30.0, dtype=np.float32).reshape(1, 6, 5, 1)
    x[0, 1, 3, 0] = x[0, 4, 1, 0] = np.nan  # the second NaN is later in row-major order
    y, pullback = jax.vjp(lambda x: ops.max_pool2d(x, (6, 5)), jnp.asarray(x))
    assert np.isnan(y).all()
    expected = np.zeros_like(x)
    expected[0, 4, 1, 0] = 1
    np.testing.assert_array_equal(pullback(jnp.ones_like(y))[0], expected)


# (window, stride, padding, ceil_mode, NCHW shape): each path of max_pool2d, on few shapes (each a compile).
MAX_POOL_GRADIENT_PATHS = [
    (2, None, 0, False, (2, 2, 4, 6)),  # the reshape
    (3, 2, 0, True, (2, 2, 7, 6)),  # the strided views (CPU), with the ceil_mode overhang
    ((6, 5), (2, 3), (3, 2), True, (1, 2, 7, 6)),  # over 25 taps: windowed_max, reduce_window's value
    (3, 2, 1, True, (2, 2, 6, 5)),  # padded: windowed_max on every platform
]


@functools.cache
def max_pool_vjp(path: int, layout: str, windowed: bool = False):
    """Jitted (x, cotangent) -> (y, dx) of max_pool2d on a path, or of `windowed_max`, the path GPUs
    and TPUs take for every overlapping window (tested here on CPU)."""
    window, stride, padding, ceil_mode, _ = MAX_POOL_GRADIENT_PATHS[path]
    pool = functools.partial(ops.max_pool2d, window=window, stride=stride, padding=padding, ceil_mode=ceil_mode)
    if windowed:
        setup = functools.partial(ops._pool_setup, "max_pool2d", window=window, stride=stride, padding=padding)

        def pool(x):
            _, dims, strides, pads, _ = setup(x, ceil_mode=ceil_mode, layout=layout)
            return _lowering.windowed_max(x, dims, strides, pads)

    else:
        pool = functools.partial(pool, layout=layout)

    def vjp(x, cotangent):
        y, pullback = jax.vjp(pool, x)
        return y, pullback(cotangent)[0]

    return jax.jit(vjp)


def max_pool_gradient_case(path, layout, x_nchw):
    """max_pool2d's value and gradient on this path against the twins', for a cotangent of distinct
    integers (any misrouted share shows)."""
    window, stride, padding, ceil_mode, _ = MAX_POOL_GRADIENT_PATHS[path]
    geometry = dict(stride=stride, padding=padding, ceil_mode=ceil_mode, layout=layout)
    x = to_layout(x_nchw, layout)
    y_ref = reference.max_pool2d(x, window, **geometry)
    cotangent = (1 + np.arange(y_ref.size, dtype=np.float32)).reshape(y_ref.shape)
    dx_ref = reference.max_pool2d_grad(x, cotangent, window, **geometry)
    for windowed in (False, True) if path else (False,):
        y, dx = max_pool_vjp(path, layout, windowed)(x, cotangent)
        chex.assert_shape(dx, x.shape)
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_array_equal(dx, dx_ref)
    return dx_ref, cotangent


@pytest.mark.parametrize("path", [1, 2, 3])
def test_max_pool_gradient_of_minus_inf_windows_skips_padding(path):
    """A window of -inf that covers padding or the ceil_mode overhang sends its gradient to its
    first in-bounds element: nothing is lost to the padding."""
    dx, cotangent = max_pool_gradient_case(path, "NCHW", np.full(MAX_POOL_GRADIENT_PATHS[path][-1], -np.inf))
    assert dx.sum() == cotangent.sum()
    if path == 3:  # 3x3/2 windows start at rows -1, 1, 3, 5 (overhanging) and columns -1, 1, 3
        firsts = np.outer(np.isin(range(6), (0, 1, 3, 5)), np.isin(range(5), (0, 1, 3)))
        np.testing.assert_array_equal(dx[0, 0] != 0, firsts)


# NaNs, infinities and ties (both zeros among them) in every mix: the cases the rule is about.
SPECIAL_VALUES = st.sampled_from([np.nan, -np.inf, -np.inf, -np.inf, np.inf, 0.0, -0.0, 1.0, 1.0, 2.0])


@st.composite
def max_pool_gradient_cases(draw):
    path = draw(st.sampled_from(range(len(MAX_POOL_GRADIENT_PATHS))))
    shape = MAX_POOL_GRADIENT_PATHS[path][-1]
    values = draw(st.lists(SPECIAL_VALUES, min_size=math.prod(shape), max_size=math.prod(shape)))
    return path, draw(st.sampled_from(ops.LAYOUTS)), np.array(values, np.float32).reshape(shape)


@settings(max_examples=20, deadline=None)
@given(max_pool_gradient_cases())
def test_max_pool_gradient_matches_reference(case):
    max_pool_gradient_case(*case)


def test_max_pool_gradient_is_pytorchs():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    for path, (window, stride, padding, ceil_mode, shape) in enumerate(MAX_POOL_GRADIENT_PATHS):
        x = rng.choice(
            np.array([np.nan, -np.inf, 0.0, 1.0, 2.0, -1.0], np.float32), size=shape, p=[0.1, 0.3, 0.15, 0.2, 0.15, 0.1]
        )
        xt = torch.tensor(x, requires_grad=True)
        yt = torch.nn.functional.max_pool2d(xt, window, stride=stride, padding=padding, ceil_mode=ceil_mode)
        cotangent = (1 + np.arange(yt.numel(), dtype=np.float32)).reshape(yt.shape)
        yt.backward(torch.from_numpy(cotangent))
        for windowed in (False, True) if path else (False,):
            y, dx = max_pool_vjp(path, "NCHW", windowed)(x, cotangent)
            np.testing.assert_array_equal(y, yt.detach().numpy())
            np.testing.assert_array_equal(dx, xt.grad.numpy())
