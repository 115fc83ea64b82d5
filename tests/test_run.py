"""jaxcnn.run as a library: RunConfig, train_and_evaluate, and a workdir that survives accidents.

In-process where they can be (jax is imported once); the lock, kill and signal tests are in
test_runner.py, as subprocesses.
"""

from __future__ import annotations

import errno
import fcntl
import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from jaxcnn import _files, checkpoint, run
from jaxcnn.run import RunConfig

# Eight train steps and two eval batches per epoch, as test_runner's TINY.
TINY = dict(
    dataset="mnist_10k",
    train_examples=256,
    test_examples=96,
    batch_size=32,
    optimizer="adam",
    lr=0.003,
    model_options={"activation": "relu", "pooling": "max"},
)


def tiny(**changes) -> RunConfig:
    return RunConfig(**({"model": "lenet"} | TINY | changes))


def learned(records) -> list[tuple]:
    return [
        (r["epoch"], r["step"], r["train_loss"], r["train_accuracy"], r["test_loss"], r["test_accuracy"])
        for r in records
    ]


def read_metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


class Recorder(run.Hooks):
    def __init__(self, stop_after: int = 0):
        """stop_after: ask to stop once this many train progress reports came."""
        self.calls, self.stop_after, self.reports = [], stop_after, 0

    def on_start(self, config):
        self.calls.append(("start", config["model"]))

    def on_phase_start(self, phase, epoch, total, done):
        self.calls.append(("phase", phase, epoch))

    def on_phase_end(self, phase):
        self.calls.append(("end", phase))

    def on_message(self, text):
        self.calls.append(("message", text))

    def on_compile(self, what, seconds):
        self.calls.append(("compile", what, seconds))

    def on_progress(self, phase, done, values):
        self.calls.append(("progress", phase, done, values))
        self.reports += phase == "train"

    def on_epoch_end(self, record):
        self.calls.append(("epoch", record["epoch"]))

    def stop_requested(self):
        return 15 if self.stop_after and self.reports >= self.stop_after else 0

    def messages(self) -> str:
        return "\n".join(c[1] for c in self.calls if c[0] == "message")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 2-epoch run with a checkpoint every 4 steps (kept: 8, 12, 16), what it reported, and when XLA compiled."""
    import jax

    workdir = tmp_path_factory.mktemp("finished") / "run"
    hooks = Recorder()

    def on_compile(event, seconds, **kwargs):
        # An XLA compile, or the session's compilation cache (conftest) handing back one made earlier.
        if event in ("/jax/core/compile/backend_compile_duration", "/jax/compilation_cache/cache_retrieval_time_sec"):
            hooks.calls.append(("xla compile", seconds))

    jax.monitoring.register_event_duration_secs_listener(on_compile)
    try:
        records = run.train_and_evaluate(tiny(epochs=2, checkpoint_every=4, log_every=2), workdir, hooks=hooks)
    finally:
        jax.monitoring.unregister_event_duration_listener(on_compile)
    return workdir, records, hooks


def copy_run(finished, tmp_path) -> Path:
    return Path(shutil.copytree(finished[0], tmp_path / "run"))


# --------------------------------------------------------------------------
# RunConfig.


def test_config_round_trips_through_json_and_fills_the_chapter_values():
    config = tiny(epochs=3, schedule="cosine")
    assert RunConfig.from_json(config.to_json()) == config
    resolved = RunConfig(model="resnet18").resolved()
    assert (resolved.lr, resolved.optimizer, resolved.batch_size, resolved.epochs, resolved.image_size) == (
        0.01,
        "sgd",
        128,
        10,
        96,
    )
    # The registry's option defaults are part of the effective config: naming one equals leaving it out.
    assert (
        RunConfig(model="lenet").resolved()
        == RunConfig(model="lenet", image_size=28, model_options={"activation": "sigmoid"}).resolved()
    )


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(model="lenet5"), "model"),
        (dict(model_options={"width_divisor": 2}), "model_options"),
        (dict(model_options={"dtype": "bfloat16"}), "model_options"),
        (dict(seed=2**32), "seed"),
        (dict(seed=-1), "seed"),
        (dict(lr=float("nan")), "lr"),
        (dict(lr=0), "lr"),
        (dict(epochs=0), "epochs"),
        (dict(batch_size=True), "batch_size"),
        (dict(image_size=0), "image_size"),
        (dict(optimizer="rmsprop"), "optimizer"),
        (dict(dtype="float16"), "dtype"),
        (dict(warmup_epochs=-1.0), "warmup_epochs"),
        (dict(checkpoint_every=-1), "checkpoint_every"),
        (dict(dataset=""), "dataset"),
    ],
)
def test_bad_config_is_a_value_error_naming_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"RunConfig: {field}"):
        tiny(**changes)


def test_numpy_scalars_become_python_numbers():
    config = tiny(epochs=np.int64(2), lr=np.float32(0.5))
    assert type(config.epochs) is int and type(config.lr) is float
    assert RunConfig.from_json(config.to_json()) == config


def test_from_json_refuses_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['learning_rate'\]"):
        RunConfig.from_json('{"learning_rate": 0.1}')


# --------------------------------------------------------------------------
# The run from a notebook.


def test_a_notebook_run_returns_its_records_and_reports_through_hooks(finished):
    workdir, records, hooks = finished
    assert [r["epoch"] for r in records] == [1, 2] and records == read_metrics(workdir)
    assert records[-1]["test_accuracy"] > 0.3
    reports = [c for c in hooks.calls if c[0] != "xla compile"]
    assert reports[0] == ("start", "lenet")  # the first report comes before the steps compile
    compiles = [c[1:] for c in hooks.calls if c[0] == "compile"]
    assert [(what, seconds is None) for what, seconds in compiles] == [
        ("train step", True),
        ("train step", False),
        ("eval step", True),
        ("eval step", False),
    ]
    # Compiling is over before the first epoch's clock starts: its images/s is training time only.
    first_epoch = hooks.calls.index(("phase", "train", 0))
    assert not [c for c in hooks.calls[first_epoch:] if c[0] == "xla compile"]
    assert [c for c in hooks.calls[:first_epoch] if c[0] == "xla compile"]
    assert records[0]["images_per_sec"] == pytest.approx(256 / records[0]["train_seconds"])
    train_progress = [c for c in hooks.calls if c[:2] == ("progress", "train")]
    assert {"loss", "accuracy", "lr", "images_per_sec"} <= set(train_progress[0][3])
    assert [c for c in hooks.calls if c[0] == "epoch"] == [("epoch", 1), ("epoch", 2)]
    config = json.loads((workdir / "config.json").read_text())
    assert None not in config.values() and config["image_size"] == 28 and config["test_examples"] == 96
    assert RunConfig.from_json(config) == tiny(epochs=2, checkpoint_every=4, log_every=2).resolved().replace(
        train_examples=256, test_examples=96
    )


def test_the_command_line_writes_the_notebook_runs_metrics(finished, tmp_path):
    from experiments import lenet

    argv = [
        "--dataset",
        "mnist_10k",
        "--train-examples",
        "256",
        "--test-examples",
        "96",
        "--batch-size",
        "32",
        "--optimizer",
        "adam",
        "--lr",
        "0.003",
        "--activation",
        "relu",
        "--pooling",
        "max",
        "--epochs",
        "2",
        "--workdir",
        str(tmp_path / "cli"),
    ]
    assert lenet.main(argv) == 0
    assert learned(read_metrics(tmp_path / "cli")) == learned(finished[1])


def test_a_training_set_on_the_device_gives_the_same_run(finished, tmp_path, monkeypatch):
    """What GPUs and TPUs do (data.device_batches), taken on the CPU: the same batches, the same metrics."""
    monkeypatch.setattr(run, "DEVICE_DATA_PLATFORMS", ("cpu",))
    records = run.train_and_evaluate(tiny(epochs=2, checkpoint_every=4, log_every=2), tmp_path / "run")
    assert learned(records) == learned(finished[1])


def test_records_keep_lr_and_time_and_steps_jsonl_keeps_the_intervals(finished):
    workdir, records, _ = finished
    assert all(
        r["lr"] == pytest.approx(0.003) and r["time"] > 1.7e9 and r["train_seconds"] <= r["seconds"] for r in records
    )
    steps = [json.loads(line) for line in (workdir / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [2, 4, 6, 8, 10, 12, 14, 16]
    assert all({"loss", "accuracy", "lr", "images_per_sec", "epoch"} <= set(s) for s in steps)


def test_tensorboard_events_hold_the_scalars(finished):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(finished[0]))
    events.Reload()
    assert {"train/loss", "train/lr", "epoch/test_accuracy", "epoch/train_loss"} <= set(events.Tags()["scalars"])
    accuracy = [(e.step, e.value) for e in events.Scalars("epoch/test_accuracy")]
    assert accuracy == [
        (8, pytest.approx(finished[1][0]["test_accuracy"])),
        (16, pytest.approx(finished[1][1]["test_accuracy"])),
    ]
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8, 10, 12, 14, 16]


def test_curves_png_is_a_readable_picture(finished):
    from matplotlib.image import imread

    image = imread(finished[0] / "curves.png")
    assert image.shape[0] >= 300 and image.shape[1] >= 600
    assert image[..., :3].std() > 0.05  # not blank


def test_a_cosine_schedule_is_recorded_as_it_decays(tmp_path):
    records = run.train_and_evaluate(tiny(epochs=2, schedule="cosine"), tmp_path / "run")
    assert records[0]["lr"] == pytest.approx(0.003 * (1 + np.cos(np.pi * 7 / 16)) / 2)
    assert records[1]["lr"] < records[0]["lr"]


def test_load_model_rebuilds_the_bfloat16_model_it_trained(tmp_path):
    import jax.numpy as jnp

    workdir = tmp_path / "run"
    run.train_and_evaluate(tiny(epochs=1, dtype="bfloat16", train_examples=64, test_examples=32), workdir)
    model, config = checkpoint.load_model(workdir)
    assert config["dtype"] == "bfloat16"
    assert model.net.layers[0].dtype == jnp.bfloat16


# --------------------------------------------------------------------------
# Resume.


def test_resume_after_a_stop_request_ends_as_an_uninterrupted_run(finished, tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(run.Stopped) as stopped:
        run.train_and_evaluate(tiny(epochs=2, checkpoint_every=4, log_every=2), workdir, hooks=Recorder(stop_after=5))
    assert stopped.value.exit_code == 128 + 15 and len(stopped.value.records) == 1
    records = run.train_and_evaluate(tiny(epochs=2, checkpoint_every=4, log_every=2), workdir, resume=True)
    assert learned(records) == learned(finished[1])


def test_lost_and_torn_files_are_rebuilt_from_the_checkpoint(finished, tmp_path):
    workdir = copy_run(finished, tmp_path)
    (workdir / "config.json").write_text("")
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    (workdir / "metrics.jsonl").write_text(lines[0][:20])  # epoch 1 torn, epoch 2 lost
    (workdir / "steps.jsonl").write_text((workdir / "steps.jsonl").read_text() + '{"step": 1')
    hooks = Recorder()
    records = run.train_and_evaluate(tiny(epochs=3, checkpoint_every=4, log_every=2), workdir, resume=True, hooks=hooks)
    assert "resuming from step 16" in hooks.messages()
    assert learned(read_metrics(workdir))[:2] == learned(finished[1]) and len(records) == 3
    assert json.loads((workdir / "config.json").read_text())["epochs"] == 3
    steps = [json.loads(line)["step"] for line in (workdir / "steps.jsonl").read_text().splitlines()]
    assert steps == list(range(2, 25, 2))


def _damage_meta(checkpoint_dir: Path, **changes):
    path = checkpoint_dir / "meta" / "metadata"
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        if key == "run_id":
            meta["config"]["run_id"] = value
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))


def _damage(checkpoints: Path, step: int, damage: str) -> None:
    where = checkpoints / str(step)
    if damage == "flip a byte":
        largest = max((p for p in (where / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        data = bytearray(largest.read_bytes())
        data[len(data) // 2] ^= 0x01
        largest.write_bytes(bytes(data))
    elif damage == "another step's arrays":
        shutil.rmtree(where / "state")
        shutil.copytree(checkpoints / "8" / "state", where / "state")
    elif damage == "meta's checksums edited":
        sums = json.loads((where / "meta" / "metadata").read_text())["checksums"]
        _damage_meta(where, checksums=[[a ^ 1, b] for a, b in sums])
    elif damage == "another run's":
        _damage_meta(where, run_id="0" * 32)
    elif damage == "meta says epoch 5":
        _damage_meta(where, epoch=5)
    else:
        assert damage == "meta without history"
        _damage_meta(where, history=None)


# Two damages a resume (one on each of the newest two checkpoints, 16 and 12), and why each is set aside.
@pytest.mark.parametrize(
    "damages",
    [
        {"another step's arrays": "disagrees", "meta says epoch 5": "not its epoch 5"},
        {"meta's checksums edited": "checksums", "another run's": "belongs to run"},
        {"meta without history": "lacks history", "another step's arrays": "disagrees"},
    ],
)
def test_a_checkpoint_that_does_not_check_out_is_set_aside(finished, tmp_path, damages):
    workdir = copy_run(finished, tmp_path)
    checkpoints = workdir / "checkpoints"
    for step, damage in zip((16, 12), damages, strict=True):
        _damage(checkpoints, step, damage)
    hooks = Recorder()
    records = run.train_and_evaluate(tiny(epochs=2, checkpoint_every=4, log_every=2), workdir, resume=True, hooks=hooks)
    said = hooks.messages().splitlines()
    for step, why in zip((16, 12), damages.values(), strict=True):
        assert any(f"checkpoint {checkpoints / str(step)} is damaged" in line and why in line for line in said), said
        assert (checkpoints / f"{step}.damaged").is_dir()
    assert "resuming from step 8 (epoch 2, batch 0)" in said
    assert learned(records) == learned(finished[1])


def test_a_flipped_byte_is_caught_or_never_read(finished, tmp_path):
    """Bit rot in the newest checkpoint's largest file: set aside if the restored arrays differ from their
    checksums (or cannot be read), else resumed from unchanged. OCDBT's files keep index nodes that a later
    write superseded, which no restore reads; where a flip lands varies between runs with the writer's threads."""
    workdir = copy_run(finished, tmp_path)
    _damage(workdir / "checkpoints", 16, "flip a byte")
    hooks = Recorder()
    records = run.train_and_evaluate(tiny(epochs=2, checkpoint_every=4, log_every=2), workdir, resume=True, hooks=hooks)
    said = hooks.messages()
    damaged = [line for line in said.splitlines() if f"checkpoint {workdir / 'checkpoints' / '16'} is damaged" in line]
    if damaged:  # the checksums differ, or restoring raised: the reason starts with the exception's type (any)
        assert "checksums" in damaged[0] or re.search(r"is damaged \(\w+: ", damaged[0]), said
        assert (workdir / "checkpoints" / "16.damaged").is_dir() and "resuming from step 12" in said
    else:
        assert "resuming from step 16" in said  # the checksums held: the arrays are the ones saved
    assert learned(records) == learned(finished[1])


