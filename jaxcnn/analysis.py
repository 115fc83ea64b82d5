"""The convolution chapters' exercises as code: what a convolution costs, and
how convolution and pooling rewrite into one another; receptive fields and
costs of the registered models.

`conv_cost` counts arithmetic and memory from a plain per-layer spec (ints),
so a model's cost is a sum over its layers (`model_cost`).
`receptive_fields` walks a model's layers; `gradient_support` asks JAX which
input pixels an output element depends on, to check it. `compose_kernels`, `im2col` /
`conv2d_im2col` and `avg_pool_as_conv` are exact rewrites, tested against
`jaxcnn.ops`; `max_pool_as_limit` shows max pooling is not a convolution but
the limit of one sandwiched between two pointwise powers.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from jaxcnn import _checks, _lowering, layers, ops
from jaxcnn.summary import sequential_net

__all__ = [
    "conv_cost",
    "compose_kernels",
    "im2col",
    "conv2d_im2col",
    "avg_pool_as_conv",
    "max_pool_as_limit",
    "Field",
    "receptive_fields",
    "gradient_support",
    "model_cost",
]

F32_BYTES = 4


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
        _checks.positive_int(fn, name, v)
        for name, v in zip(("c_i", "h", "w", "c_o", "k_h", "k_w"), (c_i, h, w, c_o, k_h, k_w))
    )
    groups = _checks.positive_int(fn, "groups", groups)
    _checks.groups_divide(fn, groups, c_i=c_i, c_o=c_o)
    # Checked here first, so that errors name conv_cost rather than conv_output_shape.
    stride, _, pads = _checks.conv_geometry(fn, (h, w), (k_h, k_w), stride, padding, 1)
    h_o, w_o = ops.conv_output_shape((h, w), (k_h, k_w), stride=stride, padding=pads)

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
        _checks.fail(fn, f"k1 and k2 must both be (kh, kw) or both HWIO, got shapes {k1.shape} and {k2.shape}")
    if k1.shape[3] != k2.shape[2]:
        _checks.fail(
            fn, f"k1 has {k1.shape[3]} output channels but k2 expects {k2.shape[2]} (k1 {k1.shape}, k2 {k2.shape})"
        )
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
    _checks.rank(fn, "x", x, 4, "(N, H, W, C)")
    kernel_hw = _checks.pair(fn, "kernel_hw", kernel_hw, minimum=1)
    stride, dilation, pads = _checks.conv_geometry(fn, x.shape[1:3], kernel_hw, stride, padding, dilation)
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    # One strided view per kernel tap, row-major; concatenated (i, j, c)-major, as HWIO reshapes.
    views = _lowering.strided_views(xp, (1, *kernel_hw, 1), (1, *stride, 1), (1, *dilation, 1))
    return jnp.concatenate(views, axis=-1)


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
    _checks.rank(fn, "w", w, 4, "(kh, kw, C, O)")
    if np.ndim(x) != 4 or np.shape(x)[-1] != w.shape[2]:
        _checks.fail(fn, f"x must be (N, H, W, {w.shape[2]}) to match w {w.shape}, got shape {np.shape(x)}")
    if b is not None and np.shape(b) != (w.shape[3],):
        _checks.fail(fn, f"b must have shape ({w.shape[3]},) to match w {w.shape}, got {np.shape(b)}")
    patches = _im2col(fn, x, w.shape[:2], stride, padding, dilation)
    y = patches @ w.reshape(-1, w.shape[3])
    return y if b is None else y + b


def avg_pool_as_conv(x, window, *, stride=None, padding=0) -> jax.Array:
    """Average pooling as a depthwise convolution with the constant kernel 1 / (kh kw).

    x (N, H, W, C). Zero padding counts in the divisor: `ops.avg_pool2d`
    with count_include_pad=True. Linear, unlike max pooling.
    """
    fn = "avg_pool_as_conv"
    x = _checks.real_array(fn, "x", x)  # as ops.conv2d takes it, so the kernel's dtype matches
    _checks.rank(fn, "x", x, 4, "(N, H, W, C)")
    window, stride, padding = _checks.pool_pairs(fn, window, stride, padding)
    pads = tuple((p, p) for p in padding)
    _checks.fits(fn, "kernel", x.shape[1:3], pads, window)
    c = x.shape[3]
    kernel = jnp.full((*window, 1, c), 1.0 / (window[0] * window[1]), x.dtype)
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
    p = _checks.positive_number(fn, "p", p)
    x = _checks.real_array(fn, "x", x)
    _checks.rank(fn, "x", x, 4, "(N, H, W, C)")
    scale = jnp.max(x)
    scale = jnp.where(scale > 0, scale, 1.0)
    mean = avg_pool_as_conv((x / scale) ** p, window, stride=stride, padding=padding)
    return mean ** (1.0 / p) * scale


# --------------------------------------------------------------------------
# Models: receptive fields and cost.

# A block whose output adds or concatenates paths (Residual, Inception,
# DenseBlock, ...) lists them in its class attribute `branches` (see
# jaxcnn.models): the attributes along each path in call order, the batch
# norms and ReLUs between them left out as pointwise. An empty path, or an
# attribute that is None, is the identity.

# Modules that keep every output's field (per element, or per channel at one position).
_POINTWISE = (layers.BatchNorm, nnx.BatchNorm, nnx.Dropout)


class Field(NamedTuple):
    """The receptive field of one layer's outputs, per axis (H, W), in input pixels.

    Output (i, j) depends on the input rows from start[0] + i * jump[0] to
    that plus size[0] - 1, and the columns likewise (`box`); rows before 0 or
    past the input's end are padding. out_hw: the layer's output size, None
    when the input size is unknown.
    """

    name: str
    layer: str
    size: tuple[int, int]
    jump: tuple[int, int]
    start: tuple[int, int]
    out_hw: tuple[int, int] | None

    def box(self, index) -> tuple[tuple[int, int], tuple[int, int]]:
        """((row_lo, row_hi), (col_lo, col_hi)), half open and not clipped, of output element index = (i, j)."""
        return tuple((a + i * j, a + i * j + r) for a, i, j, r in zip(self.start, index, self.jump, self.size))


def _join(name: str, key) -> str:
    return f"{name}.{key}" if name else str(key)


def _name(path) -> str:
    """A layer's name from its graph path, net.layers[1].layers[0].conv1 -> "1.0.conv1".

    Only the model's own .net goes: a block's (DenseBlock.net) stays, 2.net.0.2.
    """
    path = path[1:] if path[:1] == ("net",) else path
    return ".".join(str(k) for k in path if k != "layers")


def _geometry(fn: str, layer, hw):
    """(kernel span, stride, top/left padding, output size or None) of a conv or pooling layer on an hw input."""
    if isinstance(layer, layers.Conv2D):
        kernel, stride, dilation = layer.kernel.shape[:2], layer.stride, layer.dilation
        if hw is None and isinstance(layer.padding, str):
            _checks.fail(fn, f"padding {layer.padding!r} depends on the input size: pass input_hw")
        pads = _checks.padding_pairs(fn, layer.padding, hw, kernel, stride, dilation)
        out = hw and ops.conv_output_shape(hw, kernel, stride=stride, padding=pads, dilation=dilation)
        return tuple((k - 1) * d + 1 for k, d in zip(kernel, dilation)), stride, tuple(lo for lo, _ in pads), out
    if isinstance(layer, (layers.MaxPool2D, layers.AvgPool2D)):
        out = hw and ops.pool_output_shape(
            hw, layer.window, stride=layer.stride, padding=layer.padding, ceil_mode=layer.ceil_mode
        )
        return layer.window, layer.stride, layer.padding, out
    if isinstance(layer, layers.GlobalAvgPool2D):
        if hw is None:
            _checks.fail(fn, "GlobalAvgPool2D's window is its whole input: pass input_hw")
        return hw, (1, 1), (0, 0), (1, 1)
    _checks.fail(fn, f"no receptive-field rule for layer {type(layer).__name__}")


def _step(fn: str, name: str, layer, f: Field) -> Field:
    span, stride, pad, out = _geometry(fn, layer, f.out_hw)
    return Field(
        name,
        type(layer).__name__,
        size=tuple(r + (k - 1) * j for r, k, j in zip(f.size, span, f.jump)),
        jump=tuple(j * s for j, s in zip(f.jump, stride)),
        start=tuple(a - p * j for a, p, j in zip(f.start, pad, f.jump)),
        out_hw=out,
    )


def _union(fn: str, name: str, layer: str, fields: list[Field]) -> Field:
    """The field of a sum or concatenation of paths' outputs: the smallest box holding them all."""
    first = fields[0]
    for f in fields[1:]:
        if f.jump != first.jump or f.out_hw != first.out_hw:
            _checks.fail(fn, f"{name}: its paths end at different strides or sizes: jump {first.jump} vs {f.jump}")
    lo = tuple(min(f.start[i] for f in fields) for i in range(2))
    hi = tuple(max(f.start[i] + f.size[i] for f in fields) for i in range(2))
    return Field(name, layer, tuple(h - low for low, h in zip(lo, hi)), first.jump, lo, first.out_hw)


