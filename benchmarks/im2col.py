"""Convolution as one matrix product (im2col) against XLA's convolution. Prints one JSON object.

    python benchmarks/im2col.py [--repeats 20]

For each layer shape: median milliseconds of the jitted forward and
forward+backward of `ops.conv2d` and `analysis.conv2d_im2col`, the GFLOP/s
both reach (2 flops per multiply-add, from `analysis.conv_cost`), and how
many times larger the patch matrix is than the input: im2col's memory price.
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxcnn import analysis, ops

# (name, N, H, W, C, O, k, stride, padding): first layers of LeNet and of a
# CIFAR-sized VGG block, a ResNet stage-1 3x3, and a strided 3x3.
SHAPES = [
    ("lenet_conv1", 128, 28, 28, 1, 6, 5, 1, 2),
    ("vgg_block", 32, 32, 32, 16, 32, 3, 1, 1),
    ("resnet_3x3", 8, 56, 56, 64, 64, 3, 1, 1),
    ("strided_3x3", 32, 32, 32, 32, 64, 3, 2, 1),
]


def median_ms(f, args, repeats: int) -> float:
    jax.block_until_ready(f(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per measurement (median)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")

    rng = np.random.default_rng(0)
    rows = []
    for name, n, h, w, c, o, k, stride, padding in SHAPES:
        x = jnp.asarray(rng.standard_normal((n, h, w, c), dtype=np.float32))
        kernel = jnp.asarray(rng.standard_normal((k, k, c, o), dtype=np.float32))
        cost = analysis.conv_cost(c, h, w, o, k, k, stride=stride, padding=padding)
        gflop = 2 * n * cost["macs"] / 1e9
        row = {
            "shape": name,
            "x": [n, h, w, c],
            "w": [k, k, c, o],
            "stride": stride,
            "padding": padding,
            "patch_to_input_size": round(k * k * cost["output_hw"][0] * cost["output_hw"][1] / (h * w), 2),
        }
        for label, conv in (("conv2d", ops.conv2d), ("im2col", analysis.conv2d_im2col)):
            fwd = jax.jit(lambda x, kernel, conv=conv, s=stride, p=padding: conv(x, kernel, stride=s, padding=p))
            # Squared, so the backward needs the forward's output and XLA cannot drop it.
            fwd_bwd = jax.jit(jax.grad(lambda x, kernel, f=fwd: jnp.sum(f(x, kernel) ** 2), argnums=(0, 1)))
            for mode, f, flops in (("fwd", fwd, gflop), ("fwd_bwd", fwd_bwd, 3 * gflop)):
                ms = median_ms(f, (x, kernel), args.repeats)
                row[f"{label}_{mode}_ms"] = round(ms, 3)
                row[f"{label}_{mode}_gflops"] = round(flops / ms * 1e3, 2)
        for mode in ("fwd", "fwd_bwd"):
            row[f"im2col_over_conv2d_{mode}"] = round(row[f"im2col_{mode}_ms"] / row[f"conv2d_{mode}_ms"], 2)
        rows.append(row)

    print(
        json.dumps(
            {
                "benchmark": "im2col",
                "backend": jax.default_backend(),
                "devices": jax.device_count(),
                "device_kind": jax.devices()[0].device_kind,
                "repeats": args.repeats,
                "jax": jax.__version__,
                "results": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
