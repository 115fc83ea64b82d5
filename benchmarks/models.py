"""Forward and forward+backward time of each registered model at its chapter input size.

Prints one JSON object. Per model: compile_s (trace, lower and compile,
ahead of time), then the median wall time of `--repeats` runs of the
compiled function:
  forward_ms        eval mode (running BatchNorm statistics, no dropout): inference.
  forward_backward_ms  train mode: mean cross-entropy and its gradient with
                    respect to the parameters, the new BatchNorm statistics
                    returned, dropout on (what a train step costs before the
                    optimizer update).
Inputs are random; the default batch is 128. On 2 CPU cores VGG-11 at 224 is
slow: pick models with --models and a smaller --batch-size.

    python benchmarks/models.py --models lenet,resnet18 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
from flax import nnx

from jaxcnn import models, train


def _time(fn, *args, repeats: int) -> tuple[float, float]:
    """(compile seconds, median milliseconds per call) of jax.jit(fn)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(*args))  # warm-up: first-run allocations
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return compile_s, 1e3 * statistics.median(times)


def bench(name: str, batch_size: int, repeats: int, dtype: str | None) -> dict:
    size = models.default_image_size(name)
    model = models.create(name, **({"dtype": dtype} if dtype else {}))
    # Plain arrays, as the trainer passes them: merge then makes fresh
    # Variables inside each trace (BatchNorm may not mutate one from outside the grad).
    train_def, eval_def, params, batch_stats = train.split_model(model)
    kx, ky, kd = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (batch_size, size, size, 1))
    y = jax.random.randint(ky, (batch_size,), 0, 10)

    def forward(params, batch_stats, x):
        return nnx.merge(eval_def, params, batch_stats)(x)

    def loss(params, batch_stats, x, y, key):
        m = nnx.merge(train_def, params, batch_stats)
        logits = m(x, rngs=nnx.Rngs(dropout=key))
        loss = train.cross_entropy(logits, y).mean()
        return loss, nnx.as_pure(nnx.state(m, nnx.BatchStat))

    grad = jax.value_and_grad(loss, has_aux=True)
    fwd_compile, fwd_ms = _time(forward, params, batch_stats, x, repeats=repeats)
    grad_compile, grad_ms = _time(grad, params, batch_stats, x, y, kd, repeats=repeats)
    return {
        "image_size": size,
        "params": sum(p.size for p in jax.tree.leaves(params)),
        "forward_compile_s": round(fwd_compile, 3),
        "forward_ms": round(fwd_ms, 2),
        "forward_backward_compile_s": round(grad_compile, 3),
        "forward_backward_ms": round(grad_ms, 2),
        "forward_backward_images_per_s": round(batch_size / grad_ms * 1e3, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(models.names()), help="comma-separated registry names")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in models.names()]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {models.names()}")
    if args.batch_size < 1 or args.repeats < 1:
        parser.error("--batch-size and --repeats must be positive")
    dtype = None if args.dtype == "float32" else args.dtype
    results = {name: bench(name, args.batch_size, args.repeats, dtype) for name in names}
    print(
        json.dumps(
            {
                "benchmark": "models",
                "backend": jax.default_backend(),
                "devices": [str(d) for d in jax.devices()],
                "jax": jax.__version__,
                "batch_size": args.batch_size,
                "repeats": args.repeats,
                "dtype": args.dtype,
                "input": "NHWC, 1 channel, 10 classes, random",
                "load_average_1m": round(os.getloadavg()[0], 2),
                "env": {k: v for k, v in os.environ.items() if k.startswith(("JAXCNN_", "XLA_"))},
                "models": results,
            }
        )
    )


if __name__ == "__main__":
    main()
