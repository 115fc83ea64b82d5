"""Train-step throughput of the chapters' models, and whole LeNet runs. Prints one JSON object.

    python benchmarks/train.py                      # lenet, resnet18@96, resnet18@32, vgg11@224, runner runs
    python benchmarks/train.py --models lenet --runner-epochs 0
    python benchmarks/train.py --quick              # tiny settings: proves the script works

Per model (`name@image_size`; the size defaults to the chapter's), at one
global batch size, through `jaxcnn.train.make_train_step` exactly as the
runner calls it:
  synthetic_images_per_s  one uint8 28x28 batch already on device, reused:
                          the step alone (resize included, as in training).
  pipeline_images_per_s   mnist_10k through train_batches + prefetch, as the
                          runner feeds it; pipeline / synthetic near 1 means
                          the input is not the bottleneck.
  first_step_s, compile_s the first call, and its trace + lower + XLA compile
                          seconds from jax.monitoring's compile events.
  recompiles_after_first_step  compiles of train_step after the first call
                          (must be 0: every batch has one shape and sharding).
Images/s are the median (and best) of --repeats chunks of --steps steps
each (one host sync per chunk, as the runner syncs once per log interval).
Other processes on the machine move these numbers a lot: compare figures
from one run, and see load_average_before/after.

`lenet_breakdown` is where the LeNet step's time goes, for the chapter's
settings (sigmoid, average pooling, SGD) and the README's quick start (ReLU,
max pooling, Adam): the whole step, preprocess, forward, forward+backward,
the optimizer update, and each layer's forward and backward, timed in
turns, plus XLA's flop count of the step. `runner` times whole
`python -m experiments.lenet` runs on mnist_10k in a subprocess with the
same two settings: wall time, test accuracy, images/s per epoch.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxcnn import _hugepages, data, train

import _common  # benchmarks/: python puts the script's directory on sys.path
from _common import setup

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = "lenet,resnet18@96,resnet18@32,vgg11@224"
# Steps per timed chunk, so a chunk takes seconds, not minutes, on 2 CPU cores.
DEFAULT_STEPS = {"lenet@28": 100, "resnet18@32": 10, "resnet18@96": 3, "vgg11@224": 2}
# The LeNet runs the issue asks about: the chapter's (the runner's defaults, so
# its run passes no flags) and the README's quick start (these as flags).
LENET_SETTINGS = {
    "chapter": {"activation": "sigmoid", "pooling": "avg", "optimizer": "sgd", "lr": 0.1},
    "quick_start": {"activation": "relu", "pooling": "max", "optimizer": "adam", "lr": 0.003, "schedule": "cosine"},
}
# What the issue compares against (torch 2.13 CPU on this machine; not measured by this script).
TORCH_LENET_IMAGES_PER_S = [13000, 17000]


# jax.monitoring's events for the stages of a compile, and our names for them.
COMPILE_STAGES = {
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    "/jax/core/compile/backend_compile_duration": "xla_compile_s",
}


parse_model = functools.partial(_common.parse_model, prog="train.py")  # its errors name this script


class CompileLog:
    """(stage, function name, seconds) of every jax compile stage, via jax.monitoring."""

    def __init__(self):
        self.events = []
        jax.monitoring.register_event_duration_secs_listener(self._record)

    def _record(self, event, duration, fun_name="", **kwargs):
        if event in COMPILE_STAGES:
            self.events.append((COMPILE_STAGES[event], fun_name, duration))

    def mark(self) -> int:
        return len(self.events)

    def since(self, mark: int, fun_name: str) -> list:
        return [e for e in self.events[mark:] if fun_name in e[1]]


COMPILES = CompileLog()


def timed_chunks(step, state, totals, batches, steps: int, repeats: int):
    """(state, totals, seconds per chunk of `steps` steps); one sync at each chunk's end."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            images, labels = next(batches)
            state, totals = step(state, totals, images, labels)
        jax.block_until_ready((state, totals))
        seconds.append(time.perf_counter() - start)
    return state, totals, seconds