def _walk(fn: str, module, name: str, f: Field, rows: list) -> Field | None:
    """The field after `module`, appending a row per conv, pool and multi-path block; None once flattened."""
    if isinstance(module, nnx.Sequential):
        for i, layer in enumerate(module.layers):
            f = _walk(fn, layer, _join(name, i), f, rows)
            if f is None:
                break
        return f
    branches = getattr(module, "branches", None)
    if branches is not None:
        ends = []
        for path in branches:
            end = f
            for attr in path:
                if getattr(module, attr) is not None:
                    end = _walk(fn, getattr(module, attr), _join(name, attr), end, rows)
            ends.append(end)
        f = _union(fn, name, type(module).__name__, ends)
    elif isinstance(module, (layers.Flatten, nnx.Linear)):
        return None
    elif isinstance(module, _POINTWISE) or not isinstance(module, nnx.Module):
        return f  # activation functions are plain callables
    else:
        f = _step(fn, name, module, f)
    rows.append(f)
    return f


def receptive_fields(model: nnx.Module, input_hw=None) -> list[Field]:
    """The receptive field of every conv, pool and multi-path block of a model, in call order.

    Walks `model.net` (nested nnx.Sequentials, and the paths of blocks that
    list them in `branches`: residual, Inception and dense blocks). A layer
    with kernel k (dilated span (k - 1) d + 1), stride s and top/left padding
    p maps the field (size r, jump j, start a) of its input to

        r' = r + (span - 1) j,   j' = j s,   a' = a - p j,

    from (1, 1, 0) at the input pixels. Pooling counts like a convolution:
    the field holds every pixel that MAY affect an output, and any element of
    a max-pooling window may be its maximum. Activations, batch norm and
    dropout keep the field; the walk stops at Flatten (every later unit
    sees all the pixels of all the positions before it).

    A residual block's output adds its main path and its shortcut, so its
    field is the box holding both; an Inception block concatenates its four
    branches, a dense block its input and its conv blocks' outputs: the box
    holding them all, as a row covers all of a layer's channels. In ResNet
    and ResNeXt the shortcut (the identity, or a 1x1 conv with the block's
    stride) sees exactly the pixels at the centre of the main path's 3x3
    windows, so the block's field is the main path's. Each path's rows come
    in order, then the block's.

    The field is the box the output's window spans. Every pixel in it
    matters when no stride exceeds its kernel and no dilation skips pixels,
    as in the chapters' models (the 1x1 stride-2 shortcut skips pixels, but
    inside the main path's box); otherwise the box has holes.

    input_hw (default model.image_size, if the model has one) is needed only
    by global pooling and "SAME" padding, and for the rows' out_hw.
    """
    fn = "receptive_fields"
    net = sequential_net(fn, model)
    input_hw = getattr(model, "image_size", None) if input_hw is None else input_hw
    hw = None if input_hw is None else _checks.pair(fn, "input_hw", input_hw, minimum=1)
    rows = []
    _walk(fn, net, "", Field("input", "input", (1, 1), (1, 1), (0, 0), hw), rows)
    return rows


