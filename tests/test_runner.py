"""End to end: the experiments' command lines on tiny settings, resume, kills, divergence, many devices.

Runs that must be separate processes (SIGKILL, fake devices, jax.distributed)
go through subprocess; the rest call the runner in-process to pay for jax's
import once.
"""

from __future__ import annotations

import json
import os
import shutil
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


def _has_gpu() -> bool:
    import jax

    try:
        return bool(jax.devices("cuda"))
    except Exception:  # no CUDA plugin, or no GPU behind it
        return False


def run_lenet(workdir, *extra):
    return lenet.main([*LENET_FAST, "--workdir", str(workdir), *extra])


def metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def learned(records) -> list[tuple]:
    """What must agree between runs: everything but wall-clock figures."""
    return [
        (r["epoch"], r["step"], r["train_loss"], r["train_accuracy"], r["test_loss"], r["test_accuracy"])
        for r in records
    ]


def subprocess_run(args, env_extra=None, **kwargs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **kwargs,
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted 2-epoch run that the other tests compare against (checkpoints at steps 8, 12, 16)."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    assert run_lenet(workdir, "--epochs", "2", "--checkpoint-every", "4") == 0
    return workdir


def copy_run(reference, tmp_path) -> Path:
    return Path(shutil.copytree(reference, tmp_path / "run"))


def test_lenet_writes_all_outputs_and_learns(reference):
    config = json.loads((reference / "config.json").read_text())
    assert config["model"] == "lenet" and config["model_options"] == {"activation": "relu", "pooling": "max"}
    assert {"jax", "flax", "optax"} <= set(config["versions"]) and config["devices"]
    assert config["num_params"] == 61_706
    records = metrics(reference)
    assert [r["epoch"] for r in records] == [1, 2] and records[-1]["step"] == 16
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "images_per_sec", "seconds"):
        assert all(isinstance(r[key], float) for r in records)
    assert records[-1]["test_accuracy"] > 0.3  # chance is 0.1
    assert (reference / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (reference / "model").is_dir()
    assert sorted(int(p.name) for p in (reference / "checkpoints").iterdir()) == [8, 12, 16]  # keeps 3


def test_final_model_loads_back(reference):
    import jax.numpy as jnp

    from jaxcnn import checkpoint, data

    model, config = checkpoint.load_model(reference)
    test = data.load("mnist_10k").test
    logits = model(data.preprocess(test.images[: config["test_examples"]]))
    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == test.labels[: config["test_examples"]]))
    assert accuracy == pytest.approx(metrics(reference)[-1]["test_accuracy"], abs=1e-6)


def test_same_seed_same_metrics_to_the_last_digit(reference, tmp_path, capsys):
    assert run_lenet(tmp_path, "--epochs", "2") == 0
    assert learned(metrics(tmp_path)) == learned(metrics(reference))
    out = capsys.readouterr().out
    assert "epoch 2:" in out and "done: test accuracy" in out
    # Not a terminal: plain lines only, and the first says what runs before anything compiles.
    assert "\r" not in out
    lines = out.splitlines()
    assert lines[0].startswith("lenet (activation=relu, pooling=max) on mnist_10k: 256 train / 96 test images")
    assert lines[1].startswith("built lenet: 61,706 parameters in ")
    assert lines[2] == "compiling the train step ..." and lines[3].startswith("compiled the train step in ")


def test_a_terminal_gets_a_progress_bar():
    import io

    from experiments.runner import ConsoleHooks, _StopFlag

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    hooks = ConsoleHooks(_StopFlag(), stream=screen)
    hooks.on_phase_start("train", 0, 8, 0)
    hooks.on_progress("train", 4, {"loss": 1.5, "accuracy": 0.5, "lr": 0.1, "images_per_sec": 1000.0})
    hooks.on_phase_end("train")
    text = screen.getvalue()
    assert "\r" in text and "epoch 1 train" in text and "4/8" in text and "loss 1.5000" in text


@pytest.mark.parametrize(
    "module, argv",
    [
        (vgg, ["--width-divisor", "32", "--image-size", "32"]),
        (resnet, ["--image-size", "32"]),
    ],
)
def test_vgg_and_resnet_run_tiny(tmp_path, module, argv):
    extra = [*TINY, "--train-examples", "64", "--test-examples", "40", "--epochs", "1", "--workdir", str(tmp_path)]
    assert module.main([*argv, *extra]) == 0
    (record,) = metrics(tmp_path)
    assert record["step"] == 2 and 0.0 <= record["test_accuracy"] <= 1.0
    assert (tmp_path / "curves.png").exists() and (tmp_path / "model").is_dir()


