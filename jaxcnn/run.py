"""The training run as a library: `RunConfig` and `train_and_evaluate(config, workdir)`.

    from jaxcnn.run import RunConfig, train_and_evaluate
    records = train_and_evaluate(RunConfig(model="lenet", dataset="mnist_10k", epochs=2), "runs/try")

The run prints nothing: it reports through a `Hooks` object the caller passes
(`experiments/` pass one that prints a progress bar), asks the same object
whether to stop, and raises a `RunError` (one line, with an `exit_code`) when
it cannot go on. A workdir holds:

    lock                 held while a run uses the workdir (pid and host of the holder)
    config.json          the RunConfig with every value the run computed filled in
    metrics.jsonl        one record per epoch (also kept in each checkpoint, rebuilt on resume)
    steps.jsonl          one record per log interval: step, loss, accuracy, lr, images/s
    events.out.tfevents.*  the same scalars for TensorBoard
    curves.png           loss and accuracy by epoch
    checkpoints/         the whole train state every epoch (and every checkpoint_every steps)
    model/               the final params and batch statistics (checkpoint.load_model)
    profile/             a jax.profiler trace of a few steps, with profile=True

What it promises: a second run on a workdir in use is refused; config.json,
metrics.jsonl and curves.png are replaced atomically (a kill leaves the old
file or the new one; steps.jsonl and the events are appended); a checkpoint
holds a checksum of its arrays and the run's id, and one that fails either is
set aside (never deleted) in favour of the one before; resuming from any
checkpoint ends with the same metrics, to the last digit, as a run that never
stopped. Only process 0 writes files; every process takes part in checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import math
import os
import platform
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxcnn import _checks, _files, checkpoint, data, models, train

DTYPES = ("float32", "bfloat16")
# On these platforms a training set of up to DEVICE_DATA_BYTES lives on the devices, and each step's batch
# is gathered there: no host-to-device copy to wait on. CPUs keep prefetching from host memory.
DEVICE_DATA_PLATFORMS = ("gpu", "tpu")
DEVICE_DATA_BYTES = 2**30
# Progress is reported every log_every steps, and at least this often on slow models.
PROGRESS_SECONDS = 2.0
# Settings that may change on resume: they decide how the run is kept and shown, not what it computes.
RESUMABLE_CHANGES = (
    "epochs",
    "data_dir",
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
    "profile",
    "profile_steps",
)


# --------------------------------------------------------------------------
# Errors: one line each, and the exit code a command line gives them.


class RunError(Exception):
    """A run that cannot start or go on. `str(error)` is one line; `exit_code` what a command line exits with."""

    exit_code = 1


class UsageError(RunError):
    """The settings, the data or the workdir do not allow the run (a command line's usage error)."""

    exit_code = 2


class WorkdirInUse(UsageError):
    """Another process holds the workdir's lock."""


class SettingsDiffer(UsageError):
    """resume=True with settings other than the run being resumed."""


class NoUsableCheckpoint(RunError):
    """resume=True, and every checkpoint in the workdir is damaged or from another run."""


class StorageError(RunError):
    """A file of the run could not be written (disk full, read-only filesystem)."""


class Diverged(RunError):
    """A non-finite loss or gradient. `step` is the first bad step; the last good checkpoint is kept."""

    exit_code = 3

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class Stopped(RunError):
    """Stopped on request (Hooks.stop_requested) after saving a checkpoint; resume=True continues."""

    def __init__(self, where: str, signum: int, records: list[dict]):
        super().__init__(f"stopped {where}; checkpoint saved")
        self.where, self.signum, self.records = where, signum, records
        self.exit_code = 128 + signum  # as shells report a process stopped by signal n


# --------------------------------------------------------------------------
# The configuration.


class ConfigError(ValueError):
    """A RunConfig field with a value it cannot take: `field` names it, `want` says what it must be."""

    def __init__(self, field: str, want: str, value):
        super().__init__(f"RunConfig: {field} must be {want}, got {value!r}")
        self.field, self.want, self.value = field, want, value


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Every setting of a run, named as the command line's flags. None: the chapter's run (models.run_defaults)."""

    model: str = "lenet"
    model_options: dict = dataclasses.field(default_factory=dict)  # e.g. {"activation": "relu", "pooling": "max"}
    dataset: str = "fashion_mnist"  # "mnist_10k" (bundled), a TFDS name, or a directory of IDX files
    data_dir: str = ""  # TFDS's data directory ("": TFDS's default)
    epochs: int | None = None
    batch_size: int | None = None  # global, split over every device
    lr: float | None = None  # peak learning rate
    optimizer: str | None = None
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0
    image_size: int | None = None  # None: the chapter's size for the model
    dtype: str = "float32"  # compute dtype; params, loss, BatchNorm statistics and optimizer state stay float32
    train_examples: int | None = None  # None: all
    test_examples: int | None = None
    checkpoint_every: int = 0  # steps; 0: only at the end of each epoch
    keep_checkpoints: int = 3
    log_every: int = 50  # steps between progress records (steps.jsonl)
    profile: bool = False  # write a jax.profiler trace of a few steady-state steps to workdir/profile
    profile_steps: int = 5

    def __post_init__(self):
        for field in dataclasses.fields(self):  # numpy scalars as Python's, so that to_json writes them
            value = getattr(self, field.name)
            if isinstance(value, (np.integer, np.floating)):
                object.__setattr__(self, field.name, value.item())
        _check(self)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | dict) -> RunConfig:
        """A RunConfig from `to_json`'s text or a workdir's config.json (whose computed values it leaves out)."""
        values = json.loads(text) if isinstance(text, str) else dict(text)
        if not isinstance(values, dict):
            raise ValueError(f"RunConfig.from_json: want a JSON object, got {type(values).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields - set(COMPUTED_KEYS))
        if unknown:
            raise ValueError(f"RunConfig.from_json: unknown field(s) {unknown}")
        return cls(**{k: v for k, v in values.items() if k in fields})

    def replace(self, **changes) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def resolved(self) -> RunConfig:
        """This config with the chapter's values in place of None, and the model's full options."""
        chapter = models.run_defaults(self.model)
        filled = {
            k: getattr(chapter, k) for k in ("lr", "optimizer", "batch_size", "epochs") if getattr(self, k) is None
        }
        defaults = {k: v for k, v in models.options(self.model).items() if k != "dtype"}
        options = defaults | self.model_options
        return self.replace(
            **filled,
            image_size=self.image_size or models.default_image_size(self.model),
            model_options={k: options[k] for k in sorted(options)},
        )


# What config.json adds to the RunConfig's fields: values the run computed.
COMPUTED_KEYS = (
    "run_id",
    "num_classes",
    "in_channels",
    "num_params",
    "steps_per_epoch",
    "devices",
    "process_count",
    "versions",
)


def _check(config: RunConfig) -> None:
    """Every field's type and range, in one place; a ValueError naming the field."""

    def fail(name, want):
        raise ConfigError(name, want, getattr(config, name))

    if config.model not in models.names():
        fail("model", f"one of {models.names()}")
    if not isinstance(config.model_options, dict):
        fail("model_options", "a dict")
    allowed = models.options(config.model)
    unknown = sorted(set(config.model_options) - set(allowed) | ({"dtype"} & set(config.model_options)))
    if unknown:
        allowed = sorted(set(allowed) - {"dtype"})
        raise ConfigError("model_options", f"options of {config.model!r} ({allowed}; dtype is a field)", unknown)
    for name in ("dataset", "data_dir"):
        if not isinstance(getattr(config, name), str):
            fail(name, "a string")
    if not config.dataset:
        fail("dataset", "a dataset name or directory")
    for name in ("epochs", "batch_size", "image_size", "train_examples", "test_examples"):
        value = getattr(config, name)
        if value is not None and not (_checks.is_int(value) and value >= 1):
            fail(name, "a positive int")  # or None
    for name in ("keep_checkpoints", "log_every", "profile_steps"):
        if not (_checks.is_int(getattr(config, name)) and getattr(config, name) >= 1):
            fail(name, "a positive int")
    if not (_checks.is_int(config.checkpoint_every) and config.checkpoint_every >= 0):
        fail("checkpoint_every", "an int >= 0")
    if not (_checks.is_int(config.seed) and 0 <= config.seed < 2**32):
        fail("seed", "an int in [0, 2**32)")  # what jax.random.PRNGKey and numpy's generators both take
    if config.lr is not None and not (_checks.is_finite_number(config.lr) and config.lr > 0):
        fail("lr", "a positive finite number")  # or None
    for name in ("warmup_epochs", "weight_decay"):
        if not (_checks.is_finite_number(getattr(config, name)) and getattr(config, name) >= 0):
            fail(name, "a finite number >= 0")
    if config.optimizer is not None and config.optimizer not in train.OPTIMIZERS:
        fail("optimizer", f"one of {train.OPTIMIZERS}")  # or None
    if config.schedule not in train.SCHEDULES:
        fail("schedule", f"one of {train.SCHEDULES}")
    if config.dtype not in DTYPES:
        fail("dtype", f"one of {DTYPES}")
    if not isinstance(config.profile, bool):
        fail("profile", "a bool")


# --------------------------------------------------------------------------
# What a run reports, and how it is asked to stop.


class Hooks:
    """The run's reports to its caller. Override what you need: every method does nothing here.

    Reports reach process 0 only; `stop_requested` is asked on every process (they agree before stopping).
    """

    def on_start(self, config: dict) -> None:
        """Before the model is built or anything compiled: config.json's contents (num_params comes later)."""

    def on_message(self, text: str) -> None:
        """One line of news: resuming from a checkpoint, one set aside as damaged."""

    def on_compile(self, what: str, seconds: float | None) -> None:
        """Called with seconds=None as compiling `what` ("train step", "eval step") starts, then with its time."""

    def on_phase_start(self, phase: str, epoch: int, total: int, done: int) -> None:
        """`phase` is "train" or "eval"; `total` steps of which `done` are already done (a resumed epoch)."""

    def on_progress(self, phase: str, done: int, values: dict) -> None:
        """`done` steps of the phase; values: loss, accuracy (and for train lr, images_per_sec)."""

    def on_phase_end(self, phase: str) -> None:
        pass

    def on_epoch_end(self, record: dict) -> None:
        """The epoch's record, as metrics.jsonl keeps it."""

    def stop_requested(self) -> int:
        """A signal number (or any positive int) to checkpoint and stop after the current step; 0 to go on."""
        return 0


# --------------------------------------------------------------------------
# Building the model, the optimizer and the steps (the benchmarks build theirs here too).


class Trainer(NamedTuple):
    model: Any  # the nnx.Module as created (train mode)
    tx: optax.GradientTransformation
    learning_rate: Callable[[int], float]  # the schedule: the lr of the step after `step` steps
    state: train.TrainState  # replicated over `mesh`
    totals: dict
    train_step: Callable
    eval_step: Callable
    mesh: jax.sharding.Mesh
    replicate: Callable  # train.replicator(mesh): host pytrees to replicated arrays


def create_model(config: RunConfig, *, num_classes: int, in_channels: int):
    config = config.resolved()
    return models.create(
        config.model,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=config.image_size,
        seed=config.seed,
        **config.model_options,
        **({"dtype": jnp.bfloat16} if config.dtype == "bfloat16" else {}),
    )


def create_trainer(
    config: RunConfig, *, num_classes: int, in_channels: int, steps_per_epoch: int, mesh=None
) -> Trainer:
    """The model, optimizer, replicated state and jitted steps of a run, on `mesh` (default: every device)."""
    config = config.resolved()
    mesh = train.data_mesh() if mesh is None else mesh
    model = create_model(config, num_classes=num_classes, in_channels=in_channels)
    train_def, eval_def, params, batch_stats = train.split_model(model)
    total_steps = steps_per_epoch * config.epochs
    schedule = dict(
        total_steps=total_steps,
        schedule=config.schedule,
        warmup_steps=round(config.warmup_epochs * steps_per_epoch),
    )
    tx = train.make_optimizer(config.optimizer, config.lr, weight_decay=config.weight_decay, **schedule)
    replicate = train.replicator(mesh)
    return Trainer(
        model=model,
        tx=tx,
        learning_rate=_on_host(train.make_schedule(config.lr, **schedule), total_steps),
        state=replicate(train.create_train_state(params, batch_stats, tx, config.seed)),
        totals=replicate(train.zero_totals()),
        train_step=train.make_train_step(train_def, tx, mesh, image_size=config.image_size),
        eval_step=train.make_eval_step(eval_def, mesh, image_size=config.image_size),
        mesh=mesh,
        replicate=replicate,
    )


def _on_host(schedule: optax.Schedule, total_steps: int) -> Callable[[int], float]:
    """The schedule as a host-side table: reading the lr in the loop then costs no device work or compile."""
    table = np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(total_steps + 1)))

    def learning_rate(step: int) -> float:
        return float(table[min(step, total_steps)])

    return learning_rate


