"""The shared experiment runner: flags, the epoch loop, and what a run writes.

`python -m experiments.lenet` (and vgg, resnet, resnext) call `main` with
their model's defaults, which reproduce the chapters' runs. A workdir holds:

    config.json     every setting, library versions, devices
    metrics.jsonl   one JSON object per epoch
    curves.png      train loss, test loss and test accuracy by epoch
    checkpoints/    Orbax checkpoints of the whole train state (--resume)
    model/          the final params and batch statistics (checkpoint.load_model)

Only process 0 writes files; every process takes part in checkpoints.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import signal
import sys
import time
from pathlib import Path

ACCELERATORS = ("auto", "cpu", "gpu", "tpu")
DTYPES = ("float32", "bfloat16")

# Exit codes: a diverged run, and an interrupted one (128 + signal, as shells report it).
EXIT_DIVERGED = 3


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def build_parser(defaults: dict, model_flags) -> argparse.ArgumentParser:
    from jaxcnn import train

    parser = argparse.ArgumentParser(
        prog=f"python -m experiments.{defaults['entry']}",
        description=f"Train {defaults['title']} as the chapter does; writes config, metrics, plots and checkpoints to --workdir.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    # fmt: off
    add("--accelerator", choices=ACCELERATORS, default="auto",
        help="where to train; one that is not there is an error, never a silent fallback")
    add("--dataset", default="fashion_mnist",
        help="'mnist_10k' (bundled, offline), a TFDS name (fashion_mnist, mnist, ...), or a directory of the four IDX files")
    add("--data-dir", default=None, help="TFDS data directory (where prepared TFDS datasets live)")
    add("--epochs", type=_positive_int, default=defaults["epochs"], help="passes over the training set")
    add("--batch-size", type=_positive_int, default=defaults["batch_size"],
        help="global batch size, split evenly over all devices (must divide by the device count)")
    add("--lr", type=_positive_float, default=defaults["lr"], help="peak learning rate")
    add("--optimizer", choices=train.OPTIMIZERS, default=defaults["optimizer"],
        help="sgd (the chapters'), sgd with momentum 0.9, adam, adamw")
    add("--schedule", choices=train.SCHEDULES, default="constant", help="learning-rate schedule after warm-up")
    add("--warmup-epochs", type=_non_negative_float, default=0.0, help="linear warm-up from 0, in epochs")
    add("--weight-decay", type=_non_negative_float, default=0.0,
        help="L2 for sgd/momentum/adam (as PyTorch's), decoupled for adamw")
    add("--seed", type=_non_negative_int, default=0, help="initialisation, data order and dropout")
    add("--workdir", default=None,
        help="where the run writes everything (default: a new runs/%s-DATE-TIME)" % defaults["entry"])
    add("--resume", action="store_true", help="continue from the newest complete checkpoint in --workdir")
    add("--image-size", type=_positive_int, default=None,
        help="resize images to this square size (default: the chapter's size for the model)")
    add("--dtype", choices=DTYPES, default="float32",
        help="compute dtype; parameters and the loss stay float32 (bfloat16 for GPUs and TPUs)")
    add("--checkpoint-every", type=_non_negative_int, default=0,
        help="also checkpoint every N steps (0: only at the end of each epoch)")
    add("--keep-checkpoints", type=_positive_int, default=3, help="how many recent checkpoints to keep")
    add("--log-every", type=_positive_int, default=50,
        help="steps between progress updates (the only host syncs inside an epoch)")
    add("--train-examples", type=_positive_int, default=None, help="use only the first N training examples")
    add("--test-examples", type=_positive_int, default=None, help="use only the first N test examples")
    # fmt: on
    group = parser.add_argument_group("multi-host (jax.distributed)")
    group.add_argument("--coordinator", default=None, help="HOST:PORT of process 0")
    group.add_argument("--num-processes", type=_positive_int, default=None, help="number of processes (hosts)")
    group.add_argument("--process-id", type=_non_negative_int, default=None, help="this process's index")
    model_group = parser.add_argument_group(f"{defaults['title']} options")
    model_flags(model_group)
    return parser


def main(model: str, defaults: dict, model_flags=lambda group: None, model_options=lambda args: {}, argv=None) -> int:
    parser = build_parser(defaults, model_flags)
    args = parser.parse_args(argv)
    options = model_options(args)
    name = options.pop("model", model)
    if args.num_processes is not None and args.process_id is not None and args.process_id >= args.num_processes:
        parser.error(f"--process-id {args.process_id} must be less than --num-processes {args.num_processes}")
    if len({args.coordinator is None, args.num_processes is None, args.process_id is None}) > 1:
        if args.coordinator or args.num_processes or args.process_id is not None:
            parser.error("--coordinator, --num-processes and --process-id go together")
    if args.workdir is None:
        if args.resume:
            parser.error("--resume needs the --workdir of the run to continue")
        if args.num_processes and args.num_processes > 1:
            parser.error("several processes need one shared --workdir")
        args.workdir = f"runs/{defaults['entry']}-{time.strftime('%Y%m%d-%H%M%S')}"
    _select_accelerator(parser, args)
    with _StopFlag() as stop:
        return run(parser, args, name, options, stop)


def _select_accelerator(parser, args) -> None:
    """Fixes JAX's platform before any backend starts (and before jax.distributed), or fails loudly."""
    import jax

    accelerator = args.accelerator
    platform_name = {"auto": None, "gpu": "cuda"}.get(accelerator, accelerator)
    previous = jax.config.jax_platforms
    if platform_name:
        jax.config.update("jax_platforms", platform_name)
    if args.coordinator:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    if not platform_name:
        return
    try:
        # Asks for that platform by name: an error if it is missing, even where backends already started.
        jax.devices(platform_name)
    except RuntimeError as error:
        jax.config.update("jax_platforms", previous)
        parser.error(
            f"--accelerator {accelerator}: no {accelerator.upper()} is available to JAX here "
            f"({str(error).splitlines()[0]}); use --accelerator cpu or auto"
            + (", or install JAX's CUDA plugin: pip install -e '.[cuda]'" if accelerator == "gpu" else "")
        )


