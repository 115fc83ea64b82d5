"""Argument checks shared by every module, each written once.

A failed check raises a one-line `ValueError` "fn: name must be ..., got value", fn being
the public function or class the caller called. Wrong types are ValueErrors too (groups=1.5
as much as groups=0), so callers have one exception to catch. Shapes and hyperparameters
are static under `jax.jit`, so the checks run at trace time and cost nothing compiled.

bool is an int subclass in Python (True + True == 2): the int checks refuse it, so a flag
passed where a size belongs fails rather than meaning 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Largest window, stride, dilation, padding or input size accepted: XLA takes them as int64
# and adds them up, and nothing real comes near; past it they would fail deep in XLA's lowering.
MAX_EXTENT = 2**31 - 1

PADDING_FORMS = "an int, a pair, a pair of pairs, 'SAME' or 'VALID'"


def fail(fn: str, message: str) -> None:
    raise ValueError(f"{fn}: {message}")


# --------------------------------------------------------------------------
# Scalars.


def is_int(value) -> bool:
    """A Python or NumPy int, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    """A finite Python or NumPy int or float, not a bool."""
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def int_in_range(fn: str, name: str, value, minimum: int, maximum: int | None = None) -> int:
    if not is_int(value) or value < minimum or (maximum is not None and value > maximum):
        if maximum is not None:
            want = f"an int in [{minimum}, {maximum}]"
        else:
            want = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        fail(fn, f"{name} must be {want}, got {value!r}")
    return int(value)


def positive_int(fn: str, name: str, value) -> int:
    return int_in_range(fn, name, value, 1)


def groups_divide(fn: str, groups: int, **channels: int) -> None:
    """Both channel counts (named as the caller names them) divide into `groups` groups."""
    if any(count % groups for count in channels.values()):
        named = " and ".join(f"{name}={count}" for name, count in channels.items())
        fail(fn, f"{named} must both divide by groups={groups}")


def positive_ints(fn: str, name: str, value, *, length: int | None = None, meaning: str = "") -> tuple[int, ...]:
    """A non-empty sequence of positive ints (exactly `length` of them if given), as a tuple."""
    if not (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) > 0
        and (length is None or len(value) == length)
        and all(is_int(v) and v >= 1 for v in value)
    ):
        count = "a sequence of" if length is None else str(length)
        fail(fn, f"{name} must be {count} positive ints{meaning}, got {value!r}")
    return tuple(int(v) for v in value)


def positive_number(fn: str, name: str, value) -> float:
    """A finite real number > 0 (Python's, NumPy's or a concrete 0-d array), as a float."""
    number = math.nan
    if not isinstance(value, (str, bytes, bool, np.bool_)) and np.ndim(value) == 0 and np.isrealobj(value):
        try:
            number = float(value)
        except (TypeError, ValueError):  # no number, or a traced one
            pass
    if not (math.isfinite(number) and number > 0):
        fail(fn, f"{name} must be a positive finite number, got {value!r}")
    return number


def fraction(fn: str, name: str, value, *, closed: bool = False) -> float:
    """A number in [0, 1) (a dropout rate), or in [0, 1] if `closed` (a momentum)."""
    if not (is_finite_number(value) and 0 <= value and (value <= 1 if closed else value < 1)):
        fail(fn, f"{name} must be in [0, 1{']' if closed else ')'}, got {value!r}")
    return float(value)


def boolean(fn: str, name: str, value) -> bool:
    """True or False (Python's or NumPy's): a truthy string or number is refused, not read as True."""
    if not isinstance(value, (bool, np.bool_)):
        fail(fn, f"{name} must be a bool, got {value!r}")
    return bool(value)


def one_of(fn: str, name: str, value, choices: Sequence) -> None:
    if not isinstance(value, str) or value not in choices:
        fail(fn, f"{name} must be one of {tuple(choices)}, got {value!r}")


def precision(fn: str, value) -> None:
    """What lax's convolutions take as precision: None, a lax.Precision or its name, a pair of those, or
    a dot algorithm; checked here because lax's own error is several lines long."""

    def valid(p) -> bool:
        if p is None or isinstance(p, (lax.Precision, lax.DotAlgorithm, lax.DotAlgorithmPreset)):
            return True
        try:
            return isinstance(p, str) and lax.Precision(p) is not None
        except ValueError:
            return False

    pair = isinstance(value, (tuple, list)) and len(value) == 2
    if not (all(valid(p) and p is not None for p in value) if pair else valid(value)):
        names = [p.name.lower() for p in lax.Precision]
        fail(fn, f"precision must be None, a lax.Precision, one of {names} or a pair of them, got {value!r}")


# --------------------------------------------------------------------------
# Arrays.