def test_checksums_see_any_changed_word():
    import jax.numpy as jnp

    x = jnp.asarray(np.random.default_rng(0).standard_normal(4096), jnp.float32)
    before = checkpoint.checksums({"x": x, "flag": jnp.array([True, False]), "half": x.astype(jnp.bfloat16)})
    # Two sign flips: a plain sum of odd-weighted words mod 2**32 cannot see this pair; a hashed one can.
    flipped = x.at[1268].multiply(-1).at[1274].multiply(-1)
    after = checkpoint.checksums({"x": flipped, "flag": jnp.array([True, False]), "half": x.astype(jnp.bfloat16)})
    # Leaves in key order: flag, half, x.
    assert (before[2] != after[2]).all() and (before[:2] == after[:2]).all()
    flag = checkpoint.checksums({"x": x, "flag": jnp.array([True, True]), "half": x.astype(jnp.bfloat16)})
    assert (flag[0] != before[0]).all() and (flag[1:] == before[1:]).all()


def test_checkpoints_that_name_no_run_are_refused_untouched(finished, tmp_path):
    workdir = copy_run(finished, tmp_path)
    (workdir / "config.json").unlink()
    for meta in (workdir / "checkpoints").glob("*/meta/metadata"):
        values = json.loads(meta.read_text())
        del values["config"]  # as an older jaxcnn wrote them
        meta.write_text(json.dumps(values))
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    with pytest.raises(run.UsageError, match="name no run"):
        run.train_and_evaluate(tiny(epochs=2, checkpoint_every=4, log_every=2), workdir, resume=True)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(test_examples=64), "test_examples was 96, now 64"),
        (dict(epochs=3, schedule="cosine"), "schedule was 'constant', now 'cosine'"),
        (dict(model_options={"activation": "sigmoid", "pooling": "max"}), "model_options was"),
    ],
)
def test_resume_refuses_other_settings(finished, tmp_path, changes, message):
    workdir = copy_run(finished, tmp_path)
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    with pytest.raises(run.SettingsDiffer, match=message):
        run.train_and_evaluate(tiny(**(dict(epochs=2, checkpoint_every=4) | changes)), workdir, resume=True)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before