def test_refuses_to_overwrite_a_run(reference, capsys):
    before = (reference / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit) as exit_info:
        run_lenet(reference, "--epochs", "1")
    assert exit_info.value.code == 2
    assert "already holds files" in capsys.readouterr().err
    assert (reference / "metrics.jsonl").read_text() == before


def test_resume_extends_a_finished_run(reference, tmp_path, capsys):
    assert run_lenet(tmp_path, "--epochs", "1") == 0
    assert run_lenet(tmp_path, "--epochs", "2", "--resume") == 0
    assert "resuming from step 8" in capsys.readouterr().out
    assert learned(metrics(tmp_path)) == learned(metrics(reference))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "-1"], "--epochs: must be a positive int, got -1"),
        (["--batch-size", "0"], "--batch-size: must be a positive int, got 0"),
        (["--dataset", "no_such_dataset"], "dataset 'no_such_dataset'"),
        (["--optimizer", "rmsprop"], "invalid choice: 'rmsprop'"),
        (["--lr", "nan"], "--lr: must be a positive finite number, got nan"),
        (["--accelerator", "tpu"], "no TPU is available"),
        pytest.param(
            ["--accelerator", "gpu"],
            "pip install -e '.[cuda]'",
            marks=pytest.mark.skipif(_has_gpu(), reason="this machine has a GPU"),
        ),
        (["--seed", str(2**32)], "--seed: must be an int in [0, 2**32), got 4294967296"),
        (["--workdir", ""], "--workdir must not be empty"),
        (["--resume"], "--resume needs the --workdir"),
        (["--batch-size", "100000"], "larger than the"),
    ],
)
def test_bad_flags_are_argparse_errors(argv, message, capsys, tmp_path):
    extra = [] if "--resume" in argv or "--workdir" in argv else ["--workdir", str(tmp_path / "w")]
    with pytest.raises(SystemExit) as exit_info:
        lenet.main([*TINY, *argv, *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and message in err


def test_divergence_stops_with_the_step(tmp_path, capsys):
    assert run_lenet(tmp_path, "--epochs", "2", "--optimizer", "sgd", "--lr", "1e30", "--log-every", "2") == 3
    out = capsys.readouterr().out
    assert "training diverged: non-finite loss or gradient at step" in out
    step = int(out.split("at step ")[1].split(";")[0])
    assert 1 <= step <= 2  # the very first steps blow up at this rate
    assert not (tmp_path / "metrics.jsonl").exists() or metrics(tmp_path) == []


def test_sigkill_then_resume_matches_an_uninterrupted_run(reference, tmp_path):
    """A real SIGKILL of a subprocess at a step the test picks, then --resume."""
    args = [
        "-m",
        "experiments.lenet",
        *LENET_FAST,
        "--epochs",
        "2",
        "--log-every",
        "1",
        "--checkpoint-every",
        "4",
        "--workdir",
        str(tmp_path),
    ]
    victim = subprocess_run(args)
    kill_at = "epoch 2 step 6/8"  # mid-epoch, after the checkpoint at step 12 (epoch 2, batch 4) was started
    lines = []
    for line in victim.stdout:
        lines.append(line)
        if kill_at in line:
            victim.send_signal(signal.SIGKILL)
            break
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL, "".join(lines)

    assert (tmp_path / "lock").exists()  # left by the killed run: its flock died with it
    resumed = subprocess_run([*args, "--resume"])
    output = resumed.stdout.read()
    assert resumed.wait(timeout=120) == 0, output
    assert "resuming from step 12" in output or "resuming from step 8" in output, output
    assert learned(metrics(tmp_path)) == learned(metrics(reference))


def test_a_second_run_on_a_workdir_in_use_is_refused_and_the_first_does_not_notice(reference, tmp_path):
    args = ["-m", "experiments.lenet", *LENET_FAST, "--epochs", "2", "--log-every", "1", "--workdir", str(tmp_path)]
    first = subprocess_run(args)
    lines = []
    for line in first.stdout:
        lines.append(line)
        if "epoch 1 step 1/8" in line:
            first.send_signal(signal.SIGSTOP)  # holds its lock, mid-run, while the others try
            break
    try:
        for extra in ([], ["--resume"]):
            second = subprocess_run([*args, *extra])
            out = second.communicate(timeout=60)[0]
            assert second.returncode == 2 and f"is in use by pid {first.pid} on " in out, out
            assert "Traceback" not in out
    finally:
        first.send_signal(signal.SIGCONT)
    rest = first.communicate(timeout=120)[0]
    assert first.returncode == 0, "".join(lines) + rest
    assert learned(metrics(tmp_path)) == learned(metrics(reference))


def test_a_second_ctrl_c_stops_at_once_without_a_traceback(tmp_path):
    args = ["-m", "experiments.lenet", *LENET_FAST, "--epochs", "50", "--log-every", "1", "--workdir", str(tmp_path)]
    proc = subprocess_run(args)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "epoch 1 step 2/8" in line:
            break
    # Ctrl-C held down: signals sent together merge into one, so keep sending until the process is gone.
    proc.send_signal(signal.SIGINT)
    while proc.poll() is None:
        time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
    output = "".join(lines) + proc.stdout.read()
    assert proc.returncode == 128 + signal.SIGINT, output
    assert "Traceback" not in output, output
    # Almost always the second signal lands while the first stop saves; if the stop was quicker, it ended it.
    assert "interrupted again: stopped at once" in output or "stopped by SIGINT" in output


def test_a_full_disk_mid_save_is_one_line(tmp_path):
    """Checkpoint writes that fail (here: past a file-size limit) end the run with one error line and exit 1."""
    limited = (
        "import resource, runpy, signal, sys; "
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "  # writes past the limit fail with EFBIG instead
        "resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024)); "
        "sys.argv[0] = 'lenet'; runpy.run_module('experiments.lenet', run_name='__main__')"
    )
    args = ["-c", limited, *LENET_FAST, "--epochs", "1", "--workdir", str(tmp_path)]
    # It reads the session's XLA cache but adds nothing to it: an entry cut short at the size limit
    # would stay, and every later process would warn and compile again.
    no_writes = {"PYTHONDONTWRITEBYTECODE": "1", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1e9"}
    proc = subprocess_run(args, env_extra=no_writes)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1, output
    # One line from the run. (TensorStore's write threads may still print their own tracebacks as
    # Orbax closes its event loop under them: that is theirs to fix.)
    assert "error: cannot write the run's files" in output and "File too large" in output, output
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()] == []


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
def test_damaged_checkpoint_falls_back_to_the_previous_one(reference, tmp_path, capsys, damage):
    run = copy_run(reference, tmp_path)
    checkpoints = run / "checkpoints"
    for path in (checkpoints / "16" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage" if damage == "garbage" else path.read_bytes()[: path.stat().st_size // 2])
    capsys.readouterr()
    assert run_lenet(run, "--epochs", "2", "--resume") == 0
    out, err = capsys.readouterr()
    assert f"checkpoint {checkpoints / '16'} is damaged" in out
    assert "Traceback" not in out + err
    assert "resuming from step 12" in out
    assert learned(metrics(run)) == learned(metrics(reference))
    assert (checkpoints / "16.damaged").is_dir() and (checkpoints / "16").is_dir()  # set aside, then saved anew


def test_all_checkpoints_damaged_is_a_clear_error(reference, tmp_path, capsys):
    run = copy_run(reference, tmp_path)
    for path in (run / "checkpoints").rglob("*"):
        if path.is_file():
            path.write_bytes(b"")
    assert run_lenet(run, "--epochs", "3", "--resume") == 1
    assert "could be restored" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_close_metrics(records, reference_records):
    assert len(records) == len(reference_records)
    for a, b in zip(learned(records), learned(reference_records)):
        assert a[:2] == b[:2]
        assert a[2:] == pytest.approx(b[2:], rel=1e-4, abs=1e-5)


def test_eight_devices_match_one(reference, tmp_path):
    """Data parallel over 8 fake CPU devices gives the metrics of one device, same global batch."""
    eight = subprocess_run(
        ["-m", "experiments.lenet", *LENET_FAST, "--epochs", "2", "--workdir", str(tmp_path)],
        env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    )
    assert eight.wait(timeout=180) == 0, eight.stdout.read()
    assert len(json.loads((tmp_path / "config.json").read_text())["devices"]) == 8
    assert_close_metrics(metrics(tmp_path), metrics(reference))


def test_two_processes_train_together(reference, tmp_path):
    """jax.distributed on localhost: two CPU processes agree with one process on the same global batch."""
    port = _free_port()
    procs = [
        subprocess_run(
            [
                "-m",
                "experiments.lenet",
                *LENET_FAST,
                "--epochs",
                "2",
                "--workdir",
                str(tmp_path),
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ]
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["process_count"] == 2 and len(config["devices"]) == 2
    assert "epoch 2:" in outputs[0] and "epoch 2:" not in outputs[1]  # only process 0 reports
    assert_close_metrics(metrics(tmp_path), metrics(reference))


def test_resume_refuses_other_settings(reference, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_lenet(reference, "--epochs", "3", "--resume", "--lr", "0.01")
    assert exit_info.value.code == 2
    assert "lr was 0.003, now 0.01" in capsys.readouterr().err


ENTRIES = {"lenet": "lenet", "vgg": "vgg11", "resnet": "resnet18", "resnext": "resnext18", "alexnet": "alexnet",
           "nin": "nin", "googlenet": "googlenet", "densenet": "densenet", "regnet": "regnetx32",
           "resnet34": "resnet34", "resnet50": "resnet50"}  # fmt: skip


def test_every_model_has_an_entry_point_with_its_chapter_defaults(monkeypatch):
    import importlib

    from experiments import runner
    from jaxcnn import models

    called = {}
    monkeypatch.setattr(runner, "main", lambda entry, model, *args, **kwargs: called.update({entry: model}))
    assert set(ENTRIES.values()) | {"lenet_bn"} == set(models.names())  # lenet_bn: lenet --batch-norm
    for entry, model in ENTRIES.items():
        module = importlib.import_module(f"experiments.{entry}")
        module.main([])
        assert called[entry] == model  # the entry point trains the model it is named for
        parser = runner.build_parser(entry, model, getattr(module, "flags", None))
        assert models.run_defaults(model).title in parser.description


def test_huge_page_environ_asks_only_where_the_kernel_waits_to_be_asked(tmp_path, monkeypatch):
    from jaxcnn import _hugepages

    monkeypatch.setattr(_hugepages, "glibc_version", lambda: (2, 36))
    thp = tmp_path / "enabled"
    thp.write_text("always [madvise] never\n")
    asked = {"A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", _hugepages.REEXECUTED: "1"}
    assert _hugepages.environ_with_huge_pages({"A": "1"}, thp) == asked
    assert _hugepages.environ_with_huge_pages(asked, thp) is None  # so never twice
    # Where glibc dropped the tunable (a setuid interpreter), the marker still stops a second exec.
    assert _hugepages.environ_with_huge_pages({_hugepages.REEXECUTED: "1"}, thp) is None
    others = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert _hugepages.environ_with_huge_pages(others, thp)["GLIBC_TUNABLES"] == (
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    )
    assert _hugepages.environ_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, thp) is None  # opted out
    for mode in ("[always] madvise never\n", "always madvise [never]\n"):
        thp.write_text(mode)
        assert _hugepages.environ_with_huge_pages({}, thp) is None  # nothing to ask for
    assert _hugepages.environ_with_huge_pages({}, tmp_path / "missing") is None
    thp.write_text("always [madvise] never\n")
    for version in ((2, 34), None):  # a glibc without the tunable; musl, macOS
        monkeypatch.setattr(_hugepages, "glibc_version", lambda version=version: version)
        assert _hugepages.environ_with_huge_pages({}, thp) is None


def test_glibc_version_is_none_off_glibc(monkeypatch):
    from jaxcnn import _hugepages

    for answer, version in (("glibc 2.36", (2, 36)), ("musl 1.2", None), (None, None)):
        monkeypatch.setattr(os, "confstr", lambda name, answer=answer: answer)
        assert _hugepages.glibc_version() == version

    def no_name(name):
        raise ValueError("unrecognized configuration name")

    monkeypatch.setattr(os, "confstr", no_name)
    assert _hugepages.glibc_version() is None


def test_a_command_reexecutes_itself_with_huge_pages_before_it_runs(monkeypatch):
    from experiments import runner
    from jaxcnn import _hugepages

    class Replaced(Exception):
        pass

    def execve(path, args, env):
        raise Replaced(path, args, env)

    monkeypatch.setattr(os, "execve", execve)
    monkeypatch.setattr(_hugepages, "environ_with_huge_pages", lambda: {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    with pytest.raises(Replaced) as replaced:
        runner.run_command(lambda: pytest.fail("main ran before the process was replaced"))
    assert replaced.value.args == (
        sys.executable,
        [sys.executable, *sys.orig_argv[1:]],
        {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
    )
    monkeypatch.setattr(_hugepages, "environ_with_huge_pages", lambda: None)  # nothing to change: runs main
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # pytest keeps its Ctrl-C
    with pytest.raises(SystemExit) as exited:
        runner.run_command(lambda: 0)
    assert exited.value.code == 0
