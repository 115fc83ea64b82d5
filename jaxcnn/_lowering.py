"""How `ops.conv2d` lowers on CPU: XLA's convolution, patches and a matrix product, or
Winograd's F(2x2, 3x3), F(3x3, 3x3) or F(4x4, 3x3); how max pooling is differentiated; and average pooling over windows
that tile the map (`tiled_sum`).

XLA's CPU convolution is slow on small feature maps (a 3x3 kernel on 2x2 or
1x1 maps runs tens of times below the machine's matrix-product rate) and its
gradients are slow on most maps, while a matrix product runs near peak.
`conv2d_matmul` gathers the kh * kw shifted (strided, dilated) views of the
padded input into a (N * Ho * Wo, kh * kw * C) patch matrix and multiplies it
by the kernel seen as a (kh * kw * C, O) matrix. Autodiff then gives the
gradients as products too: the input gradient dY @ W^T scattered back
(col2im) as a fused sum of kh * kw padded slices, the weight gradient
dY^T @ patches (`_matmul` picks that order over patches^T @ dY).

What keeps it fast:
- Kernel taps that only ever meet padding are dropped, so a 3x3 kernel on a
  1x1 map is the 1x1 convolution it really is; a map smaller than the
  (remaining) kernel is one dense (H * W * C, Ho * Wo * O) matrix.
- The patch matrix is kh * kw times the input, and XLA's CPU runtime maps its
  temporaries afresh on every call, a page fault per 4 KiB. Large batches are
  convolved a few MiB of patches at a time (`lax.map`), each chunk's patches
  rebuilt for the backward pass (`jax.checkpoint`) rather than stored.
- Inputs with few channels (LeNet's) build their patches with the batch as
  the minor axis, so views copy in long runs; a float32 grey image under a
  few outputs (LeNet's first layer) skips them in the forward pass, a sum
  over kernel taps of weighted views (`_tap_sum`), patches for dW only.

`conv2d_xla_forward` keeps XLA's convolution for the value and the input
gradient, and makes only the weight gradient a product (patches @ dY with
channel-major patches): for a strided stem over a few image channels, where
XLA's forward is the faster one and its weight gradient 2-3x slower.

`conv2d_winograd` computes a 3x3 stride-1 convolution from (m + 2)^2 input
tiles at stride m: for m = 2, 16 products per 2x2 output tile where a direct
convolution makes 36; for m = 3 ("winograd_3x3"), 25 per 3x3 tile for 81; for
m = 4 ("winograd_4x4"), 36 per 4x4 tile for 144.
The tile transforms are small sums, fused, but for F(3x3)'s and F(4x4)'s
output transform, one small matrix product; the tile products are one batched
matrix product. Its input gradient is the same algorithm on dY with the
flipped kernel; its weight gradient the algorithm read backwards (tile sums,
one batched product per chunk).

Max pooling's derivatives (`tiled_max`, `sliced_max`, `windowed_max`) route
each window's gradient as PyTorch's kernel does, through a reshape or views of
the input rather than select-and-scatter.

GPUs and TPUs keep XLA's convolution: in "auto" mode the product is staged
with `lax.platform_dependent`, resolved when lowered for the devices.

`auto_choice`'s thresholds were measured on 2-core VMs (AVX-512 Intel Xeon and AMD
EPYC; Winograd's map sizes on an AVX2 AMD EPYC Zen 3). "tune" times every
lowering that applies on the machine at hand, once per convolution shape, and
keeps the timings in a JSON file ($JAXCNN_TUNE_CACHE, default
~/.cache/jaxcnn/conv_lowerings.json) under the machine's name; "auto" then takes
the fastest there for a shape (the thresholds' choice if within TUNE_MARGIN of
it), and the thresholds' for shapes never timed (`cpu_choice`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jaxcnn import _files

LOWERINGS = ("auto", "tune", "xla", "matmul", "winograd", "winograd_3x3", "winograd_4x4")
ENV_VAR = "JAXCNN_CONV_LOWERING"
TUNE_CACHE_ENV = "JAXCNN_TUNE_CACHE"
# Timed calls per lowering when tuning (after one that compiles); the fastest counts.
TUNE_REPEATS = 3
# A timed lowering replaces the thresholds' choice when it is faster by more than this factor.
TUNE_MARGIN = 1.05
# Inputs of at most this many channels are taken for images (a first layer): tuning times their
# forward pass and weight gradient only, as a train step needs no gradient for the data.
IMAGE_CHANNELS = 3

# Bytes of patch matrix per chunk of images: a few MiB stay in cache and in
# pages the runtime already touched.
CHUNK_BYTES = 4 * 2**20
# Largest (input pixels x output pixels) count for which a map smaller than
# the kernel is convolved as a dense matrix.
MAX_DENSE_BLOCKS = 64
# Inputs with fewer channels than this get batch-minor patches (narrow
# views copy slowly), or "xla_forward" in "auto" when strided.
MIN_CHANNELS = 8
# Single-channel inputs under kernels of at most this many outputs take `_tap_sum`'s forward pass
# (no patch matrix). Measured at LeNet's 6 outputs only; with many outputs the product, whose
# cost per output is the same but which runs near the matrix-product rate, wins back.
MAX_TAP_SUM_OUTPUTS = 16
# Maps of at most this many output pixels (4x4 and smaller) take the product, unless Winograd applies.
SMALL_MAP = 16
# "xla_forward" builds the whole transposed patch matrix and keeps it for the backward
# pass; past this many bytes (an RGB 7x7 stem at 224 px and batch 64) "auto" takes XLA's.
MAX_XLA_FORWARD_PATCH_BYTES = 256 * 2**20
# Inputs this wide take the product once the patch matrix has this many rows (N * Ho * Wo).
WIDE_CHANNELS = 32
MANY_ROWS = 4096
# 3x3 stride-1 kernels on inputs this wide take Winograd's algorithm (on narrower ones patches are as fast).
WINOGRAD_CHANNELS = 64
# Maps of 16 pixels or fewer take F(2x2, 3x3) only when at least this large on both sides: 4x4 maps are
# 2x2 whole tiles (1.6x faster forward and backward than the product at 4x4x128 and 4x4x512, batch 256);
# on 2x2 maps the product is 1.6x faster (AMD EPYC Zen 3).
WINOGRAD_MAP = 4
# Float32 maps at least this large on both sides take F(4x4, 3x3): fewer products and transformed
# values than F(2x2)'s outweigh its costlier transforms and tiles rounded up to 4x4.
WINOGRAD_4X4_MAP = 12
# Smaller float32 maps of whole 3x3 tiles (3x3, 6x6, 9x9) take F(3x3, 3x3) from this many tiles in the
# batch. Forward and backward (AMD EPYC Zen 3): 3x3x512 maps 28 ms vs the product's 30 at 32 tiles,
# 55 vs 124 ms at 128, 100 vs 240 at 256; 6x6x256 maps 12.8 ms vs F(2x2)'s 8.6 at 64 tiles, 13.8 vs
# XLA's 29.2 (what "auto" took) at 128, 104 vs F(2x2)'s 132 at 1,024; 9x9x128 at 144 tiles 5.9 vs XLA's 8.7.
WINOGRAD_3X3_TILES = 128
# Bytes of transformed tiles per chunk of images: the tile products run faster on longer chunks
# (64 channels: 200 GFLOP/s on 2,304 tiles, 110 on 576), but 16 MiB at once is slower again
# (8x8x64 maps, batch 256: forward 12 ms, 6 ms in 8 MiB chunks; quiet Intel Xeon).
WINOGRAD_CHUNK_BYTES = 8 * 2**20
# ... but at least this many tiles per chunk where the transformed kernel, (m + 2)^2 * C * O numbers that
# each chunk reads whole, is over WINOGRAD_CACHED_KERNEL_BYTES (out of cache by the next chunk). Forward
# and backward, batch 256 (AMD EPYC Zen 3): 3x3x512 maps under F(3x3) (26 MB) 183 ms with 128 tiles a chunk
# (8 MiB), 151 ms with the whole batch; 12x12x128 under F(4x4) (2.4 MB), 158 ms with 1,024 tiles, 136-147
# with 2,048, 109-119 with 4,096 (the whole batch). Smaller kernels keep the bytes' chunks: 24x24x64 under
# F(4x4) (0.6 MB), 5-20% slower with 2,048 tiles; 8x8x64 under F(2x2) 22 ms with 2,048, 26 ms with 4,096.
WINOGRAD_MIN_TILES = 4096
WINOGRAD_CACHED_KERNEL_BYTES = 2**20
# The floor's chunks hold at most this many bytes of tiles (the whole batch of 12x12x128 maps above is 42 MB;
# a floor of 28x28x512 maps would be 300 MB).
WINOGRAD_MAX_CHUNK_BYTES = 64 * 2**20


def mode(fn: str, lowering: str | None) -> str:
    """The lowering asked for: the keyword, else $JAXCNN_CONV_LOWERING, else "auto"."""
    chosen = os.environ.get(ENV_VAR, "auto") if lowering is None else lowering
    if chosen not in LOWERINGS:
        source = f"${ENV_VAR}" if lowering is None else "lowering"
        raise ValueError(f"{fn}: {source} must be one of {LOWERINGS}, got {chosen!r}")
    return chosen


def auto_choice(batch: int, channels: int, kernel_hw, stride, out_hw, dilation=(1, 1), dtype=np.float32) -> str:
    """What "auto" computes on CPU (groups=1) for a shape this machine has not timed ("tune"),
    from measurements on 2-core VMs (AVX-512 Intel and AMD; Winograd's map sizes on an AVX2 AMD Zen 3):

    "winograd"     3x3 stride-1 undilated kernels on maps of 4x4 and larger with at least 64 input
                   channels and many output rows (ResNet's and VGG's bulk) that neither F(4x4) nor
                   F(3x3) below takes (and in bfloat16): F(2x2, 3x3) makes
                   2.25x fewer products; forward and backward 1.26-1.68x faster than the next best on
                   ResNet-18's (quiet Intel Xeon, batch 128; 1.0-1.3x on AMD EPYC before Winograd's
                   own weight gradient).
    "winograd_4x4" the same kernels in float32 on maps of at least 12x12 (WINOGRAD_4X4_MAP):
                   F(4x4, 3x3), 4x fewer products. A ResNet-18 step at 96 px (24x24x64 and
                   12x12x128 maps), batch 128, 15-20% faster than with F(2x2) everywhere; at 224 px
                   (56, 28 and 14), batch 32, even. Alone, forward and backward, batch 128: 1.16x
                   on 12x12x128, even on 24x24x64, 0.9x on 14x14x128 and 16x16x128, 0.8x on 6x6x256
                   (tiles rounded up to 8x8): "tune" decides such shapes (AMD EPYC Zen 3). Its float32
                   error is 10-30x F(2x2)'s (3-5 bits), so bfloat16 keeps F(2x2).
    "winograd_3x3" the same kernels in float32 on smaller maps of whole 3x3 tiles (sides of 3, 6 or 9:
                   ResNet-18's stages 4 and 3 at 96 px), from WINOGRAD_3X3_TILES tiles, however few rows:
                   F(3x3, 3x3), 3.2x fewer products, its error about F(4x4)'s. Batch 256: 2.4x faster
                   forward and backward than the product on 3x3x512, 1.3x than F(2x2) on 6x6x256 (AMD
                   EPYC Zen 3); on 3x3 maps F(2x2) and F(4x4) would round tiles up to 4x4.

    "matmul"       1x1 kernels; other maps of 16 pixels or fewer, where XLA's convolution runs tens of
                   times below the matrix-product rate; wide inputs (>= 32 channels) with many
                   output rows, whose gradients run 1.2-2x faster as products; and stride-1
                   kernels on inputs of few channels (LeNet's), as batch-minor patches
                   (a float32 grey image under at most 16 outputs: a sum over taps forward).
    "xla_forward"  strided kernels on inputs of fewer than 8 channels (a stem, grey or RGB):
                   XLA's forward pass is the faster one there, its weight gradient 2-3x slower
                   than a product; while the patch matrix fits MAX_XLA_FORWARD_PATCH_BYTES.
    "xla"          the rest (8-31 channels, or few rows): patches cost more than they save.
    """
    many_rows = batch * out_hw[0] * out_hw[1] >= MANY_ROWS
    if kernel_hw == (1, 1):
        return "matmul"
    if winograd_applies(kernel_hw, stride, dilation) and channels >= WINOGRAD_CHANNELS:
        float32 = np.dtype(dtype) == np.float32
        if float32 and many_rows and min(out_hw) >= WINOGRAD_4X4_MAP:
            return "winograd_4x4"
        whole_3x3_tiles = out_hw[0] % 3 == 0 and out_hw[1] % 3 == 0 and min(out_hw) < WINOGRAD_4X4_MAP
        if float32 and whole_3x3_tiles and batch * out_hw[0] * out_hw[1] // 9 >= WINOGRAD_3X3_TILES:
            return "winograd_3x3"
        if many_rows and (min(out_hw) >= WINOGRAD_MAP or out_hw[0] * out_hw[1] > SMALL_MAP):
            return "winograd"
    if out_hw[0] * out_hw[1] <= SMALL_MAP:
        return "matmul"
    if channels < MIN_CHANNELS:
        if stride == (1, 1):
            return "matmul"
        return "xla_forward" if _xla_forward_fits(batch, channels, kernel_hw, out_hw, 4) else "xla"
    return "matmul" if channels >= WIDE_CHANNELS and many_rows else "xla"


def _xla_forward_fits(batch, channels, kernel_hw, out_hw, itemsize) -> bool:
    """Whether "xla_forward"'s patch matrix, built whole and kept for the backward pass, fits its budget."""
    patch_bytes = itemsize * kernel_hw[0] * kernel_hw[1] * channels * batch * out_hw[0] * out_hw[1]
    return patch_bytes <= MAX_XLA_FORWARD_PATCH_BYTES


def cpu_choice(how: str, x_shape, w_shape, dtype, stride, padding, dilation, out_hw) -> str:
    """The lowering "auto" (or "tune") takes on CPU for x (N, H, W, C) and w (kh, kw, C, O): the one
    timed fastest for this shape on this machine if it was timed, else `auto_choice`'s.

    "tune" times a shape never timed here, once, and caches the result: when the default backend
    is the CPU, in a single process (several would each choose for themselves, and could compile
    different programs), and not while `untuned` (shape-only traces). "auto" never times.
    """
    n, _, _, c = x_shape
    thresholds = auto_choice(n, c, tuple(w_shape[:2]), stride, out_hw, dilation, dtype)
    if jax.process_count() > 1:
        return thresholds
    candidates = _candidates(x_shape, w_shape, dtype, stride, dilation, out_hw)
    key, path = _shape_key(x_shape, w_shape, dtype, stride, padding, dilation), tune_cache_path()
    ms = _measured(path, key)
    # A damaged entry, or one timed before the thresholds' choice was a lowering, is as if untimed.
    if not (
        isinstance(ms, dict)
        and thresholds in ms
        and set(ms) <= set(candidates)
        and all(isinstance(t, (int, float)) for t in ms.values())
    ):
        ms = None
    if ms is None and how == "tune" and jax.default_backend() == "cpu" and not _UNTUNED.get():
        ms = _time_lowerings(candidates, x_shape, w_shape, (n, *out_hw, w_shape[3]), dtype, stride, padding, dilation)
        _record(path, key, ms)
    if ms is None:
        return thresholds
    fastest = min(ms, key=ms.get)
    # The thresholds' choice stands unless another is clearly faster: timings vary by a few percent.
    return thresholds if ms[thresholds] <= TUNE_MARGIN * ms[fastest] else fastest


# Set while a model is traced for its shapes alone (analysis): nothing runs, so nothing is worth timing.
_UNTUNED = contextvars.ContextVar("untuned", default=False)


@contextlib.contextmanager
def untuned():
    """Within this block "tune" acts as "auto": for traces that only want shapes (jax.eval_shape)."""
    token = _UNTUNED.set(True)
    try:
        yield
    finally:
        _UNTUNED.reset(token)


def _candidates(x_shape, w_shape, dtype, stride, dilation, out_hw) -> list[str]:
    """The CPU lowerings that compute this convolution, "xla_forward" only while its patches fit and
    F(3x3) and F(4x4) only in float32 (FLOAT32_WINOGRAD_CONVS)."""
    (n, _, _, c), kernel_hw = x_shape, tuple(w_shape[:2])
    return [
        name
        for name in CPU_CONVS
        if (name not in WINOGRAD_CONVS or winograd_applies(kernel_hw, stride, dilation))
        and (name not in FLOAT32_WINOGRAD_CONVS or np.dtype(dtype) == np.float32)
        and (name != "xla_forward" or _xla_forward_fits(n, c, kernel_hw, out_hw, np.dtype(dtype).itemsize))
    ]


def tune_cache_path() -> Path:
    """Where "tune" keeps its timings: $JAXCNN_TUNE_CACHE, else jaxcnn/conv_lowerings.json under
    $XDG_CACHE_HOME or ~/.cache. Deleting the file forgets them."""
    if os.environ.get(TUNE_CACHE_ENV):
        return Path(os.environ[TUNE_CACHE_ENV])
    try:
        cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    except RuntimeError:  # no home directory: a cache nobody will find, never written
        cache_home = Path(tempfile.gettempdir()) / f"jaxcnn-{os.getpid()}"
    return cache_home / "jaxcnn" / "conv_lowerings.json"


def machine() -> str:
    """The machine timings hold for: its CPU model, the cores this process may use, and jaxlib's version."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{_cpu_model()}, {cores} cores, jaxlib {jax.lib.__version__}"


@functools.cache
def _cpu_model() -> str:
    """x86 Linux's model name; on ARM Linux the implementer and part numbers; else what platform knows."""
    try:
        with open("/proc/cpuinfo") as info:
            fields = dict(line.split(":", 1) for line in info if ":" in line)
    except OSError:  # not Linux
        fields = {}
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    if "model name" in fields:
        return fields["model name"]
    arm = [f"{k} {fields[k]}" for k in ("CPU implementer", "CPU part") if k in fields]
    return " ".join([platform.machine(), *arm]) if arm else (platform.processor() or platform.machine())


def _shape_key(x_shape, w_shape, dtype, stride, padding, dilation) -> str:
    (top, bottom), (left, right) = padding
    return (
        f"x {'x'.join(map(str, x_shape))} w {'x'.join(map(str, w_shape))} {np.dtype(dtype).name} "
        f"stride {stride[0]},{stride[1]} pad {top},{bottom},{left},{right} dilation {dilation[0]},{dilation[1]}"
    )


# Timings this process measured or read, by (cache file, machine, shape): a cache that cannot be
# written still times each shape once, and the file is read once per change.
_TIMINGS: dict = {}
_READ: dict = {}


def _measured(path: Path, key: str):
    """The timings {lowering: ms} of this shape on this machine, from this process or the cache file; None if none."""
    here = machine()
    if (path, here, key) in _TIMINGS:
        return _TIMINGS[path, here, key]
    try:
        stat = path.stat()
    except OSError:
        return None
    stamp = stat.st_ino, stat.st_mtime_ns, stat.st_size  # a rewrite is a new file (write_atomic)
    if _READ.get(path, (None,))[0] != stamp:
        _READ[path] = stamp, _read_cache(path)
    timings = _READ[path][1].get(here)
    entry = timings.get(key) if isinstance(timings, dict) else None
    return entry.get("ms") if isinstance(entry, dict) else None


def _read_cache(path: Path) -> dict:
    """The cache's {machine: {shape: {"ms": {lowering: ms}}}}; empty if there is none or it is damaged
    (then "tune" times again and writes a whole new file)."""
    cache = _files.read_json(path)
    return cache if isinstance(cache, dict) else {}


def _record(path: Path, key: str, ms: dict) -> None:
    """Keeps a shape's timings for this process and adds them to the cache file, a whole new file.
    A cache that cannot be written costs a warning, not the run."""
    here = machine()
    _TIMINGS[path, here, key] = ms
    cache = _read_cache(path)
    timings = cache.get(here)
    cache[here] = {**(timings if isinstance(timings, dict) else {}), key: {"ms": ms}}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _files.write_atomic(path, json.dumps(cache, indent=1, sort_keys=True) + "\n")
    except OSError as error:
        warnings.warn(f"conv2d: could not write the tuning cache {path}: {error}", stacklevel=4)  # conv2d's caller


def _time_lowerings(candidates, x_shape, w_shape, y_shape, dtype, stride, padding, dilation) -> dict[str, float]:
    """Milliseconds of each candidate's forward and backward pass on random data, for a random cotangent
    as a layer gets from the next (the gradients of x and w; of w alone for images, IMAGE_CHANNELS):
    the fastest of TUNE_REPEATS calls after one that compiles, the candidates taking turns."""
    wrt = (1,) if x_shape[3] <= IMAGE_CHANNELS else (0, 1)
    rng = np.random.default_rng(0)
    data = [rng.standard_normal(s).astype(dtype) for s in (x_shape, w_shape, y_shape)]
    steps = {}
    for name in candidates:
        conv = functools.partial(CPU_CONVS[name], stride=stride, padding=padding, dilation=dilation)
        loss = lambda x, w, dy, conv=conv: jnp.vdot(conv(x, w), dy)  # noqa: E731
        # value_and_grad: XLA would drop from grad alone the forward, which no gradient reads.
        steps[name] = jax.jit(jax.value_and_grad(loss, argnums=wrt))
    times = {name: [] for name in candidates}
    # Run now, also while a caller's function is being traced, and with the data's transfers allowed.
    with jax.ensure_compile_time_eval(), jax.transfer_guard("allow"):
        data = [jnp.asarray(a) for a in data]
        for step in steps.values():
            jax.block_until_ready(step(*data))
        for _ in range(TUNE_REPEATS):
            for name, step in steps.items():
                start = time.perf_counter()
                jax.block_until_ready(step(*data))
                times[name].append(time.perf_counter() - start)
    return {name: round(1e3 * min(t), 3) for name, t in times.items()}


def strided_views(xp, window, strides, dilation=None) -> list[jax.Array]:
    """The view of the (already padded) xp that each window tap reads, taps in row-major order.

    window, strides and dilation give one entry per axis of xp, 1 on axes not windowed;
    every view has the output's shape.
    """
    dilation = (1,) * xp.ndim if dilation is None else dilation
    out = [(n - (k - 1) * d - 1) // s + 1 for n, k, s, d in zip(xp.shape, window, strides, dilation)]
    views = []
    for tap in np.ndindex(*window):
        start = [t * d for t, d in zip(tap, dilation)]
        views.append(lax.slice(xp, start, [b + (o - 1) * s + 1 for b, o, s in zip(start, out, strides)], strides))
    return views


# --------------------------------------------------------------------------
# Max pooling's derivatives, on every platform PyTorch's: each window's gradient goes to the tap
# PyTorch's kernel selects when it scans the window's in-bounds elements in row-major order,
# moving to an element that is greater than the maximum so far (strictly: ties keep the first)
# or is NaN (so the last NaN wins). Padding and the ceil_mode overhang are never selected: a
# window of -inf takes its first in-bounds element. The values are reduce_window's (or a
# reshape's); only the derivatives are custom, as JVPs whose transposes are selects and pads
# rather than reduce_window's select-and-scatter (slow on CPU, and blind to this NaN rule).

# Unpadded max pooling windows of up to this many taps take `sliced_max` on CPU (each tap is one
# view of the input); larger ones take `windowed_max`, whose views grow as kh + kw, not kh * kw.
MAX_SLICED_TAPS = 25


def _first_in_bounds(window, strides, pads, out_shape) -> jax.Array | None:
    """Each window's first in-bounds tap (its row-major index) over the output's shape; None where it
    is tap 0 for every window. Computed from iotas: as a static table, broadcast into the gradient's
    fused loop, it made that loop 6x slower (117 vs 19 ms, a ResNet stem's pooling gradient, AMD EPYC)."""
    if not any(lo for lo, _ in pads):
        return None
    first = jnp.zeros((), jnp.int32)
    for axis, (k, (lo, _), s) in enumerate(zip(window, pads, strides)):
        first = first * k  # row-major: each axis's index weighs the product of the later windows
        if lo:
            first = first + jnp.maximum(lo - s * lax.broadcasted_iota(jnp.int32, out_shape, axis), 0)
    return first


def _select(views, first_in_bounds):
    """PyTorch's scan over a window's taps, one view of the (padded) input per tap, in row-major order:
    each window's maximum (NaN if it holds one) and the index of the tap its gradient goes to.

    Padding reads -inf, which is never greater than the maximum so far nor NaN: the scan may start
    on padding but leaves it at the first element above -inf. Only a window whose elements are all
    -inf stays there, and it takes its first in-bounds tap (`first_in_bounds`), one select at the end
    rather than a mask per tap.
    """
    index_dtype = jnp.int8 if len(views) <= 127 else jnp.int16
    y, selected = views[0], jnp.zeros(views[0].shape, index_dtype)
    for index, view in enumerate(views[1:], 1):
        # y is NaN once a NaN was seen (maximum propagates it), and then only a later NaN moves the choice.
        take = (view > y) | jnp.isnan(view)
        selected = jnp.where(take, jnp.asarray(index, index_dtype), selected)
        y = jnp.maximum(y, view)
    if first_in_bounds is not None:
        selected = jnp.where(y == -jnp.inf, first_in_bounds.astype(index_dtype), selected)
    return y, selected


def _pick(selected, views):
    """Each window's selected view: a masked sum, not a gather, so its transpose is selects and pads, not a scatter."""
    return sum(jnp.where(selected == index, view, 0) for index, view in enumerate(views))


def _padded(x, fill, pads):
    """x padded with `fill` by reduce_window's (lo, hi) pads."""
    return lax.pad(x, jnp.array(fill, x.dtype), [(lo, hi, 0) for lo, hi in pads])


def _tap_views(x, fill, window, strides, pads):
    """The input padded with `fill`: its strided view for each window tap, in row-major window order."""
    return strided_views(_padded(x, fill, pads), window, strides)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def sliced_max(x, window, strides, pads):
    """Max pooling (4-D window, strides, pads as reduce_window takes them) differentiated
    through one strided view of the padded input per window tap (CPU, up to MAX_SLICED_TAPS).

    The value is reduce_window's, which XLA's CPU runs faster than a max of views when
    no derivative is wanted. The JVP scans the taps' views for each window's selected tap
    and picks the tangent's view there; its transpose, the gradient, adds each tap's share
    back as a padded, interior-dilated copy, one fused loop where reduce_window's
    select-and-scatter gradient runs element by element: 4-6x faster to train through.
    """
    return lax.reduce_window(x, -jnp.inf, lax.max, window, strides, pads)


@sliced_max.defjvp
def _sliced_max_jvp(window, strides, pads, primals, tangents):
    (x,), (dx,) = primals, tangents
    views = _tap_views(x, -jnp.inf, window, strides, pads)
    y, selected = _select(views, _first_in_bounds(window, strides, pads, views[0].shape))
    return y, _pick(selected, _tap_views(dx, 0, window, strides, pads))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def windowed_max(x, window, strides, pads):
    """Max pooling as `sliced_max` takes it, for windows of any size and every platform:
    reduce_window's value, and a JVP that selects along one windowed axis at a time.

    PyTorch's choice is the greatest tap under a total order (NaN above numbers, then the value,
    then the scan position), so a window's choice is the choice among its rows' choices: the
    JVP selects within each row of taps (the inner axis of the row-major scan), then among the
    rows, kh + kw views in all rather than sliced_max's kh * kw.
    """
    return lax.reduce_window(x, -jnp.inf, lax.max, window, strides, pads)


@windowed_max.defjvp
def _windowed_max_jvp(window, strides, pads, primals, tangents):
    (x,), (dx,) = primals, tangents
    y, dy = _padded(x, -jnp.inf, pads), _padded(dx, 0, pads)
    pooled = [a for a, (k, s) in enumerate(zip(window, strides)) if k > 1 or s > 1]
    for axis in reversed(pooled):  # the inner (later) axis first
        window1, strides1, pads1 = (_along(axis, v, rest) for v, rest in ((window, 1), (strides, 1), (pads, (0, 0))))
        views = strided_views(y, window1, strides1)
        y, selected = _select(views, _first_in_bounds(window1, strides1, pads1, views[0].shape))
        dy = _pick(selected, strided_views(dy, window1, strides1))
    return y, dy


def _along(axis, values, rest):
    """values on `axis`, `rest` on every other axis."""
    return tuple(v if a == axis else rest for a, v in enumerate(values))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def tiled_max(x, window, axes):
    """Max pooling over non-overlapping, unpadded windows that tile x (LeNet's, VGG's 2x2/2):
    a reshape and a max, several times faster to train through on CPU than select-and-scatter."""
    return _windows_last(x, window, axes).max(-1)


def _split_tiles(x, window, axes):
    """(..., H, ..., W, ...) -> (..., H/kh, kh, ..., W/kw, kw, ...): a tile's rows on axis ah + 1, columns on aw + 2."""
    (ah, aw), (kh, kw) = axes, window
    shape = list(x.shape)
    shape[aw : aw + 1] = [shape[aw] // kw, kw]
    shape[ah : ah + 1] = [shape[ah] // kh, kh]
    return x.reshape(shape)


def _windows_last(x, window, axes):
    """(..., H, ..., W, ...) -> (..., H/kh, ..., W/kw, ..., kh * kw): each tile's elements on the last axis."""
    tiles = jnp.moveaxis(_split_tiles(x, window, axes), (axes[0] + 1, axes[1] + 2), (-2, -1))
    return tiles.reshape(*tiles.shape[:-2], window[0] * window[1])


@tiled_max.defjvp
def _tiled_max_jvp(window, axes, primals, tangents):
    (x,), (dx,) = primals, tangents
    tiles, dtiles = _windows_last(x, window, axes), _windows_last(dx, window, axes)
    taps = range(tiles.shape[-1])
    y, selected = _select([tiles[..., t] for t in taps], None)  # no padding
    return y, _pick(selected, [dtiles[..., t] for t in taps])


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def tiled_sum(x, window, axes):
    """Sums over non-overlapping, unpadded windows that tile x (average pooling's 2x2/2): the strided
    views of its taps added in one fused pass, 4-5x faster on CPU than reduce_window on LeNet's
    maps; in float32 for narrower dtypes (bfloat16 keeps 8 bits). The gradient spreads dy over
    each tile, a reshape's transpose: 2-3x faster than the views' (padded dy)."""
    steps = [1] * x.ndim
    for axis, k in zip(axes, window):
        steps[axis] = k
    acc = jnp.promote_types(x.dtype, jnp.float32)
    return functools.reduce(jnp.add, (v.astype(acc) for v in strided_views(x, steps, steps))).astype(x.dtype)


@tiled_sum.defjvp
def _tiled_sum_jvp(window, axes, primals, tangents):
    (x,), (dx,) = primals, tangents
    return tiled_sum(x, window, axes), _split_tiles(dx, window, axes).sum((axes[0] + 1, axes[1] + 2))


# --------------------------------------------------------------------------
# conv2d's matrix-product lowerings.


def _live_taps(n: int, k: int, stride: int, dilation: int, lo: int, out: int) -> tuple[int, int] | None:
    """First and last kernel tap along one axis that reads a real (not padding) pixel; None if none does."""
    live = [i for i in range(k) if any(0 <= r * stride + i * dilation - lo < n for r in range(out))]
    return (live[0], live[-1]) if live else None


def conv2d_matmul(x, w, *, stride, padding, dilation, precision=None) -> jax.Array:
    """x (N, H, W, C), w (kh, kw, C, O), explicit padding -> (N, Ho, Wo, O): groups=1 only."""
    n, h, wd, c = x.shape
    (sh, sw), (dh, dw), ((top, bottom), (left, right)) = stride, dilation, padding
    ho = (h + top + bottom - (w.shape[0] - 1) * dh - 1) // sh + 1
    wo = (wd + left + right - (w.shape[1] - 1) * dw - 1) // sw + 1
    live = _live_taps(h, w.shape[0], sh, dh, top, ho), _live_taps(wd, w.shape[1], sw, dw, left, wo)
    if None in live or n == 0:  # every output reads only padding, or there are none
        return jnp.zeros((n, ho, wo, w.shape[3]), jnp.result_type(x, w))
    (i0, i1), (j0, j1) = live
    w = w[i0 : i1 + 1, j0 : j1 + 1]
    # Padding for the live taps alone; negative where it now crops the input.
    top, left = top - i0 * dh, left - j0 * dw
    bottom = (ho - 1) * sh + (w.shape[0] - 1) * dh + 1 - h - top
    right = (wo - 1) * sw + (w.shape[1] - 1) * dw + 1 - wd - left
    pads = ((top, bottom, 0), (left, right, 0))
    if h * wd < w.shape[0] * w.shape[1] and h * wd * ho * wo <= MAX_DENSE_BLOCKS:
        # A map smaller than the kernel: the dense matrix has fewer entries than the patches.
        return _dense(x, w, (ho, wo), stride, dilation, (top, left), precision)
    per_image = ho * wo * w.shape[0] * w.shape[1] * c * x.dtype.itemsize
    chunk = _divisor_near(n, min(n, max(1, CHUNK_BYTES // per_image)))
    if c < MIN_CHANNELS and w.shape[:2] != (1, 1):
        return _batch_minor(x, w, (ho, wo), stride, dilation, pads, precision, chunk)

    def conv(x):
        xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), *pads, (0, 0, 0)))
        return _patches_dot(xp, w, (ho, wo), stride, dilation, precision)

    if w.shape[:2] == (1, 1) or chunk == n:
        return conv(x)
    one_image = jax.checkpoint(lambda xi: conv(xi[None])[0])
    return lax.map(one_image, x, batch_size=chunk)


def _batch_minor(x, w, out_hw, stride, dilation, pads, precision, chunk) -> jax.Array:
    """Patches for inputs with few channels, built with the batch as the minor axis.

    Each kernel tap's view of (C, H, W, chunk) images is then a block of rows
    of the (kh * kw * C, Ho * Wo * chunk) patch matrix, copied in runs of
    `chunk` numbers rather than C; the product is W^T @ patches. A float32
    grey image under a kernel of few outputs (LeNet's first layer) takes
    `_tap_sum` instead, patches for its weight gradient only.
    """
    n, _, _, c = x.shape
    o = w.shape[3]
    ho, wo = out_hw
    pads = ((0, 0, 0), *pads, (0, 0, 0))  # (C, H, W, chunk)
    by_taps = c == 1 and o <= MAX_TAP_SUM_OUTPUTS and jnp.result_type(x, w) == jnp.float32

    def conv(xc):  # (C, H, W, chunk) -> (O, Ho, Wo, chunk)
        xp = lax.pad(xc, jnp.zeros((), x.dtype), pads)
        return (_tap_sum if by_taps else _patches_product)(xp, w, out_hw, stride, dilation, precision)

    to_minor = lambda x, k: x.reshape(-1, k, *x.shape[1:]).transpose(0, 4, 2, 3, 1)  # noqa: E731
    from_minor = lambda y: y.transpose(0, 4, 2, 3, 1).reshape(-1, ho, wo, o)  # noqa: E731
    whole = n // chunk * chunk
    ys = [from_minor(lax.map(jax.checkpoint(conv), to_minor(x[:whole], chunk)))] if whole else []
    if whole < n:  # the remainder, as one smaller chunk
        ys.append(from_minor(conv(to_minor(x[whole:], n - whole)[0])[None]))
    return ys[0] if len(ys) == 1 else jnp.concatenate(ys)


def _patches_product(xp, w, out_hw, stride, dilation, precision) -> jax.Array:
    """Padded batch-minor xp (C, Hp, Wp, chunk), w (kh, kw, C, O) -> (O, Ho, Wo, chunk): W^T @ patches."""
    kh, kw, c, o = w.shape
    patches = _batch_minor_patches(xp, (kh, kw), out_hw, stride, dilation)
    return _matmul(patches.T, w.reshape(kh * kw * c, o), precision).T.reshape(o, *out_hw, xp.shape[3])


def _batch_minor_patches(xp, kernel_hw, out_hw, stride, dilation) -> jax.Array:
    """Padded batch-minor xp (C, Hp, Wp, chunk) -> its (kh * kw * C, Ho * Wo * chunk) patch matrix."""
    (kh, kw), (sh, sw), (dh, dw) = kernel_hw, stride, dilation
    # Separably, the kw column shifts first, then the kh row shifts of those: kh + kw views, not kh * kw.
    cols = jnp.stack(strided_views(xp, (1, 1, kw, 1), (1, 1, sw, 1), (1, 1, dw, 1)))  # (kw, C, Hp, Wo, chunk)
    rows = jnp.stack(strided_views(cols, (1, 1, kh, 1, 1), (1, 1, sh, 1, 1), (1, 1, dh, 1, 1)))
    return rows.reshape(kh * kw * xp.shape[0], out_hw[0] * out_hw[1] * xp.shape[3])


def _weighted_views(xp, w, stride, dilation) -> jax.Array:
    """Padded batch-minor xp (1, Hp, Wp, chunk), w (kh, kw, 1, O) -> (O, Ho, Wo, chunk): the sum over
    kernel taps of each tap's weights times its strided view of xp, one fused elementwise pass."""
    kh, kw, _, _ = w.shape
    views = strided_views(xp, (1, kh, kw, 1), (1, *stride, 1), (1, *dilation, 1))  # each (1, Ho, Wo, chunk)
    taps = np.ndindex(kh, kw)
    return functools.reduce(jnp.add, (w[i, j, 0, :, None, None, None] * view for (i, j), view in zip(taps, views)))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5))
def _tap_sum(xp, w, out_hw, stride, dilation, precision) -> jax.Array:
    """`_patches_product` for a single channel: the forward pass as `_weighted_views` (kh * kw * O
    multiply-adds per pixel, as the product makes, but no patch matrix kh * kw times the input and
    no product too narrow (K = kh * kw) to run fast: LeNet's 28x28 -> 6 forward 1.9x faster), the
    weight gradient the product."""
    return _weighted_views(xp, w, stride, dilation)


def _tap_sum_jvp(out_hw, stride, dilation, precision, primals, tangents):
    (xp, w), (dxp, dw) = primals, tangents
    y = _weighted_views(xp, w, stride, dilation)
    terms = [] if isinstance(dxp, SymbolicZero) else [_weighted_views(dxp, w, stride, dilation)]
    if not isinstance(dw, SymbolicZero):
        # dW^T @ patches, whose transpose dY @ patches^T is the order _matmul's gradient takes.
        kh, kw, _, o = w.shape
        patches = _batch_minor_patches(xp, (kh, kw), out_hw, stride, dilation)
        terms.append(jnp.dot(dw.reshape(kh * kw, o).T, patches, precision=precision).reshape(y.shape))
    return y, _sum_or_zeros(terms, y)


_tap_sum.defjvp(_tap_sum_jvp, symbolic_zeros=True)


def _patches_dot(xp, w, out_hw, stride, dilation, precision) -> jax.Array:
    """The convolution of an already padded xp: patches @ w."""
    kh, kw, c, o = w.shape
    (ho, wo), (sh, sw), (dh, dw) = out_hw, stride, dilation
    n = xp.shape[0]
    # One strided view per kernel tap, in w's (kh, kw, C) row order.
    views = strided_views(xp, (1, kh, kw, 1), (1, sh, sw, 1), (1, dh, dw, 1))
    patches = views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)
    y = _matmul(patches.reshape(n * ho * wo, kh * kw * c), w.reshape(kh * kw * c, o), precision)
    return y.reshape(n, ho, wo, o)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _matmul(a, b, precision) -> jax.Array:
    """a @ b, whose gradient for b is computed as (dY^T @ a)^T.

    Autodiff would compute a^T @ dY, a product XLA's CPU dot runs up to twice
    as slowly when a is a tall patch matrix; the forward stays a @ b.
    """
    return jnp.dot(a, b, precision=precision)


def _matmul_jvp(precision, primals, tangents):
    (a, b), (da, db) = primals, tangents
    y = jnp.dot(a, b, precision=precision)
    # Linear in (da, db); the transpose of the second term is (dY^T @ a)^T.
    # Zero tangents (x or w not differentiated) stay symbolic: no wasted product.
    terms = [jnp.dot(da, b, precision=precision)] if not isinstance(da, SymbolicZero) else []
    if not isinstance(db, SymbolicZero):
        terms.append(jnp.dot(db.T, a.T, precision=precision).T)
    return y, _sum_or_zeros(terms, y)


_matmul.defjvp(_matmul_jvp, symbolic_zeros=True)


def _sum_or_zeros(terms: list, like) -> jax.Array:
    """The sum of a JVP's tangent terms; zeros like `like` when every input's tangent was a symbolic zero."""
    return functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(like)


def _dense(x, w, out_hw, stride, dilation, top_left, precision) -> jax.Array:
    """The convolution as one (H * W * C, Ho * Wo * O) matrix: block (input pixel, output pixel) is
    the kernel tap joining them, or zero."""
    n, h, wd, c = x.shape
    o = w.shape[3]
    zero = jnp.zeros((c, o), w.dtype)

    def tap(q, r, axis):  # the kernel tap along `axis` that output r reads input q with, if any
        i, rem = divmod(q + top_left[axis] - r * stride[axis], dilation[axis])
        return i if rem == 0 and 0 <= i < w.shape[axis] else None

    rows = []
    for qi in range(h):
        for qj in range(wd):
            taps = [(tap(qi, ri, 0), tap(qj, rj, 1)) for ri in range(out_hw[0]) for rj in range(out_hw[1])]
            rows.append(jnp.concatenate([zero if None in t else w[t] for t in taps], axis=1))
    y = _matmul(x.reshape(n, h * wd * c), jnp.concatenate(rows, axis=0), precision)
    return y.reshape(n, *out_hw, o)


def _divisor_near(n: int, chunk: int) -> int:
    """A chunk size near `chunk` that divides n if one is at least half as large (no remainder pass)."""
    best = max(d for d in range(1, chunk + 1) if n % d == 0)
    return best if 2 * best >= chunk else chunk


def conv2d_xla_forward(x, w, *, stride, padding, dilation, precision=None) -> jax.Array:
    """x (N, H, W, C), w (kh, kw, C, O) -> (N, Ho, Wo, O): XLA's convolution, whose weight
    gradient is one matrix product with the input's patches (groups=1)."""
    return _xla_forward(x, w, stride, padding, dilation, precision)


def _xla_conv(x, w, stride, padding, dilation, precision):
    return lax.conv_general_dilated(
        x, w, stride, padding, rhs_dilation=dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5))
def _xla_forward(x, w, stride, padding, dilation, precision):
    return _xla_conv(x, w, stride, padding, dilation, precision)


def _xla_forward_jvp(stride, padding, dilation, precision, primals, tangents):
    (x, w), (dx, dw) = primals, tangents
    y = _xla_conv(x, w, stride, padding, dilation, precision)
    terms = [] if isinstance(dx, SymbolicZero) else [_xla_conv(dx, w, stride, padding, dilation, precision)]
    if not isinstance(dw, SymbolicZero):
        # Linear in dw through the (kh * kw * C, N * Ho * Wo) patches; its transpose, the weight
        # gradient, is patches @ dY, a product in natural layout.
        kh, kw, c, o = w.shape
        patches = _patches_t(x, (kh, kw), y.shape[1:3], stride, padding, dilation)
        dy = lax.dot_general(patches, dw.reshape(kh * kw * c, o), (((0,), (0,)), ((), ())), precision=precision)
        terms.append(dy.reshape(y.shape))
    return y, _sum_or_zeros(terms, y)


_xla_forward.defjvp(_xla_forward_jvp, symbolic_zeros=True)


def _patches_t(x, kernel_hw, out_hw, stride, padding, dilation) -> jax.Array:
    """The transposed patch matrix (kh * kw * C, N * Ho * Wo) of an input with few channels:
    each kernel tap's view of the (C, N, H, W) input is a block of long rows."""
    n, _, _, c = x.shape
    (kh, kw), (ho, wo), (sh, sw), (dh, dw) = kernel_hw, out_hw, stride, dilation
    xp = lax.pad(
        jnp.moveaxis(x, 3, 0), jnp.zeros((), x.dtype), ((0, 0, 0), (0, 0, 0), *[(lo, hi, 0) for lo, hi in padding])
    )
    views = strided_views(xp, (1, 1, kh, kw), (1, 1, sh, sw), (1, 1, dh, dw))
    return jnp.stack(views).reshape(kh * kw * c, n * ho * wo)


# Winograd's F(m x m, 3x3): each (m + 2)^2 input tile d gives an m x m output tile
# A^T [(G g G^T) * (B^T d B)] A, (m + 2)^2 products per tile and channel pair where a
# direct convolution makes 9 m^2. {m: (B^T, G, A^T)}.
# F(2x2): 16 products for 36. Coefficients 0, +-1 and 1/2 keep float32 within a few ulps
# of the direct sum.
# F(3x3) (points 0, +-1, 2): 25 products for 81, coefficients up to 4 and 1/6; its float32
# error is about F(4x4)'s. It tiles 3x3 and 6x6 maps exactly, where F(4x4) would round up to 4x4 and 8x8.
# F(4x4) (Lavin and Gray's points 0, +-1, +-2): 36 products for 144, and 36 transformed
# values per 16 outputs where F(2x2) has 16 per 4, but its coefficients up to 8 and 1/24
# cost float32 digits.
WINOGRAD = {
    2: (
        np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32),
        np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32),
    ),
    3: (
        np.array(
            [[2, -1, -2, 1, 0], [0, -2, -1, 1, 0], [0, 2, -3, 1, 0], [0, -1, 0, 1, 0], [0, 2, -1, -2, 1]], np.float32
        ),
        np.array(
            [[1 / 2, 0, 0], [-1 / 2, -1 / 2, -1 / 2], [-1 / 6, 1 / 6, -1 / 6], [1 / 6, 1 / 3, 2 / 3], [0, 0, 1]],
            np.float32,
        ),
        np.array([[1, 1, 1, 1, 0], [0, 1, -1, 2, 0], [0, 1, 1, 4, 1]], np.float32),
    ),
    4: (
        np.array(
            [
                [4, 0, -5, 0, 1, 0],
                [0, -4, -4, 1, 1, 0],
                [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0],
                [0, 2, -1, -2, 1, 0],
                [0, 4, 0, -5, 0, 1],
            ],
            np.float32,
        ),
        np.array(
            [
                [1 / 4, 0, 0],
                [-1 / 6, -1 / 6, -1 / 6],
                [-1 / 6, 1 / 6, -1 / 6],
                [1 / 24, 1 / 12, 1 / 6],
                [1 / 24, -1 / 12, 1 / 6],
                [0, 0, 1],
            ],
            np.float32,
        ),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], np.float32),
    ),
}


