"""conv2d's matmul and Winograd lowerings against XLA's convolution and the NumPy twin:
values, gradients, which lowering each shape gets, and the switch."""

import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

from jaxcnn import _files, _lowering, ops, reference

HIGHEST = lax.Precision.HIGHEST
assert_close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5)
# F(4x4, 3x3)'s and F(3x3, 3x3)'s transforms (coefficients up to 8 and 1/24, 4 and 1/6) cost float32
# digits: 1e-6 to 3e-6 of the largest output where F(2x2)'s and XLA's cost 1e-7
# (test_winograd_float32_error_is_stated, which bounds it); atol 5e-4 here is 2e-5 of the largest
# outputs (about 25), room for the gradients' longer sums.
assert_close_wide_winograd = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=5e-4)


def close_for(lowering):
    return assert_close_wide_winograd if lowering in _lowering.FLOAT32_WINOGRAD_CONVS else assert_close


# name: (x shape in the layout, w shape in the layout, conv2d keywords). Each
# branch of the matmul lowering, and the fallback to XLA (groups).
CASES = {
    "1x1_strided": ((2, 5, 5, 3), (1, 1, 3, 4), dict(stride=2)),  # a strided slice and a dot
    "3x3_on_2x2": ((2, 2, 2, 8), (3, 3, 8, 4), dict(padding=1)),  # map smaller than the kernel: dense
    "3x3_on_1x1": ((2, 1, 1, 8), (3, 3, 8, 4), dict(padding=1)),  # only the centre tap is live: 1x1
    "3x3_s2_to_1x1": ((2, 2, 2, 8), (3, 3, 8, 4), dict(stride=2, padding=1)),  # 2x2 live taps, cropped
    "1x1_padded": ((2, 2, 2, 8), (1, 1, 8, 4), dict(padding=1)),  # a ring of outputs that see only padding
    "only_padding": ((2, 1, 1, 8), (1, 1, 8, 4), dict(stride=3, padding=1)),  # nothing but the bias
    "3x3_wide": ((2, 4, 4, 8), (3, 3, 8, 4), dict(padding=1)),  # patches; Winograd's 2x2 tiles, one 4x4 tile
    # Winograd on odd outputs (a part tile) and uneven padding, its input gradient's padding 2 - 2 and 2 - 0;
    # padding past the kernel (the input gradient crops), in NCHW.
    "3x3_odd_uneven": ((2, 5, 7, 8), (3, 3, 8, 4), dict(padding=((2, 0), (0, 1)))),
    "3x3_wide_padding_nchw": ((2, 8, 4, 5), (4, 8, 3, 3), dict(padding=((3, 1), (0, 4)), layout="NCHW")),
    "3x3_strided": ((2, 4, 4, 3), (3, 3, 3, 4), dict(stride=2, padding=1)),  # few channels: batch-minor patches
    "asymmetric": ((2, 5, 6, 3), (2, 3, 3, 4), dict(stride=(2, 1), padding=((0, 1), (2, 0)))),
    "same_stride2": ((2, 6, 6, 2), (3, 3, 2, 3), dict(stride=2, padding="SAME")),
    "dilated": ((2, 6, 5, 3), (3, 2, 3, 4), dict(dilation=(2, 3), padding=(2, 1))),
    "dilated_dead_rows": ((2, 2, 3, 3), (3, 3, 3, 4), dict(dilation=2, padding=2)),  # kernel rows 0, 2 see padding
    "nchw": ((2, 3, 4, 5), (4, 3, 3, 2), dict(stride=(1, 2), padding=1, layout="NCHW")),
    # Strided, few channels, more than 16 outputs: "auto" takes XLA's forward, a product for dW.
    "stem": ((2, 12, 12, 3), (3, 3, 3, 4), dict(stride=2, padding=1)),
    "stem_nchw_dilated": ((2, 2, 13, 12), (4, 2, 3, 2), dict(stride=2, padding=2, dilation=(2, 3), layout="NCHW")),
    "grouped": ((2, 4, 4, 4), (3, 3, 2, 6), dict(groups=2, padding=1)),
    # Grey images under few outputs (LeNet's first layer): the forward pass a sum over taps, dW a product.
    "grey_5x5": ((2, 7, 7, 1), (5, 5, 1, 3), dict(padding=2)),
    "grey_strided_dilated": (
        (2, 9, 8, 1),
        (3, 2, 1, 4),
        dict(stride=(2, 1), dilation=(1, 2), padding=((1, 0), (2, 1))),
    ),
}


def case_args(name, seed=0, dtype=np.float32):
    x_shape, w_shape, kwargs = CASES[name]
    rng = np.random.default_rng(seed)
    x, w = (rng.normal(size=s).astype(dtype) for s in (x_shape, w_shape))
    b = rng.normal(size=w_shape[-1] if kwargs.get("layout", "NHWC") == "NHWC" else w_shape[0]).astype(dtype)
    return x, w, b, kwargs


