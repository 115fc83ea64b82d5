"""jaxcnn against PyTorch eager on CPU: train steps and every ResNet-18 conv. Prints one JSON object.

    python benchmarks/compare_torch.py [--lowering LOWERING] [--models lenet,resnet18_32,resnet18_96]
    python benchmarks/compare_torch.py --models '' --conv-sizes 96 --convs stem,stage1_3x3

Needs the `bench` extra (pip install torch==2.13.0: the CPU wheel). Both run on
the same --threads cores (the process is pinned to them; torch.set_num_threads)
with the same batch, shapes and plain SGD:
  models  images/s of a whole train step: jaxcnn's registry model and
          `train.make_train_step` as the runner builds them (uint8 NHWC in),
          against the chapters' d2l LeNet and ResNet-18 (BatchNorm, NCHW,
          xavier init) written below in torch (float NCHW in, from uint8);
          and the fraction of the matrix-product peak each step reaches,
          counting useful multiply-adds only (`step_macs_per_image`).
  convs   each distinct ResNet-18 conv shape at 32 and 96 px: forward and
          forward+backward (gradients of x, w and b; none of x for the stem,
          which sees the data) of `ops.conv2d` and F.conv2d, with GFLOP/s and
          the fraction of the matrix-product peak (a large jnp.dot) they reach.
Times are medians over --repeats after warm-up, jaxcnn and torch taking turns
(each turn one untimed call, then about a quarter second of back-to-back calls) so a busy machine
slows both alike; each model and each conv runs in a fresh process of
its own. ratio = jaxcnn images/s / torch images/s, and
torch ms / jaxcnn ms for convs: above 1 means jaxcnn is faster. --lowering
(or $JAXCNN_CONV_LOWERING) picks conv2d's lowering; "xla" shows the gain,
"tune" first times each lowering on each conv shape not yet measured here.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not

# name: (jaxcnn registry name, image size)
MODELS = {"lenet": ("lenet", 28), "resnet18_32": ("resnet18", 32), "resnet18_96": ("resnet18", 96)}
# ResNet-18's distinct convs at input size s: (name, H = W, C, O, k, stride, padding).
RESNET18_CONVS = lambda s: [  # noqa: E731
    ("stem", s, 1, 64, 7, 2, 3),
    ("stage1_3x3", s // 4, 64, 64, 3, 1, 1),
    ("stage2_3x3_s2", s // 4, 64, 128, 3, 2, 1),
    ("stage2_1x1_s2", s // 4, 64, 128, 1, 2, 0),
    ("stage2_3x3", s // 8, 128, 128, 3, 1, 1),
    ("stage3_3x3_s2", s // 8, 128, 256, 3, 2, 1),
    ("stage3_1x1_s2", s // 8, 128, 256, 1, 2, 0),
    ("stage3_3x3", s // 16, 256, 256, 3, 1, 1),
    ("stage4_3x3_s2", s // 16, 256, 512, 3, 2, 1),
    ("stage4_1x1_s2", s // 16, 256, 512, 1, 2, 0),
    ("stage4_3x3", s // 32, 512, 512, 3, 1, 1),
]
CONV_NAMES = [conv[0] for conv in RESNET18_CONVS(32)]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {list(MODELS)}; '' for none")
    parser.add_argument("--conv-sizes", default="32,96", help="ResNet-18 input sizes whose convs to time; '' for none")
    parser.add_argument(
        "--convs", default=",".join(CONV_NAMES), help=f"comma-separated, from {CONV_NAMES}; '' for none"
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median)")
    parser.add_argument("--steps", type=int, default=1, help="train steps per call")
    # Checked once jaxcnn is imported (after the cores are pinned), as conv2d checks it.
    parser.add_argument("--lowering", default=None, help="a conv2d lowering; default: $JAXCNN_CONV_LOWERING or auto")
    # Internal: the run a parent hands one model, or one conv at one size, with its measured peak.
    parser.add_argument("--child-peak-gflops", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.models = [m for m in args.models.split(",") if m]
    args.conv_sizes = [int(s) for s in args.conv_sizes.split(",") if s]
    args.convs = [c for c in args.convs.split(",") if c]
    if unknown := [m for m in args.models if m not in MODELS]:
        parser.error(f"unknown models {unknown}; choose from {list(MODELS)}")
    if unknown := [c for c in args.convs if c not in CONV_NAMES]:
        parser.error(f"unknown convs {unknown}; choose from {CONV_NAMES}")
    args.convs = [c for c in CONV_NAMES if c in args.convs]  # in ResNet-18's order, each once
    if min(args.batch_size, args.threads, args.repeats, args.steps) < 1:
        parser.error("--batch-size, --threads, --repeats and --steps must be positive")
    return args


ARGS = parse_args()
# Before jax and torch start their thread pools: both see only these cores.
os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: ARGS.threads])
if ARGS.lowering:
    os.environ["JAXCNN_CONV_LOWERING"] = ARGS.lowering

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from flax import nnx  # noqa: E402
from torch import nn  # noqa: E402

from jaxcnn import _hugepages, _lowering, analysis, models, ops, run  # noqa: E402

try:  # --lowering, or $JAXCNN_CONV_LOWERING without it
    _lowering.mode("compare_torch.py", ARGS.lowering)
except ValueError as error:
    sys.exit(str(error))
torch.set_num_threads(ARGS.threads)


# --------------------------------------------------------------------------
# The chapters' models in PyTorch, as d2l writes them (7.6 LeNet, 8.6 ResNet).


def torch_lenet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5, padding=2), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.Sigmoid(),
        nn.Linear(120, 84), nn.Sigmoid(),
        nn.Linear(84, 10),
    )  # fmt: skip


class Residual(nn.Module):
    def __init__(self, in_channels, num_channels, use_1x1conv=False, strides=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, num_channels, kernel_size=3, padding=1, stride=strides)
        self.conv2 = nn.Conv2d(num_channels, num_channels, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(in_channels, num_channels, kernel_size=1, stride=strides) if use_1x1conv else None
        self.bn1, self.bn2 = nn.BatchNorm2d(num_channels), nn.BatchNorm2d(num_channels)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.conv3 is not None:
            x = self.conv3(x)
        return F.relu(y + x)


def torch_resnet18() -> nn.Module:
    layers = [nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3), nn.BatchNorm2d(64), nn.ReLU(),
              nn.MaxPool2d(kernel_size=3, stride=2, padding=1)]  # fmt: skip
    channels = 64
    for i, (num_residuals, num_channels) in enumerate(((2, 64), (2, 128), (2, 256), (2, 512))):
        for j in range(num_residuals):
            first = j == 0 and i > 0
            layers.append(Residual(channels, num_channels, use_1x1conv=first, strides=2 if first else 1))
            channels = num_channels
    layers += [nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(512, 10)]
    return nn.Sequential(*layers)


def init_cnn(module):  # d2l's init_cnn
    if type(module) in (nn.Linear, nn.Conv2d):
        nn.init.xavier_uniform_(module.weight)


# --------------------------------------------------------------------------
# Timing.


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_medians(fns: dict, repeats: int, warmup: int = 2, sample_s: float = 0.25) -> dict:
    """Median seconds per call of each zero-argument fn (which must block until done).

    Each sample times enough back-to-back calls to last about sample_s, and
    the fns take turns sample by sample. Idle worker threads of either
    library sleep, and on this VM waking them costs up to ~10 ms: a single
    short call after the other library's turn would mostly time that. Each
    turn also starts with one untimed call, as a training loop's steps follow
    one another: the first call after the other library's turn touches memory
    the other freed, and its page faults cost about 3x the steady state's (a
    ResNet-18 step at 96 px, batch 256: 5 s of system time, not 1.3; AMD EPYC VM).
    """
    calls = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        calls[name] = max(1, math.ceil(sample_s / seconds(fn)))

    def back_to_back(fn, k):
        for _ in range(k):
            fn()  # each result dropped at once: keeping k outputs alive times page faults on fresh memory

    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            fn()  # settles this library's memory and threads after the other's turn
            times[name].append(seconds(functools.partial(back_to_back, fn, calls[name])) / calls[name])
    return {name: statistics.median(t) for name, t in times.items()}


def matmul_peak_gflops(repeats: int, n: int = 2048) -> float:
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    dot = jax.jit(jnp.dot)
    t = interleaved_medians({"dot": lambda: dot(a, a).block_until_ready()}, repeats)["dot"]
    return 2 * n**3 / t / 1e9


# --------------------------------------------------------------------------
# Train steps.


def jax_train_step(name: str, size: int, images: np.ndarray, labels: np.ndarray, steps: int):
    # Built as a run builds it (replicated state, so the first step's outputs match its inputs: no second compile).
    config = run.RunConfig(model=MODELS[name][0], image_size=size, optimizer="sgd", lr=0.01, epochs=1)
    trainer = run.create_trainer(config, num_classes=10, in_channels=1, steps_per_epoch=10**6)
    step, holder = trainer.train_step, {"state": trainer.state, "totals": trainer.totals}  # images come at `size`
    images, labels = jax.device_put(images), jax.device_put(labels)

    def run_steps():
        for _ in range(steps):
            holder["state"], holder["totals"] = step(holder["state"], holder["totals"], images, labels)
        jax.block_until_ready(holder["state"])

    return run_steps


def torch_train_step(name: str, images: np.ndarray, labels: np.ndarray, steps: int):
    torch.manual_seed(0)
    net = torch_lenet() if name == "lenet" else torch_resnet18()
    net.apply(init_cnn).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    images = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())  # uint8 NCHW
    labels = torch.from_numpy(labels.astype(np.int64))

    def run():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(images.float() / 255), labels)
            loss.backward()
            opt.step()

    return run


def step_macs_per_image(name: str, size: int) -> int:
    """Useful multiply-adds of one image's train step (taps on padding not counted): each conv and dense
    layer's forward and weight gradient, and its input gradient but for the first layer's (the data's)."""
    model = nnx.eval_shape(functools.partial(models.create, MODELS[name][0], image_size=size))
    rows, totals = analysis.model_cost(model, (1, size, size, 1))
    return 3 * totals["macs_unpadded"] - rows[0]["macs_unpadded"]


def bench_models(args, peak: float) -> dict:
    rng = np.random.default_rng(0)
    results = {}
    for name in args.models:
        size, steps = MODELS[name][1], args.steps
        images = rng.integers(0, 256, (args.batch_size, size, size, 1), dtype=np.uint8)
        labels = rng.integers(0, 10, args.batch_size).astype(np.int32)
        fns = {"jaxcnn": jax_train_step(name, size, images, labels, steps),
               "torch": torch_train_step(name, images, labels, steps)}  # fmt: skip
        t = interleaved_medians(fns, args.repeats)
        ips = {k: args.batch_size * steps / v for k, v in t.items()}
        gflop_per_image = 2 * step_macs_per_image(name, size) / 1e9
        results[name] = {
            "image_size": size,
            "jaxcnn_images_per_s": round(ips["jaxcnn"], 1),
            "torch_images_per_s": round(ips["torch"], 1),
            "ratio": round(ips["jaxcnn"] / ips["torch"], 3),
            "train_gflop_per_image": round(gflop_per_image, 4),
            **{f"{k}_peak_fraction": round(v * gflop_per_image / peak, 3) for k, v in ips.items()},
        }
        print(json.dumps({name: results[name]}), file=sys.stderr, flush=True)
    return results


# --------------------------------------------------------------------------
# Convolutions.


def bench_conv(n, h, c, o, k, stride, padding, input_grad: bool, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, h, h, c), dtype=np.float32)
    w = (rng.standard_normal((k, k, c, o)) / np.sqrt(k * k * c)).astype(np.float32)
    b = rng.standard_normal(o, dtype=np.float32)
    ho = (h + 2 * padding - k) // stride + 1
    dy = rng.standard_normal((n, ho, ho, o), dtype=np.float32)
    argnums = (0, 1, 2) if input_grad else (1, 2)

    conv = lambda x, w, b: ops.conv2d(x, w, b, stride=stride, padding=padding)  # noqa: E731
    fwd = jax.jit(conv)
    # value_and_grad: with grad alone XLA drops the forward, which no gradient reads, and torch's backward
    # includes its forward.
    bwd = jax.jit(jax.value_and_grad(lambda x, w, b, dy: jnp.vdot(conv(x, w, b), dy), argnums=argnums))
    jx, jw, jb, jdy = map(jnp.asarray, (x, w, b, dy))

    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(input_grad)
    tw = torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).requires_grad_()
    tb = torch.from_numpy(b).requires_grad_()
    tdy = torch.from_numpy(dy.transpose(0, 3, 1, 2).copy())

    def torch_fwd():
        with torch.no_grad():
            F.conv2d(tx, tw, tb, stride=stride, padding=padding)

    def torch_bwd():
        tw.grad = tb.grad = tx.grad = None
        F.conv2d(tx, tw, tb, stride=stride, padding=padding).backward(tdy)

    t = interleaved_medians(
        {
            "jaxcnn_fwd": lambda: fwd(jx, jw, jb).block_until_ready(),
            "torch_fwd": torch_fwd,
            "jaxcnn_fwd_bwd": lambda: jax.block_until_ready(bwd(jx, jw, jb, jdy)),
            "torch_fwd_bwd": torch_bwd,
        },
        repeats,
    )
    gflop = 2 * n * ho * ho * o * k * k * c / 1e9  # forward; each gradient costs as much
    flops = {"fwd": gflop, "fwd_bwd": gflop * (3 if input_grad else 2)}
    row = {f"{k}_ms": round(1e3 * v, 3) for k, v in t.items()}
    for mode in ("fwd", "fwd_bwd"):
        row[f"{mode}_ratio"] = round(t[f"torch_{mode}"] / t[f"jaxcnn_{mode}"], 3)
        for lib in ("jaxcnn", "torch"):
            row[f"{lib}_{mode}_gflops"] = round(flops[mode] / t[f"{lib}_{mode}"], 1)
    return row