def winograd_applies(kernel_hw, stride, dilation) -> bool:
    """Whether Winograd's F(m x m, 3x3) computes this convolution: a 3x3 kernel at stride 1, undilated."""
    return (tuple(kernel_hw), tuple(stride), tuple(dilation)) == ((3, 3), (1, 1), (1, 1))


def conv2d_winograd(x, w, *, stride, padding, dilation, precision=None, tile=2) -> jax.Array:
    """x (N, H, W, C), w (3, 3, C, O), stride 1, no dilation -> (N, Ho, Wo, O), as F(tile x tile, 3x3)
    (`WINOGRAD`'s tiles: 2, 3 or 4).

    Its input gradient is a Winograd convolution too (of dY with the flipped
    kernel), its weight gradient `_winograd_weight_grad`: both as written, where
    autodiff of the forward would transpose its tile gathers into scatter-adds.
    """
    assert winograd_applies(w.shape[:2], stride, dilation), "ops.conv2d checks winograd_applies first"
    return _winograd(x, w, tuple(map(tuple, padding)), precision, tile)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _winograd(x, w, padding, precision, m):
    return _winograd_conv(x, w, padding, precision, m)


def _winograd_jvp(padding, precision, m, primals, tangents):
    (x, w), (dx, dw) = primals, tangents
    y = _winograd_conv(x, w, padding, precision, m)
    # Each tangent term is written as the transpose of its gradient, so that reverse mode,
    # transposing it back, runs the gradient as written (a Winograd convolution, Winograd's
    # tile sums), not the transpose of the forward's tile gathers (scatter-adds, several times slower).
    terms = []
    if not isinstance(dx, SymbolicZero):
        (top, bottom), (left, right) = padding
        flipped_pads = (2 - top, 2 - bottom), (2 - left, 2 - right)
        input_grad = lambda dy: _winograd_conv(dy, w, flipped_pads, precision, m, adjoint=True)  # noqa: E731
        terms.append(jax.linear_transpose(input_grad, y)(dx)[0])
    if not isinstance(dw, SymbolicZero):
        weight_grad = lambda dy: _winograd_weight_grad(x, dy, padding, precision, m)  # noqa: E731
        terms.append(jax.linear_transpose(weight_grad, y)(dw)[0])
    return y, _sum_or_zeros(terms, y)


