"""The GPU checks, and jaxcnn against PyTorch on one GPU, in one command. Prints one JSON object.

    python benchmarks/gpu.py                  # a machine with an NVIDIA GPU and JAX's CUDA plugin
    python benchmarks/gpu.py --cpu-dry-run    # this script's own check on CPU: toy sizes, numbers mean nothing

Sized to finish in under 8 minutes on one H200, compiles included: no model's check starts after
--check-budget-s, no other piece after --budget-s (each is recorded as skipped), and at --deadline-s or
on SIGTERM it prints what was measured so far and exits 1. On a machine without a GPU it says so in one
line and exits 1.

checks       every registered model (--check-models) at its chapter size: the train step as the runner
             builds it, --check-steps steps on the GPU and on this machine's CPU from the same initial
             state and the same batches, then the eval step and the eval-mode logits. float32 with
             matmul precision "highest" on both, so the two differ by rounding alone. The batches are
             uniform random 28x28 images, not digits: a digit's flat strokes and background give
             windows of equal values, whose max-pool gradient then goes wherever rounding puts the
             largest (AlexNet's first-layer gradients differ by 6e-3 between two correct CPU
             lowerings on digits, by 8e-7 on noise). What a forward pass gives from the initial
             weights (eval logits, the first train loss) must agree within CHECK_RTOL (relative to
             the CPU's largest magnitude). The first step's gradients (relative L2 over all
             parameters) and what follows that step are held to NOISE_FACTOR times the CPU's own
             spread, the same steps from weights nudged by 2**-22 up or down at random
             (CHECK_RTOL where that is smaller): at batch 8 BatchNorm makes some networks' gradients
             ill-conditioned (one part in a million on the input moves some of ResNet-18's weight
             gradients by 5%). A figure whose tolerance would pass JUDGE_LIMIT is not judged (listed
             under not_judged). The same figures are held to the same tolerances for the CPU with
             XLA's convolutions in place of _lowering's (cpu_lowerings_vs_xla): _lowering's gradients
             against XLA's on one platform, as the GPU's against the CPU's.
throughput   train-step images/s with bf16 compute and float32 parameters, plain SGD, uint8 NHWC batches
             already on the device: jaxcnn's runner step (dtype=bfloat16) against PyTorch eager and
             torch.compile (default mode) with channels_last and bf16 autocast, on the same
             architecture (twin parameter counts are compared), for ResNet-18 at 96 px (1 channel, the
             chapter's) and the largest registered ResNet by parameter count at 224 px (3 channels),
             batch --batch-size. Median of --repeats chunks of --steps steps after warm-up, one device
             sync per chunk. peak_fraction = achieved FLOP/s / PEAK_TFLOPS (dense bf16, H100/H200 SXM),
             counting a train step as 3 forward passes of 2 x jaxcnn.analysis.model_cost's
             multiply-adds (padded taps included, as ResNet-50's usual 4.1 G count does);
             xla_gflop_per_image is XLA's own count of the compiled jaxcnn step, for comparison.
A piece that fails (a model's check, torch.compile) records {"error": ...} and the rest runs; the exit
status is 0 only if every check passed and no piece failed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

# JAX would take 75% of the GPU's memory at start, leaving PyTorch too little.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not

PEAK_TFLOPS = 989  # dense bf16, H100/H200 SXM (NVIDIA's datasheet; 1979 counts 2:4 sparsity)
CHECK_RTOL = 1e-3
NOISE_FACTOR = 10
JUDGE_LIMIT = 0.05
NUDGE = 2.0**-22  # 2 to 4 float32 ulps
START = time.perf_counter()
RESULT = {"benchmark": "gpu"}  # filled as the run goes, so SIGTERM can print what there is


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check-models", default=None, help="comma-separated registry names (default: all)")
    parser.add_argument("--check-batch-size", type=int, default=8)
    parser.add_argument("--check-steps", type=int, default=2)
    parser.add_argument("--check-budget-s", type=float, default=180, help="start no model's check after this")
    parser.add_argument("--batch-size", type=int, default=256, help="throughput batch")
    parser.add_argument("--steps", type=int, default=20, help="train steps per timed chunk")
    parser.add_argument("--repeats", type=int, default=5, help="timed chunks (median)")
    parser.add_argument("--no-torch-compile", action="store_true", help="skip torch.compile (a minute per model)")
    parser.add_argument("--budget-s", type=float, default=400, help="start no other piece after this")
    parser.add_argument("--deadline-s", type=float, default=470, help="print what there is and exit after this")
    parser.add_argument("--cpu-dry-run", action="store_true", help="the CPU as the GPU, toy sizes: checks the script")
    args = parser.parse_args()
    if min(args.check_batch_size, args.check_steps, args.batch_size, args.steps, args.repeats) < 1:
        parser.error("--check-batch-size, --check-steps, --batch-size, --steps and --repeats must be positive")
    if args.cpu_dry_run:
        args.batch_size, args.steps, args.repeats = min(args.batch_size, 4), 1, 2
    return args


ARGS = parse_args()

import jax  # noqa: E402

try:
    ACCELERATOR = jax.devices("cpu" if ARGS.cpu_dry_run else "gpu")[0]
except (RuntimeError, AssertionError) as error:  # which one depends on the jax version and JAX_PLATFORMS
    print(
        f"gpu.py: no GPU visible to JAX ({str(error).splitlines()[0]}); run it on a machine with an NVIDIA GPU "
        "after pip install -e '.[cuda]', or pass --cpu-dry-run to check the script itself",
        file=sys.stderr,
    )
    sys.exit(1)

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxcnn import _lowering, analysis, data, models, train  # noqa: E402

import _common  # noqa: E402  (benchmarks/: python puts the script's directory on sys.path)


def error_record(error: BaseException) -> dict:
    lines = str(error).strip().splitlines()
    return {"error": f"{type(error).__name__}: {lines[0] if lines else ''}"}


def skipped(budget_s: float, flag: str) -> dict | None:
    """A record saying the piece was skipped, once `budget_s` seconds have passed; else None."""
    return {"skipped": f"past {flag} {budget_s:g}"} if time.perf_counter() - START > budget_s else None


# --------------------------------------------------------------------------
# Checks: the runner's steps on the GPU against the CPU.


def run_steps(device, name: str, host_state, defs, batches: data.Split) -> dict:
    """Train losses, eval loss and eval logits of the runner's steps on `device`, float32 at "highest"."""
    train_def, eval_def, tx = defs
    size, batch = models.default_image_size(name), ARGS.check_batch_size
    mesh = train.data_mesh([device])
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    rows = [slice(i * batch, (i + 1) * batch) for i in range(ARGS.check_steps + 1)]  # the last for eval
    # A thread-local setting: the CPU worker threads set it for themselves.
    with jax.default_matmul_precision("highest"):
        step = train.make_train_step(train_def, tx, mesh, image_size=size)
        eval_step = train.make_eval_step(eval_def, mesh, image_size=size)
        forward = jax.jit(lambda p, s, x: nnx.merge(eval_def, p, s)(data.preprocess(x, size)))
        state = jax.device_put(host_state, replicated)
        eval_batch = jax.device_put((batches.images[rows[-1]], batches.labels[rows[-1]]), sharded)
        init_logits = np.asarray(forward(state.params, state.batch_stats, eval_batch[0]))

        @jax.jit
        def first_grads(state, images, labels):  # the train step's loss, dropout key included
            def loss(params):
                rngs = nnx.Rngs(dropout=jax.random.fold_in(state.rng, state.step))
                logits = nnx.merge(train_def, params, state.batch_stats)(data.preprocess(images, size), rngs=rngs)
                return train.cross_entropy(logits, labels).mean()

            return jax.grad(loss)(state.params)

        grads = first_grads(state, *jax.device_put((batches.images[rows[0]], batches.labels[rows[0]]), sharded))
        grads = np.concatenate([np.ravel(np.asarray(g, np.float64)) for g in jax.tree.leaves(grads)])
        losses, first_step_s = [], None
        for i in rows[:-1]:
            images, labels = jax.device_put((batches.images[i], batches.labels[i]), sharded)
            start = time.perf_counter()
            state, totals = step(state, jax.device_put(train.zero_totals(), replicated), images, labels)
            losses.append(float(totals["loss"]) / batch)  # the fetch waits for the step
            first_step_s = first_step_s or time.perf_counter() - start  # compile included
        totals = jax.device_put(train.zero_totals(), replicated)
        mask = jax.device_put(np.ones(batch, bool), sharded)
        totals = eval_step(state.params, state.batch_stats, totals, *eval_batch, mask)
        logits = np.asarray(forward(state.params, state.batch_stats, eval_batch[0]))
    return {
        "losses": losses,
        "eval_loss": float(totals["loss"]) / batch,
        "logits": logits,
        "init_logits": init_logits,
        "first_grads": grads,
        "first_step_s": first_step_s,
    }


def relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def after_steps_diffs(a: dict, b: dict) -> dict:
    """How far apart two runs' figures that a gradient moves are: the first step's gradients (relative L2
    over all parameters: a layer's error shows in proportion to its share of the gradient's norm, where two
    SGD steps at lr 0.01 barely move the losses), and what follows that step."""
    return {
        "first_grads_rel_l2_diff": float(
            np.linalg.norm(a["first_grads"] - b["first_grads"]) / np.linalg.norm(b["first_grads"])
        ),
        "later_train_loss_rel_diff": relative(a["losses"][1:] or [0.0], b["losses"][1:] or [0.0]),
        "eval_loss_rel_diff": relative(a["eval_loss"], b["eval_loss"]),
        "logits_rel_diff": relative(a["logits"], b["logits"]),
    }


def held(other: dict, cpu: dict, tolerance: dict) -> dict:
    """`other`'s figures against the CPU's: forward ones within CHECK_RTOL, later ones within `tolerance`.
    Figures whose tolerance passes JUDGE_LIMIT are only required to be finite."""
    diffs = {
        "init_logits_rel_diff": relative(other["init_logits"], cpu["init_logits"]),
        "first_train_loss_rel_diff": relative(other["losses"][0], cpu["losses"][0]),
    } | after_steps_diffs(other, cpu)
    limits = {k: tolerance.get(k, CHECK_RTOL) for k in diffs}
    judged = {k for k, limit in limits.items() if limit <= JUDGE_LIMIT}
    return {
        "passed": all(np.isfinite(v) for v in diffs.values()) and all(diffs[k] <= limits[k] for k in judged),
        **{k: float(f"{v:.3g}") for k, v in diffs.items()},
        "not_judged": sorted(set(diffs) - judged),
    }