class _Tap(nnx.Module):
    """Calls `layer`, then `see(x, y)` on its input and output: how the analysis reads inside any model."""

    def __init__(self, layer, see):
        self.layer, self.see = layer, see

    def __call__(self, x):
        y = self.layer(x)
        self.see(x, y)
        return y


def _replace(model: nnx.Module, make) -> None:
    """Swaps, in place, every submodule m of model for make(name, m) (m itself: keep it).

    nnx.iter_graph lists children before their parents, so a parent's
    replacement wraps its already replaced children.
    """
    for path, node in list(nnx.iter_graph(model)):
        if not path or not isinstance(node, nnx.Module):
            continue
        new = make(_name(path), node)
        if new is node:
            continue
        parent = functools.reduce(lambda o, k: o[k] if isinstance(k, int) else getattr(o, k), path[:-1], model)
        if isinstance(path[-1], int):
            parent[path[-1]] = new
        else:
            setattr(parent, path[-1], new)


class _Narrow(nnx.Module):
    """A conv's one-channel twin: the mean of its input channels, averaged over each window of its geometry.

    lax.conv_general_dilated itself, whatever ops.conv2d lowers to: under a
    vmap over thousands of pixels XLA's convolution compiles fastest.
    """

    def __init__(self, conv: layers.Conv2D):
        self.kernel_hw = tuple(conv.kernel.shape[:2])
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation

    def __call__(self, x):
        x = jnp.mean(x, axis=-1, keepdims=True)
        pads = _checks.padding_pairs(
            "gradient_support", self.padding, x.shape[1:3], self.kernel_hw, self.stride, self.dilation
        )
        kernel = jnp.full((*self.kernel_hw, 1, 1), 1.0 / math.prod(self.kernel_hw), x.dtype)
        return lax.conv_general_dilated(
            x, kernel, self.stride, pads, rhs_dilation=self.dilation, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )


