"""Data-parallel scaling of the train step, and what checkpointing costs. Prints one JSON object.

    python benchmarks/scaling.py                    # lenet and resnet18@32 on 1, 2, 4, 8 devices
    python benchmarks/scaling.py --models lenet,resnet18@96 --steps 2
    python benchmarks/scaling.py --quick            # tiny settings: proves the script works

Scaling: images/s of `jaxcnn.train.make_train_step` at a fixed global batch
split over N devices of a `train.data_mesh` (batch sharded, state
replicated, as the runner does), on a uint8 MNIST batch already on device.
On a CPU host each N runs in its own subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=N: those fake devices share
the same cores, so the numbers show the cost of sharding (per-device
programs, the gradient all-reduce), not a speed-up. With GPUs or TPUs the
first N real devices are used, in this process. The loop waits for the
devices every --sync-every steps: with a hundred or so LeNet steps in
flight, XLA's CPU all-reduce between fake devices stalls and aborts the
process (seen with jax 0.10.2 on 2 cores).

Checkpointing: seconds per `jaxcnn.checkpoint.save` of each model's whole
train state (the chapters' SGD), split into the part that blocks the loop
and the wait for Orbax's background write, and both as a percentage of one
epoch: mnist_10k's 8000 training images at the global batch, from the
1-device step time (the runner saves once per epoch).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxcnn import _hugepages, checkpoint, data, train

import _common  # benchmarks/: python puts the script's directory on sys.path
from _common import setup

DEFAULT_MODELS = "lenet,resnet18@32"
DEFAULT_STEPS = {"lenet@28": 50, "resnet18@32": 5}  # per timed chunk; others: 2
NOTE = (
    "On a CPU host the N devices are fake (--xla_force_host_platform_device_count) and share "
    "the same cores: images/s across N shows the overhead of sharding, not a speed-up."
)


parse_model = functools.partial(_common.parse_model, prog="scaling.py")  # its errors name this script


def step_throughput(spec: str, num_devices: int, batch_size: int, steps: int, repeats: int, sync_every: int) -> dict:
    name, size = parse_model(spec)
    mesh = train.data_mesh(jax.devices()[:num_devices])
    step, state, totals, _, _ = setup(name, size, mesh)
    split = data.load(data.BUNDLED).train
    batch = jax.device_put((split.images[:batch_size], split.labels[:batch_size]), NamedSharding(mesh, P("data")))
    start = time.perf_counter()
    state, totals = step(state, totals, *batch)
    jax.block_until_ready((state, totals))
    first_s = time.perf_counter() - start
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(1, steps + 1):
            state, totals = step(state, totals, *batch)
            if i % sync_every == 0 or i == steps:
                jax.block_until_ready((state, totals))
        seconds.append(time.perf_counter() - start)
    step_s = statistics.median(seconds) / steps
    return {
        "images_per_s": round(batch_size / step_s),
        "best_images_per_s": round(batch_size * steps / min(seconds)),
        "chunk_images_per_s": [round(batch_size * steps / s) for s in seconds],
        "step_ms": round(1e3 * step_s, 3),
        "first_step_minus_steady_s": round(first_s - step_s, 3),
    }


def run_fake_devices(num_devices: int, spec: str, argv: list[str], attempts: int = 2) -> dict:
    """One model's worker in a fresh process whose CPU platform has `num_devices` devices.

    XLA's CPU all-reduce between fake devices can stall when the cores are
    busy (it waits 40 s for every device to reach it, then aborts the
    process), so a failed worker is tried again and, failing twice, reported
    as an error instead of ending the benchmark.
    """
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={num_devices}".strip()
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    errors = []
    for _ in range(attempts):
        done = subprocess.run(
            [sys.executable, __file__, *argv, "--models", spec, "--worker", str(num_devices)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if done.returncode == 0:
            return {**json.loads(done.stdout.strip().splitlines()[-1])[spec], "failed_attempts": errors}
        lines = done.stderr.strip().splitlines() or ["(no output)"]
        reason = next((line for line in lines if "Termination timeout" in line or "Error" in line), lines[-1])
        errors.append(f"exit {done.returncode}: {reason[:300]}")
    return {"error": errors}


# --------------------------------------------------------------------------
# Checkpoint overhead.


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def checkpoint_cost(spec: str, saves: int) -> dict:
    name, size = parse_model(spec)
    _, state, totals, _, _ = setup(name, size, train.data_mesh())
    seconds, blocking = [], []
    with tempfile.TemporaryDirectory() as tmp:
        mngr = checkpoint.manager(Path(tmp) / "checkpoints", keep=2)
        for step in range(1, saves + 1):
            start = time.perf_counter()
            checkpoint.save(mngr, step, state, totals, {"epoch": step, "batch": 0})
            blocking.append(time.perf_counter() - start)
            mngr.wait_until_finished()
            seconds.append(time.perf_counter() - start)
        on_disk = directory_bytes(Path(tmp) / "checkpoints" / str(saves))
        mngr.close()
    later = seconds[1:] or seconds
    return {
        "state_mbytes": round(sum(x.nbytes for x in jax.tree.leaves(state)) / 1e6, 2),
        "on_disk_mbytes": round(on_disk / 1e6, 2),
        "saves": saves,
        "first_save_s": round(seconds[0], 3),
        "save_s": round(statistics.median(later), 3),
        "save_blocking_s": round(statistics.median(blocking[1:] or blocking), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated name[@image_size]")
    parser.add_argument("--devices", default="1,2,4,8", help="comma-separated device counts")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch (must divide by every count)")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed chunk (default: per model)")
    parser.add_argument("--repeats", type=int, default=3, help="timed chunks per measurement")
    parser.add_argument(
        "--sync-every",
        type=int,
        default=10,
        help="wait for the devices every N steps: XLA's CPU all-reduce between fake devices "
        "aborts when too many steps are in flight",
    )
    parser.add_argument("--saves", type=int, default=4, help="checkpoints saved per model (the first is setup-heavy)")
    parser.add_argument("--quick", action="store_true", help="tiny settings, to check the script runs")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.models, args.devices, args.batch_size, args.steps, args.repeats, args.saves = "lenet", "1,2", 16, 2, 1, 2
    try:
        specs = [s for s in args.models.split(",") if s]
        [parse_model(s) for s in specs]
        counts = [int(n) for n in args.devices.split(",") if n]
    except ValueError as error:
        parser.error(str(error))
    if min(counts, default=0) < 1 or any(args.batch_size % n for n in counts):
        parser.error(
            f"--devices must be positive counts that divide --batch-size {args.batch_size}, got {args.devices}"
        )
    if min(args.batch_size, args.repeats, args.saves, args.sync_every, args.steps or 1) < 1:
        parser.error("--batch-size, --steps, --repeats, --sync-every and --saves must be positive")
    steps = lambda spec: args.steps or DEFAULT_STEPS.get("{}@{}".format(*parse_model(spec)), 2)
    if args.worker is not None:  # a subprocess with fake devices: print its throughput, nothing else
        if jax.device_count() < args.worker:
            raise RuntimeError(f"scaling.py: asked for {args.worker} devices, JAX sees {jax.device_count()}")
        print(
            json.dumps(
                {
                    s: step_throughput(s, args.worker, args.batch_size, steps(s), args.repeats, args.sync_every)
                    for s in specs
                }
            )
        )
        return

    fake = jax.default_backend() == "cpu"
    if fake:
        argv = [
            "--batch-size",
            str(args.batch_size),
            "--repeats",
            str(args.repeats),
            "--devices",
            args.devices,
            "--sync-every",
            str(args.sync_every),
        ]
        by_count = {n: {s: run_fake_devices(n, s, [*argv, "--steps", str(steps(s))]) for s in specs} for n in counts}
    else:
        counts = [n for n in counts if n <= jax.device_count()]
        by_count = {
            n: {s: step_throughput(s, n, args.batch_size, steps(s), args.repeats, args.sync_every) for s in specs}
            for n in counts
        }

    scaling = {}
    for spec in specs:
        key = "{}@{}".format(*parse_model(spec))
        one = by_count[counts[0]][spec].get("images_per_s")
        scaling[key] = {str(n): by_count[n][spec] for n in counts}
        for n in counts:
            if one and "images_per_s" in by_count[n][spec]:
                scaling[key][str(n)][f"relative_to_{counts[0]}"] = round(by_count[n][spec]["images_per_s"] / one, 3)

    steps_per_epoch = data.num_train_batches(data.load(data.BUNDLED).train, args.batch_size)
    checkpoints = {}
    for spec in specs:
        name, size = parse_model(spec)
        key = f"{name}@{size}"
        cost = checkpoint_cost(spec, args.saves)
        checkpoints[key] = cost
        step_ms = scaling[key][str(counts[0])].get("step_ms")
        if step_ms:  # None if that worker failed
            epoch_s = steps_per_epoch * step_ms / 1e3
            checkpoints[key] |= {
                "epoch_s": round(epoch_s, 3),
                "save_percent_of_epoch": round(100 * cost["save_s"] / epoch_s, 2),
                "blocking_percent_of_epoch": round(100 * cost["save_blocking_s"] / epoch_s, 2),
            }
    print(
        json.dumps(
            {
                "benchmark": "scaling",
                "backend": jax.default_backend(),
                "fake_cpu_devices": fake,
                "host_devices_seen_by_parent": [str(d) for d in jax.devices()],
                "cpu_count": os.cpu_count(),
                "jax": jax.__version__,
                "global_batch_size": args.batch_size,
                "sync_every_steps": args.sync_every,
                "note": NOTE if fake else "real devices: images/s across N is the data-parallel speed-up",
                "scaling": scaling,
                "checkpoint": {
                    "what": "checkpoint.save(state with the chapters' SGD, totals, meta) then wait_until_finished; "
                    "blocking = until save() returns (the loop goes on while Orbax writes)",
                    "epoch": f"{steps_per_epoch} steps of {args.batch_size} (mnist_10k's 8000 training images) "
                    f"at the {counts[0]}-device step time",
                    "directory": tempfile.gettempdir(),
                    **checkpoints,
                },
                "load_average": os.getloadavg(),
            }
        )
    )


if __name__ == "__main__":
    _hugepages.reexec_with_huge_pages()  # as the experiments' command lines run
    main()
