"""The training benchmarks run end to end on tiny settings (--quick) and print sane JSON. Nothing is timed."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str) -> dict:
    # Without the session's compilation cache (conftest): a cached step would report no XLA compile.
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"} if script == "train.py" else None
    done = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, f"want one JSON line, got {len(lines)}:\n{done.stdout[-2000:]}"
    return json.loads(lines[0])


def test_train_benchmark_quick():
    out = run_benchmark("train.py")
    lenet = out["models"]["lenet@28"]
    assert lenet["params"] == 61706  # the chapter's LeNet-5
    assert lenet["synthetic_images_per_s"] > 0 and lenet["pipeline_images_per_s"] > 0
    assert lenet["compile_s"]["xla_compile_s"] > 0  # the first step's compile was seen
    assert lenet["recompiles_after_first_step"] == 0 and lenet["other_compiles_in_loop"] == []
    breakdown = out["lenet_breakdown"]["quick_start"]
    assert breakdown["settings"]["pooling"] == "max"
    assert [label.split()[1] for label in breakdown["layers"]] == [
        "Conv2D",
        "relu",
        "MaxPool2D",
        "Conv2D",
        "relu",
        "MaxPool2D",
        "Flatten",
        "Linear",
        "relu",
        "Linear",
        "relu",
        "Linear",
    ]
    assert 0 < breakdown["forward_loss_ms"] and 0 < breakdown["whole_step_ms"] and 0 < breakdown["xla_step_gflop"]
    run = out["runner"]["quick_start"]
    assert run["epochs"] == 1 and 0 <= run["final_test_accuracy"] <= 1 and run["wall_s"] > 0
    assert "--optimizer adam" in run["command"]


def test_profile_benchmark_quick():
    lenet = run_benchmark("step_profile.py")["models"]["lenet@28"]
    kinds, ops = lenet["kinds"], lenet["ops"]
    assert lenet["step_ms"] > 0 and kinds and ops
    # LeNet's step is matrix products among other things, listed longest first.
    assert {"ynn_fusion", "dot"} & {k["kind"] for k in kinds}
    assert [k["ms"] for k in kinds] == sorted((k["ms"] for k in kinds), reverse=True)
    assert [o["ms"] for o in ops] == sorted((o["ms"] for o in ops), reverse=True) and ops[0]["ms"] > 0
    # A kind holds its operations: the longest operation's kind took at least as long.
    longest_kind = re.sub(r"\.\d+$", "", ops[0]["op"])
    assert next(k["ms"] for k in kinds if k["kind"] == longest_kind) >= ops[0]["ms"]
    # Self times, not loops counted with their bodies: together within the step's wall time (2 threads).
    assert 0.2 < sum(k["share"] for k in kinds) <= 2


def test_scaling_benchmark_quick():
    out = run_benchmark("scaling.py")
    lenet = out["scaling"]["lenet@28"]
    assert set(lenet) == {"1", "2"} and all(r["images_per_s"] > 0 for r in lenet.values())
    assert out["fake_cpu_devices"] == (out["backend"] == "cpu") and out["note"]
    cost = out["checkpoint"]["lenet@28"]
    assert cost["on_disk_mbytes"] > 0.2  # 61,706 float32 parameters are 0.25 MB
    assert 0 < cost["save_blocking_s"] and 0 < cost["save_percent_of_epoch"]


@pytest.mark.parametrize(
    "script, flags",
    [
        ("train.py", ["--models", "lenet,nosuch"]),
        ("train.py", ["--models", "lenet@x"]),
        ("scaling.py", ["--devices", "3", "--batch-size", "16"]),
    ],
)
def test_bad_flags_fail_cleanly(script, flags):
    done = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2 and "error:" in done.stderr and "Traceback" not in done.stderr


def has_gpu() -> bool:
    import jax

    return any(d.platform == "gpu" for d in jax.devices())


@pytest.mark.skipif(has_gpu(), reason="this machine has a GPU")
def test_gpu_benchmark_without_a_gpu_says_so_in_one_line():
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu.py"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 1 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "no GPU" in done.stderr and "Traceback" not in done.stderr


def test_gpu_benchmark_cpu_dry_run():
    """Every path of benchmarks/gpu.py but torch.compile, with the CPU standing in for the GPU at toy sizes.
    Without PyTorch (the test extra has none) its pieces record the ImportError and the rest still runs."""
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu.py", "--cpu-dry-run", "--check-models", "lenet", "--no-torch-compile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stderr[-3000:]
    out = json.loads(lines[0])
    lenet = out["checks"]["models"]["lenet"]
    assert lenet["passed"] and lenet["logits_rel_diff"] == lenet["init_logits_rel_diff"] == 0
    assert lenet["first_grads_rel_l2_diff"] == 0 and lenet["cpu_spread"]["first_grads_rel_l2_diff"] > 0
    assert len(lenet["train_losses_gpu"]) == 2 and lenet["not_judged"] == []
    # The nudged run computes something else (the spread is not 0), and so does the CPU with XLA's convolutions:
    # were $JAXCNN_CONV_LOWERING not read, or a trace reused, its logits would be bit-equal to the CPU's.
    assert lenet["cpu_spread"]["logits_rel_diff"] > 0
    assert lenet["cpu_lowerings_vs_xla"]["passed"] and lenet["cpu_lowerings_vs_xla"]["logits_rel_diff"] > 0
    row = out["throughput"]["models"]["resnet18@32"]
    assert row["jaxcnn"]["images_per_s"] > 0 and 0 < row["train_gflop_per_image"]
    # XLA's count of the compiled step and model_cost's agree within the padding taps and elementwise work.
    assert abs(row["jaxcnn"]["xla_gflop_per_image"] / row["train_gflop_per_image"] - 1) < 0.1
    assert row["torch_compile"] == {"skipped": "--no-torch-compile"}
    if importlib.util.find_spec("torch") is None:
        assert row["torch_eager"]["error"].startswith("ModuleNotFoundError") and done.returncode == 1
    else:
        assert row["torch_eager"]["params"] == row["params"]  # the PyTorch twin has jaxcnn's parameters
        assert row["torch_eager"]["images_per_s"] > 0 and done.returncode == 0