def tolerances(spread: dict) -> dict:
    return {k: max(CHECK_RTOL, NOISE_FACTOR * v) for k, v in spread.items()}


def compare(gpu: dict, cpu: dict, nudged_cpu: dict) -> dict:
    """The GPU's run against the CPU's, with the tolerances the nudged CPU run sets."""
    spread = after_steps_diffs(nudged_cpu, cpu)
    tolerance = tolerances(spread)
    return {
        **held(gpu, cpu, tolerance),
        "tolerance": {k: float(f"{v:.3g}") for k, v in tolerance.items()},
        "cpu_spread": {k: float(f"{v:.3g}") for k, v in spread.items()},
        "train_losses_gpu": [round(v, 6) for v in gpu["losses"]],
        "train_losses_cpu": [round(v, 6) for v in cpu["losses"]],
        "gpu_first_step_s": round(gpu["first_step_s"], 2),
        "cpu_first_step_s": round(cpu["first_step_s"], 2),
    }


def nudged(host_state):
    """The state with every float parameter scaled by 1 +- NUDGE (a random sign each; zeros stay zero)."""
    rng = np.random.default_rng(0)

    def nudge(a):
        if not np.issubdtype(a.dtype, np.floating):
            return a
        return (a * (1 + NUDGE * rng.choice([-1.0, 1.0], np.shape(a)))).astype(a.dtype)

    return host_state.replace(params=jax.tree.map(nudge, host_state.params))


