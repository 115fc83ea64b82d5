"""Convolution and pooling as pure, jit-able, differentiable JAX functions.

The chapter ops (`corr2d`, `corr2d_multi_in`, `pool2d`, ...) work on single
images the way the notes write them; `conv2d`, `max_pool2d` and `avg_pool2d`
are the batched ops the models use, with PyTorch's semantics for padding,
stride, dilation, groups, `ceil_mode` and `count_include_pad`.

Everything lowers to `jax.lax.conv_general_dilated` and
`jax.lax.reduce_window` with explicit dimension numbers, except where XLA's
CPU is slow: there `conv2d` is patches and one matrix product, or
Winograd's F(2x2, 3x3) or F(4x4, 3x3) (`jaxcnn._lowering`; its `lowering=` switch picks). Max pooling is
differentiated on every platform through a reshape or strided views of its
input (`jaxcnn._lowering`), never reduce_window's select-and-scatter, so that
its gradient is PyTorch's to the element, NaN and -inf included. Pooling
windows that tile the map (2x2/2, or global pooling of up to 25 pixels) are
a reshape (max) or a sum of strided views (average) on every platform. Every public function
checks its arguments and raises `ValueError` naming the function, the argument
and the shapes; shapes are static, so the checks cost nothing under `jax.jit`.
`jaxcnn.reference` holds the naive twin of each function, the tests' oracle.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxcnn import _checks, _lowering

Pair = int | tuple[int, int]
Padding = int | str | tuple[int, int] | tuple[tuple[int, int], tuple[int, int]]

LAYOUTS = ("NHWC", "NCHW")
KERNEL_LAYOUTS = {"NHWC": "HWIO", "NCHW": "OIHW"}
# (input, kernel, output) dimension numbers for lax.conv_general_dilated.
_CONV_DIMS = {"NHWC": ("NHWC", "HWIO", "NHWC"), "NCHW": ("NCHW", "OIHW", "NCHW")}

__all__ = [
    "corr2d",
    "convolve2d",
    "corr2d_multi_in",
    "corr2d_multi_in_out",
    "corr2d_multi_in_out_1x1",
    "pool2d",
    "conv2d",
    "conv_output_shape",
    "pool_output_shape",
    "max_pool2d",
    "avg_pool2d",
    "min_pool2d",
    "soft_pool2d",
]


# --------------------------------------------------------------------------
# Output shapes, and pooling's rules (the checks themselves are `jaxcnn._checks`); the twins in
# reference.py share them.


def conv_output_shape(
    input_hw: Pair,
    kernel_hw: Pair,
    *,
    stride: Pair = 1,
    padding: Padding = 0,
    dilation: Pair = 1,
) -> tuple[int, int]:
    """Output (h, w) of a convolution: the notes' floor((n - k + p + s) / s).

    p is the total padding along an axis (both sides) and k the dilated
    kernel extent (k - 1) * dilation + 1. Agrees with what `conv2d` returns.
    """
    fn = "conv_output_shape"
    input_hw = _checks.pair(fn, "input_hw", input_hw, minimum=1)
    kernel_hw = _checks.pair(fn, "kernel_hw", kernel_hw, minimum=1)
    stride, dilation, pads = _checks.conv_geometry(fn, input_hw, kernel_hw, stride, padding, dilation)
    return tuple(
        (n - ((k - 1) * d + 1) + lo + hi + s) // s
        for n, k, (lo, hi), s, d in zip(input_hw, kernel_hw, pads, stride, dilation)
    )


def pool_output_shape(
    input_hw: Pair,
    window: Pair,
    *,
    stride: Pair | None = None,
    padding: Pair = 0,
    ceil_mode: bool = False,
) -> tuple[int, int]:
    """Output (h, w) of PyTorch-style pooling (stride defaults to the window).

    With ceil_mode the division rounds up, but the last window must start
    inside the input or its left/top padding, as in PyTorch.
    """
    fn = "pool_output_shape"
    input_hw = _checks.pair(fn, "input_hw", input_hw, minimum=1)
    ceil_mode = _checks.boolean(fn, "ceil_mode", ceil_mode)
    window, stride, padding = _pool_geometry(fn, input_hw, window, stride, padding)
    return _pool_out(input_hw, window, stride, padding, ceil_mode)


def _pool_out(input_hw, window, stride, padding, ceil_mode) -> tuple[int, int]:
    out = []
    for n, k, s, p in zip(input_hw, window, stride, padding):
        span = n + 2 * p - k
        o = (-(-span // s) if ceil_mode else span // s) + 1
        if ceil_mode and (o - 1) * s >= n + p:
            o -= 1
        out.append(o)
    return tuple(out)


def _pool_geometry(fn, input_hw, window, stride, padding):
    window, stride, padding = _checks.pool_pairs(fn, window, stride, padding)
    for axis, k, p in zip("HW", window, padding):
        # PyTorch's rule: a window never lies wholly in the padding.
        if p > k // 2:
            _checks.fail(fn, f"padding {p} along {axis} must be at most half the window ({k})")
    _checks.fits(fn, "window", input_hw, [(p, p) for p in padding], window)
    return window, stride, padding


# --------------------------------------------------------------------------
# The batched ops.


def conv2d(
    x,
    w,
    b=None,
    *,
    stride: Pair = 1,
    padding: Padding = 0,
    dilation: Pair = 1,
    groups: int = 1,
    layout: str = "NHWC",
    precision=None,
    lowering: str | None = None,
) -> jax.Array:
    """Batched 2-D cross-correlation (what deep learning calls convolution).

    layout "NHWC": x (N, H, W, C), w (kh, kw, C // groups, O).
    layout "NCHW": x (N, C, H, W), w (O, C // groups, kh, kw), as torch.nn.functional.conv2d.
    b: None or (O,). stride, dilation: int or pair. padding: int or (ph, pw)
    (symmetric, as PyTorch), ((top, bottom), (left, right)), "SAME" or "VALID".

    lowering: "auto", "tune", "xla", "matmul", "winograd", "winograd_3x3" or "winograd_4x4"; None
    reads $JAXCNN_CONV_LOWERING when conv2d runs or is traced (a jitted function keeps the lowering
    it was traced with), default "auto". "xla" is lax.conv_general_dilated.
    "matmul" is patches @ kernel as matrix products (`jaxcnn._lowering`).
    "winograd" is Winograd's F(2x2, 3x3) for 3x3 stride-1 undilated kernels,
    "winograd_3x3" F(3x3, 3x3) and "winograd_4x4" F(4x4, 3x3) (fewer products, 3-5 bits less
    float32 precision), "auto"'s choice for any other kernel. "auto" picks by shape on
    CPU (`_lowering.auto_choice`). Winograd for those kernels on inputs of 64
    channels or more, maps of 4x4 and larger and many output rows (ResNet's bulk),
    F(4x4) on float32 maps of 12x12 and more, F(3x3) on smaller float32 maps of whole 3x3 tiles
    (3x3, 6x6) from 128 tiles, whatever the rows;
    the products where XLA's convolution and above all its gradients are slow (up to 300x
    on 2x2 and 1x1 maps; wide inputs at training batch sizes), XLA's forward
    with a product for the weight gradient on strided kernels over few
    channels (a stem), and XLA's convolution for the rest; XLA's convolution
    on GPU and TPU. Where this machine has timed an NHWC shape, "auto" takes
    the fastest instead: "tune" times each CPU lowering on a shape never timed
    here, once, when conv2d runs or is traced, and keeps the timings in
    $JAXCNN_TUNE_CACHE (`_lowering.cpu_choice`). Grouped convolutions always
    use XLA's. All give the same values and gradients within float rounding;
    "xla" measures the gain.
    """
    fn = "conv2d"
    _checks.one_of(fn, "layout", layout, LAYOUTS)
    how = _lowering.mode(fn, lowering)
    _checks.precision(fn, precision)
    x, w = _checks.real_array(fn, "x", x), _checks.real_array(fn, "w", w)
    b = None if b is None else _checks.real_array(fn, "b", b)
    # Mixed dtypes promote, as jnp.dot and nnx.Conv do (lax alone would raise a TypeError).
    dtype = jnp.promote_types(x.dtype, w.dtype)
    x, w = x.astype(dtype), w.astype(dtype)
    _checks.rank(fn, "x", x, 4, f"({', '.join(layout)})")
    _checks.rank(fn, "w", w, 4, "(kh, kw, C/groups, O)" if layout == "NHWC" else "(O, C/groups, kh, kw)")
    groups = _checks.positive_int(fn, "groups", groups)
    _, h, wd, c = x.shape if layout == "NHWC" else (x.shape[0], *x.shape[2:], x.shape[1])
    kh, kw, cin, cout = _hwio(layout, w.shape)

    def matches(cin, cout):  # x's channels, and b's if given
        return cin * groups == c and (b is None or b.shape == (cout,))

    other = LAYOUTS[1 - LAYOUTS.index(layout)]
    if not matches(cin, cout) and matches(*_hwio(other, w.shape)[2:]):
        # Read in the other layout, w fits x and b: a transposed kernel, which the mismatch alone would hide.
        _checks.fail(
            fn,
            f"w {w.shape} looks like an {KERNEL_LAYOUTS[other]} kernel, but layout {layout} takes "
            f"{KERNEL_LAYOUTS[layout]} kernels (x {x.shape} has {c} channels)",
        )
    if c < 1 or cout < 1:  # no convolution to compute (and the products would divide by zero)
        _checks.fail(fn, f"input and output channels must be >= 1, got {c} and {cout} (x {x.shape}, w {w.shape})")
    _checks.groups_divide(fn, groups, input_channels=c, output_channels=cout)
    if cin * groups != c:
        x_looks_other = cin * groups == (x.shape[1] if layout == "NHWC" else x.shape[3])
        _checks.fail(
            fn,
            f"w expects {cin} x groups={groups} = {cin * groups} input channels but x has {c} "
            f"(x {x.shape}, w {w.shape}, layout {layout}" + (f"; x looks {other})" if x_looks_other else ")"),
        )
    if b is not None and b.shape != (cout,):
        _checks.fail(fn, f"b must have shape ({cout},) to match w {w.shape}, got {b.shape}")
    if kh < 1 or kw < 1:
        _checks.fail(fn, f"w is an empty kernel: {kh}x{kw} (w {w.shape}, layout {layout})")
    stride, dilation, pads = _checks.conv_geometry(
        fn, (h, wd), (kh, kw), stride, padding, dilation, what=f"kernel {(kh, kw)}"
    )

    def xla(x, w):
        return lax.conv_general_dilated(
            x,
            w,
            window_strides=stride,
            padding=pads,
            rhs_dilation=dilation,
            dimension_numbers=_CONV_DIMS[layout],
            feature_group_count=groups,
            precision=precision,
        )

    def nhwc(lowered):  # one of _lowering's NHWC convolutions, in this layout
        def conv(x, w):
            if layout == "NCHW":
                x, w = x.transpose(0, 2, 3, 1), w.transpose(2, 3, 1, 0)
            y = lowered(x, w, stride=stride, padding=pads, dilation=dilation, precision=precision)
            return y if layout == "NHWC" else y.transpose(0, 3, 1, 2)

        return conv

    if how == "xla" or groups != 1:
        y = xla(x, w)
    elif how == "matmul":
        y = nhwc(_lowering.conv2d_matmul)(x, w)
    elif how in _lowering.WINOGRAD_CONVS and _lowering.winograd_applies((kh, kw), stride, dilation):
        y = nhwc(_lowering.CPU_CONVS[how])(x, w)
    else:
        out_hw = conv_output_shape((h, wd), (kh, kw), stride=stride, padding=pads, dilation=dilation)
        if layout == "NHWC":
            choice = _lowering.cpu_choice(how, x.shape, w.shape, dtype, stride, pads, dilation, out_hw)
        else:  # timings are of NHWC convolutions (the layers'), which NCHW's transposes would slow
            choice = _lowering.auto_choice(x.shape[0], c, (kh, kw), stride, out_hw, dilation, dtype)
        # Resolved when lowered: the choice on CPU, XLA's convolution elsewhere.
        cpu = None if choice == "xla" else nhwc(_lowering.CPU_CONVS[choice])
        y = xla(x, w) if cpu is None else lax.platform_dependent(x, w, cpu=cpu, default=xla)
    if b is not None:
        y = y + (b if layout == "NHWC" else b[:, None, None])
    return y


def _hwio(layout: str, kernel_shape) -> tuple[int, int, int, int]:
    """(kh, kw, C/groups, O) of a kernel in the layout's order."""
    o, cin, kh, kw = kernel_shape  # OIHW, unless NHWC's HWIO
    return tuple(kernel_shape) if layout == "NHWC" else (kh, kw, cin, o)


def _spatial_axes(layout: str) -> tuple[int, int]:
    return (1, 2) if layout == "NHWC" else (2, 3)


def _pool_setup(fn, x, window, stride, padding, ceil_mode, layout):
    """Checks a batched pooling call; returns x, window, strides and padding for reduce_window."""
    _checks.one_of(fn, "layout", layout, LAYOUTS)
    x = _checks.real_array(fn, "x", x)
    _checks.rank(fn, "x", x, 4, f"({', '.join(layout)})")
    ceil_mode = _checks.boolean(fn, "ceil_mode", ceil_mode)
    ah, aw = _spatial_axes(layout)
    input_hw = (x.shape[ah], x.shape[aw])
    window, stride, padding = _pool_geometry(fn, input_hw, window, stride, padding)
    out_hw = _pool_out(input_hw, window, stride, padding, ceil_mode)
    # ceil_mode may need extra padding past the end: the overhang.
    pads = [(p, max((o - 1) * s + k - n - p, 0)) for n, k, s, p, o in zip(input_hw, window, stride, padding, out_hw)]
    full = lambda pair: tuple(pair[a] if a in (ah, aw) else 1 for a in range(4))
    win4 = full({ah: window[0], aw: window[1]})
    str4 = full({ah: stride[0], aw: stride[1]})
    pad4 = tuple(pads[(ah, aw).index(a)] if a in (ah, aw) else (0, 0) for a in range(4))
    geometry = dict(input_hw=input_hw, window=window, stride=stride, padding=padding, out_hw=out_hw)
    return x, win4, str4, pad4, geometry


def max_pool2d(
    x,
    window: Pair,
    *,
    stride: Pair | None = None,
    padding: Pair = 0,
    ceil_mode: bool = False,
    layout: str = "NHWC",
) -> jax.Array:
    """Max pooling as torch.nn.functional.max_pool2d: padding is -inf, never 0.

    A window holding NaN pools to NaN. The gradient is PyTorch's: each window's goes to the
    element its kernel selects scanning the window's in-bounds elements in row-major order and
    moving to one greater than the maximum so far (strictly) or NaN. So ties go to the first
    maximum, NaNs to the last NaN, and a window of -inf to its first in-bounds element, never
    to the padding or the ceil_mode overhang.
    """
    return _max_pool("max_pool2d", x, window, stride, padding, ceil_mode, layout)


def _windows_tile(g, pads) -> bool:
    """Whether the pooling windows tile the input: non-overlapping, unpadded (no ceil_mode overhang
    either), and of at most MAX_SLICED_TAPS taps: global pooling of a 5x5 map or smaller (ResNet's
    at 96 px) is included, its thousands of taps on larger maps are not a sum of views."""
    return (
        g["stride"] == g["window"]
        and not any(lo or hi for lo, hi in pads)
        and math.prod(g["window"]) <= _lowering.MAX_SLICED_TAPS
    )


def _tiled(x, g, layout):
    """(x cropped to the whole windows, window, spatial axes): the arguments of _lowering's tiled pooling."""
    ah, aw = _spatial_axes(layout)
    (ho, wo), (kh, kw) = g["out_hw"], g["window"]
    x = lax.slice_in_dim(lax.slice_in_dim(x, 0, ho * kh, axis=ah), 0, wo * kw, axis=aw)
    return x, (kh, kw), (ah, aw)


def _max_pool(fn, x, window, stride, padding, ceil_mode, layout) -> jax.Array:
    x, win, strides, pads, g = _pool_setup(fn, x, window, stride, padding, ceil_mode, layout)
    taps = math.prod(g["window"])
    if _windows_tile(g, pads):
        # Non-overlapping windows (LeNet's, VGG's 2x2/2): a reshape and a max on every platform
        # (its gradient selects tap by tap: global pooling's thousands go to windowed_max).
        return _lowering.tiled_max(*_tiled(x, g, layout))
    windowed = functools.partial(_lowering.windowed_max, window=win, strides=strides, pads=pads)
    if taps > _lowering.MAX_SLICED_TAPS or any(g["padding"]):
        # Large windows; and padded ones, whose -inf windows must skip the padding: on ResNet's stem
        # (3x3/2, pad 1, 48x48x64, batch 128) windowed_max trains 3.5x faster than sliced_max (73 vs 260 ms).
        return windowed(x)
    # Overlapping windows (3x3/1, or the ceil_mode overhang): on CPU a gradient through one strided
    # view per tap, faster to train through than windowed_max's two passes or select-and-scatter.
    sliced = functools.partial(_lowering.sliced_max, window=win, strides=strides, pads=pads)
    return lax.platform_dependent(x, cpu=sliced, default=windowed)


def avg_pool2d(
    x,
    window: Pair,
    *,
    stride: Pair | None = None,
    padding: Pair = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    layout: str = "NHWC",
) -> jax.Array:
    """Average pooling as torch.nn.functional.avg_pool2d.

    The divisor is the number of window elements inside the padded input
    (count_include_pad=True) or inside the input itself (False); the ceil_mode
    overhang past the padding is never counted.
    """
    fn = "avg_pool2d"
    count_include_pad = _checks.boolean(fn, "count_include_pad", count_include_pad)
    x, win, strides, pads, g = _pool_setup(fn, x, window, stride, padding, ceil_mode, layout)
    if _windows_tile(g, pads):  # LeNet's, DenseNet's 2x2/2: strided views and a reshape, on every platform
        total = _lowering.tiled_sum(*_tiled(x, g, layout))
    else:
        total = lax.reduce_window(x, 0.0, lax.add, win, strides, pads)
    return total / _avg_divisor(g, count_include_pad, layout).astype(x.dtype)


def _avg_divisor(g, count_include_pad: bool, layout: str) -> np.ndarray:
    """Per-output divisor, a static (Ho, Wo) table broadcast to the layout."""
    counts = []
    for n, k, s, p, o in zip(g["input_hw"], g["window"], g["stride"], g["padding"], g["out_hw"]):
        start = np.arange(o) * s - p
        end = np.minimum(start + k, n + p)
        if not count_include_pad:
            start, end = np.maximum(start, 0), np.minimum(end, n)
        counts.append(end - start)
    divisor = np.outer(counts[0], counts[1]).astype(np.float32)
    return jnp.asarray(divisor[:, :, None] if layout == "NHWC" else divisor)


def min_pool2d(x, window: Pair, *, stride=None, padding: Pair = 0, ceil_mode=False, layout="NHWC"):
    """Min pooling, the notes' exercise: -max_pool2d(-x) (padding acts as +inf)."""
    fn = "min_pool2d"
    return -_max_pool(fn, -_checks.real_array(fn, "x", x), window, stride, padding, ceil_mode, layout)


def soft_pool2d(
    x,
    window: Pair,
    *,
    temperature: float = 1.0,
    stride: Pair | None = None,
    padding: Pair = 0,
    ceil_mode: bool = False,
    layout: str = "NHWC",
) -> jax.Array:
    """Log-mean-exp pooling, between average and maximum (the notes' exercise).

    T * log(mean(exp(x / T))) over the real elements of each window: it tends
    to the maximum as T -> 0 and to the average as T -> inf, and is never
    below the average nor above the maximum. Padding is not counted. Computed
    on patches with logsumexp, so it is stable for any finite T > 0; the
    limits themselves are `max_pool2d` and `avg_pool2d(count_include_pad=False)`.
    """
    fn = "soft_pool2d"
    temperature = _checks.positive_number(fn, "temperature", temperature)
    x, win, strides, pads, g = _pool_setup(fn, x, window, stride, padding, ceil_mode, layout)
    if layout == "NCHW":
        x = jnp.moveaxis(x, 1, 3)
    ph, pw = pads[1:3] if layout == "NHWC" else pads[2:4]
    patches = _window_patches(x, g["window"], g["stride"], (ph, pw))
    mask = _window_patches(jnp.ones((1, *x.shape[1:3], 1), x.dtype), g["window"], g["stride"], (ph, pw))
    log_count = jnp.log(mask.sum(-1))
    y = temperature * (jax.nn.logsumexp(patches / temperature, axis=-1, where=mask > 0) - log_count)
    return y if layout == "NHWC" else jnp.moveaxis(y, 3, 1)


def _window_patches(x, window, stride, pads) -> jax.Array:
    """(N, H, W, C) -> (N, Ho, Wo, C, kh * kw): the window of every output position."""
    n, _, _, c = x.shape
    patches = lax.conv_general_dilated_patches(
        x,
        window,
        stride,
        pads,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=lax.Precision.HIGHEST,
    )
    return patches.reshape(*patches.shape[:3], c, window[0] * window[1])


# --------------------------------------------------------------------------
# The chapters' single-image ops.


def corr2d(x, k) -> jax.Array:
    """2-D cross-correlation: x (H, W), k (kh, kw) -> (H - kh + 1, W - kw + 1)."""
    fn = "corr2d"
    x, k = _checks.real_array(fn, "x", x), _checks.real_array(fn, "k", k)
    _checks.rank(fn, "x", x, 2, "(H, W)")
    _checks.rank(fn, "k", k, 2, "(kh, kw)")
    _checks.kernel_fits(fn, x.shape, k.shape)
    return conv2d(x[None, :, :, None], k[:, :, None, None], precision=lax.Precision.HIGHEST)[0, :, :, 0]


CONVOLVE2D_MODES = ("valid", "full", "same")


def convolve2d(x, k, mode: str = "valid") -> jax.Array:
    """Strict 2-D convolution (the kernel flipped), as scipy.signal.convolve2d.

    mode "valid": (H - kh + 1, W - kw + 1), needs k no larger than x.
    mode "full": (H + kh - 1, W + kw - 1), every overlap; commutative, f * g == g * f.
    mode "same": the centre of "full" with the shape of x.
    """
    fn = "convolve2d"
    x, k = _checks.real_array(fn, "x", x), _checks.real_array(fn, "k", k)
    _checks.rank(fn, "x", x, 2, "(H, W)")
    _checks.rank(fn, "k", k, 2, "(kh, kw)")
    _checks.one_of(fn, "mode", mode, CONVOLVE2D_MODES)
    # "full" and "same" take a kernel of any size: it need only fit itself, i.e. not be empty.
    _checks.kernel_fits(fn, x.shape if mode == "valid" else k.shape, k.shape)
    pads = ((0, 0), (0, 0)) if mode == "valid" else ((k.shape[0] - 1,) * 2, (k.shape[1] - 1,) * 2)
    flipped = k[::-1, ::-1]
    y = conv2d(x[None, :, :, None], flipped[:, :, None, None], padding=pads, precision=lax.Precision.HIGHEST)
    y = y[0, :, :, 0]
    if mode == "same":
        top, left = (k.shape[0] - 1) // 2, (k.shape[1] - 1) // 2
        y = y[top : top + x.shape[0], left : left + x.shape[1]]
    return y


def corr2d_multi_in(x, k) -> jax.Array:
    """Cross-correlation summed over channels: x (C, H, W), k (C, kh, kw) -> (H', W')."""
    fn = "corr2d_multi_in"
    x, k = _checks.real_array(fn, "x", x), _checks.real_array(fn, "k", k)
    _checks.rank(fn, "x", x, 3, "(C, H, W)")
    _checks.rank(fn, "k", k, 3, "(C, kh, kw)")
    if x.shape[0] != k.shape[0]:
        _checks.fail(fn, f"x has {x.shape[0]} channels but k has {k.shape[0]} (x {x.shape}, k {k.shape})")
    _checks.kernel_fits(fn, x.shape[1:], k.shape[1:])
    return conv2d(x[None], k[None], layout="NCHW", precision=lax.Precision.HIGHEST)[0, 0]


def corr2d_multi_in_out(x, k) -> jax.Array:
    """One output channel per kernel: x (C, H, W), k (O, C, kh, kw) -> (O, H', W')."""
    fn = "corr2d_multi_in_out"
    x, k = _checks.real_array(fn, "x", x), _checks.real_array(fn, "k", k)
    _checks.rank(fn, "x", x, 3, "(C, H, W)")
    _checks.rank(fn, "k", k, 4, "(O, C, kh, kw)")
    if x.shape[0] != k.shape[1]:
        _checks.fail(fn, f"x has {x.shape[0]} channels but k expects {k.shape[1]} (x {x.shape}, k {k.shape})")
    _checks.kernel_fits(fn, x.shape[1:], k.shape[2:])
    return conv2d(x[None], k, layout="NCHW", precision=lax.Precision.HIGHEST)[0]


def corr2d_multi_in_out_1x1(x, k) -> jax.Array:
    """A 1x1 convolution as one matrix product: x (C, H, W), k (O, C, 1, 1) -> (O, H, W)."""
    fn = "corr2d_multi_in_out_1x1"
    x, k = _checks.real_array(fn, "x", x), _checks.real_array(fn, "k", k)
    _checks.rank(fn, "x", x, 3, "(C, H, W)")
    _checks.rank(fn, "k", k, 4, "(O, C, 1, 1)")
    if k.shape[2:] != (1, 1):
        _checks.fail(fn, f"k must be a 1x1 kernel (O, C, 1, 1), got shape {k.shape}")
    c, h, w = x.shape
    if k.shape[1] != c:
        _checks.fail(fn, f"x has {c} channels but k expects {k.shape[1]} (x {x.shape}, k {k.shape})")
    y = jnp.matmul(k.reshape(k.shape[0], c), x.reshape(c, h * w), precision=lax.Precision.HIGHEST)
    return y.reshape(k.shape[0], h, w)


POOL2D_MODES = ("max", "avg", "min")


def pool2d(x, pool_size: Pair, mode: str = "max") -> jax.Array:
    """The notes' pooling: x (H, W), window pool_size, stride 1, no padding."""
    fn = "pool2d"
    x = _checks.real_array(fn, "x", x)
    _checks.rank(fn, "x", x, 2, "(H, W)")
    _checks.one_of(fn, "mode", mode, POOL2D_MODES)
    pool_size = _checks.pair(fn, "pool_size", pool_size, minimum=1)
    _checks.kernel_fits(fn, x.shape, pool_size)
    if mode == "max":
        return lax.reduce_window(x, -jnp.inf, lax.max, pool_size, (1, 1), "VALID")
    if mode == "min":
        return lax.reduce_window(x, jnp.inf, lax.min, pool_size, (1, 1), "VALID")
    return lax.reduce_window(x, 0.0, lax.add, pool_size, (1, 1), "VALID") / (pool_size[0] * pool_size[1])