_winograd.defjvp(_winograd_jvp, symbolic_zeros=True)


def _combine(arrays, m) -> list:
    """[sum_a m[i, a] * arrays[a] for each row i of m], skipping zero coefficients."""
    out = []
    for row in m:
        terms = [a if c == 1 else -a if c == -1 else c * a for c, a in zip(row.tolist(), arrays) if c]
        out.append(functools.reduce(jnp.add, terms))
    return out


def _winograd_tiles(x, padding, out_hw, m) -> jax.Array:
    """The transformed input tiles B^T d B of x (N, H, W, C), as (a * a, N * th * tw, C) for tiles of
    a = m + 2, the tile index column-major (a * j + i): the order two stacks build it in, each one fused copy."""
    n, h, wd, c = x.shape
    a, (bt, _, _) = m + 2, WINOGRAD[m]
    th, tw = -(-out_hw[0] // m), -(-out_hw[1] // m)
    (top, _), (left, _) = padding
    # Pad (or crop) to whole tiles at stride m, and one group of m more (the last tile's 2 extra rows).
    pads = ((0, 0, 0), (top, m * th + m - h - top, 0), (left, m * tw + m - wd - left, 0), (0, 0, 0))
    xp = lax.pad(x, jnp.zeros((), x.dtype), pads)
    # Row r of tile t is row r % m of group t + r // m of the map seen as (groups, m): views without
    # strides. B^T d B separably, rows first, then columns.
    groups = xp.reshape(n, th + 1, m, m * tw + m, c)
    rows = jnp.stack(_combine([groups[:, r // m : r // m + th, r % m] for r in range(a)], bt))
    groups = rows.reshape(a, n, th, tw + 1, m, c)
    return jnp.stack(_combine([groups[:, :, :, r // m : r // m + tw, r % m] for r in range(a)], bt)).reshape(
        a * a, -1, c
    )


def _winograd_chunk(x, th, tw, m, o) -> int:
    """Images per chunk: WINOGRAD_CHUNK_BYTES of their (a * a, th * tw, C) transformed tiles, or
    WINOGRAD_MIN_TILES tiles if that is more and the (a * a, C, O) transformed kernel is out of cache."""
    n, _, _, c = x.shape
    a2, itemsize = (m + 2) ** 2, x.dtype.itemsize
    per_image = a2 * th * tw * c * itemsize
    images = max(1, WINOGRAD_CHUNK_BYTES // per_image)
    if a2 * c * o * itemsize > WINOGRAD_CACHED_KERNEL_BYTES:
        floor = min(-(-WINOGRAD_MIN_TILES // (th * tw)), WINOGRAD_MAX_CHUNK_BYTES // per_image)
        images = max(images, floor)
    return _divisor_near(n, min(n, images))


def _winograd_conv(x, w, padding, precision, m, adjoint=False) -> jax.Array:
    """x (N, H, W, C) convolved with w (3, 3, C, O), or with its adjoint if `adjoint` (w (3, 3, O, C) with
    its taps flipped and its channels swapped, as the input gradient convolves): without moving w's numbers,
    the flip taken by G's columns reversed, the swap by the product's contraction. (A transposed copy of
    a 3x3x512x512 kernel fused into its transform took 40-60 ms, the transform alone 2 ms.)"""
    n, h, wd, c = x.shape
    o = w.shape[2 if adjoint else 3]
    (top, bottom), (left, right) = padding
    ho, wo = h + top + bottom - 2, wd + left + right - 2
    th, tw = -(-ho // m), -(-wo // m)
    _, g, at = WINOGRAD[m]
    if n == 0:
        return jnp.zeros((0, ho, wo, o), jnp.result_type(x, w))
    # G g G^T in float32 (G is), then in the input's dtype: bfloat16 in, bfloat16 out.
    u = _kernel_transform(w.astype(jnp.promote_types(w.dtype, jnp.float32)), g[:, ::-1] if adjoint else g)
    u = u.astype(w.dtype)

    contract = 2 if adjoint else 1  # u's input-channel axis

    def conv(x):
        v = _winograd_tiles(x, padding, (ho, wo), m)
        prods = lax.dot_general(v, u, (((2,), (contract,)), ((0,), (0,))), precision=precision)  # (a * a, P, O)
        # A^T prods A, then the m x m output tiles interleaved into the map.
        y = _output_transform(prods, at)
        y = y.reshape(m, m, -1, th, tw, o).transpose(2, 3, 0, 4, 1, 5).reshape(-1, m * th, m * tw, o)
        return y[:, :ho, :wo]

    # WINOGRAD_CHUNK_BYTES of tiles at a time, as the patch product chunks its patches.
    chunk = _winograd_chunk(x, th, tw, m, o)
    if chunk == n:
        return conv(x)
    whole = n // chunk * chunk
    ys = [lax.map(conv, x[:whole].reshape(-1, chunk, h, wd, c)).reshape(whole, ho, wo, o)]
    if whole < n:  # the remainder, as one smaller chunk
        ys.append(conv(x[whole:]))
    return ys[0] if len(ys) == 1 else jnp.concatenate(ys)


def _output_transform(prods, at) -> jax.Array:
    """A^T t A of each (a * a, P, O) tile product t, as (m, m, P, O). Wider tiles' as one (m * m, a * a) matrix
    product: XLA fused F(4x4)'s 16 stacked sums into the output's interleaving write, unvectorized (24x24x64
    maps, batch 256: forward 68 ms, 57-63 as a product; F(3x3) on 6x6x256 as fast either way; AMD EPYC Zen 3).
    F(2x2)'s as `_from_tiles`' sums, which the product was slower than (8x8x64: 5.5-6.0 ms, 6.4-7.6)."""
    m, a = at.shape
    if m == 2:
        return _from_tiles(prods, at)
    # Row m * p + q, column a * j + i (the tiles' column-major index): A^T[p, i] A^T[q, j].
    transform = np.einsum("pi,qj->pqji", at, at).reshape(m * m, a * a)
    # Its coefficients are small powers of two, exact in any float dtype: the product is exact at HIGHEST.
    y = jnp.dot(jnp.asarray(transform, prods.dtype), prods.reshape(a * a, -1), precision=lax.Precision.HIGHEST)
    return y.reshape(m, m, *prods.shape[1:])


def _winograd_weight_grad(x, dy, padding, precision, m) -> jax.Array:
    """The weight gradient (3, 3, C, O) for cotangent dy (N, Ho, Wo, O), as F(m x m, 3x3) read backwards:
    G^T [sum over tiles of (B^T d B) * (A dY A^T)] G, elementwise in each (m + 2)^2 tile and a product
    over channels, the (m + 2)^2 tile sums one batched product per chunk; summed in float32 (bfloat16
    in, out)."""
    n, _, _, c = x.shape
    _, ho, wo, o = dy.shape
    th, tw = -(-ho // m), -(-wo // m)
    a, (_, g, at) = m + 2, WINOGRAD[m]
    acc = jnp.promote_types(dy.dtype, jnp.float32)
    if n == 0:
        return jnp.zeros((3, 3, c, o), dy.dtype)

    def tile_sums(x, dy):  # (a * a, C, O): each tile's input transform times its m x m cotangent taken to a x a
        v = _winograd_tiles(x, padding, (ho, wo), m)
        dyp = lax.pad(dy, jnp.zeros((), dy.dtype), ((0, 0, 0), (0, m * th - ho, 0), (0, m * tw - wo, 0), (0, 0, 0)))
        dyp = dyp.reshape(-1, th, m, tw, m, o)
        # A dY A^T as _winograd_tiles builds B^T d B: two stacks, rows (i) then columns (j), j major.
        rows = jnp.stack(_combine([dyp[:, :, p] for p in range(m)], at.T))  # (a, n, th, tw, m, O)
        dm = jnp.stack(_combine([rows[..., q, :] for q in range(m)], at.T)).reshape(a * a, -1, o)
        return lax.dot_general(v, dm, (((1,), (1,)), ((0,), (0,))), precision=precision, preferred_element_type=acc)

    # Chunked as the forward is; the tiles are rebuilt from x (jax.checkpoint) rather than kept.
    tile_sums = jax.checkpoint(tile_sums)
    chunk = _winograd_chunk(x, th, tw, m, o)
    whole = n // chunk * chunk
    chunks = lambda z: z[:whole].reshape(-1, chunk, *z.shape[1:])  # noqa: E731
    du, _ = lax.scan(lambda du, xy: (du + tile_sums(*xy), None), jnp.zeros((a * a, c, o), acc), (chunks(x), chunks(dy)))
    if whole < n:  # the remainder, as one smaller chunk
        du = du + tile_sums(x[whole:], dy[whole:])
    return _from_tiles(du, g.T).astype(dy.dtype)


def _kernel_transform(w, g) -> jax.Array:
    """G w G^T of w (3, 3, C, O) as (a * a, C, O), tile index column-major (a * j + i): sums of its taps'
    (C, O) slices, fused elementwise work. (As an einsum over the taps, XLA took 54 ms on a 3x3x512x512
    kernel, longer than the tile products of a 256-image batch; AMD EPYC Zen 3. So did the weight
    gradient's G^T du G, now `_from_tiles`.)"""
    cols = [_combine([w[r, s] for s in range(3)], g) for r in range(3)]  # cols[r][j]: sum_s G[j, s] w[r, s]
    return jnp.stack([jnp.stack(_combine([cols[r][j] for r in range(3)], g)) for j in range(len(g))]).reshape(
        -1, *w.shape[2:]
    )


def _from_tiles(t, m) -> jax.Array:
    """M t M^T for M (k, a) of t (a * a, ...), tile index column-major (a * j + i), as (k, k, ...): F(2x2)'s
    output transform (M = A^T) and the weight gradient's (M = G^T). Separably, one stack per stage, as the
    tiles are built (so F(4x4)'s output transform ran 7x faster than summed through unstacked lists)."""
    a = m.shape[1]
    cols = jnp.stack([jnp.stack(_combine([t[a * j + i] for i in range(a)], m)) for j in range(a)])  # [j, p]
    return jnp.stack([jnp.stack(_combine([cols[j, p] for j in range(a)], m)) for p in range(m.shape[0])])


def conv2d_xla(x, w, *, stride, padding, dilation, precision=None) -> jax.Array:
    """x (N, H, W, C), w (kh, kw, C, O) -> (N, Ho, Wo, O): XLA's convolution, as the others are called."""
    return _xla_conv(x, w, stride, padding, dilation, precision)


# The CPU lowerings "auto" and "tune" choose among, by name; all NHWC, groups=1.
CPU_CONVS = {
    "xla": conv2d_xla,
    "matmul": conv2d_matmul,
    "xla_forward": conv2d_xla_forward,
    "winograd": conv2d_winograd,
    "winograd_3x3": functools.partial(conv2d_winograd, tile=3),
    "winograd_4x4": functools.partial(conv2d_winograd, tile=4),
}
# Those for 3x3 stride-1 undilated kernels only (`winograd_applies`): F(2x2, 3x3), F(3x3, 3x3) and F(4x4, 3x3).
WINOGRAD_CONVS = ("winograd", "winograd_3x3", "winograd_4x4")
# Those whose 3-5 bits of extra error would cost bfloat16 most of its 8: "auto" and "tune" take them in float32 only.
FLOAT32_WINOGRAD_CONVS = ("winograd_3x3", "winograd_4x4")