class _Flattened(Exception):
    pass


def _flatten_stops(x):
    raise _Flattened


def gradient_support(model: nnx.Module, input_hw=None) -> dict[str, np.ndarray]:
    """Which input pixels each output element of each `receptive_fields` row has a non-zero derivative on.

    Returns {Field.name: bool (H_o, W_o, H, W)}: entry (i, j, y, x) says
    whether output (i, j) of that layer (any channel) changes with input
    pixel (y, x) (any channel). It checks `receptive_fields`: each (i, j)
    slice should be `Field.box((i, j))` clipped to the input. Computed in one
    forward-mode pass per input pixel (jax.jvp, vmapped over one-hot
    tangents: the columns of the Jacobian), all layers at once.

    A zero derivative must mean "no path", so this runs a twin of the model
    with no other zeros, wired by the model's own code:
    - every conv averages: constant kernel 1 / (kh kw), no bias; batch norm
      is the identity and the twin is in eval mode (dropout off); the input
      is uniform on [0.5, 1.5]. So every pre-activation is a positive
      average: ReLU passes derivative 1 (no dead units), sigmoid a positive
      one, and nothing underflows however deep the model is.
    - max pooling really does pass the derivative to one element per
      window, although any of them may be the maximum; the twin averages
      over the same windows (stride, padding, ceil mode) instead.
    - with constant kernels every channel of a layer holds the same values,
      so one stands for all: each conv is narrowed to a single channel
      (averaging its input's), which makes a pass per pixel cheap.
    The twin stops at Flatten, where the rows end. input_hw defaults to
    model.image_size.
    """
    fn = "gradient_support"
    names = [f.name for f in receptive_fields(model, input_hw)]
    input_hw = getattr(model, "image_size", None) if input_hw is None else input_hw
    if input_hw is None:
        _checks.fail(fn, "the model has no image_size: pass input_hw")
    h, w = _checks.pair(fn, "input_hw", input_hw, minimum=1)

    seen = {}

    def twin_of(name, m):
        if isinstance(m, layers.Conv2D):
            m = _Narrow(m)
        elif isinstance(m, layers.MaxPool2D):
            m = layers.AvgPool2D(m.window, stride=m.stride, padding=m.padding, ceil_mode=m.ceil_mode)
        elif isinstance(m, (layers.BatchNorm, nnx.BatchNorm)):
            return lambda x: x
        elif isinstance(m, layers.Flatten):
            return _flatten_stops
        if name in names:
            m = _Tap(m, lambda x, y: seen.__setitem__(name, y))
        return m

    twin = nnx.clone(model)
    twin.eval()
    _replace(twin, twin_of)

    def outputs(x):
        seen.clear()
        try:
            twin(x)
        except _Flattened:
            pass
        return dict(seen)

    c = getattr(model, "in_channels", 1)  # any count will do: the twin's convs average over channels

    @jax.jit
    def derivatives(x, pixels):
        return jax.vmap(lambda t: jax.jvp(outputs, (x,), (jnp.broadcast_to(t, x.shape),))[1])(pixels)

    x = np.random.default_rng(0).uniform(0.5, 1.5, (1, h, w, c)).astype(np.float32)
    # A one-hot tangent per pixel, built on the host: XLA would constant-fold it slowly.
    pixels = np.eye(h * w, dtype=np.float32).reshape(h * w, 1, h, w, 1)
    derivative = derivatives(x, pixels)
    support = {}
    for name in names:
        nonzero = np.asarray((derivative[name][:, 0] != 0).any(axis=-1))  # (H * W, H_o, W_o)
        support[name] = np.moveaxis(nonzero, 0, -1).reshape(*nonzero.shape[1:], h, w)
    return support