def bench_model(spec: str, batch_size: int, steps: int, repeats: int, split: data.Split) -> dict:
    name, image_size = parse_model(spec)
    mesh = train.data_mesh()
    batch_sharding = NamedSharding(mesh, P("data"))
    step, state, totals, _, _ = setup(name, image_size, mesh)
    num_params = sum(p.size for p in jax.tree.leaves(state.params))
    # The dataset's own shape (28x28x1): the step resizes, in training as here.
    images, labels = split.images[:batch_size], split.labels[:batch_size]
    synthetic = itertools.repeat(jax.device_put((images, labels), batch_sharding))

    mark = COMPILES.mark()
    state, totals, (first_s,) = timed_chunks(step, state, totals, synthetic, 1, 1)
    first = COMPILES.since(mark, "train_step")
    mark = COMPILES.mark()
    state, totals, synthetic_s = timed_chunks(step, state, totals, synthetic, steps, repeats)

    endless = itertools.chain.from_iterable(
        data.train_batches(split, batch_size, seed=0, epoch=epoch) for epoch in itertools.count()
    )
    pipeline = data.prefetch(endless, batch_sharding)
    state, totals, pipeline_s = timed_chunks(step, state, totals, pipeline, steps, repeats)
    recompiles = [e for e in COMPILES.since(mark, "") if e[0] == "xla_compile_s"]

    per_s = lambda seconds: batch_size * steps / statistics.median(seconds)
    step_s = statistics.median(synthetic_s) / steps
    compile_s = {stage: round(sum(s for st, _, s in first if st == stage), 3) for stage in COMPILE_STAGES.values()}
    return {
        "image_size": image_size,
        "params": num_params,
        "steps_per_chunk": steps,
        "chunks": repeats,
        "synthetic_images_per_s": round(per_s(synthetic_s)),
        "synthetic_best_images_per_s": round(batch_size * steps / min(synthetic_s)),
        "synthetic_chunk_images_per_s": [round(batch_size * steps / s) for s in synthetic_s],
        "pipeline_images_per_s": round(per_s(pipeline_s)),
        "pipeline_best_images_per_s": round(batch_size * steps / min(pipeline_s)),
        "pipeline_chunk_images_per_s": [round(batch_size * steps / s) for s in pipeline_s],
        "pipeline_over_synthetic": round(per_s(pipeline_s) / per_s(synthetic_s), 3),
        "step_ms": round(1e3 * step_s, 3),
        "first_step_s": round(first_s, 3),
        "first_step_minus_steady_s": round(first_s - step_s, 3),
        "compile_s": compile_s,
        "recompiles_after_first_step": sum("train_step" in e[1] for e in recompiles),
        "other_compiles_in_loop": sorted({e[1] for e in recompiles if "train_step" not in e[1]}),
    }


# --------------------------------------------------------------------------
# Where the LeNet step's time goes.


def interleaved_ms(pieces: dict, repeats: int) -> dict:
    """Median milliseconds of each zero-argument callable, timed in turns (round robin)
    so that other processes' load, which comes and goes, falls on all pieces alike."""
    for piece in pieces.values():
        jax.block_until_ready(piece())  # compile
    times = {name: [] for name in pieces}
    for _ in range(repeats):
        for name, piece in pieces.items():
            start = time.perf_counter()
            jax.block_until_ready(piece())
            times[name].append(time.perf_counter() - start)
    return {name: round(1e3 * statistics.median(t), 3) for name, t in times.items()}