def run_checks(names: list[str], out: dict) -> None:
    cpu = jax.devices("cpu")[0]
    rng = np.random.default_rng(0)
    n = ARGS.check_batch_size * (ARGS.check_steps + 1)
    noise = data.Split(rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.int32))
    out |= {
        "what": "float32, matmul precision highest on both; max |GPU - CPU| / max |CPU|, gradients' relative L2",
        "tolerance": f"{CHECK_RTOL} for forward figures; max({CHECK_RTOL}, {NOISE_FACTOR} x cpu_spread) for the "
        f"gradients and after a step, not judged past {JUDGE_LIMIT}",
        "cpu_lowering": _lowering.mode("gpu.py", None),  # "xla" asked by $JAXCNN_CONV_LOWERING: XLA against itself
        "batch_size": ARGS.check_batch_size,
        "steps": ARGS.check_steps,
        "models": {name: {"skipped": "not reached"} for name in names},
    }
    submitted, pending = [], {}  # pending: name -> (GPU's run, CPU runs' futures, initial state, step definitions)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as cpu_workers:
        for name in names:
            if record := skipped(ARGS.check_budget_s, "--check-budget-s"):
                out["models"][name] = record
                continue
            out["models"][name] = {"unfinished": "started"}
            try:
                train_def, eval_def, params, batch_stats = train.split_model(models.create(name))
                tx = train.make_optimizer("sgd", 0.01, total_steps=100)
                host_state = jax.device_get(train.create_train_state(params, batch_stats, tx, seed=0))
                defs = (train_def, eval_def, tx)
                runs = [
                    cpu_workers.submit(run_steps, cpu, name, s, defs, noise) for s in (host_state, nudged(host_state))
                ]
                submitted += runs
                pending[name] = (run_steps(ACCELERATOR, name, host_state, defs, noise), runs, host_state, defs)
            except Exception as error:  # noqa: BLE001  one model's failure is recorded, the rest run
                out["models"][name] = error_record(error)
        for name, (on_gpu, runs, _, _) in pending.items():  # recorded now, should the deadline come next
            try:
                out["models"][name] = compare(on_gpu, *(future.result() for future in runs))
            except Exception as error:  # noqa: BLE001
                out["models"][name] = error_record(error)
        # XLA's CPU convolutions in place of _lowering's. $JAXCNN_CONV_LOWERING is read when a step is traced,
        # so it is set once every other CPU run is done (setenv while no thread traces); the GPU is idle.
        concurrent.futures.wait(submitted)
        asked = os.environ.get(_lowering.ENV_VAR)
        os.environ[_lowering.ENV_VAR] = "xla"
        try:
            with_xla = {}
            for name, (_, _, host_state, defs) in pending.items():
                if "passed" in out["models"][name]:
                    out["models"][name]["cpu_lowerings_vs_xla"] = {"unfinished": "started"}
                    with_xla[name] = cpu_workers.submit(run_steps, cpu, name, host_state, defs, noise)
            concurrent.futures.wait(with_xla.values())
        finally:
            if asked is None:
                del os.environ[_lowering.ENV_VAR]
            else:
                os.environ[_lowering.ENV_VAR] = asked
        for name, future in with_xla.items():
            record, (_, (cpu_run, nudged_run), _, _) = out["models"][name], pending[name]
            try:
                spread = after_steps_diffs(nudged_run.result(), cpu_run.result())
                record["cpu_lowerings_vs_xla"] = held(future.result(), cpu_run.result(), tolerances(spread))
                record["passed"] = record["passed"] and record["cpu_lowerings_vs_xla"]["passed"]
            except Exception as error:  # noqa: BLE001
                record["cpu_lowerings_vs_xla"] = error_record(error)
                record["passed"] = False
    out["all_passed"] = all(r.get("passed", False) for r in out["models"].values())


# --------------------------------------------------------------------------
# Throughput: jaxcnn and PyTorch train steps.


def timed(run, sync, steps: int) -> dict:
    """Median seconds per step of `run(k)` (k steps) over --repeats chunks of `steps`, after warm-up steps
    (cuDNN's and XLA's autotuning, first-touch allocations)."""
    run(1 if ARGS.cpu_dry_run else 3)
    sync()
    chunks = []
    for _ in range(ARGS.repeats):
        start = time.perf_counter()
        run(steps)
        sync()
        chunks.append(time.perf_counter() - start)
    return {"step_s": statistics.median(chunks) / steps, "chunk_s": [round(c, 4) for c in chunks]}


def jaxcnn_throughput(name, size, channels, images, labels) -> dict:
    mesh = train.data_mesh([ACCELERATOR])
    step, state, totals, _, _ = _common.setup(name, size, mesh, in_channels=channels, dtype="bfloat16")
    images, labels = jax.device_put((images, labels), NamedSharding(mesh, P("data")))
    start = time.perf_counter()
    compiled = step.lower(state, totals, images, labels).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, list) else cost) or {}  # a list of one dict in older jax
    carry = [state, totals]  # donated to each step: thread them through

    def run(k):
        for _ in range(k):
            carry[:] = compiled(*carry, images, labels)

    return {
        **timed(run, lambda: jax.block_until_ready(carry), ARGS.steps),
        "compile_s": round(compile_s, 1),
        "xla_gflop_per_image": round(cost.get("flops", float("nan")) / len(labels) / 1e9, 3),
    }