def conv(lowering, kwargs):
    return jax.jit(conv_fn(lowering, kwargs))


def lowerings_for(name) -> list[str]:
    """The lowerings worth comparing on a case: "tune" is "auto" with measured choices (test_tune_*), and
    Winograd's, where it does not apply, "auto"'s choice again (test_lowering_chosen holds that)."""
    _, w_shape, kwargs = CASES[name]
    kernel_hw = w_shape[2:] if kwargs.get("layout") == "NCHW" else w_shape[:2]
    as_pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    applies = _lowering.winograd_applies(
        kernel_hw, as_pair(kwargs.get("stride", 1)), as_pair(kwargs.get("dilation", 1))
    )
    return [lo for lo in _lowering.LOWERINGS if lo != "tune" and (applies or lo not in _lowering.WINOGRAD_CONVS)]


def conv_fn(lowering, kwargs):
    """ops.conv2d with these keywords and lowering, at full float32 precision."""
    return functools.partial(ops.conv2d, **kwargs, precision=HIGHEST, lowering=lowering)


def compiled_hlo(f, *shapes):
    """The optimised HLO XLA compiles for f on these shapes (nothing is allocated or run)."""
    return jax.jit(f).lower(*(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes)).compile().as_text()


def weight_grad_3x3_same(x, dy) -> np.ndarray:
    """The float64 weight gradient of a 3x3, stride-1, padding-1 convolution: dW[a, b] sums, over
    images and outputs, the padded input's view at tap (a, b) times dY."""
    h, w = x.shape[1:3]
    xp = np.pad(np.float64(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
    return np.array([[np.einsum("nijc,nijo->co", xp[:, a : a + h, b : b + w], dy) for b in range(3)] for a in range(3)])


@pytest.mark.parametrize("name", CASES)
def test_values_equal_xla_and_twin(name):
    x, w, b, kwargs = case_args(name)
    want = reference.conv2d(x, w, b, **kwargs)
    ys = {lowering: conv(lowering, kwargs)(x, w, b) for lowering in lowerings_for(name)}
    for lowering, y in ys.items():
        chex.assert_shape(y, want.shape)
        close_for(lowering)(y, want, err_msg=lowering)
    assert_close(ys["matmul"], ys["xla"])


@pytest.mark.parametrize("name", CASES)
def test_gradients_equal_xla(name):
    x, w, b, kwargs = case_args(name)
    y_shape = reference.conv2d(x, w, b, **kwargs).shape
    cotangent = np.random.default_rng(1).normal(size=y_shape).astype(np.float32)

    def grads(lowering):
        def loss(x, w, b):
            return jnp.vdot(conv_fn(lowering, kwargs)(x, w, b), cotangent)

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, w, b)

    want = grads("xla")
    for lowering in [lo for lo in lowerings_for(name) if lo != "xla"]:
        got = grads(lowering)
        chex.assert_trees_all_equal_shapes(got, (x, w, b))
        for g, h, what in zip(got, want, ("x", "w", "b")):
            if name != "only_padding":  # there x and w do not matter
                assert np.abs(h).max() > 0, what  # a zero gradient would match anything
            close_for(lowering)(g, h, err_msg=f"{lowering}: d/d{what}")


@pytest.mark.parametrize("name", ["1x1_strided", "asymmetric", "dilated", "nchw"])
def test_matmul_gradients_match_finite_differences(name):
    x, w, b, kwargs = case_args(name, dtype=np.float64)
    with jax.enable_x64(True):
        check_grads(conv("matmul", kwargs), (x, w, b), order=1, modes=("fwd", "rev"))


@pytest.mark.parametrize(
    "lowering, x_shape, w_shape, kwargs, uses_conv",
    [
        ("xla", (2, 2, 2, 8), (3, 3, 8, 4), dict(padding=1), True),
        ("matmul", (2, 2, 2, 8), (3, 3, 8, 4), dict(padding=1), False),
        ("matmul", (2, 4, 4, 4), (3, 3, 2, 6), dict(padding=1, groups=2), True),  # groups fall back
        ("auto", (2, 2, 2, 8), (3, 3, 8, 4), dict(padding=1), False),
        ("auto", (256, 24, 24, 64), (3, 3, 64, 64), dict(padding=1), False),  # ResNet-18's first stage at 96 px
        ("auto", (2, 5, 5, 3), (1, 1, 3, 4), dict(stride=2), False),  # 1x1: a dot, however few channels
        ("auto", (2, 28, 28, 1), (5, 5, 1, 6), dict(padding=2), None),  # LeNet's first layer: a sum over taps
        ("auto", (2, 32, 32, 1), (7, 7, 1, 64), dict(stride=2, padding=3), True),  # ResNet's stem: strided
        ("auto", (8, 32, 32, 16), (3, 3, 16, 32), dict(padding=1), True),  # 16 channels on a large map
        ("auto", (8, 8, 8, 64), (3, 3, 64, 64), dict(padding=1), True),  # wide, but 512 rows
        ("auto", (64, 8, 8, 64), (3, 3, 64, 64), dict(padding=1), False),  # wide, 4096 rows
        ("auto", (8, 4, 4, 16), (3, 3, 16, 32), dict(padding=1), False),  # 16 channels on a 4x4 map
        ("winograd", (2, 6, 6, 8), (3, 3, 8, 4), dict(padding=1), False),
        ("winograd", (2, 8, 8, 8), (3, 3, 8, 4), dict(padding=2, dilation=2), True),  # not 3x3 stride 1: "auto"'s
        ("winograd_3x3", (2, 6, 6, 8), (3, 3, 8, 4), dict(padding=1), False),
        ("winograd_4x4", (2, 6, 6, 8), (3, 3, 8, 4), dict(padding=1), False),
        ("winograd_4x4", (2, 8, 8, 8), (3, 3, 8, 4), dict(padding=2, dilation=2), True),
    ],
)
def test_lowering_chosen(lowering, x_shape, w_shape, kwargs, uses_conv):
    hlo = compiled_hlo(functools.partial(ops.conv2d, **kwargs, lowering=lowering), x_shape, w_shape)
    assert ("convolution(" in hlo) == (uses_conv is True)  # None: neither a convolution nor a product
    assert ("dot(" in hlo) == (uses_conv is False)


def test_stem_weight_gradient_is_a_product():
    """ "auto" on a strided kernel over few channels: XLA's convolution forward, and the weight
    gradient as patches @ dY, not XLA's weight-gradient convolution."""
    x_shape, w_shape, kwargs = (2, 32, 32, 1), (7, 7, 1, 64), dict(stride=2, padding=3)

    def weight_grad(x, w):
        return jax.grad(lambda w: jnp.sum(ops.conv2d(x, w, **kwargs, lowering="auto") ** 2))(w)

    hlo = compiled_hlo(weight_grad, x_shape, w_shape)
    assert hlo.count("convolution(") == 1 and "dot(" in hlo


def test_stem_patches_too_large_take_xlas_weight_gradient(monkeypatch):
    """Past MAX_XLA_FORWARD_PATCH_BYTES "auto" keeps XLA's weight gradient, which builds no patch matrix."""
    monkeypatch.setattr(_lowering, "MAX_XLA_FORWARD_PATCH_BYTES", 1024)
    x_shape, w_shape, kwargs = (2, 32, 32, 1), (7, 7, 1, 64), dict(stride=2, padding=3)

    def weight_grad(x, w):
        return jax.grad(lambda w: jnp.sum(ops.conv2d(x, w, **kwargs, lowering="auto") ** 2))(w)

    assert compiled_hlo(weight_grad, x_shape, w_shape).count("convolution(") == 2


def test_environment_switch_read_at_trace_time(monkeypatch):
    # A fresh function each time: jit caches a traced function, lowering and all.
    shapes = (2, 2, 2, 8), (3, 3, 8, 4)
    monkeypatch.setenv(_lowering.ENV_VAR, "xla")
    assert "convolution(" in compiled_hlo(functools.partial(ops.conv2d, padding=1), *shapes)
    monkeypatch.setenv(_lowering.ENV_VAR, "matmul")
    assert "convolution(" not in compiled_hlo(functools.partial(ops.conv2d, padding=1), *shapes)
    # The keyword wins over the environment.
    assert "convolution(" in compiled_hlo(lambda x, w: ops.conv2d(x, w, padding=1, lowering="xla"), *shapes)


@pytest.mark.parametrize(  # batch-minor, plain patches, Winograd tiles
    "channels, lowering", [(3, "matmul"), (8, "matmul"), (8, "winograd"), (8, "winograd_3x3"), (8, "winograd_4x4")]
)
def test_empty_batch(channels, lowering):
    x, w = np.ones((0, 5, 5, channels), np.float32), np.ones((3, 3, channels, 4), np.float32)
    chex.assert_shape(ops.conv2d(x, w, padding=1, lowering=lowering), (0, 5, 5, 4))
    dw = jax.grad(lambda w: ops.conv2d(x, w, padding=1, lowering=lowering).sum())(w)
    np.testing.assert_array_equal(dw, np.zeros_like(w))  # no images, no gradient


def test_tune_times_each_lowering_once_and_auto_follows(tune_cache, monkeypatch):
    x, w, b, kwargs = case_args("3x3_odd_uneven")  # every CPU lowering applies, Winograd's too
    want = reference.conv2d(x, w, b, **kwargs)
    assert_close(conv("tune", kwargs)(x, w, b), want)
    (timed,) = json.loads(tune_cache.read_text()).values()  # one machine
    (entry,) = timed.values()  # one shape
    assert set(entry["ms"]) == {"xla", "matmul", "xla_forward", "winograd", "winograd_3x3", "winograd_4x4"}
    assert all(ms > 0 for ms in entry["ms"].values())
    # Timed once: neither "tune" nor "auto" times it again, in fresh traces and (reading the file) a fresh process.
    monkeypatch.setattr(_lowering, "_time_lowerings", lambda *args: pytest.fail("timed twice"))
    monkeypatch.setattr(_lowering, "_TIMINGS", {})
    for lowering in ("tune", "auto"):
        assert_close(conv(lowering, kwargs)(x, w, b), want, err_msg=lowering)


@pytest.fixture
def lowerings_called(monkeypatch) -> list:
    """The names of the CPU lowerings ops.conv2d calls from now on, in order."""
    called = []
    for name, lowered in list(_lowering.CPU_CONVS.items()):
        spy = lambda *args, name=name, lowered=lowered, **kwargs: called.append(name) or lowered(*args, **kwargs)  # noqa: E731
        monkeypatch.setitem(_lowering.CPU_CONVS, name, spy)
    return called


def test_auto_takes_what_was_timed_on_this_machine(tune_cache, lowerings_called):
    shapes = (2, 2, 2, 8), (3, 3, 8, 4)  # a map of 4 pixels: the thresholds take the product
    key = _lowering._shape_key(*shapes, np.float32, (1, 1), ((1, 1), (1, 1)), (1, 1))
    called = lowerings_called

    def taken(cache) -> str:  # the lowering a fresh trace takes with this cache file
        _files.write_atomic(tune_cache, cache if isinstance(cache, str) else json.dumps(cache))
        called.clear()
        jax.jit(functools.partial(ops.conv2d, padding=1)).lower(*(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes))
        return called[0] if called else "xla"  # ops.conv2d's own XLA convolution

    here = _lowering.machine()
    assert taken("{}") == "matmul"
    assert taken({here: {key: {"ms": {"xla": 1, "matmul": 2, "winograd": 3}}}}) == "xla"
    assert taken({here: {key: {"ms": {"xla": 3, "matmul": 2, "winograd": 1}}}}) == "winograd"
    assert taken({here: {key: {"ms": {"matmul": 1.04, "winograd": 1}}}}) == "matmul"  # within TUNE_MARGIN
    # Another machine's timings and damaged files or entries leave the thresholds' choice.
    for cache in (
        {"another machine": {key: {"ms": {"xla": 1, "matmul": 2}}}},
        '{"half a file',
        [],
        {here: []},
        {here: {key: {"ms": {"xla": "1", "matmul": 2}}}},
        {here: {key: {"ms": {"fast": 1, "matmul": 2}}}},  # not a lowering of this shape
        {here: {key: {"ms": {"xla": 1, "winograd": 2}}}},  # timed before the thresholds' choice was a lowering
        {here: {key: {"ms": []}}},
    ):
        assert taken(cache) == "matmul", cache


def test_tune_replaces_a_damaged_cache_and_survives_an_unwritable_one(tune_cache, tmp_path, monkeypatch):
    x, w, b, kwargs = case_args("1x1_strided")
    want = reference.conv2d(x, w, b, **kwargs)
    tune_cache.write_text('{"half a file')
    assert_close(conv("tune", kwargs)(x, w, b), want)
    cache = json.loads(tune_cache.read_text())
    assert list(cache) == [_lowering.machine()]
    (entry,) = cache[_lowering.machine()].values()
    assert set(entry["ms"]) == {"xla", "matmul", "xla_forward"}  # no Winograd for a strided 1x1
    assert list(tune_cache.parent.iterdir()) == [tune_cache]  # no temporary file left behind
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv(_lowering.TUNE_CACHE_ENV, str(tmp_path / "a_file" / "conv_lowerings.json"))
    with pytest.warns(UserWarning, match=r"^conv2d: could not write the tuning cache .*a_file"):
        assert_close(conv("tune", kwargs)(x, w, b), want)
    # Timed once all the same: this process remembers.
    monkeypatch.setattr(_lowering, "_time_lowerings", lambda *args: pytest.fail("timed twice"))
    assert_close(conv("tune", kwargs)(x, w, b), want)


def test_tune_times_nothing_off_the_cpu_or_for_shapes_alone(tune_cache, monkeypatch):
    from jaxcnn import analysis, models

    monkeypatch.setenv(_lowering.ENV_VAR, "tune")
    with monkeypatch.context() as patched:
        patched.setattr(_lowering, "_time_lowerings", lambda *args: pytest.fail("timed"))
        analysis.model_cost(models.create("lenet"), (4, 28, 28, 1))  # jax.eval_shape: nothing runs
        patched.setattr(jax, "default_backend", lambda: "gpu")
        x, w, b, kwargs = case_args("3x3_wide")
        assert_close(conv("tune", kwargs)(x, w, b), reference.conv2d(x, w, b, **kwargs))
    assert not tune_cache.exists()
    # On the CPU it times even where the caller allows no transfers, in bfloat16 too.
    x, w = jnp.ones((2, 4, 4, 8), jnp.bfloat16), jnp.ones((3, 3, 8, 4), jnp.bfloat16)
    with jax.transfer_guard("disallow"):
        y = jax.jit(functools.partial(ops.conv2d, padding=1))(x, w)
    assert y.dtype == jnp.bfloat16 and "bfloat16" in tune_cache.read_text()


def test_bad_lowering(monkeypatch):
    x, w = np.ones((1, 3, 3, 1), np.float32), np.ones((1, 1, 1, 1), np.float32)
    with pytest.raises(ValueError, match=r"^conv2d: lowering must be one of .*'fast'"):
        ops.conv2d(x, w, lowering="fast")
    monkeypatch.setenv(_lowering.ENV_VAR, "MATMUL")
    with pytest.raises(ValueError, match=r"^conv2d: \$JAXCNN_CONV_LOWERING must be one of .*'MATMUL'"):
        ops.conv2d(x, w)


def test_bfloat16_keeps_its_dtype():
    x, w, _, kwargs = case_args("3x3_strided")
    x, w = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    ys = {lowering: conv(lowering, kwargs)(x, w) for lowering in ("matmul", "xla")}
    assert ys["matmul"].dtype == ys["xla"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(ys["matmul"]), np.float32(ys["xla"]), rtol=2e-2, atol=5e-2)
    # Winograd, and "auto" where it takes Winograd (its branches must agree on the dtype).
    x, w = jnp.ones((64, 8, 8, 64), jnp.bfloat16), jnp.full((3, 3, 64, 64), 0.5, jnp.bfloat16)
    assert _lowering.auto_choice(64, 64, (3, 3), (1, 1), (8, 8)) == "winograd"
    ys = {lowering: conv(lowering, dict(padding=1))(x, w) for lowering in ("winograd", "auto", "xla")}
    assert {y.dtype for y in ys.values()} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_array_equal(np.float32(ys["winograd"]), np.float32(ys["xla"]))  # sums of halves: exact
    # F(4x4), forced: bfloat16 in and out, but why "auto" takes F(3x3) and F(4x4) in float32 only. The
    # transforms' coefficients (up to 8 and 1/24) cost bfloat16 most of its digits: 12% of the largest
    # output off here (F(3x3) 5%), where F(2x2) is 0.6% off. (One case: a bfloat16 compile takes seconds.)
    rng = np.random.default_rng(0)
    x, w = (jnp.asarray(rng.standard_normal(s), jnp.bfloat16) for s in ((4, 12, 12, 16), (3, 3, 16, 8)))
    y, y_xla = (conv(lowering, dict(padding=1))(x, w) for lowering in ("winograd_4x4", "xla"))
    assert y.dtype == jnp.bfloat16
    assert np.abs(np.float32(y) - np.float32(y_xla)).max() < 0.16 * np.abs(np.float32(y_xla)).max()


@pytest.mark.parametrize("m", [3, 4])
def test_output_transform_is_from_tiles_sums(m):
    # The product form of F(3x3)'s and F(4x4)'s output transform keeps `_from_tiles`' (row, column) order.
    at = _lowering.WINOGRAD[m][2]
    t = jax.random.normal(jax.random.key(m), ((m + 2) ** 2, 5, 7))
    y, y_sums = jax.jit(lambda t: (_lowering._output_transform(t, at), _lowering._from_tiles(t, at)))(t)
    chex.assert_shape(y, (m, m, 5, 7))
    np.testing.assert_allclose(y, y_sums, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name, lowering",
    [
        ("asymmetric", "matmul"),
        ("grey_5x5", "matmul"),
        ("3x3_wide", "matmul"),
        ("3x3_wide", "winograd"),
        ("3x3_wide", "winograd_3x3"),
        ("3x3_wide", "winograd_4x4"),
    ],
)
def test_chunked_batches_equal_xla(monkeypatch, name, lowering):
    """Patches over CHUNK_BYTES (or Winograd tiles over WINOGRAD_CHUNK_BYTES) are built a few images
    at a time, in a loop, and rebuilt for the gradient."""
    x, w, b, kwargs = case_args(name, seed=3)
    # Bytes of one image's patch matrix, or of its 16 x 2 x 2 (25 x 2 x 2, 36 x 1 x 1) transformed tiles of 8 channels.
    tiles = {"winograd": 2048, "winograd_3x3": 3200, "winograd_4x4": 1152}
    per_image = {"asymmetric": 1296, "grey_5x5": 4900, "3x3_wide": tiles.get(lowering, 4608)}[name]
    monkeypatch.setattr(_lowering, "WINOGRAD_CHUNK_BYTES" if lowering in tiles else "CHUNK_BYTES", 3 * per_image)
    monkeypatch.setattr(_lowering, "WINOGRAD_MIN_TILES", 1)
    x = np.concatenate([x, x[:1] + 1, -x, 2 * x])  # N = 7: two chunks of 3 (a loop that sums) and a remainder
    assert "while" in compiled_hlo(lambda x, w: ops.conv2d(x, w, **kwargs, lowering=lowering), x.shape, w.shape)
    close_for(lowering)(conv(lowering, kwargs)(x, w, b), reference.conv2d(x, w, b, **kwargs))

    def grad_fn(lowering):
        return jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(conv_fn(lowering, kwargs)(x, w))), (0, 1)))

    assert "while" in grad_fn(lowering).lower(x, w).compile().as_text()  # the gradients loop over chunks too
    for g, h in zip(grad_fn(lowering)(x, w), grad_fn("xla")(x, w)):
        # A weight gradient sums hundreds of products, over 3 chunks here (F(3x3), F(4x4):
        # see assert_close_wide_winograd).
        np.testing.assert_allclose(g, h, rtol=1e-4, atol=5e-4 if lowering in _lowering.FLOAT32_WINOGRAD_CONVS else 1e-4)