def test_resume_refuses_more_epochs_under_a_cosine_schedule_and_takes_the_default_image_size(tmp_path):
    workdir = tmp_path / "run"
    config = tiny(epochs=1, schedule="cosine", train_examples=64, test_examples=32)
    run.train_and_evaluate(config, workdir)
    with pytest.raises(run.SettingsDiffer, match="would change the cosine schedule"):
        run.train_and_evaluate(config.replace(epochs=2), workdir, resume=True)
    # image_size 28 is LeNet's own: the same run, so resuming the finished run is a no-op.
    assert learned(run.train_and_evaluate(config.replace(image_size=28), workdir, resume=True)) == learned(
        read_metrics(workdir)
    )


# --------------------------------------------------------------------------
# The workdir.


@pytest.mark.parametrize("held", ["metrics.jsonl", "model", "curves.png", "notes.txt"])
def test_a_workdir_holding_anything_is_refused(tmp_path, held):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / held).mkdir() if held == "model" else (workdir / held).write_text("x")
    with pytest.raises(run.UsageError, match="already holds files"):
        run.train_and_evaluate(tiny(epochs=1), workdir)
    assert sorted(p.name for p in workdir.iterdir()) == sorted([held, "lock"])


def test_a_workdir_that_is_a_file_or_empty_is_a_usage_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(run.UsageError, match="is a file"):
        run.train_and_evaluate(tiny(epochs=1), tmp_path / "file")
    with pytest.raises(run.UsageError, match="non-empty path"):
        run.train_and_evaluate(tiny(epochs=1), "")