def bench_convs(args, peak: float) -> list:
    rows, lowering = [], _lowering.mode("compare_torch", None)
    for size in args.conv_sizes:
        for name, h, c, o, k, stride, padding in (conv for conv in RESNET18_CONVS(size) if conv[0] in args.convs):
            ho = (h + 2 * padding - k) // stride + 1
            # What conv2d runs: a Winograd lowering takes "auto"'s choice where it does not apply.
            chosen = lowering in ("auto", "tune") or (
                lowering in _lowering.WINOGRAD_CONVS and not _lowering.winograd_applies((k, k), (stride,) * 2, (1, 1))
            )
            x_shape, w_shape = (args.batch_size, h, h, c), (k, k, c, o)
            row = {"image_size": size, "conv": name, "x": list(x_shape), "w": list(w_shape),
                   "stride": stride, "padding": padding, "output_hw": ho,
                   "lowering": _lowering.cpu_choice(lowering, x_shape, w_shape, np.float32, (stride, stride),
                                                    ((padding, padding),) * 2, (1, 1), (ho, ho))
                   if chosen else lowering}  # fmt: skip
            row |= bench_conv(args.batch_size, h, c, o, k, stride, padding, name != "stem", args.repeats)
            for key in [k for k in row if k.endswith("_gflops")]:
                row[key.replace("_gflops", "_peak_fraction")] = round(row[key] / peak, 3)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def in_children(args, peak: float) -> tuple[dict, list]:
    """Each model and each conv timed in a fresh process: XLA's CPU runtime ran a ResNet-18 step
    10-20% slower after another model's steps in the same process, and stage 1's 3x3 at 96 px
    forward in 128 ms after the stem's turn, 68-91 ms as the only conv of a process (AMD EPYC Zen 3)."""
    models, convs = {}, []
    jobs = [(["--models", m, "--conv-sizes", ""]) for m in args.models]
    jobs += [["--models", "", "--conv-sizes", str(size), "--convs", c] for size in args.conv_sizes for c in args.convs]
    for job in jobs:
        common = ["--batch-size", str(args.batch_size), "--threads", str(args.threads), "--repeats", str(args.repeats)]
        command = [
            sys.executable,
            __file__,
            *job,
            *common,
            "--steps",
            str(args.steps),
            "--child-peak-gflops",
            str(peak),
        ]
        done = subprocess.run(command, stdout=subprocess.PIPE, check=True, text=True)  # its stderr streams through
        child = json.loads(done.stdout)
        models |= child["models"]
        convs += child["convs"]
    return models, convs