def run(parser, args, model_name: str, model_options: dict, stop: _StopFlag) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils

    from jaxcnn import checkpoint, data, models, train

    if model_name not in models.names():
        parser.error(f"unknown model {model_name!r}; choose from {', '.join(models.names())}")
    try:
        dataset = data.load(args.dataset, data_dir=args.data_dir)
    except ValueError as error:
        parser.error(f"--dataset {args.dataset}: {error}")
    train_split, test_split = dataset.train, dataset.test
    if args.train_examples:
        train_split = data.Split(train_split.images[: args.train_examples], train_split.labels[: args.train_examples])
    if args.test_examples:
        test_split = data.Split(test_split.images[: args.test_examples], test_split.labels[: args.test_examples])

    devices = jax.devices()
    if args.batch_size % len(devices):
        parser.error(
            f"--batch-size {args.batch_size} must divide by the {len(devices)} devices (each gets an equal share)"
        )
    steps_per_epoch = data.num_train_batches(train_split, args.batch_size)
    if steps_per_epoch == 0:
        parser.error(f"--batch-size {args.batch_size} is larger than the {len(train_split.labels)} training examples")
    image_size = args.image_size or models.default_image_size(model_name)
    in_channels = train_split.images.shape[-1]
    workdir = Path(args.workdir)
    is_writer = jax.process_index() == 0
    multi_host = jax.process_count() > 1

    holds_run = (workdir / "config.json").exists() or (workdir / "checkpoints").exists()
    if multi_host:  # process 0 decides: the others may look after it has started writing
        holds_run = bool(multihost_utils.broadcast_one_to_all(np.int32(holds_run)))
    if holds_run and not args.resume:
        parser.error(
            f"--workdir {workdir} already holds a run; pass --resume to continue it, "
            "or choose another --workdir (nothing was overwritten)"
        )

    try:
        model = models.create(
            model_name,
            num_classes=dataset.num_classes,
            in_channels=in_channels,
            image_size=image_size,
            seed=args.seed,
            **model_options,
            **({"dtype": jnp.bfloat16} if args.dtype == "bfloat16" else {}),
        )
    except ValueError as error:
        parser.error(str(error))
    train_def, eval_def, params, batch_stats = train.split_model(model)
    total_steps = steps_per_epoch * args.epochs
    tx = train.make_optimizer(
        args.optimizer,
        args.lr,
        total_steps=total_steps,
        schedule=args.schedule,
        warmup_steps=round(args.warmup_epochs * steps_per_epoch),
        weight_decay=args.weight_decay,
    )
    mesh = train.data_mesh()
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    # A jitted identity places host values on every device of every process (device_put can't across hosts).
    replicate = train.replicator(mesh)
    state = replicate(train.create_train_state(params, batch_stats, tx, args.seed))
    totals = replicate(train.zero_totals())
    train_step = train.make_train_step(train_def, tx, mesh, image_size=image_size)
    eval_step = train.make_eval_step(eval_def, mesh, image_size=image_size)

    config = {
        "model": model_name,
        "model_options": model_options,
        "num_classes": dataset.num_classes,
        "in_channels": in_channels,
        "image_size": image_size,
        "num_params": sum(p.size for p in jax.tree.leaves(params)),
        "dataset": args.dataset,
        "train_examples": len(train_split.labels),
        "test_examples": len(test_split.labels),
        "steps_per_epoch": steps_per_epoch,
        **{k: v for k, v in vars(args).items() if k not in ("resume",)},
        "argv": sys.argv,
        "versions": _versions(),
        "devices": [str(d) for d in devices],
        "process_count": jax.process_count(),
    }

    if args.resume and (workdir / "config.json").exists():
        _check_same_run(parser, json.loads((workdir / "config.json").read_text()), config)
    mngr = checkpoint.manager(workdir / "checkpoints", keep=args.keep_checkpoints)
    start_epoch, start_batch = 0, 0
    if args.resume:
        try:
            restored = checkpoint.restore_latest(mngr, state, totals)
        except ValueError as error:
            parser.exit(1, f"error: {error}\n")
        if restored is None:
            _say(f"no checkpoint in {workdir / 'checkpoints'}; starting from scratch")
        else:
            step, state, totals, meta = restored
            start_epoch, start_batch = meta["epoch"], meta["batch"]
            _say(
                f"resuming from step {step} (epoch {start_epoch + 1}, batch {start_batch}) in {workdir / 'checkpoints'}"
            )
    if is_writer:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        history = _truncate_metrics(workdir / "metrics.jsonl", keep_epochs=start_epoch)
    else:
        history = []

    bound_in_flight = devices[0].platform == "cpu" and jax.local_device_count() > 1
    log = _Progress(steps_per_epoch)
    for epoch in range(start_epoch, args.epochs):
        epoch_start = time.perf_counter()
        batches = data.train_batches(
            train_split,
            args.batch_size,
            seed=args.seed,
            epoch=epoch,
            start_batch=start_batch,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        images_seen = 0
        for batch_index, (images, labels) in enumerate(data.prefetch(batches, batch_sharding), start=start_batch):
            state, totals = train_step(state, totals, images, labels)
            if bound_in_flight and batch_index % 8 == 7:
                # XLA's CPU all-reduce between devices of one host aborts (40 s rendezvous
                # timeout) when ~100 steps are queued; waiting costs nothing on a CPU.
                jax.block_until_ready(totals)
            images_seen += args.batch_size
            step = epoch * steps_per_epoch + batch_index + 1
            done_in_epoch = batch_index + 1
            mid_epoch = done_in_epoch < steps_per_epoch
            log_now = done_in_epoch % args.log_every == 0
            stopping = stop.signal  # read once: a signal may land at any line
            if multi_host:
                # Hosts must agree, or one would save (a collective) alone: they do at log steps.
                stopping = _agreed(stopping) if mid_epoch and log_now else 0
            save_now = mid_epoch and bool(stopping or (args.checkpoint_every and step % args.checkpoint_every == 0))
            if save_now or log_now:
                # One host sync per log interval: progress, and the divergence guard before any save.
                summary = train.summarize(totals)
                _check_finite(summary, mngr, workdir, args.lr)
                log.update(epoch, done_in_epoch, summary, images_seen / (time.perf_counter() - epoch_start))
            if save_now:
                checkpoint.save(mngr, step, state, totals, {"epoch": epoch, "batch": done_in_epoch})
            if stopping and mid_epoch:
                mngr.wait_until_finished()
                return _stopped(stopping, f"at step {step}", parser)
        start_batch = 0
        train_summary = train.summarize(totals)  # waits for the device: the epoch's time is all in
        train_seconds = time.perf_counter() - epoch_start
        _check_finite(train_summary, mngr, workdir, args.lr)

        eval_totals = replicate(train.zero_totals())
        for images, labels, mask in data.prefetch(
            data.eval_batches(
                test_split, args.batch_size, process_index=jax.process_index(), process_count=jax.process_count()
            ),
            batch_sharding,
        ):
            eval_totals = eval_step(state.params, state.batch_stats, eval_totals, images, labels, mask)
        test_summary = train.summarize(eval_totals)
        step = (epoch + 1) * steps_per_epoch
        record = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": train_summary["loss"],
            "train_accuracy": train_summary["accuracy"],
            "test_loss": test_summary["loss"],
            "test_accuracy": test_summary["accuracy"],
            "images_per_sec": images_seen / train_seconds,
            "seconds": time.perf_counter() - epoch_start,
        }
        totals = replicate(train.zero_totals())
        checkpoint.save(mngr, step, state, totals, {"epoch": epoch + 1, "batch": 0})
        log.epoch_done(record)
        if is_writer:
            history.append(record)
            with open(workdir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            _plot(history, workdir / "curves.png", title=f"{model_name} on {args.dataset}")
        stopping = _agreed(stop.signal) if multi_host else stop.signal
        if stopping:
            mngr.wait_until_finished()
            return _stopped(stopping, f"after epoch {epoch + 1}", parser)

    mngr.close()  # waits for the last checkpoint to finish
    checkpoint.save_model(workdir / "model", state.params, state.batch_stats)
    if history:
        final = history[-1]
        _say(
            f"done: test accuracy {final['test_accuracy']:.4f}, test loss {final['test_loss']:.4f}; outputs in {workdir}"
        )
    return 0


def _stopped(signum: int, where: str, parser) -> int:
    """After SIGTERM or Ctrl-C: the checkpoint is saved; say how to go on."""
    argv = [a for a in sys.argv[1:] if a != "--resume"] + ["--resume"]
    _say(
        f"\nstopped by {signal.Signals(signum).name} {where}; checkpoint saved. "
        f"Resume with: {parser.prog} {shlex.join(argv)}"
    )
    return 128 + signum


# What a resumed run must share with the run it continues (--epochs may grow).
RESUME_KEYS = (
    "model",
    "model_options",
    "dataset",
    "train_examples",
    "image_size",
    "batch_size",
    "steps_per_epoch",
    "optimizer",
    "lr",
    "schedule",
    "warmup_epochs",
    "weight_decay",
    "seed",
    "dtype",
)


def _check_same_run(parser, saved: dict, config: dict) -> None:
    changed = [
        f"{key} was {saved.get(key)!r}, now {config.get(key)!r}"
        for key in RESUME_KEYS
        if saved.get(key) != config.get(key)
    ]
    if changed:
        parser.error(
            "--resume continues the run in --workdir with its own settings, but "
            + "; ".join(changed)
            + ". Pass the same flags (only --epochs may change)"
        )


def _agreed(signum: int) -> int:
    """The stop signal any process got (0 if none), the same on every process."""
    import numpy as np
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.int32(signum))))