def test_a_workdir_in_use_is_refused_naming_the_holder(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    with open(workdir / "lock", "w") as held:
        held.write("pid 4242 on somehost\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(run.WorkdirInUse, match="in use by pid 4242 on somehost"):
            run.train_and_evaluate(tiny(epochs=1), workdir, resume=True)
    assert [p.name for p in workdir.iterdir()] == ["lock"]


def _idx(path: Path, array: np.ndarray) -> None:
    path.write_bytes(bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


@pytest.mark.parametrize("test_images, image_hw, message", [(0, 4, "no test examples"), (8, 0, "empty images")])
def test_empty_data_is_refused(tmp_path, test_images, image_hw, message):
    for prefix, n in (("train", 64), ("t10k", test_images)):
        _idx(tmp_path / f"{prefix}-images-idx3-ubyte", np.zeros((n, image_hw, image_hw), np.uint8))
        _idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.zeros((n,), np.uint8))
    with pytest.raises(run.UsageError, match=message):
        run.train_and_evaluate(
            tiny(dataset=str(tmp_path), epochs=1, train_examples=None, test_examples=None), tmp_path / "run"
        )


@pytest.mark.parametrize(
    "changes, message",
    [(dict(model_options={"activation": "tanh"}), "activation"), (dict(model_options={}, image_size=2), "lenet")],
)
def test_a_model_that_cannot_be_built_is_a_usage_error(tmp_path, changes, message):
    with pytest.raises(run.UsageError, match=message):
        run.train_and_evaluate(tiny(epochs=1, **changes), tmp_path / "run")


def test_a_full_disk_is_one_line_and_keeps_the_checkpoints(tmp_path, monkeypatch):
    write = _files.write_atomic

    def full(path, content):
        if path.name == "metrics.jsonl" and content:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        write(path, content)

    monkeypatch.setattr(_files, "write_atomic", full)
    workdir = tmp_path / "run"
    with pytest.raises(run.StorageError) as error:
        run.train_and_evaluate(tiny(epochs=2), workdir)
    assert "No space left on device" in str(error.value) and "\n" not in str(error.value)
    assert [p.name for p in (workdir / "checkpoints").iterdir()] == ["8"]  # epoch 1's, complete


def test_profile_writes_a_trace_of_the_train_step(tmp_path):
    import gzip

    config = tiny(epochs=1, train_examples=256, test_examples=32, profile=True, profile_steps=2)
    run.train_and_evaluate(config, tmp_path / "run")
    (trace,) = (tmp_path / "run" / "profile").rglob("perfetto_trace.json.gz")
    assert b"jit_train_step" in gzip.decompress(trace.read_bytes())
