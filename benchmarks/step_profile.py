"""Where a model's train step spends its time: XLA's operations, summed over a few steps by jax.profiler.

Prints one JSON object: the step's wall time; the time per step of each kind of operation (the HLO
name without its number: all `ynn_fusion`s together), and of the --top single operations, each with
its share of the step's wall time (under the profiler).
Names are the optimized HLO's (`ynn_fusion`: a matrix product by YNNPACK, `dot`: one by Eigen;
`*concatenate*`, `*dynamic-update-slice*`: copies; `while`: a chunk loop, its own time only). Times
are self times (a loop's less its body's); operations on XLA's two threads may overlap, so shares
can sum past 1. The step is built as a run builds it.

    python benchmarks/step_profile.py --models resnet18@96 --batch-size 128
    JAXCNN_CONV_LOWERING=xla python benchmarks/step_profile.py --models lenet   # XLA's own convolutions

Not named profile.py: a script's directory comes first on sys.path, where the standard library's
cProfile (which PyTorch imports) would find it in place of its own `profile`.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from jaxcnn import _hugepages, _lowering, train

from _common import parse_model, setup


def op_times(trace_dir: str) -> tuple[collections.Counter, collections.Counter]:
    """(self microseconds, calls) per HLO operation, from the trace jax.profiler wrote.

    Operations run on XLA's threads ("tf_XLA..."); the runtime's own events there ("Class::method",
    "end: ...") are skipped. A loop's or call's event spans its body's operations on the same
    thread, so each event counts its self time: its duration less that of the events it encloses.
    """
    (path,) = Path(trace_dir).glob("**/*.trace.json.gz")
    with gzip.open(path) as file:
        events = json.load(file)["traceEvents"]
    xla_threads = {
        (e["pid"], e["tid"])
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name" and e["args"]["name"].startswith("tf_XLA")
    }
    ops = [
        e
        for e in events
        if e.get("ph") == "X"
        and "dur" in e
        and (e["pid"], e["tid"]) in xla_threads
        and "::" not in e["name"]
        and not e["name"].startswith("end: ")
    ]
    micros, calls = collections.Counter(), collections.Counter()
    open_events = {}  # per thread: the events enclosing the current one, innermost last
    for e in sorted(ops, key=lambda e: (e["ts"], -e["dur"])):
        stack = open_events.setdefault((e["pid"], e["tid"]), [])
        while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
            stack.pop()
        if stack:
            micros[stack[-1]["name"]] -= e["dur"]
        micros[e["name"]] += e["dur"]
        calls[e["name"]] += 1
        stack.append(e)
    return micros, calls


def kind(op: str) -> str:
    """An HLO name without its number: "ynn_fusion.28" -> "ynn_fusion"."""
    return re.sub(r"\.\d+$", "", op)


def profile(name: str, size: int, batch_size: int, steps: int, top: int) -> dict:
    """One model's step profile: wall time, operation kinds and the `top` operations, per step."""
    step, state, totals, _, _ = setup(name, size, train.data_mesh())
    rng = np.random.default_rng(0)
    images = jax.device_put(rng.integers(0, 256, (batch_size, size, size, 1), dtype=np.uint8))
    labels = jax.device_put(rng.integers(0, 10, batch_size).astype(np.int32))
    for _ in range(2):  # compile, then first-run allocations
        state, totals = step(state, totals, images, labels)
    jax.block_until_ready(state)

    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            start = time.perf_counter()
            for _ in range(steps):
                state, totals = step(state, totals, images, labels)
            jax.block_until_ready(state)
            wall = time.perf_counter() - start
        micros, calls = op_times(trace_dir)
    kinds, kind_calls = collections.Counter(), collections.Counter()
    for op, us in micros.items():
        kinds[kind(op)] += us
        kind_calls[kind(op)] += calls[op]

    per_step = lambda us: round(us / steps / 1e3, 3)  # noqa: E731
    share = lambda us: round(us / 1e6 / wall, 3)  # noqa: E731
    return {
        "step_ms": round(wall / steps * 1e3, 2),  # under the profiler: a little slower than unprofiled
        "kinds": [
            {"kind": k, "ms": per_step(us), "calls": kind_calls[k] // steps, "share": share(us)}
            for k, us in kinds.most_common()
        ],
        "ops": [
            {"op": op, "ms": per_step(us), "calls": calls[op] // steps, "share": share(us)}
            for op, us in micros.most_common(top)
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet18@96", help="comma-separated name[@image_size]s")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="profiled steps (after two warm-up steps)")
    parser.add_argument("--top", type=int, default=20, help="single operations to list")
    parser.add_argument("--quick", action="store_true", help="LeNet, batch 8, 1 step: checks the script runs")
    args = parser.parse_args()
    if args.quick:
        args.models, args.batch_size, args.steps = "lenet", 8, 1
    try:
        specs = [parse_model(spec, parser.prog) for spec in args.models.split(",") if spec]
        lowering = _lowering.mode(parser.prog, None)  # a bad $JAXCNN_CONV_LOWERING fails here, not mid-run
    except ValueError as error:
        parser.error(str(error).removeprefix(f"{parser.prog}: "))
    if not specs or args.batch_size < 1 or args.steps < 1 or args.top < 0:
        parser.error("--models must name a model, --batch-size and --steps be positive, --top at least 0")
    result = {
        "benchmark": "step_profile",
        "batch_size": args.batch_size,
        "steps": args.steps,
        "lowering": lowering,
        "models": {
            f"{name}@{size}": profile(name, size, args.batch_size, args.steps, args.top) for name, size in specs
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    _hugepages.reexec_with_huge_pages()  # as the experiments' command lines run
    main()