# --------------------------------------------------------------------------
# The run.


def train_and_evaluate(config: RunConfig, workdir, *, resume: bool = False, hooks: Hooks | None = None) -> list[dict]:
    """Trains and evaluates `config` in `workdir`; returns the per-epoch records (metrics.jsonl's lines).

    resume=True continues the run in `workdir` from its newest usable checkpoint (or starts one if it
    holds none); without it a workdir that holds anything is refused. Raises a RunError subclass when
    the run cannot start or go on.
    """
    if not isinstance(config, RunConfig):
        raise ValueError(f"train_and_evaluate: config must be a RunConfig, got {type(config).__name__}")
    hooks = hooks or Hooks()
    workdir = _workdir_path(workdir)
    is_writer = jax.process_index() == 0
    with _Lock(workdir, resume=resume), checkpoint.quiet_orbax():
        dataset, effective = _load(config)
        config = RunConfig.from_json(effective)
        mngr = checkpoint.manager(workdir / "checkpoints", keep=config.keep_checkpoints)
        try:
            effective["run_id"] = _run_id(workdir, mngr, effective, resume)  # refuses other settings first
            if is_writer:
                hooks.on_start(effective)  # before the model is built: that alone can take a while
            start = time.perf_counter()
            try:  # an option's value the model refuses, or images too small for it
                trainer = create_trainer(
                    config,
                    num_classes=effective["num_classes"],
                    in_channels=effective["in_channels"],
                    steps_per_epoch=effective["steps_per_epoch"],
                )
            except ValueError as error:
                raise UsageError(f"model {config.model!r}: {error}") from None
            effective["num_params"] = sum(int(p.size) for p in jax.tree.leaves(trainer.state.params))
            if is_writer:
                seconds = time.perf_counter() - start
                hooks.on_message(f"built {config.model}: {effective['num_params']:,} parameters in {seconds:.1f} s")
            restored = _restore(mngr, trainer, effective, hooks) if resume else None
            if is_writer:
                _files.write_atomic(workdir / "config.json", json.dumps(effective, indent=2) + "\n")
            records = _Run(config, effective, workdir, dataset, trainer, mngr, hooks).loop(restored)
            checkpoint.close(mngr)
            return records
        except OSError as error:  # checkpoint.SaveError among them
            raise StorageError(_storage_message(workdir, error)) from None
        finally:
            with contextlib.suppress(Exception):  # after an error: wait for a save in flight, not masking the error
                mngr.close()


