"""Naive twins of `jaxcnn.ops`: plain NumPy loops over output positions.

Slow and obviously correct, like the notes' corr2d; the oracle for the tests.
Same names and signatures as `jaxcnn.ops`, plus `max_pool2d_grad`, the
gradient PyTorch routes through max pooling; they expect valid arguments (the
ops are what check them). Every result is a float64 NumPy array, so the twins
never share the ops' float32 rounding.
"""

from __future__ import annotations

import numpy as np

from jaxcnn import _checks
from jaxcnn.ops import LAYOUTS, POOL2D_MODES, conv_output_shape, pool_output_shape

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
    "max_pool2d_grad",
    "avg_pool2d",
    "min_pool2d",
    "soft_pool2d",
]


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def corr2d(x, k) -> np.ndarray:
    x, k = _f64(x), _f64(k)
    h, w = k.shape
    y = np.zeros((x.shape[0] - h + 1, x.shape[1] - w + 1))
    for i in range(y.shape[0]):
        for j in range(y.shape[1]):
            y[i, j] = (x[i : i + h, j : j + w] * k).sum()
    return y


def convolve2d(x, k, mode: str = "valid") -> np.ndarray:
    x, k = _f64(x), _f64(k)
    kh, kw = k.shape
    if mode == "valid":
        return corr2d(x, k[::-1, ::-1])
    # The full convolution straight from its definition: y[i, j] = sum_ab x[a, b] k[i - a, j - b].
    y = np.zeros((x.shape[0] + kh - 1, x.shape[1] + kw - 1))
    for i in range(y.shape[0]):
        for j in range(y.shape[1]):
            for a in range(max(0, i - kh + 1), min(x.shape[0], i + 1)):
                for b in range(max(0, j - kw + 1), min(x.shape[1], j + 1)):
                    y[i, j] += x[a, b] * k[i - a, j - b]
    if mode == "same":
        top, left = (kh - 1) // 2, (kw - 1) // 2
        y = y[top : top + x.shape[0], left : left + x.shape[1]]
    return y


def corr2d_multi_in(x, k) -> np.ndarray:
    return sum(corr2d(xc, kc) for xc, kc in zip(x, k))


def corr2d_multi_in_out(x, k) -> np.ndarray:
    return np.stack([corr2d_multi_in(x, ko) for ko in k], 0)


def corr2d_multi_in_out_1x1(x, k) -> np.ndarray:
    return corr2d_multi_in_out(x, k)


def pool2d(x, pool_size, mode: str = "max") -> np.ndarray:
    _checks.one_of("pool2d", "mode", mode, POOL2D_MODES)
    x = _f64(x)
    p_h, p_w = _checks.pair("pool2d", "pool_size", pool_size, minimum=1)
    reduce = {"max": np.max, "avg": np.mean, "min": np.min}[mode]
    y = np.zeros((x.shape[0] - p_h + 1, x.shape[1] - p_w + 1))
    for i in range(y.shape[0]):
        for j in range(y.shape[1]):
            y[i, j] = reduce(x[i : i + p_h, j : j + p_w])
    return y


def _to_nhwc(fn, x, layout):
    _checks.one_of(fn, "layout", layout, LAYOUTS)
    x = _f64(x)
    return x if layout == "NHWC" else x.transpose(0, 2, 3, 1)


def _from_nhwc(y, layout):
    return y if layout == "NHWC" else y.transpose(0, 3, 1, 2)


def conv2d(x, w, b=None, *, stride=1, padding=0, dilation=1, groups=1, layout="NHWC", precision=None):
    x = _to_nhwc("conv2d", x, layout)
    w = _f64(w)
    if layout == "NCHW":
        w = w.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    n, h, wd, c = x.shape
    kh, kw, cin, cout = w.shape
    stride, dilation, pads = _checks.conv_geometry("conv2d", (h, wd), (kh, kw), stride, padding, dilation)
    ho, wo = conv_output_shape((h, wd), (kh, kw), stride=stride, padding=pads, dilation=dilation)
    xp = np.pad(x, ((0, 0), *pads, (0, 0)))
    out_per_group = cout // groups
    y = np.zeros((n, ho, wo, cout))
    for i in range(ho):
        for j in range(wo):
            top, left = i * stride[0], j * stride[1]
            # (N, kh, kw, C): the dilated window under output position (i, j).
            patch = xp[
                :,
                top : top + (kh - 1) * dilation[0] + 1 : dilation[0],
                left : left + (kw - 1) * dilation[1] + 1 : dilation[1],
                :,
            ]
            for g in range(groups):
                xg = patch[..., g * cin : (g + 1) * cin]
                wg = w[..., g * out_per_group : (g + 1) * out_per_group]
                y[:, i, j, g * out_per_group : (g + 1) * out_per_group] = np.einsum("nhwc,hwco->no", xg, wg)
    if b is not None:
        y = y + _f64(b)
    return _from_nhwc(y, layout)