def torch_twin(name: str, channels: int):
    """The registry model `name` in PyTorch: d2l's ResNet-18 (8.6, written here), or torchvision's ResNet-34/50."""
    from torch import nn
    from torch.nn import functional as F

    if name != "resnet18":
        import torchvision

        net = getattr(torchvision.models, name)(num_classes=10)
        if channels != 3:
            net.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        return net

    class Residual(nn.Module):
        def __init__(self, cin, cout, use_1x1conv=False, strides=1):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, kernel_size=3, padding=1, stride=strides)
            self.conv2 = nn.Conv2d(cout, cout, kernel_size=3, padding=1)
            self.conv3 = nn.Conv2d(cin, cout, kernel_size=1, stride=strides) if use_1x1conv else None
            self.bn1, self.bn2 = nn.BatchNorm2d(cout), nn.BatchNorm2d(cout)

        def forward(self, x):
            y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            return F.relu(y + (x if self.conv3 is None else self.conv3(x)))

    stack = [nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3), nn.BatchNorm2d(64), nn.ReLU(),
             nn.MaxPool2d(kernel_size=3, stride=2, padding=1)]  # fmt: skip
    cin = 64
    for i, (blocks, cout) in enumerate(((2, 64), (2, 128), (2, 256), (2, 512))):
        for j in range(blocks):
            strided = j == 0 and i > 0
            stack.append(Residual(cin, cout, use_1x1conv=strided, strides=2 if strided else 1))
            cin = cout
    stack += [nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(512, 10)]
    return nn.Sequential(*stack)


def torch_throughput(name, channels, compiled: bool, images, labels) -> dict:
    import torch
    from torch.nn import functional as F

    device = "cpu" if ARGS.cpu_dry_run else "cuda"
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    net = torch_twin(name, channels).to(device, memory_format=torch.channels_last).train()
    model = torch.compile(net) if compiled else net
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2)  # uint8 NCHW, channels_last in memory
    y = torch.from_numpy(labels.astype(np.int64)).to(device)

    def run(k):
        for _ in range(k):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):  # CPU bf16 crawls
                loss = F.cross_entropy(model(x.float() / 255), y)
            loss.backward()
            opt.step()

    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    start = time.perf_counter()
    run(1)  # torch.compile compiles here
    sync()
    first_step_s = time.perf_counter() - start
    return {
        **timed(run, sync, ARGS.steps),
        "first_step_s": round(first_step_s, 1),
        "params": sum(p.numel() for p in net.parameters()),
    }


def release_torch_memory() -> None:
    """Hands PyTorch's cached blocks back to the driver for the next run (JAX allocates as it goes)."""
    if "torch" in sys.modules and not ARGS.cpu_dry_run:
        sys.modules["torch"].cuda.empty_cache()


def param_count(name: str, **options) -> int:
    model = nnx.eval_shape(functools.partial(models.create, name, **options))
    return sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def fill_throughput_row(row: dict, name: str, size: int, channels: int, rng) -> None:
    """Measures `name` at `size` into `row`, piece by piece (what a deadline finds there is printed)."""
    batch = ARGS.batch_size
    row |= {"image_size": size, "in_channels": channels}
    model = nnx.eval_shape(functools.partial(models.create, name, image_size=size, in_channels=channels))
    row["params"] = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    row["train_gflop_per_image"] = round(6 * analysis.model_cost(model, (1, size, size, channels))[1]["macs"] / 1e9, 3)
    images = rng.integers(0, 256, (batch, size, size, channels), dtype=np.uint8)
    labels = rng.integers(0, 10, batch).astype(np.int32)
    runs = {
        "jaxcnn": (jaxcnn_throughput, name, size, channels),
        "torch_eager": (torch_throughput, name, channels, False),
        "torch_compile": (torch_throughput, name, channels, True),
    }
    for library, (fn, *args) in runs.items():
        if library == "torch_compile" and ARGS.no_torch_compile:
            row[library] = {"skipped": "--no-torch-compile"}
            continue
        if record := skipped(ARGS.budget_s, "--budget-s"):
            row[library] = record
            continue
        row[library] = {"unfinished": "started"}
        try:
            result = fn(*args, images, labels)
        except Exception as error:  # noqa: BLE001  torch.compile may fail; the rest still runs
            row[library] = error_record(error)
            continue
        finally:
            release_torch_memory()
        step_s = result.pop("step_s")
        tflops = batch / step_s * row["train_gflop_per_image"] / 1e3
        row[library] = {"images_per_s": round(batch / step_s, 1), "step_ms": round(1e3 * step_s, 3),
                        "peak_fraction": round(tflops / PEAK_TFLOPS, 4), **result}  # fmt: skip
        if result.get("params", row["params"]) != row["params"]:
            row[library]["not_a_twin"] = "its parameter count differs from jaxcnn's"
    for library in ("torch_eager", "torch_compile"):
        if "images_per_s" in row["jaxcnn"] and "images_per_s" in row[library]:
            row[f"jaxcnn_over_{library}"] = round(row["jaxcnn"]["images_per_s"] / row[library]["images_per_s"], 3)