def real_array(fn: str, name: str, x) -> jax.Array:
    """x as a JAX array of floats: ints and bools become float32, floats keep their dtype,
    complex numbers are refused (no op here is defined on them: max pooling has no order)."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        fail(fn, f"{name} must be real, got dtype {x.dtype}")
    return x if jnp.issubdtype(x.dtype, jnp.inexact) else x.astype(jnp.float32)


def rank(fn: str, name: str, a, expected: int, meaning: str) -> None:
    if np.ndim(a) != expected:
        fail(fn, f"{name} must have rank {expected} {meaning}, got shape {tuple(np.shape(a))}")


def kernel_fits(fn: str, input_hw, kernel_hw) -> None:
    """A kernel of at least one element, no larger than the (unpadded) input."""
    if min(kernel_hw) < 1:
        fail(fn, f"kernel {tuple(kernel_hw)} is empty")
    if kernel_hw[0] > input_hw[0] or kernel_hw[1] > input_hw[1]:
        fail(fn, f"kernel {tuple(kernel_hw)} is larger than the input {tuple(input_hw)}")


# --------------------------------------------------------------------------
# Window geometry: kernel or window size, stride, dilation, padding.


def pair(fn: str, name: str, value, *, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each in [minimum, MAX_EXTENT], as a pair."""
    both = (value, value) if is_int(value) else value
    if not (isinstance(both, Sequence) and len(both) == 2 and all(is_int(v) for v in both)):
        fail(fn, f"{name} must be an int or a pair of ints, got {value!r}")
    if min(both) < minimum:
        fail(fn, f"{name} must be >= {minimum}, got {value!r}")
    if max(both) > MAX_EXTENT:
        fail(fn, f"{name} must be at most 2**31 - 1, got {value!r}")
    return int(both[0]), int(both[1])


def padding_pairs(
    fn: str,
    padding,
    input_hw: tuple[int, int],
    kernel_hw: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int] = (1, 1),
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Any accepted padding as explicit ((top, bottom), (left, right)).

    int p and (ph, pw) pad symmetrically, as PyTorch. "VALID" pads nothing.
    "SAME" is TensorFlow's: output size ceil(n / stride), with the odd pixel
    of padding at the bottom/right (so it is not symmetric for stride 2 on
    even sizes).
    """
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return ((0, 0), (0, 0))
        if mode != "SAME":
            fail(fn, f"padding must be {PADDING_FORMS}, got {padding!r}")
        pads = []
        for n, k, s, d in zip(input_hw, kernel_hw, stride, dilation):
            total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
            pads.append((total // 2, total - total // 2))
        return tuple(pads)
    is_pair = lambda p: isinstance(p, Sequence) and len(p) == 2 and all(is_int(q) for q in p)
    if is_int(padding):
        pads = ((padding, padding), (padding, padding))
    elif is_pair(padding):
        pads = ((padding[0], padding[0]), (padding[1], padding[1]))
    elif isinstance(padding, Sequence) and len(padding) == 2 and all(is_pair(p) for p in padding):
        pads = tuple(tuple(p) for p in padding)
    else:
        fail(fn, f"padding must be {PADDING_FORMS}, got {padding!r}")
    sides = [side for p in pads for side in p]
    if min(sides) < 0:
        fail(fn, f"padding must be >= 0, got {padding!r}")
    if max(sides) > MAX_EXTENT:
        fail(fn, f"padding must be at most 2**31 - 1, got {padding!r}")
    return tuple((int(a), int(b)) for a, b in pads)


def fits(fn: str, what: str, input_hw, pads, window_hw, dilation=(1, 1)) -> None:
    """The (dilated) window fits the padded input along both axes."""
    for axis, n, (lo, hi), k, d in zip("HW", input_hw, pads, window_hw, dilation):
        span = (k - 1) * d + 1
        if span > n + lo + hi:
            fail(
                fn,
                f"{what} spans {span} along {axis} but the padded input has only "
                f"{n + lo + hi} (input {n}, padding {(lo, hi)})",
            )


def conv_geometry(fn: str, input_hw, kernel_hw, stride, padding, dilation, *, what: str = "kernel"):
    """A convolution's stride and dilation as pairs and its padding as pairs of pairs, checked to fit
    the input; kernel_hw and input_hw are pairs already. `what` names the kernel in the error."""
    stride = pair(fn, "stride", stride, minimum=1)
    dilation = pair(fn, "dilation", dilation, minimum=1)
    pads = padding_pairs(fn, padding, input_hw, kernel_hw, stride, dilation)
    if dilation != (1, 1):
        what = f"{what} with dilation {dilation}"
    fits(fn, what, input_hw, pads, kernel_hw, dilation)
    return stride, dilation, pads


def pool_pairs(fn: str, window, stride, padding) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """A pooling's window, stride (default: the window) and symmetric padding, as pairs."""
    window = pair(fn, "window", window, minimum=1)
    stride = window if stride is None else pair(fn, "stride", stride, minimum=1)
    return window, stride, pair(fn, "padding", padding, minimum=0)