def _windows(fn, hw, window, stride, padding, ceil_mode):
    """Each output position (i, j) with the rows and columns its window covers: clipped to the
    padded input (what count_include_pad counts) and to the input itself (what is read)."""
    h, w = hw
    out_h, out_w = pool_output_shape(hw, window, stride=stride, padding=padding, ceil_mode=ceil_mode)
    (kh, kw), (sh, sw), (ph, pw) = _checks.pool_pairs(fn, window, stride, padding)
    for i in range(out_h):
        for j in range(out_w):
            h0, w0 = i * sh - ph, j * sw - pw
            h1, w1 = min(h0 + kh, h + ph), min(w0 + kw, w + pw)
            yield i, j, (h0, h1, w0, w1), (range(max(h0, 0), min(h1, h)), range(max(w0, 0), min(w1, w)))


def _pool(fn, x, window, stride, padding, ceil_mode, layout, reduce_window):
    """Loops over output positions as PyTorch's CPU kernel does; reduce_window(patch, count_padded)."""
    x = _to_nhwc(fn, x, layout)
    n, h, w, c = x.shape
    out_h, out_w = pool_output_shape((h, w), window, stride=stride, padding=padding, ceil_mode=ceil_mode)
    y = np.zeros((n, out_h, out_w, c))
    for i, j, (h0, h1, w0, w1), (rows, cols) in _windows(fn, (h, w), window, stride, padding, ceil_mode):
        patch = x[:, rows.start : rows.stop, cols.start : cols.stop, :]
        y[:, i, j, :] = reduce_window(patch, (h1 - h0) * (w1 - w0))
    return _from_nhwc(y, layout)


def max_pool2d(x, window, *, stride=None, padding=0, ceil_mode=False, layout="NHWC"):
    return _pool("max_pool2d", x, window, stride, padding, ceil_mode, layout, lambda patch, _: patch.max(axis=(1, 2)))


def max_pool2d_grad(x, cotangent, window, *, stride=None, padding=0, ceil_mode=False, layout="NHWC"):
    """max_pool2d's gradient (its vector-Jacobian product with `cotangent`), element by element
    as PyTorch's kernel routes it: each window's in-bounds elements are scanned in row-major order,
    moving to one that is greater than the maximum so far or is NaN. So ties go to the first
    maximum, a window holding NaNs to its last NaN, and a window of -inf to its first in-bounds
    element, never the padding or the ceil_mode overhang."""
    x, cotangent = _to_nhwc("max_pool2d", x, layout), _to_nhwc("max_pool2d", cotangent, layout)
    n, h, w, c = x.shape
    dx = np.zeros_like(x)
    for i, j, _, (rows, cols) in _windows("max_pool2d", (h, w), window, stride, padding, ceil_mode):
        for b in range(n):
            for ch in range(c):
                best, at = -np.inf, (rows[0], cols[0])
                for r in rows:
                    for q in cols:
                        if x[b, r, q, ch] > best or np.isnan(x[b, r, q, ch]):
                            best, at = x[b, r, q, ch], (r, q)
                dx[b, *at, ch] += cotangent[b, i, j, ch]
    return _from_nhwc(dx, layout)


def min_pool2d(x, window, *, stride=None, padding=0, ceil_mode=False, layout="NHWC"):
    return _pool("min_pool2d", x, window, stride, padding, ceil_mode, layout, lambda patch, _: patch.min(axis=(1, 2)))


def avg_pool2d(x, window, *, stride=None, padding=0, ceil_mode=False, count_include_pad=True, layout="NHWC"):
    def average(patch, count_padded):
        count = count_padded if count_include_pad else patch.shape[1] * patch.shape[2]
        return patch.sum(axis=(1, 2)) / count

    return _pool("avg_pool2d", x, window, stride, padding, ceil_mode, layout, average)


def soft_pool2d(x, window, *, temperature=1.0, stride=None, padding=0, ceil_mode=False, layout="NHWC"):
    def log_mean_exp(patch, _):
        z = patch / temperature
        m = z.max(axis=(1, 2))
        return temperature * (m + np.log(np.exp(z - m[:, None, None, :]).mean(axis=(1, 2))))

    return _pool("soft_pool2d", x, window, stride, padding, ceil_mode, layout, log_mean_exp)