def _trace_layers(model: nnx.Module, input_shape, types) -> list[tuple[str, nnx.Module, tuple, tuple]]:
    """(name, layer, input shape, output shape) of each call of a layer of the given types, in call order.

    The model runs in eval mode under jax.eval_shape on an input of
    input_shape (NHWC): nothing is computed, the model is left as is, and an
    abstract model (nnx.eval_shape) works too. Names as `receptive_fields`
    names layers; the layers are the model's own.
    """
    graphdef, state = nnx.split(model)
    originals = {_name(path): node for path, node in nnx.iter_graph(model) if isinstance(node, types)}
    seen = []

    def forward(state, x):
        twin = nnx.merge(graphdef, state)
        twin.eval()
        see = lambda n: lambda x, y: seen.append((n, originals[n], x.shape, y.shape))
        _replace(twin, lambda n, m: _Tap(m, see(n)) if isinstance(m, types) else m)
        return twin(x)

    with _lowering.untuned():  # conv2d's "tune" would time shapes nothing runs
        jax.eval_shape(forward, state, jax.ShapeDtypeStruct(tuple(int(d) for d in input_shape), jnp.float32))
    return seen


def model_cost(model: nnx.Module, input_shape) -> tuple[list[dict], dict]:
    """One forward pass's arithmetic on input_shape (N, H, W, C): a row per conv and dense layer, and totals.

    Each conv row is `conv_cost` times N; a dense layer (fan_in -> out) does
    fan_in * out multiply-adds per example. Row keys: name (as
    `receptive_fields` names layers), layer, input_shape, output_shape, macs,
    macs_unpadded (taps on real input), mul and add (the notes' count: the
    first product of each sum needs no addition; bias adds included), and
    flops = 2 macs_unpadded + bias adds, which is what XLA's cost_analysis
    counts for these ops (for a convolution lowered to
    lax.conv_general_dilated, which skips the padding; lowered to patches
    and a matrix product it multiplies the zeros too: 2 macs). The totals
    sum the numbers.

    XLA's count for the whole compiled forward is a little more: it adds the
    elementwise and windowed work, about one flop per element per op
    (ReLU's max, a residual add, batch norm's scale and shift once folded, the
    final cast) and one per window element per output for pooling. That work
    grows with the activations, a conv's with activations times its fan-in
    (hundreds to thousands), so the convolutions dominate.
    """
    fn = "model_cost"
    sequential_net(fn, model)
    input_shape = _checks.positive_ints(fn, "input_shape", input_shape, length=4, meaning=" (N, H, W, C)")
    rows = []
    for name, layer, x_shape, y_shape in _trace_layers(model, input_shape, (layers.Conv2D, nnx.Linear)):
        if isinstance(layer, layers.Conv2D):
            n, h, w, c_i = x_shape
            if layer.dilation != (1, 1):
                _checks.fail(fn, f"{name}: conv_cost counts undilated convolutions, got dilation {layer.dilation}")
            c = conv_cost(
                c_i, h, w, y_shape[-1], *layer.kernel.shape[:2],
                padding=layer.padding, stride=layer.stride, groups=layer.groups, bias=layer.bias is not None,
            )  # fmt: skip
            cost = {"macs": c["macs"], "macs_unpadded": c["macs_unpadded"], **c["forward"]}
        else:
            n, fan_in = math.prod(x_shape[:-1]), x_shape[-1]
            macs = fan_in * layer.out_features
            cost = {"macs": macs, "macs_unpadded": macs, "mul": macs, "add": macs - layer.out_features}
            cost["add"] += layer.out_features if layer.bias is not None else 0
        cost = {k: n * v for k, v in cost.items()}
        cost["flops"] = 2 * cost["macs_unpadded"] + (math.prod(y_shape) if layer.bias is not None else 0)
        layer_type = type(layer).__name__
        rows.append({"name": name, "layer": layer_type, "input_shape": x_shape, "output_shape": y_shape, **cost})
    keys = ("macs", "macs_unpadded", "mul", "add", "flops")
    return rows, {k: sum(r[k] for r in rows) for k in keys}