def lenet_breakdown(setting: str, batch_size: int, repeats: int, split: data.Split) -> dict:
    """Where the time of one LeNet train step goes, with `setting`'s model and optimizer."""
    config = LENET_SETTINGS[setting]
    step, state, totals, tx, model = setup("lenet", 28, train.data_mesh(), **config)
    # The pieces use the model's own arrays: the whole step donates the state's.
    train_def, _, params, batch_stats = train.split_model(model)
    images, labels = jax.device_put((split.images[:batch_size], split.labels[:batch_size]))
    x = data.preprocess(images)

    def loss(params, x):
        logits = nnx.merge(train_def, params, batch_stats)(x)
        return train.cross_entropy(logits, labels).mean()

    def update(grads, opt_state, params):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    compiled = step.lower(state, totals, images, labels).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # a list of one dict in older jax
    carry = [state, totals]  # the step donates them: thread them through

    def whole_step():
        carry[:] = compiled(*carry, images, labels)
        return carry

    forward, grad, update = jax.jit(loss), jax.jit(jax.grad(loss)), jax.jit(update)
    grads, opt_state = grad(params, x), tx.init(params)
    preprocess = jax.jit(data.preprocess)
    pieces = {
        "whole_step_ms": whole_step,
        "preprocess_ms": lambda: preprocess(images),
        "forward_loss_ms": lambda: forward(params, x),
        "forward_backward_ms": lambda: grad(params, x),
        "optimizer_update_ms": lambda: update(grads, opt_state, params),
    }
    # Each layer alone at its input shape: its forward, and its backward (the vjp
    # training needs: to the parameters, and to the input after the first layer).
    # XLA runs the forward inside the backward only where the backward uses it
    # (not for conv and dense layers, which are linear), so a layer's share of the
    # step is about forward + backward.
    h = x
    for i, layer in enumerate(model.net.layers):
        if isinstance(layer, nnx.Module):
            graphdef, layer_state = nnx.split(layer)
            apply = lambda s, h, graphdef=graphdef: nnx.merge(graphdef, s)(h)
        else:
            layer_state, apply = {}, lambda s, h, f=layer: f(h)

        def backward(s, h, cotangent, apply=apply, first=i == 0):
            # A random cotangent as an argument: with a constant one (grad of a sum)
            # XLA simplifies the backward away.
            grads = jax.vjp(apply, s, h)[1](cotangent)
            return grads[0] if first else grads

        apply, backward = jax.jit(apply), jax.jit(backward)
        out = apply(layer_state, h)
        cotangent = jax.random.normal(jax.random.key(i), out.shape, out.dtype)
        label = f"{i} {getattr(layer, '__name__', type(layer).__name__)} {tuple(h.shape[1:])}"
        pieces[f"{label} forward_ms"] = lambda f=apply, s=layer_state, h=h: f(s, h)
        pieces[f"{label} backward_ms"] = lambda f=backward, s=layer_state, h=h, c=cotangent: f(s, h, c)
        h = out
    ms = interleaved_ms(pieces, repeats)
    whole = ms["whole_step_ms"]
    layers = {}
    for key in list(ms)[5:]:
        label, _, measure = key.rpartition(" ")
        layers.setdefault(label, {})[measure] = ms[key]
    return {
        "settings": config,
        "batch_size": batch_size,
        "repeats": repeats,
        **{k: ms[k] for k in list(ms)[:5]},
        "whole_step_images_per_s": round(batch_size / whole * 1e3),
        "rest_ms": round(whole - ms["preprocess_ms"] - ms["forward_backward_ms"] - ms["optimizer_update_ms"], 3),
        "note": "pieces are timed in turns, one sync per call; each is its own jit, so the sum misses "
        "fusion across pieces; rest = whole step - preprocess - forward_backward - optimizer_update "
        "(metrics, loss reductions, dispatch)",
        "layers": layers,
        "xla_step_gflop": round(cost.get("flops", float("nan")) / 1e9, 4),
        "xla_step_mbytes_accessed": round(cost.get("bytes accessed", float("nan")) / 1e6, 2),
        "achieved_gflop_per_s": round(cost.get("flops", float("nan")) / 1e6 / whole, 2),
    }


# --------------------------------------------------------------------------
# Whole runs through the runner.


