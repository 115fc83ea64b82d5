"""The convolution chapters' exercises as code: what a convolution costs, and
how convolution and pooling rewrite into one another.

`conv_cost` counts arithmetic and memory from a plain per-layer spec (ints),
so a model's cost is a sum over its layers. `compose_kernels`, `im2col` /
`conv2d_im2col` and `avg_pool_as_conv` are exact rewrites, tested against
`jaxcnn.ops`; `max_pool_as_limit` shows max pooling is not a convolution but
the limit of one sandwiched between two pointwise powers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxcnn import ops

__all__ = [
    "conv_cost",
    "compose_kernels",
    "im2col",
    "conv2d_im2col",
    "avg_pool_as_conv",
    "max_pool_as_limit",
]

F32_BYTES = 4


def _fail(fn: str, message: str) -> None:
    raise ValueError(f"{fn}: {message}")


def _positive_int(fn: str, name: str, value) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        _fail(fn, f"{name} must be a positive int, got {value!r}")
    return int(value)


def _output_hw(fn, input_hw, kernel_hw, stride, pads, dilation=(1, 1)) -> tuple[int, int]:
    """The notes' floor((n + p - k + s) / s) per axis, failing if the kernel does not fit."""
    out = []
    for axis, n, k, s, (lo, hi), d in zip("HW", input_hw, kernel_hw, stride, pads, dilation):
        span = (k - 1) * d + 1
        if span > n + lo + hi:
            _fail(fn, f"kernel spans {span} along {axis} but the padded input has only {n + lo + hi}")
        out.append((n + lo + hi - span) // s + 1)
    return tuple(out)


# --------------------------------------------------------------------------
# Cost.


def conv_cost(
    c_i: int,
    h: int,
    w: int,
    c_o: int,
    k_h: int,
    k_w: int,
    *,
    padding=0,
    stride=1,
    groups: int = 1,
    bias: bool = False,
) -> dict:
    """Arithmetic and memory of one example through a convolution layer.

    Input c_i x h x w, kernel c_o x (c_i / groups) x k_h x k_w, padding and
    stride as `ops.conv2d` takes them (int, pair, pair of pairs, "SAME").
    With P = total padding along an axis:

        H_o = floor((h + P_h - k_h) / s_h) + 1,  W_o likewise
        M   = c_o * (c_i / groups) * k_h * k_w * H_o * W_o      multiply-adds

    Forward: M multiplications; M - c_o H_o W_o additions (each output sums
    c_i k_h k_w / groups products), plus c_o H_o W_o for the bias.
    Backward, given dY (the output's shape):
      dW: M multiplications, M - |W| additions (each weight sums H_o W_o terms).
      dX: M multiplications, M - c_i C_h C_w additions, where
          C = min(s, k) (H_o - 1) + k padded rows (columns) some window
          touches; the padded border of dX is then dropped.
      db: c_o H_o W_o - c_o additions.
    So backward costs about twice the forward, and doubling c_i and c_o
    multiplies everything by 4; doubling padding changes only H_o W_o.

    Memory in elements (bytes: x4 for float32). Forward reads the input
    (c_i h w), kernel and bias and writes the output (c_o H_o W_o). Backward
    must keep the input (for dW) and the kernel (for dX), nothing else: the
    layer is linear. It reads dY and writes dX, dW, db (shapes of x, W, b).

    XLA (`jax.jit(f).lower(...).compile().cost_analysis()["flops"]`, checked
    on CPU) counts 2 flops per multiply-add (the first add into the zero
    accumulator included) but skips taps that land in the padding: it reports
    2 * macs_unpadded per convolution, of which the backward has two, plus
    one flop per bias element and c_o H_o W_o - c_o for db. Without padding,
    macs_unpadded == macs.
    """
    fn = "conv_cost"
    c_i, h, w, c_o, k_h, k_w = (
        _positive_int(fn, name, v)
        for name, v in zip(("c_i", "h", "w", "c_o", "k_h", "k_w"), (c_i, h, w, c_o, k_h, k_w))
    )
    groups = _positive_int(fn, "groups", groups)
    if c_i % groups or c_o % groups:
        _fail(fn, f"c_i={c_i} and c_o={c_o} must both divide by groups={groups}")
    stride = ops.as_pair(fn, "stride", stride, minimum=1)
    pads = ops.as_padding(fn, padding, (h, w), (k_h, k_w), stride)
    h_o, w_o = _output_hw(fn, (h, w), (k_h, k_w), stride, pads)

    fan_in = c_i // groups * k_h * k_w
    out = c_o * h_o * w_o
    kernel = c_o * fan_in
    macs = out * fan_in
    # Per axis: kernel taps inside the real input, and padded positions any window covers.
    taps, covered = [], []
    for n, k, s, (lo, _), o in zip((h, w), (k_h, k_w), stride, pads, (h_o, w_o)):
        pos = np.arange(o)[:, None] * s - lo + np.arange(k)
        taps.append(int(((pos >= 0) & (pos < n)).sum()))
        covered.append(min(s, k) * (o - 1) + k)
    macs_unpadded = c_o * (c_i // groups) * taps[0] * taps[1]

    forward = {"mul": macs, "add": macs - out + (out if bias else 0)}
    grad_input = {"mul": macs, "add": macs - c_i * covered[0] * covered[1]}
    grad_kernel = {"mul": macs, "add": macs - kernel}
    backward = {
        "mul": grad_input["mul"] + grad_kernel["mul"],
        "add": grad_input["add"] + grad_kernel["add"] + (out - c_o if bias else 0),
    }
    b = c_o if bias else 0
    memory = {
        "input": c_i * h * w,
        "kernel": kernel,
        "bias": b,
        "output": out,
        "forward": c_i * h * w + kernel + b + out,
        "backward_saved": c_i * h * w + kernel,
        # saved tensors + incoming dY + the gradients dX, dW, db.
        "backward": 2 * (c_i * h * w + kernel) + out + b,
    }
    return {
        "output_hw": (h_o, w_o),
        "macs": macs,
        "macs_unpadded": macs_unpadded,
        "forward": forward,
        "backward": backward,
        "grad_input": grad_input,
        "grad_kernel": grad_kernel,
        "memory": memory,
        "bytes": {k: F32_BYTES * v for k, v in memory.items()},
    }


# --------------------------------------------------------------------------
# Rewrites.


def compose_kernels(k1, k2) -> jax.Array:
    """Two stride-1 valid cross-correlations in a row as one.

    corr(corr(x, a), b)[i] = sum_v sum_u x[i + u + v] a[u] b[v]
                           = sum_t x[i + t] c[t],  c[t] = sum_{u + v = t} a[u] b[v],
    so c is the FULL (true, flipped) convolution of a and b, of size
    k1 + k2 - 1. k1 (kh1, kw1), k2 (kh2, kw2); or HWIO k1 (kh1, kw1, ci, cm),
    k2 (kh2, kw2, cm, co) -> (kh1 + kh2 - 1, kw1 + kw2 - 1, ci, co), the
    middle channels summed. The converse fails: not every kernel factors,
    e.g. [1, 0, 1] is no composition of two real 2-tap kernels (x^2 + 1 has
    no real roots). Padding between the layers breaks the identity at the
    borders, where the first layer's zeros differ from the image.
    """
    fn = "compose_kernels"
    k1, k2 = jnp.asarray(k1), jnp.asarray(k2)
    if k1.ndim == k2.ndim == 2:
        return ops.convolve2d(k1, k2, mode="full")
    if not k1.ndim == k2.ndim == 4:
        _fail(fn, f"k1 and k2 must both be (kh, kw) or both HWIO, got shapes {k1.shape} and {k2.shape}")
    if k1.shape[3] != k2.shape[2]:
        _fail(fn, f"k1 has {k1.shape[3]} output channels but k2 expects {k2.shape[2]} (k1 {k1.shape}, k2 {k2.shape})")
    kh2, kw2 = k2.shape[:2]
    # Each input channel of k1 is an image with cm channels; fully convolve it with k2.
    images = jnp.transpose(k1, (2, 0, 1, 3))
    c = ops.conv2d(
        images,
        k2[::-1, ::-1],
        padding=((kh2 - 1, kh2 - 1), (kw2 - 1, kw2 - 1)),
        precision=lax.Precision.HIGHEST,
    )
    return jnp.transpose(c, (1, 2, 0, 3))


def _im2col(fn, x, kernel_hw, stride, padding, dilation) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim != 4:
        _fail(fn, f"x must have rank 4 (N, H, W, C), got shape {x.shape}")
    kernel_hw = ops.as_pair(fn, "kernel_hw", kernel_hw, minimum=1)
    stride = ops.as_pair(fn, "stride", stride, minimum=1)
    dilation = ops.as_pair(fn, "dilation", dilation, minimum=1)
    pads = ops.as_padding(fn, padding, x.shape[1:3], kernel_hw, stride, dilation)
    h_o, w_o = _output_hw(fn, x.shape[1:3], kernel_hw, stride, pads, dilation)
    (kh, kw), (sh, sw), (dh, dw) = kernel_hw, stride, dilation
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    # One strided slice per kernel offset; concatenated (i, j, c)-major, as HWIO reshapes.
    cols = [
        xp[:, i * dh : i * dh + (h_o - 1) * sh + 1 : sh, j * dw : j * dw + (w_o - 1) * sw + 1 : sw]
        for i in range(kh)
        for j in range(kw)
    ]
    return jnp.concatenate(cols, axis=-1)


def im2col(x, kernel_hw, *, stride=1, padding=0, dilation=1) -> jax.Array:
    """Every window of x as a row: (N, H, W, C) -> (N, H_o, W_o, kh * kw * C).

    The last axis is ordered (kh, kw, C), matching an HWIO kernel reshaped to
    (kh * kw * C, O), so a convolution is one matrix product. Padding as in
    `ops.conv2d` (zeros).
    """
    return _im2col("im2col", x, kernel_hw, stride, padding, dilation)


def conv2d_im2col(x, w, b=None, *, stride=1, padding=0, dilation=1) -> jax.Array:
    """`ops.conv2d` (NHWC, HWIO, groups=1) as patches @ kernel, for any window.

    The notes' exercise: a 1x1 convolution is a matrix product over
    channels; a k x k one is too, once each k x k x C window is a row.
    """
    fn = "conv2d_im2col"
    w = jnp.asarray(w)
    if w.ndim != 4:
        _fail(fn, f"w must have rank 4 (kh, kw, C, O), got shape {w.shape}")
    if np.ndim(x) != 4 or np.shape(x)[-1] != w.shape[2]:
        _fail(fn, f"x must be (N, H, W, {w.shape[2]}) to match w {w.shape}, got shape {np.shape(x)}")
    if b is not None and np.shape(b) != (w.shape[3],):
        _fail(fn, f"b must have shape ({w.shape[3]},) to match w {w.shape}, got {np.shape(b)}")
    patches = _im2col(fn, x, w.shape[:2], stride, padding, dilation)
    y = patches @ w.reshape(-1, w.shape[3])
    return y if b is None else y + b


def avg_pool_as_conv(x, window, *, stride=None, padding=0) -> jax.Array:
    """Average pooling as a depthwise convolution with the constant kernel 1 / (kh kw).

    x (N, H, W, C). Zero padding counts in the divisor: `ops.avg_pool2d`
    with count_include_pad=True. Linear, unlike max pooling.
    """
    fn = "avg_pool_as_conv"
    x = jnp.asarray(x)
    if x.ndim != 4:
        _fail(fn, f"x must have rank 4 (N, H, W, C), got shape {x.shape}")
    window = ops.as_pair(fn, "window", window, minimum=1)
    stride = window if stride is None else ops.as_pair(fn, "stride", stride, minimum=1)
    padding = ops.as_pair(fn, "padding", padding, minimum=0)
    pads = tuple((p, p) for p in padding)
    _output_hw(fn, x.shape[1:3], window, stride, pads)
    c = x.shape[3]
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.float32
    kernel = jnp.full((*window, 1, c), 1.0 / (window[0] * window[1]), dtype)
    return ops.conv2d(x, kernel, stride=stride, padding=pads, groups=c, precision=lax.Precision.HIGHEST)


def max_pool_as_limit(x, window, p: float, *, stride=None, padding=0) -> jax.Array:
    """The power mean (avg_pool(x^p))^(1/p), which tends to max pooling as p grows.

    For x >= 0 and n elements per window (padding counted, as zeros):
    max * n^(-1/p) <= result <= max, nondecreasing in p. So max pooling is a
    convolution only in the limit, between two pointwise powers; itself it is
    not linear. x is scaled by its maximum so x^p cannot overflow; windows
    whose maximum is below max(x) * 1e-38^(1/p) underflow to 0.
    """
    fn = "max_pool_as_limit"
    if not (isinstance(p, (int, float, np.integer, np.floating)) and p > 0):
        _fail(fn, f"p must be a positive number, got {p!r}")
    x = jnp.asarray(x)
    if x.ndim != 4:
        _fail(fn, f"x must have rank 4 (N, H, W, C), got shape {x.shape}")
    scale = jnp.max(x)
    scale = jnp.where(scale > 0, scale, 1.0)
    mean = avg_pool_as_conv((x / scale) ** p, window, stride=stride, padding=padding)
    return mean ** (1.0 / p) * scale