def _workdir_path(workdir) -> Path:
    if not isinstance(workdir, (str, os.PathLike)) or not os.fspath(workdir):
        raise UsageError(f"workdir must be a non-empty path, got {workdir!r}")
    return Path(workdir).absolute()


def _storage_message(workdir: Path, error: OSError) -> str:
    where = f" ({error.filename})" if error.filename else ""
    return (
        f"cannot write the run's files in {workdir}{where}: {error.strerror or error}; its saved checkpoints are intact"
    )


def _load(config: RunConfig) -> tuple[data.Dataset, dict]:
    """The dataset, and config.json's contents: every setting with the values the run computes filled in."""
    resolved = config.resolved()
    try:
        dataset = data.load(config.dataset, data_dir=config.data_dir or None)
    except ValueError as error:
        raise UsageError(f"dataset {config.dataset!r}: {error}") from None
    train_split = _first(dataset.train, config.train_examples)
    test_split = _first(dataset.test, config.test_examples)
    height, width, in_channels = train_split.images.shape[1:]
    for name, split in (("train", train_split), ("test", test_split)):
        if len(split.labels) == 0:
            raise UsageError(f"dataset {config.dataset!r} has no {name} examples")
    if min(height, width, in_channels) < 1:
        raise UsageError(f"dataset {config.dataset!r} has empty images ({height}x{width}x{in_channels})")
    devices = jax.devices()
    if resolved.batch_size % len(devices):
        raise UsageError(f"batch_size {resolved.batch_size} must divide by the {len(devices)} devices")
    steps_per_epoch = data.num_train_batches(train_split, resolved.batch_size)
    if steps_per_epoch == 0:
        raise UsageError(
            f"batch_size {resolved.batch_size} is larger than the {len(train_split.labels)} training examples"
        )
    effective = json.loads(resolved.to_json()) | {
        "train_examples": len(train_split.labels),
        "test_examples": len(test_split.labels),
        "num_classes": dataset.num_classes,
        "in_channels": int(in_channels),
        "steps_per_epoch": steps_per_epoch,
        "devices": [str(d) for d in devices],
        "process_count": jax.process_count(),
        "versions": _versions(),
    }
    return data.Dataset(dataset.name, train_split, test_split, dataset.num_classes), effective