def run_throughput(out: dict) -> None:
    largest = max((n for n in models.names() if n.startswith("resnet")), key=lambda n: param_count(n, in_channels=3))
    specs = [("resnet18", 96, 1), (largest, 224, 3)]
    if ARGS.cpu_dry_run:  # one toy row exercises every path
        specs = [("resnet18", 32, 1)]
    out |= {"peak_dense_bf16_tflops": PEAK_TFLOPS, "batch_size": ARGS.batch_size, "largest_resnet": largest}
    out["models"] = {f"{name}@{size}": {"skipped": "not reached"} for name, size, _ in specs}
    rng = np.random.default_rng(0)
    for name, size, channels in specs:
        row = out["models"][f"{name}@{size}"] = skipped(ARGS.budget_s, "--budget-s") or {}
        try:
            if not row:
                fill_throughput_row(row, name, size, channels, rng)
        except Exception as error:  # noqa: BLE001
            row |= error_record(error)
    small, large = out["models"].get("resnet18@96", {}), out["models"].get(f"{largest}@224", {})
    out["targets"] = {  # the issue's; null where a side did not run
        "resnet18_96_jaxcnn_at_least_torch_compile": small["jaxcnn_over_torch_compile"] >= 1
        if "jaxcnn_over_torch_compile" in small
        else None,
        "largest_224_jaxcnn_at_least_quarter_of_peak": large["jaxcnn"]["peak_fraction"] >= 0.25
        if "peak_fraction" in large.get("jaxcnn", {})
        else None,
    }


def errors(tree) -> list[str]:
    """Where in a result a piece recorded an error."""
    if not isinstance(tree, dict):
        return []
    return (["error"] if "error" in tree else []) + [f"{k}.{e}" for k, v in tree.items() for e in errors(v)]


def finish(status: int) -> None:
    RESULT["seconds_total"] = round(time.perf_counter() - START, 1)
    print(json.dumps(RESULT), flush=True)
    sys.exit(status)


def stop_now(reason: str) -> None:
    """Prints what was measured so far and ends the process at once: os._exit, since worker threads (or a
    compile in the main thread) may still be busy."""
    RESULT["interrupted"] = reason
    RESULT["seconds_total"] = round(time.perf_counter() - START, 1)
    text = json.dumps({"interrupted": reason})  # if RESULT never holds still long enough to serialise
    for _ in range(10):
        try:
            text = json.dumps(RESULT)
            break
        except RuntimeError:  # the main thread was adding to it
            time.sleep(0.05)
    print(text, flush=True)
    os._exit(1)


def main() -> None:
    names = models.names() if ARGS.check_models is None else [n for n in ARGS.check_models.split(",") if n]
    if unknown := [n for n in names if n not in models.names()]:
        print(f"gpu.py: unknown --check-models {unknown}; choose from {models.names()}", file=sys.stderr)
        sys.exit(2)
    signal.signal(signal.SIGTERM, lambda signum, frame: stop_now("SIGTERM"))
    # A thread, not SIGALRM: a signal handler waits for the main thread's XLA compile to return.
    left_s = ARGS.deadline_s - (time.perf_counter() - START)
    watchdog = threading.Timer(left_s, stop_now, args=(f"past --deadline-s {ARGS.deadline_s:g}",))
    watchdog.daemon = True
    watchdog.start()
    RESULT.update(dry_run=ARGS.cpu_dry_run, device=ACCELERATOR.device_kind, jax=jax.__version__)
    try:
        import torch

        RESULT["torch"] = torch.__version__
    except ImportError as error:
        RESULT["torch"] = error_record(error)
    run_checks(names, RESULT.setdefault("checks", {}))
    RESULT["seconds_checks"] = round(time.perf_counter() - START, 1)
    run_throughput(RESULT.setdefault("throughput", {}))
    finish(0 if RESULT["checks"]["all_passed"] and not errors(RESULT) else 1)


if __name__ == "__main__":
    main()