def main():
    if ARGS.child_peak_gflops is None:
        peak = matmul_peak_gflops(ARGS.repeats)
        print(json.dumps({"matmul_peak_gflops": round(peak, 1)}), file=sys.stderr, flush=True)
    else:
        peak = ARGS.child_peak_gflops
    start_load = round(os.getloadavg()[0], 2)
    if ARGS.child_peak_gflops is None and len(ARGS.models) + len(ARGS.conv_sizes) * len(ARGS.convs) > 1:
        models, convs = in_children(ARGS, peak)
    else:
        models, convs = bench_models(ARGS, peak), bench_convs(ARGS, peak)
    result = {
        "benchmark": "compare_torch",
        "lowering": _lowering.mode("compare_torch", None),
        "threads": ARGS.threads,
        "batch_size": ARGS.batch_size,
        "repeats": ARGS.repeats,
        "steps_per_call": ARGS.steps,
        "jax": jax.__version__,
        "torch": torch.__version__,
        "backend": jax.default_backend(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),  # huge pages or not: see jaxcnn._hugepages
        "load_average_1m_at_start": start_load,
        "matmul_peak_gflops": round(peak, 1),
        "models": models,
        "convs": convs,
    }
    result["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    _hugepages.reexec_with_huge_pages()  # as the experiments' command lines run
    main()