def _first(split: data.Split, n: int | None) -> data.Split:
    return split if n is None else data.Split(split.images[:n], split.labels[:n])


def _run_id(workdir: Path, mngr, effective: dict, resume: bool) -> str:
    """The resumed run's id (after checking its settings), else a new one; the same on every process."""
    run_id = (_previous_run_id(workdir, mngr, effective) if resume else None) or uuid.uuid4().hex
    if jax.process_count() > 1:
        run_id = bytes(multihost_utils.broadcast_one_to_all(np.frombuffer(bytes.fromhex(run_id), np.uint8))).hex()
    return run_id


def _previous_run_id(workdir: Path, mngr, effective: dict) -> str | None:
    """The id of the run being resumed, after checking that it had these settings (None: no run to resume)."""
    saved = _files.read_json(workdir / "config.json")
    if not (isinstance(saved, dict) and saved.get("run_id")):  # lost or damaged: the checkpoints keep a copy
        saved = checkpoint.latest_meta(mngr).get("config")
    if not (isinstance(saved, dict) and saved.get("run_id")):
        if mngr.all_steps():
            raise UsageError(
                f"the checkpoints in {mngr.directory} name no run (an older jaxcnn's?), so they cannot be "
                "checked; start a new run in another workdir (nothing was changed)"
            )
        return None
    changed = [
        f"{key} was {saved.get(key)!r}, now {effective[key]!r}"
        for key in json.loads(RunConfig().to_json())
        if key not in RESUMABLE_CHANGES and saved.get(key) != effective[key]
    ]
    if saved.get("epochs") != effective["epochs"] and effective["schedule"] != "constant":
        changed.append(
            f"epochs was {saved.get('epochs')!r}, now {effective['epochs']!r}, which would change the "
            f"{effective['schedule']} schedule mid-run"
        )
    if changed:
        raise SettingsDiffer(
            "resume continues the run in the workdir with its own settings, but "
            + "; ".join(changed)
            + " (epochs may change under a constant schedule; so may data_dir and how the run is logged and kept)"
        )
    return saved.get("run_id")