def runner_run(setting: str, epochs: int, extra: list[str]) -> dict:
    flags = [] if setting == "chapter" else [a for k, v in LENET_SETTINGS[setting].items() for a in (f"--{k}", str(v))]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp) / "run"
        argv = [
            sys.executable,
            "-m",
            "experiments.lenet",
            "--dataset",
            "mnist_10k",
            "--workdir",
            str(workdir),
            "--epochs",
            str(epochs),
            *flags,
            *extra,
        ]
        start = time.perf_counter()
        done = subprocess.run(
            argv, cwd=ROOT, capture_output=True, text=True, check=False, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        wall_s = time.perf_counter() - start
        if done.returncode:
            raise RuntimeError(
                f"train.py: {' '.join(argv[1:])} exited {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
            )
        records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steady = [r["images_per_sec"] for r in records[1:]] or [records[0]["images_per_sec"]]
    return {
        "command": " ".join(["python", *argv[1:]]).replace(str(workdir), "TMP"),
        "wall_s": round(wall_s, 1),
        "epochs": len(records),
        "final_test_accuracy": records[-1]["test_accuracy"],
        "final_train_loss": round(records[-1]["train_loss"], 4),
        "train_epoch_s": [round(r["seconds"], 2) for r in records],
        "first_epoch_images_per_s": round(records[0]["images_per_sec"]),
        "later_epochs_images_per_s": round(statistics.median(steady)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated name[@image_size]")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None, help="steps per timed chunk (default: per model)")
    parser.add_argument("--repeats", type=int, default=3, help="timed chunks per measurement")
    parser.add_argument("--runner-epochs", type=int, default=10, help="epochs of each runner run (0: skip the runs)")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the LeNet step breakdown")
    parser.add_argument("--quick", action="store_true", help="tiny settings, to check the script runs")
    args = parser.parse_args()
    runner_extra, settings = [], list(LENET_SETTINGS)
    if args.quick:  # one runner run is enough to show the subprocess and its metrics work
        args.models, args.batch_size, args.steps, args.repeats, args.runner_epochs = "lenet", 32, 2, 1, 1
        runner_extra = ["--train-examples", "256", "--test-examples", "64", "--batch-size", "32"]
        settings = ["quick_start"]
    if args.batch_size < 1 or args.repeats < 1 or (args.steps is not None and args.steps < 1) or args.runner_epochs < 0:
        parser.error("--batch-size, --steps and --repeats must be positive, --runner-epochs >= 0")
    try:
        specs = [s for s in args.models.split(",") if s]
        [parse_model(s) for s in specs]
    except ValueError as error:
        parser.error(str(error))

    split = data.load(data.BUNDLED).train
    results = {
        "benchmark": "train",
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "load_average_before": os.getloadavg(),
        "jax": jax.__version__,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),  # huge pages or not: see jaxcnn._hugepages
        "batch_size": args.batch_size,
        "data": "uint8 28x28x1 MNIST digits, resized inside the step",
        "models": {},
        "benchmark_seconds": {},
    }
    clock = time.perf_counter()

    def lap(section):  # how long each part of this script took: it is slow on 2 cores
        nonlocal clock
        results["benchmark_seconds"][section] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()

    for spec in specs:
        key = "{}@{}".format(*parse_model(spec))
        steps = args.steps or DEFAULT_STEPS.get(key, 2)
        results["models"][key] = bench_model(spec, args.batch_size, steps, args.repeats, split)
        lap(key)
    for setting in settings if not args.no_breakdown else []:
        results.setdefault("lenet_breakdown", {})[setting] = lenet_breakdown(
            setting, args.batch_size, 1 if args.quick else 20, split
        )
        lap(f"lenet_breakdown_{setting}")
    if "lenet@28" in results["models"] and args.batch_size == 128:
        lenet = results["models"]["lenet@28"]
        ours = {"median": lenet["synthetic_images_per_s"], "best_chunk": lenet["synthetic_best_images_per_s"]}
        results["lenet_vs_torch"] = {
            "torch_images_per_s": TORCH_LENET_IMAGES_PER_S,
            "jax_synthetic_images_per_s": ours,
            "ratio_to_torch": {k: [round(v / t, 2) for t in TORCH_LENET_IMAGES_PER_S] for k, v in ours.items()},
            "note": "the chapter's LeNet (sigmoid, avg pooling, SGD); torch figures are the issue's "
            "(torch 2.13 CPU, batch 128, this machine), not measured in this run",
        }
    for setting in settings if args.runner_epochs else []:
        results.setdefault("runner", {})[setting] = runner_run(setting, args.runner_epochs, runner_extra)
        lap(f"runner_{setting}")
    results["load_average_after"] = os.getloadavg()
    print(json.dumps(results))


if __name__ == "__main__":
    _hugepages.reexec_with_huge_pages()  # as the experiments' command lines run
    main()