def _check_finite(summary, mngr, workdir, lr) -> None:
    if summary["first_bad_step"] >= 0:
        mngr.wait_until_finished()
        latest = mngr.latest_step()
        kept = (
            f"the last good checkpoint is step {latest} in {workdir / 'checkpoints'}"
            if latest is not None
            else "no checkpoint was saved"
        )
        _say(
            f"\ntraining diverged: non-finite loss or gradient at step {summary['first_bad_step']}; "
            f"{kept}. Try a smaller --lr (now {lr})."
        )
        raise SystemExit(EXIT_DIVERGED)


class _StopFlag:
    """SIGTERM and Ctrl-C ask the loop to checkpoint and stop after the current step."""

    def __enter__(self):
        self.signal = 0
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.signal:  # asked twice: stop now
            raise KeyboardInterrupt
        self.signal = signum


class _Progress:
    """A progress line per epoch on a terminal; plain lines when not a terminal (CI, pipes)."""

    def __init__(self, steps_per_epoch: int):
        self.tty = sys.stdout.isatty() and _is_writer()
        self.steps = steps_per_epoch

    def update(self, epoch, done, summary, images_per_sec):
        text = f"epoch {epoch + 1} step {done}/{self.steps} loss {summary['loss']:.4f} {images_per_sec:,.0f} img/s"
        if not self.tty:
            _say(text)
            return
        width = 30
        bar = "#" * (width * done // self.steps) + "." * (width - width * done // self.steps)
        print(f"\r{text} [{bar}]", end="", flush=True)

    def epoch_done(self, r):
        if self.tty:
            print("\r" + " " * 100 + "\r", end="")
        if _is_writer():
            print(
                f"epoch {r['epoch']}: train loss {r['train_loss']:.4f} acc {r['train_accuracy']:.4f} | "
                f"test loss {r['test_loss']:.4f} acc {r['test_accuracy']:.4f} | "
                f"{r['images_per_sec']:,.0f} img/s, {r['seconds']:.1f} s",
                flush=True,
            )


def _is_writer() -> bool:
    import jax

    return jax.process_index() == 0


def _say(message: str) -> None:
    if _is_writer():
        print(message, flush=True)


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_metrics(path: Path, keep_epochs: int) -> list[dict]:
    """On resume, drop lines of epochs after the checkpoint: they will be written again. Returns the lines kept."""
    kept = [r for r in _read_metrics(path) if r["epoch"] <= keep_epochs]
    if path.exists() or kept:
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept


def _plot(history: list[dict], path: Path, title: str) -> None:
    """The chapters' progress board: train loss, test loss and test accuracy by epoch."""
    # A bare Figure renders PNGs with Agg without touching pyplot's process-wide backend.
    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    ax.plot(epochs, [r["train_loss"] for r in history], "-o", label="train loss")
    ax.plot(epochs, [r["test_loss"] for r in history], "--o", label="test loss")
    ax.plot(epochs, [r["test_accuracy"] for r in history], "-.o", label="test acc")
    ax.set_xlabel("epoch")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def _versions() -> dict:
    import flax
    import jax
    import optax

    import jaxcnn

    return {
        "jaxcnn": jaxcnn.__version__,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "python": platform.python_version(),
    }