def _restore(mngr, trainer: Trainer, effective: dict, hooks: Hooks):
    try:
        restored = checkpoint.restore_latest(
            mngr,
            trainer.state,
            trainer.totals,
            run_id=effective["run_id"],
            steps_per_epoch=effective["steps_per_epoch"],
            on_damaged=hooks.on_message,
        )
    except ValueError as error:
        raise NoUsableCheckpoint(str(error)) from None
    if jax.process_index() == 0:
        if restored is None:
            hooks.on_message(f"no checkpoint in {mngr.directory}; starting from scratch")
        else:
            step, _, _, meta = restored
            hooks.on_message(f"resuming from step {step} (epoch {meta['epoch'] + 1}, batch {meta['batch']})")
    return restored


class _Run:
    """The epoch loop and what it writes; one per train_and_evaluate call."""

    def __init__(self, config, effective, workdir, dataset, trainer, mngr, hooks):
        self.config, self.effective, self.workdir, self.dataset = config, effective, workdir, dataset
        self.trainer, self.mngr, self.hooks = trainer, mngr, hooks
        self.steps_per_epoch = effective["steps_per_epoch"]
        self.is_writer = jax.process_index() == 0
        self.multi_host = jax.process_count() > 1
        self.batch_sharding = NamedSharding(trainer.mesh, P("data"))
        self.replicate = trainer.replicate
        self.writer = _Writer(workdir, config) if self.is_writer else None
        on_devices = jax.devices()[0].platform in DEVICE_DATA_PLATFORMS
        self.resident = None
        if on_devices and dataset.train.images.nbytes + dataset.train.labels.nbytes <= DEVICE_DATA_BYTES:
            self.resident = data.device_split(dataset.train, self.batch_sharding)

    def loop(self, restored) -> list[dict]:
        cfg, trainer = self.config, self.trainer
        state, totals = trainer.state, trainer.totals
        start_epoch, start_batch, history = 0, 0, []
        if restored is not None:
            _, state, totals, meta = restored
            start_epoch, start_batch, history = meta["epoch"], meta["batch"], meta["history"]
        self.profiler = _Profiler(self.workdir / "profile", cfg, start_epoch * self.steps_per_epoch + start_batch)
        try:
            if self.writer:
                self.writer.start(history, resumed_at=start_epoch * self.steps_per_epoch + start_batch)
            train_step, eval_step = self._compile(state, totals)
            for epoch in range(start_epoch, cfg.epochs):
                state, totals, record = self._epoch(epoch, start_batch, state, totals, history, train_step, eval_step)
                start_batch = 0
                history.append(record)
                totals = self.replicate(train.zero_totals())
                self._save(record["step"], state, totals, epoch + 1, 0, history)
                if self.writer:
                    self.hooks.on_epoch_end(record)
                    self.writer.epoch(history)
                stopping = self._agreed(self.hooks.stop_requested())
                if stopping and epoch + 1 < cfg.epochs:
                    raise self._stopped(stopping, f"after epoch {epoch + 1}", history)
            checkpoint.wait(self.mngr)
            checkpoint.save_model(
                self.workdir / "model", state.params, state.batch_stats
            )  # every process: a collective
        finally:
            self.profiler.stop()
            if self.writer:
                self.writer.close()
        return history

    def _compile(self, state, totals):
        """Both steps compiled ahead of time, so the first epoch's images/s counts training only.

        The checkpoints' checksums compile here too: nothing compiles inside an epoch.
        """
        batch = self.config.batch_size
        shape = self.dataset.train.images.shape[1:]
        images = jax.ShapeDtypeStruct((batch, *shape), jnp.uint8, sharding=self.batch_sharding)
        labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=self.batch_sharding)
        mask = jax.ShapeDtypeStruct((batch,), jnp.bool_, sharding=self.batch_sharding)
        compiled = []
        for what, step, args in (
            ("train step", self.trainer.train_step, (state, totals, images, labels)),
            ("eval step", self.trainer.eval_step, (state.params, state.batch_stats, totals, images, labels, mask)),
        ):
            if self.is_writer:
                self.hooks.on_compile(what, None)
            start = time.perf_counter()
            compiled.append(step.lower(*args).compile())
            if self.is_writer:
                self.hooks.on_compile(what, time.perf_counter() - start)
        checkpoint.checksums((state, totals))
        if self.resident is not None:
            next(self._train_batches(0, 0))  # compiles the on-device gather
        return compiled

    def _epoch(self, epoch, start_batch, state, totals, history, train_step, eval_step):
        cfg, hooks, writer = self.config, self.hooks, self.writer
        batches = self._train_batches(epoch, start_batch)
        if writer:
            hooks.on_phase_start("train", epoch, self.steps_per_epoch, start_batch)
        # XLA's CPU all-reduce between devices of one host aborts (40 s rendezvous timeout) when
        # ~100 steps are queued; waiting every 8 steps costs nothing on a CPU.
        bound_in_flight = jax.devices()[0].platform == "cpu" and jax.local_device_count() > 1
        epoch_start = last_report = time.perf_counter()
        images_seen = 0
        for batch_index, (images, labels) in enumerate(batches, start_batch):
            step = epoch * self.steps_per_epoch + batch_index + 1
            self.profiler.before(step, totals)
            state, totals = train_step(state, totals, images, labels)
            self.profiler.after(step, totals)
            if bound_in_flight and batch_index % 8 == 7:
                jax.block_until_ready(totals)
            images_seen += cfg.batch_size
            done = batch_index + 1
            mid_epoch = done < self.steps_per_epoch
            log_now = done % cfg.log_every == 0
            # Hosts must agree on stopping, or one would save (a collective) alone: they do every few steps.
            stopping = self.hooks.stop_requested()
            if self.multi_host:
                stopping = self._agreed(stopping) if mid_epoch and done % min(cfg.log_every, 10) == 0 else 0
            save_now = mid_epoch and bool(stopping or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0))
            report_now = time.perf_counter() - last_report >= PROGRESS_SECONDS and not self.multi_host
            if save_now or log_now or report_now:
                # The host syncs inside an epoch: progress, and the divergence guard before any save.
                summary = train.summarize(totals)
                self._check_finite(summary)
                last_report = time.perf_counter()
                values = {
                    "loss": summary["loss"],
                    "accuracy": summary["accuracy"],
                    "lr": float(self.trainer.learning_rate(step - 1)),
                    "images_per_sec": images_seen / (last_report - epoch_start),
                }
                if writer:
                    hooks.on_progress("train", done, values)
                    if log_now:
                        writer.interval({"step": step, "epoch": epoch + 1, **values})
            if save_now:
                self._save(step, state, totals, epoch, done, history)
            if stopping and mid_epoch:
                raise self._stopped(stopping, f"at step {step}", history)
        train_summary = train.summarize(totals)  # waits for the device: the epoch's time is all in
        train_seconds = time.perf_counter() - epoch_start
        self._check_finite(train_summary)
        if writer:
            hooks.on_phase_end("train")
        test_summary = self._evaluate(epoch, state, eval_step)
        step = (epoch + 1) * self.steps_per_epoch
        record = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": train_summary["loss"],
            "train_accuracy": train_summary["accuracy"],
            "test_loss": test_summary["loss"],
            "test_accuracy": test_summary["accuracy"],
            "lr": float(self.trainer.learning_rate(step - 1)),
            "images_per_sec": images_seen / train_seconds,
            "train_seconds": train_seconds,
            "seconds": time.perf_counter() - epoch_start,
            "time": time.time(),
        }
        return state, totals, record

    def _train_batches(self, epoch: int, start_batch: int):
        """The epoch's global batches from `start_batch` on, as jax.Arrays sharded over the mesh."""
        cfg = self.config
        if self.resident is not None:
            return data.device_batches(
                self.resident, cfg.batch_size, self.batch_sharding, seed=cfg.seed, epoch=epoch, start_batch=start_batch
            )
        process = dict(process_index=jax.process_index(), process_count=jax.process_count())
        batches = data.train_batches(
            self.dataset.train, cfg.batch_size, seed=cfg.seed, epoch=epoch, start_batch=start_batch, **process
        )
        return data.prefetch(batches, self.batch_sharding)

    def _evaluate(self, epoch, state, eval_step) -> dict:
        cfg, split = self.config, self.dataset.test
        total = -(-len(split.labels) // cfg.batch_size)
        if self.writer:
            self.hooks.on_phase_start("eval", epoch, total, 0)
        eval_totals = self.replicate(train.zero_totals())
        batches = data.eval_batches(
            split, cfg.batch_size, process_index=jax.process_index(), process_count=jax.process_count()
        )
        last_report = time.perf_counter()
        for done, (images, labels, mask) in enumerate(data.prefetch(batches, self.batch_sharding), 1):
            eval_totals = eval_step(state.params, state.batch_stats, eval_totals, images, labels, mask)
            if self.writer and (time.perf_counter() - last_report >= PROGRESS_SECONDS or done == total):
                summary = train.summarize(eval_totals)
                self.hooks.on_progress("eval", done, {"loss": summary["loss"], "accuracy": summary["accuracy"]})
                last_report = time.perf_counter()
        if self.writer:
            self.hooks.on_phase_end("eval")
        return train.summarize(eval_totals)

    def _save(self, step, state, totals, epoch, batch, history):
        meta = {"epoch": epoch, "batch": batch, "history": history, "config": self.effective}
        checkpoint.save(self.mngr, step, state, totals, meta)

    def _agreed(self, signum: int) -> int:
        """The stop signal any process got (0 if none), the same on every process."""
        if not self.multi_host:
            return signum
        return int(np.max(multihost_utils.process_allgather(np.int32(signum))))

    def _check_finite(self, summary) -> None:
        if summary["first_bad_step"] < 0:
            return
        checkpoint.wait(self.mngr)
        latest = self.mngr.latest_step()
        kept = f"the last good checkpoint is step {latest}" if latest is not None else "no checkpoint was saved"
        raise Diverged(
            f"training diverged: non-finite loss or gradient at step {summary['first_bad_step']}; {kept}. "
            f"Try a smaller lr (now {self.config.lr})",
            summary["first_bad_step"],
        )

    def _stopped(self, signum, where, history) -> Stopped:
        checkpoint.wait(self.mngr)
        return Stopped(where, signum, history)


class _Profiler:
    """With profile=True, a jax.profiler trace of `profile_steps` steps from the 3rd step this process runs.

    The 3rd: the first steps allocate and warm caches, which is not what a profile should show.
    A run resumed in a workdir that already has a profile does not trace again.
    """

    def __init__(self, directory: Path, config: RunConfig, last_step_done: int):
        self.on = config.profile and jax.process_index() == 0 and not directory.exists()
        self.directory, self.start = directory, last_step_done + 3
        self.stop_after = self.start + config.profile_steps - 1
        self.tracing = False

    def before(self, step, totals):
        if self.on and step == self.start:
            jax.block_until_ready(totals)
            jax.profiler.start_trace(str(self.directory), create_perfetto_trace=True)
            self.tracing = True

    def after(self, step, totals):
        if self.tracing and step == self.stop_after:
            jax.block_until_ready(totals)
            self.stop()

    def stop(self):
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False


class _Writer:
    """Process 0's files: metrics.jsonl, steps.jsonl, TensorBoard events, curves.png."""

    def __init__(self, workdir: Path, config: RunConfig):
        self.workdir, self.config = workdir, config
        self.tensorboard = None

    def start(self, history: list[dict], resumed_at: int) -> None:
        # metrics.jsonl is the checkpoint's history: a lost or torn line is rebuilt, later ones dropped.
        self.epoch(history, plot=bool(history))
        steps = self.workdir / "steps.jsonl"
        kept = [r for r in _read_jsonl(steps) if r.get("step", math.inf) <= resumed_at]
        _files.write_atomic(steps, "".join(json.dumps(r) + "\n" for r in kept))
        from tensorboardX import SummaryWriter

        # purge_step: TensorBoard drops what an earlier, interrupted attempt logged past the checkpoint.
        self.tensorboard = SummaryWriter(str(self.workdir), purge_step=resumed_at + 1)

    def interval(self, record: dict) -> None:
        with open(self.workdir / "steps.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        for key in ("loss", "accuracy", "lr", "images_per_sec"):
            self.tensorboard.add_scalar(f"train/{key}", record[key], record["step"])

    def epoch(self, history: list[dict], plot: bool = True) -> None:
        _files.write_atomic(self.workdir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
        if history and self.tensorboard:
            record = history[-1]
            for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr", "images_per_sec"):
                self.tensorboard.add_scalar(f"epoch/{key}", record[key], record["step"])
            self.tensorboard.flush()
        if plot:
            _plot(history, self.workdir / "curves.png", title=plot_title(self.config))

    def close(self) -> None:
        if self.tensorboard:
            self.tensorboard.close()


def plot_title(config: RunConfig) -> str:
    """The model, its options and the settings that differ from its chapter run: what tells runs apart."""
    config = config.resolved()
    chapter = RunConfig(model=config.model).resolved()
    options = [f"{k}={v}" for k, v in config.model_options.items() if chapter.model_options.get(k) != v]
    settings = [
        f"{f.name}={getattr(config, f.name)}"
        for f in dataclasses.fields(RunConfig)
        if f.name
        in ("lr", "optimizer", "batch_size", "schedule", "warmup_epochs", "weight_decay", "dtype", "image_size", "seed")
        and getattr(config, f.name) != getattr(chapter, f.name)
    ]
    title = config.model + (f" ({', '.join(options)})" if options else "") + f" on {config.dataset}"
    return title + (f"\n{', '.join(settings)}" if settings else "")


def _plot(history: list[dict], path: Path, title: str) -> None:
    """Loss and accuracy by epoch, each on its own axes, train and test."""
    from matplotlib.figure import Figure  # a bare Figure draws with Agg, leaving pyplot's backend alone

    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(8, 3.6), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for ax, key, label in ((loss_ax, "loss", "loss"), (acc_ax, "accuracy", "accuracy")):
        ax.plot(epochs, [r[f"train_{key}"] for r in history], "-o", label=f"train {label}")
        ax.plot(epochs, [r[f"test_{key}"] for r in history], "--s", label=f"test {label}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
        ax.xaxis.get_major_locator().set_params(integer=True)
    acc_ax.set_ylim(0, 1)
    fig.suptitle(title, fontsize=10)
    buffer = _png_bytes(fig)
    _files.write_atomic(path, buffer)


def _png_bytes(fig) -> bytes:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


# --------------------------------------------------------------------------
# Files.


def _read_jsonl(path: Path) -> list[dict]:
    """The complete lines of a JSON-lines file; a torn last line (a kill mid-write) is dropped."""
    records = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return records
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


class _Lock:
    """The workdir's lock: an flock on workdir/lock, held by process 0 for the whole run.

    The kernel drops an flock when its process dies, however it dies, so a killed run never blocks a
    resume. Taken before anything else is read or written: a refused second run changes nothing but
    creating the workdir and its lock file if they were missing.
    """

    def __init__(self, workdir: Path, *, resume: bool):
        self.workdir, self.resume = workdir, resume
        self.file = None

    def __enter__(self):
        problem = self._acquire() if jax.process_index() == 0 else None
        if jax.process_count() > 1:  # process 0 decides for all: the others may look after it started writing
            refused = bool(multihost_utils.broadcast_one_to_all(np.int32(problem is not None)))
            if refused and problem is None:
                problem = UsageError(f"process 0 refused the workdir {self.workdir}")
        if problem is not None:
            self._release()
            raise problem
        return self

    def _acquire(self) -> RunError | None:
        workdir = self.workdir
        if workdir.exists() and not workdir.is_dir():
            return UsageError(f"workdir {workdir} is a file, not a directory")
        try:
            workdir.mkdir(parents=True, exist_ok=True)
            self.file = open(workdir / "lock", "a+")
        except OSError as error:
            return UsageError(f"cannot use {workdir} as the workdir: {error.strerror or error}")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):  # ENOLCK: a filesystem without locks
                return UsageError(
                    f"cannot lock {workdir / 'lock'}: {error.strerror} (its filesystem may not support locks)"
                )
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            return WorkdirInUse(f"workdir {workdir} is in use by {holder}; wait for it to finish or choose another")
        held = [p.name for p in workdir.iterdir() if p.name != "lock"]
        if held and not self.resume:
            return UsageError(
                f"workdir {workdir} already holds files ({', '.join(sorted(held)[:4])}"
                f"{', ...' if len(held) > 4 else ''}); resume to continue its run, or choose another workdir "
                "(nothing was overwritten)"
            )
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.file.flush()
        return None

    def __exit__(self, *exc):
        self._release()

    def _release(self):
        if self.file is not None:
            self.file.close()  # drops the flock; the file stays, harmless to the next run
            self.file = None


def _versions() -> dict:
    import flax

    import jaxcnn

    return {
        "jaxcnn": jaxcnn.__version__,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "python": platform.python_version(),
    }
