"""End to end: the experiments' command lines on tiny settings, resume, kills, divergence, many devices.

Runs that must be separate processes (SIGKILL, fake devices, jax.distributed)
go through subprocess; the rest call the runner in-process to pay for jax's
import once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import lenet, resnet, vgg

ROOT = Path(__file__).resolve().parents[1]
# A few batches of real digits: 8 train steps and 2 eval batches per epoch.
TINY = ["--dataset", "mnist_10k", "--train-examples", "256", "--test-examples", "96", "--batch-size", "32"]
LENET_FAST = TINY + ["--activation", "relu", "--pooling", "max", "--optimizer", "adam", "--lr", "0.003"]


def run_lenet(workdir, *extra):
    return lenet.runner.main("lenet", lenet.DEFAULTS, lenet.flags, lenet.options,
                             argv=[*LENET_FAST, "--workdir", str(workdir), *extra])


def metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def learned(records) -> list[tuple]:
    """What must agree between runs: everything but wall-clock figures."""
    return [(r["epoch"], r["step"], r["train_loss"], r["train_accuracy"], r["test_loss"], r["test_accuracy"])
            for r in records]


def subprocess_run(args, env_extra=None, **kwargs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)


def test_lenet_writes_all_outputs_and_learns(tmp_path, capsys):
    assert run_lenet(tmp_path / "run", "--epochs", "2") == 0
    out = capsys.readouterr().out
    run = tmp_path / "run"
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "lenet" and config["model_options"] == {"activation": "relu", "pooling": "max"}
    assert {"jax", "flax", "optax"} <= set(config["versions"]) and config["devices"]
    records = metrics(run)
    assert [r["epoch"] for r in records] == [1, 2] and records[-1]["step"] == 16
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "images_per_sec", "seconds"):
        assert all(isinstance(r[key], float) for r in records)
    assert records[-1]["test_accuracy"] > 0.3  # chance is 0.1
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "model").is_dir() and (run / "checkpoints").is_dir()
    assert "epoch 2:" in out and "done: test accuracy" in out


def test_final_model_loads_back(tmp_path):
    import jax.numpy as jnp

    from jaxcnn import checkpoint, data

    assert run_lenet(tmp_path, "--epochs", "1", "--test-examples", "64") == 0
    model, config = checkpoint.load_model(tmp_path)
    test = data.load("mnist_10k").test
    logits = model(data.preprocess(test.images[:64]))
    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == test.labels[:64]))
    assert accuracy == pytest.approx(metrics(tmp_path)[-1]["test_accuracy"], abs=1e-6)


def test_same_seed_same_metrics(tmp_path):
    assert run_lenet(tmp_path / "a", "--epochs", "1") == 0
    assert run_lenet(tmp_path / "b", "--epochs", "1") == 0
    assert run_lenet(tmp_path / "c", "--epochs", "1", "--seed", "1") == 0
    assert learned(metrics(tmp_path / "a")) == learned(metrics(tmp_path / "b"))
    assert learned(metrics(tmp_path / "a")) != learned(metrics(tmp_path / "c"))


@pytest.mark.parametrize(
    "module, argv",
    [
        (vgg, ["--width-divisor", "32", "--image-size", "32"]),
        (resnet, ["--image-size", "32"]),
    ],
)
def test_vgg_and_resnet_run_tiny(tmp_path, module, argv):
    name = {vgg: "vgg11", resnet: "resnet18"}[module]
    extra = [*TINY, "--train-examples", "64", "--test-examples", "40", "--epochs", "1", "--workdir", str(tmp_path)]
    flags = getattr(module, "flags", lambda group: None)
    options = getattr(module, "options", lambda args: {})
    assert module.runner.main(name, module.DEFAULTS, flags, options, argv=[*argv, *extra]) == 0
    (record,) = metrics(tmp_path)
    assert record["step"] == 2 and 0.0 <= record["test_accuracy"] <= 1.0
    assert (tmp_path / "curves.png").exists() and (tmp_path / "model").is_dir()


def test_refuses_to_overwrite_a_run(tmp_path, capsys):
    assert run_lenet(tmp_path, "--epochs", "1") == 0
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit) as exit_info:
        run_lenet(tmp_path, "--epochs", "1")
    assert exit_info.value.code == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_resume_extends_a_finished_run(tmp_path, capsys):
    assert run_lenet(tmp_path / "a", "--epochs", "2") == 0
    assert run_lenet(tmp_path / "b", "--epochs", "1") == 0
    assert run_lenet(tmp_path / "b", "--epochs", "2", "--resume") == 0
    assert "resuming from step 8" in capsys.readouterr().out
    assert learned(metrics(tmp_path / "a")) == learned(metrics(tmp_path / "b"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "-1"], "--epochs: must be a positive integer"),
        (["--batch-size", "0"], "--batch-size: must be a positive integer"),
        (["--dataset", "no_such_dataset"], "--dataset no_such_dataset"),
        (["--optimizer", "rmsprop"], "invalid choice: 'rmsprop'"),
        (["--lr", "nan"], "--lr: must be a positive number"),
        (["--accelerator", "tpu"], "no TPU is available"),
        (["--resume"], "--resume needs the --workdir"),
        (["--batch-size", "100000"], "larger than the"),
    ],
)
def test_bad_flags_are_argparse_errors(argv, message, capsys, tmp_path):
    extra = [] if "--resume" in argv else ["--workdir", str(tmp_path / "w")]
    with pytest.raises(SystemExit) as exit_info:
        lenet.runner.main("lenet", lenet.DEFAULTS, lenet.flags, lenet.options, argv=[*TINY, *argv, *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and message in err


def test_divergence_stops_with_the_step(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_lenet(tmp_path, "--epochs", "2", "--optimizer", "sgd", "--lr", "1e30", "--log-every", "2")
    assert exit_info.value.code == 3
    out = capsys.readouterr().out
    assert "training diverged: non-finite loss or gradient at step" in out
    step = int(out.split("at step ")[1].split(";")[0])
    assert 1 <= step <= 2  # the very first steps blow up at this rate
    assert not (tmp_path / "metrics.jsonl").exists() or metrics(tmp_path) == []


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    """A real SIGKILL of a subprocess at a step the test picks, then --resume."""
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    args = ["-m", "experiments.lenet", *LENET_FAST, "--epochs", "3", "--log-every", "1", "--checkpoint-every", "3"]
    full = subprocess_run([*args, "--workdir", str(reference)])
    victim = subprocess_run([*args, "--workdir", str(killed)])
    kill_at = "epoch 2 step 5/8"  # mid-epoch, after the checkpoint at step 12 (= epoch 2, batch 4)
    lines = []
    for line in victim.stdout:
        lines.append(line)
        if kill_at in line:
            victim.send_signal(signal.SIGKILL)
            break
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL, "".join(lines)
    assert full.wait(timeout=120) == 0, full.stdout.read()

    resumed = subprocess_run([*args, "--workdir", str(killed), "--resume"])
    output = resumed.stdout.read()
    assert resumed.wait(timeout=120) == 0, output
    assert "resuming from step" in output
    assert learned(metrics(killed)) == learned(metrics(reference))


def test_sigterm_saves_and_says_how_to_resume(tmp_path):
    args = ["-m", "experiments.lenet", *LENET_FAST, "--epochs", "3", "--log-every", "1", "--workdir", str(tmp_path)]
    proc = subprocess_run(args)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "epoch 1 step 3/8" in line:
            proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    output = "".join(lines)
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "stopped by SIGTERM" in output and "--resume" in output
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    steps = [int(name) for name in saved if name.isdigit()]
    assert steps and 3 <= steps[-1] < 8, (saved, output)


@pytest.mark.parametrize("damage", ["garbage", "truncate"])
def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, damage):
    assert run_lenet(tmp_path, "--epochs", "1", "--checkpoint-every", "4") == 0
    checkpoints = tmp_path / "checkpoints"
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [4, 8]
    for path in (checkpoints / "8" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage" if damage == "garbage" else path.read_bytes()[: path.stat().st_size // 2])
    capsys.readouterr()
    assert run_lenet(tmp_path, "--epochs", "1", "--resume") == 0
    out, err = capsys.readouterr()
    assert f"checkpoint {checkpoints / '8'} is damaged" in err
    assert "resuming from step 4" in out
    assert [r["epoch"] for r in metrics(tmp_path)] == [1]
    assert (checkpoints / "8.damaged").is_dir() and (checkpoints / "8").is_dir()  # set aside, then saved anew


def test_all_checkpoints_damaged_is_a_clear_error(tmp_path, capsys):
    assert run_lenet(tmp_path, "--epochs", "1") == 0
    for path in (tmp_path / "checkpoints").rglob("*"):
        if path.is_file():
            path.write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        run_lenet(tmp_path, "--epochs", "2", "--resume")
    assert exit_info.value.code == 1
    assert "could be restored" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_eight_devices_match_one(tmp_path):
    """Data parallel over 8 fake CPU devices gives the metrics of one device, same global batch."""
    args = ["-m", "experiments.lenet", *LENET_FAST, "--epochs", "1", "--batch-size", "32"]
    one = subprocess_run([*args, "--workdir", str(tmp_path / "one")])
    assert one.wait(timeout=120) == 0, one.stdout.read()
    eight = subprocess_run([*args, "--workdir", str(tmp_path / "eight")],
                           env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert eight.wait(timeout=120) == 0, eight.stdout.read()
    config = json.loads((tmp_path / "eight" / "config.json").read_text())
    assert len(config["devices"]) == 8
    for a, b in zip(learned(metrics(tmp_path / "one")), learned(metrics(tmp_path / "eight"))):
        assert a[:2] == b[:2]
        assert a[2:] == pytest.approx(b[2:], rel=1e-4, abs=1e-5)


def test_two_processes_train_together(tmp_path):
    """jax.distributed on localhost: two CPU processes agree with one process on the same global batch."""
    args = ["-m", "experiments.lenet", *LENET_FAST, "--epochs", "1"]
    single = subprocess_run([*args, "--workdir", str(tmp_path / "single")])
    assert single.wait(timeout=120) == 0, single.stdout.read()
    port = _free_port()
    procs = [
        subprocess_run([*args, "--workdir", str(tmp_path / "multi"), "--coordinator", f"127.0.0.1:{port}",
                        "--num-processes", "2", "--process-id", str(i)])
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    config = json.loads((tmp_path / "multi" / "config.json").read_text())
    assert config["process_count"] == 2 and len(config["devices"]) == 2
    for a, b in zip(learned(metrics(tmp_path / "single")), learned(metrics(tmp_path / "multi"))):
        assert a[:2] == b[:2]
        assert a[2:] == pytest.approx(b[2:], rel=1e-4, abs=1e-5)