def test_winograd_chunks_hold_a_floor_of_tiles_for_kernels_out_of_cache():
    """Images per chunk: WINOGRAD_CHUNK_BYTES of tiles, but WINOGRAD_MIN_TILES where the transformed
    kernel is over WINOGRAD_CACHED_KERNEL_BYTES, within WINOGRAD_MAX_CHUNK_BYTES."""

    def chunk(shape, m, o):
        x = jax.ShapeDtypeStruct(shape, jnp.float32)
        return _lowering._winograd_chunk(x, -(-shape[1] // m), -(-shape[2] // m), m, o)

    # 24x24x64 under F(4x4): a 0.6 MB kernel, 8 MiB of 332 KB images, 25, taken down to 16 (a divisor).
    assert chunk((256, 24, 24, 64), 4, 64) == 16
    assert chunk((256, 12, 12, 128), 4, 128) == 256  # 2.4 MB: 4,096 tiles of 9 an image, the whole batch
    assert chunk((256, 3, 3, 512), 3, 512) == 256  # F(3x3) on ResNet-18's stage 4: 26 MB
    assert chunk((256, 3, 3, 256), 3, 512) == 256  # the input gradient's, channels swapped: as large
    assert chunk((256, 28, 28, 512), 4, 512) == 16  # 28x28x512: the floor capped at 64 MiB, 18 images of 3.6 MB


def test_winograd_bfloat16_weight_gradient_sums_in_float32(monkeypatch):
    """bfloat16 in and out, but the weight gradient's tile sums carry float32 from chunk to chunk
    (bfloat16 keeps 8 bits). Small integers in: the float32 sums are exact, so the gradient is the
    exact one rounded once to bfloat16."""
    monkeypatch.setattr(_lowering, "WINOGRAD_CHUNK_BYTES", 2 * 16 * 16 * 8 * 2)  # 2 images a chunk: 16 chunks
    rng = np.random.default_rng(0)
    x, dy = rng.integers(0, 4, (32, 8, 8, 8)), rng.integers(0, 4, (32, 8, 8, 4))
    w = jnp.full((3, 3, 8, 4), 0.5, jnp.bfloat16)
    conv_bf16 = functools.partial(conv_fn("winograd", dict(padding=1)), jnp.asarray(x, jnp.bfloat16))
    dw = jax.vjp(conv_bf16, w)[1](jnp.asarray(dy, jnp.bfloat16))[0]
    assert dw.dtype == jnp.bfloat16
    want = weight_grad_3x3_same(x, dy)
    np.testing.assert_array_equal(np.float32(dw), np.float32(jnp.asarray(want, jnp.bfloat16)))


@pytest.mark.parametrize(
    "n, k, stride, dilation, lo, out, live",
    [
        (1, 3, 1, 1, 1, 1, (1, 1)),  # 1x1 map, padding 1: the centre tap
        (2, 3, 2, 1, 1, 1, (1, 2)),  # 2x2 -> 1x1 with stride 2: the first tap is all padding
        (4, 3, 1, 1, 1, 4, (0, 2)),  # every tap meets the input somewhere
        (1, 3, 1, 2, 2, 1, (1, 1)),  # dilated: taps 0 and 2 fall in the padding
        (1, 1, 3, 1, 1, 1, None),  # the one output reads only padding
    ],
)
def test_live_taps(n, k, stride, dilation, lo, out, live):
    assert _lowering._live_taps(n, k, stride, dilation, lo, out) == live


def test_forward_mode_and_per_example_gradients():
    """The lowering keeps jax.jvp (custom_jvp, not custom_vjp) and vmap of grad working."""
    x, w, _, kwargs = case_args("stem")
    tangents = (np.ones_like(x), np.ones_like(w))
    # "auto" takes XLA's forward and a product for the weight (a strided kernel on 3 channels).
    assert _lowering.auto_choice(2, 3, (3, 3), (2, 2), (6, 6)) == "xla_forward"
    lowerings = ("matmul", "auto", "xla")
    jvp = {lowering: jax.jvp(conv_fn(lowering, kwargs), (x, w), tangents)[1] for lowering in lowerings}

    def per_example(lowering):
        return jax.vmap(jax.grad(lambda xi, w: jnp.sum(conv_fn(lowering, kwargs)(xi[None], w) ** 2), 1), (0, None))

    for lowering in ("matmul", "auto"):
        assert_close(jvp[lowering], jvp["xla"], err_msg=lowering)
        assert_close(per_example(lowering)(x, w), per_example("xla")(x, w), err_msg=lowering)


def test_grey_images_sum_over_taps_forward_and_keep_forward_mode(monkeypatch):
    """A float32 grey image under few outputs convolves as a sum over kernel taps (_tap_sum), in
    jax.jvp too; wider inputs, more outputs and other dtypes build patches."""
    summed = []
    weighted_views = _lowering._weighted_views
    monkeypatch.setattr(_lowering, "_weighted_views", lambda *a: summed.append(a[1].shape) or weighted_views(*a))
    x, w, _, kwargs = case_args("grey_strided_dilated")
    tangents = (np.ones_like(x), np.ones_like(w))
    got = jax.jvp(conv_fn("matmul", kwargs), (x, w), tangents)
    want = jax.jvp(conv_fn("xla", kwargs), (x, w), tangents)
    assert summed  # the value, and the tangent of x
    for g, h in zip(got, want):
        assert_close(g, h)
    # The weight gradient is a product with the patches, and no convolution anywhere.
    hlo = jax.jit(jax.grad(lambda w: jnp.sum(conv_fn("matmul", kwargs)(x, w) ** 2))).lower(w).compile().as_text()
    assert "dot(" in hlo and "convolution(" not in hlo
    summed.clear()
    for shape, o, dtype in [
        ((2, 9, 8, 2), 4, np.float32),
        ((2, 9, 8, 1), 17, np.float32),
        ((2, 9, 8, 1), 4, jnp.bfloat16),
    ]:
        jax.eval_shape(conv_fn("matmul", kwargs), jnp.zeros(shape, dtype), jnp.zeros((3, 2, shape[3], o), dtype))
    assert summed == []


def test_winograd_forward_mode_and_choice():
    """Winograd's custom_jvp keeps jax.jvp working; "auto" takes it for ResNet's wide 3x3 stride-1
    convolutions only, F(4x4) on float32 maps of 12x12 and more, F(3x3) on smaller ones of whole 3x3 tiles."""
    x, w, _, kwargs = case_args("3x3_wide")
    tangents = (np.ones_like(x), np.ones_like(w))
    lowerings = ("winograd", "winograd_3x3", "winograd_4x4", "xla")
    # Jitted: run op by op, Winograd's many small ops each compile on their own (seconds).
    jvp = {
        lowering: jax.jit(jax.jvp, static_argnums=0)(conv_fn(lowering, kwargs), (x, w), tangents)[1]
        for lowering in lowerings
    }
    assert_close(jvp["winograd"], jvp["xla"])
    assert_close_wide_winograd(jvp["winograd_3x3"], jvp["xla"])
    assert_close_wide_winograd(jvp["winograd_4x4"], jvp["xla"])
    assert _lowering.auto_choice(256, 64, (3, 3), (1, 1), (24, 24)) == "winograd_4x4"  # ResNet-18's stage 1 at 96 px
    assert _lowering.auto_choice(256, 128, (3, 3), (1, 1), (12, 12)) == "winograd_4x4"  # and stage 2
    assert _lowering.auto_choice(256, 256, (3, 3), (1, 1), (6, 6)) == "winograd_3x3"  # stage 3: 2x2 whole 3x3 tiles
    assert _lowering.auto_choice(256, 512, (3, 3), (1, 1), (3, 3)) == "winograd_3x3"  # stage 4: one tile
    assert _lowering.auto_choice(128, 512, (3, 3), (1, 1), (3, 3)) == "winograd_3x3"  # 128 tiles, 1,152 rows
    assert _lowering.auto_choice(127, 512, (3, 3), (1, 1), (3, 3)) == "matmul"  # 127 tiles
    assert _lowering.auto_choice(16, 128, (3, 3), (1, 1), (9, 9)) == "winograd_3x3"  # 144 tiles
    assert _lowering.auto_choice(256, 128, (3, 3), (1, 1), (6, 8)) == "winograd"  # not whole 3x3 tiles
    assert _lowering.auto_choice(256, 256, (3, 3), (1, 1), (6, 6), dtype=jnp.bfloat16) == "winograd"
    assert _lowering.auto_choice(256, 64, (3, 3), (1, 1), (24, 24), dtype=jnp.bfloat16) == "winograd"
    assert _lowering.auto_choice(256, 64, (3, 3), (1, 1), (24, 24), dilation=(2, 2)) == "matmul"
    assert _lowering.auto_choice(256, 32, (3, 3), (1, 1), (24, 24)) == "matmul"  # narrower: patches
    assert _lowering.auto_choice(256, 256, (3, 3), (1, 1), (4, 4)) == "winograd"  # a 4x4 map: 2x2 whole tiles
    assert _lowering.auto_choice(256, 256, (3, 3), (1, 1), (2, 2)) == "matmul"  # one tile, 4x4 for 2x2
    assert _lowering.auto_choice(256, 64, (3, 3), (1, 1), (2, 9)) == "winograd"  # thin, but 18 pixels


def test_auto_asks_with_the_dtype(tune_cache, lowerings_called):
    """ops.conv2d's choice sees the input's dtype: F(4x4) in float32, F(2x2) in bfloat16."""
    for dtype, want in ((jnp.float32, "winograd_4x4"), (jnp.bfloat16, "winograd")):
        lowerings_called.clear()
        shapes = (32, 12, 12, 64), (3, 3, 64, 8)  # 4,608 output rows
        jax.jit(functools.partial(ops.conv2d, padding=1)).lower(*(jax.ShapeDtypeStruct(s, dtype) for s in shapes))
        assert lowerings_called == [want], dtype


def test_winograd_float32_error_is_stated():
    """Float32 error against the float64 twin, relative to the largest output, measured on 13x13 maps
    (F(4x4)'s last tile part padding):
    - F(2x2, 3x3)'s transforms add and halve: within twice that of XLA's direct convolution (both
      about 1e-7); its weight gradient's, which transforms both x and dY, within 3x (1.0-1.8x, 4e-7 to 9e-7).
    - F(4x4, 3x3)'s coefficients up to 8 and 1/24 cost 3-5 bits: 1e-6 to 3e-6 forward and for the
      weight gradient, up to 30x XLA's; asserted below 5e-6.
    - F(3x3, 3x3)'s, up to 4 and 1/6, about as many; asserted below 5e-6 too.
    The input gradient, each one's algorithm on dY with the kernel's adjoint, is bounded as its forward is."""
    rng = np.random.default_rng(5)
    x, w, dy = rng.normal(size=(2, 13, 13, 64)), rng.normal(size=(3, 3, 64, 8)), rng.normal(size=(2, 13, 13, 8))
    want = reference.conv2d(x, w, padding=1)
    want_dw = weight_grad_3x3_same(x, dy)
    want_dx = reference.conv2d(dy, np.flip(w, (0, 1)).transpose(0, 1, 3, 2), padding=1)

    @functools.partial(jax.jit, static_argnums=0)  # op by op, Winograd's many small ops would each compile
    def value_and_grads(lowering, x, w, dy):
        y, vjp = jax.vjp(conv_fn(lowering, {"padding": 1}), x, w)
        return y, *vjp(dy)

    err, err_dx, err_dw = {}, {}, {}
    for lowering in ("winograd", "winograd_3x3", "winograd_4x4", "xla"):
        y, dx, dw = value_and_grads(lowering, np.float32(x), np.float32(w), np.float32(dy))
        err[lowering] = np.abs(y - want).max() / np.abs(want).max()
        err_dx[lowering] = np.abs(dx - want_dx).max() / np.abs(want_dx).max()
        err_dw[lowering] = np.abs(dw - want_dw).max() / np.abs(want_dw).max()
    assert err["winograd"] < max(2 * err["xla"], 2e-7), err
    assert err_dx["winograd"] < max(2 * err_dx["xla"], 2e-7), err_dx
    assert err_dw["winograd"] < max(3 * err_dw["xla"], 3e-7), err_dw
    for lowering in _lowering.FLOAT32_WINOGRAD_CONVS:
        assert max(err[lowering], err_dx[lowering], err_dw[lowering]) < 5e-6, (err, err_dx, err_dw)
        assert err[lowering] > err["winograd"]  # not F(2x2) under another name
    assert err["winograd_3x3"] != err["winograd_4x4"]  # nor F(3x3) and F(4x4) one algorithm
