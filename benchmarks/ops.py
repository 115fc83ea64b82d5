"""Times jaxcnn.ops against their NumPy twins and Flax's own layers; prints one JSON object.

    python benchmarks/ops.py [--repeats 200] [--reference-repeats 5]

Each op is jitted and fed the same arrays as Flax's equivalent (nnx.Conv with
explicit padding and the same weights, nnx.max_pool / nnx.avg_pool). Times are
medians of single calls after warm-up, each ending in block_until_ready; the
jaxcnn and Flax calls alternate, so a busy machine slows both alike.
ratio = jaxcnn / flax (the target is <= 1.1).
"""

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcnn import ops, reference


def call_time(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def medians(fns: dict, args_of: dict, repeats: int, warmup: int = 3) -> dict:
    """Median seconds per call of each fn, calls interleaved round-robin."""
    for name, fn in fns.items():
        for _ in range(warmup):
            jax.block_until_ready(fn(*args_of[name]))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(call_time(fn, *args_of[name]))
    return {name: statistics.median(t) for name, t in times.items()}


def flax_conv(w, b, padding):
    """nnx.Conv holding w (HWIO) and b, as a pure function of its state and x."""
    kh, kw, cin, cout = w.shape
    conv = nnx.Conv(cin, cout, (kh, kw), padding=padding, use_bias=b is not None, rngs=nnx.Rngs(0))
    conv.kernel[...] = w
    if b is not None:
        conv.bias[...] = b
    graphdef, state = nnx.split(conv)
    return graphdef, state


def cases(rng):
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)

    # corr2d: one 64x64 image, a 3x3 kernel; Flax sees it as a 1-channel batch of one.
    x, k = normal(64, 64), normal(3, 3)
    graphdef, state = flax_conv(k[:, :, None, None], None, "VALID")
    yield dict(
        name="corr2d 64x64, 3x3",
        jaxcnn=(jax.jit(ops.corr2d), (x, k)),
        reference=(reference.corr2d, (np.asarray(x), np.asarray(k))),
        flax=(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x[None, :, :, None])[0, :, :, 0]), (state, x)),
    )

    # conv2d: N=8, 32x32, 16 -> 32 channels, 3x3, padding 1, NHWC, with bias.
    x, w, b = normal(8, 32, 32, 16), normal(3, 3, 16, 32), normal(32)
    graphdef_c, state_c = flax_conv(w, b, ((1, 1), (1, 1)))
    yield dict(
        name="conv2d N=8 32x32 16->32 3x3 p1 NHWC",
        jaxcnn=(jax.jit(functools.partial(ops.conv2d, padding=1)), (x, w, b)),
        reference=(functools.partial(reference.conv2d, padding=1), tuple(map(np.asarray, (x, w, b)))),
        flax=(jax.jit(lambda s, x: nnx.merge(graphdef_c, s)(x)), (state_c, x)),
    )

    # Pooling: N=8, 32x32x32, window 2 stride 2 and window 3 stride 2 padding 1.
    x = normal(8, 32, 32, 32)
    for window, padding in ((2, 0), (3, 1)):
        geometry = dict(window=window, stride=2, padding=padding)
        flax_args = dict(window_shape=(window, window), strides=(2, 2), padding=((padding, padding),) * 2)
        for op, flax_op in (("max_pool2d", nnx.max_pool), ("avg_pool2d", nnx.avg_pool)):
            # count_include_pad=True on both sides (the default of each).
            yield dict(
                name=f"{op} N=8 32x32x32 k{window} s2 p{padding}",
                jaxcnn=(jax.jit(functools.partial(getattr(ops, op), **geometry)), (x,)),
                reference=(functools.partial(getattr(reference, op), **geometry), (np.asarray(x),)),
                flax=(jax.jit(functools.partial(flax_op, **flax_args)), (x,)),
            )

    # Training through max pooling: the gradient, as ResNet's stem pool at 32 px and batch 64
    # sees it, VGG's 2x2/2 (the reshape path) and an unpadded 3x3/1 (the strided views); Flax's
    # is reduce_window's select-and-scatter.
    for shape, window, stride, padding in (
        ((64, 16, 16, 64), 3, 2, 1),
        ((64, 32, 32, 32), 2, 2, 0),
        ((16, 28, 28, 32), 3, 1, 0),
    ):
        x = normal(*shape)
        geometry = dict(window=window, stride=stride, padding=padding)
        flax_args = dict(window_shape=(window,) * 2, strides=(stride,) * 2, padding=((padding, padding),) * 2)
        n, h, w, c = shape
        yield dict(
            name=f"max_pool2d gradient N={n} {h}x{w}x{c} k{window} s{stride} p{padding}",
            jaxcnn=(jax.jit(jax.grad(lambda x, g=geometry: jnp.sum(ops.max_pool2d(x, **g) ** 2))), (x,)),
            reference=None,  # reference.max_pool2d_grad loops over every element: too slow to time here
            flax=(jax.jit(jax.grad(lambda x, f=flax_args: jnp.sum(nnx.max_pool(x, **f) ** 2))), (x,)),
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--reference-repeats", type=int, default=5)
    args = parser.parse_args()

    device = jax.devices()[0]
    result = dict(
        machine=dict(
            jax=jax.__version__,
            flax=flax.__version__,
            numpy=np.__version__,
            python=platform.python_version(),
            backend=jax.default_backend(),
            device_kind=device.device_kind,
            device_count=jax.device_count(),
            cpu_count=os.cpu_count(),
            load_average=os.getloadavg() if hasattr(os, "getloadavg") else None,
            # Settings that change what is timed (XLA flags, jaxcnn's own switches).
            env={k: v for k, v in os.environ.items() if k.startswith(("JAXCNN_", "XLA_"))},
        ),
        repeats=dict(jitted=args.repeats, reference=args.reference_repeats),
        unit="ms, median per call",
        ops={},
    )
    for case in cases(np.random.default_rng(0)):
        fns = {side: case[side][0] for side in ("jaxcnn", "flax")}
        inputs = {side: case[side][1] for side in ("jaxcnn", "flax")}
        times = medians(fns, inputs, args.repeats)
        if case["reference"] is not None:
            ref_fn, ref_args = case["reference"]
            times["reference"] = statistics.median(call_time(ref_fn, *ref_args) for _ in range(args.reference_repeats))
        # Same inputs, same answer: a guard that the comparison is like for like.
        y, y_flax = fns["jaxcnn"](*inputs["jaxcnn"]), fns["flax"](*inputs["flax"])
        result["ops"][case["name"]] = dict(
            **{f"{side}_ms": round(t * 1e3, 4) for side, t in times.items()},
            ratio_jaxcnn_over_flax=round(times["jaxcnn"] / times["flax"], 3),
            **(
                {"speedup_over_reference": round(times["reference"] / times["jaxcnn"], 1)}
                if "reference" in times
                else {}
            ),
            max_abs_diff_vs_flax=float(jnp.max(jnp.abs(y - y_flax))),
        )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
