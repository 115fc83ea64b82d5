"""The experiments' shared command line: flags -> `jaxcnn.run.RunConfig` -> `jaxcnn.run.train_and_evaluate`.

`python -m experiments.lenet` (and vgg, resnet, resnext) call `main` with their
model; every default is the model's chapter run (`jaxcnn.models.run_defaults`)
or the registry's option default, so nothing is written twice. This module
adds what only a command line has: flags, a progress bar, SIGTERM/Ctrl-C as
stop requests, and exit codes:

    0    done
    1    a run error (no usable checkpoint, disk full, ...)
    2    a usage error: bad flags, data or workdir (argparse's message, no traceback)
    3    diverged: a non-finite loss or gradient (the last good checkpoint is kept)
    128+n  stopped by signal n after saving a checkpoint (130: Ctrl-C, 143: SIGTERM)
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import signal
import sys
import time

from jaxcnn import _hugepages, run

ACCELERATORS = ("auto", "cpu", "gpu", "tpu")


# Flag types for the notes' experiments and the multi-host flags. The run's own flags are parsed
# with int/float only: RunConfig checks their values, once, and names the flag's field.


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


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


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one to show (not None, not a flag's False), and once."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == "" or "default:" in action.help:
            return action.help
        return super()._get_help_string(action)


def build_parser(entry: str, model: str, model_flags=None) -> argparse.ArgumentParser:
    from jaxcnn import models, train

    defaults = run.RunConfig(model=model)  # the flags' defaults: RunConfig's, None meaning the chapter's
    chapter = defaults.resolved()
    title = models.run_defaults(model).title
    parser = argparse.ArgumentParser(
        prog=f"python -m experiments.{entry}",
        description=f"Train {title} as the chapter does; writes config, metrics, plots and checkpoints to --workdir.",
        formatter_class=_HelpFormatter,
    )
    add = parser.add_argument

    def chapters(field: str) -> str:
        return f"(default: the chapter's, {getattr(chapter, field)})"

    # fmt: off
    add("--accelerator", choices=ACCELERATORS, default="auto",
        help="where to train; one that is not there is an error, never a silent fallback")
    add("--dataset", default=defaults.dataset,
        help="'mnist_10k' (bundled, offline), a TFDS name (fashion_mnist, mnist, ...), or a directory of IDX files")
    add("--data-dir", default=defaults.data_dir, help="TFDS data directory (where prepared TFDS datasets live)")
    add("--epochs", type=int, default=defaults.epochs, help=f"passes over the training set {chapters('epochs')}")
    add("--batch-size", type=int, default=defaults.batch_size,
        help=f"global batch size, split evenly over all devices {chapters('batch_size')}")
    add("--lr", type=float, default=defaults.lr, help=f"peak learning rate {chapters('lr')}")
    add("--optimizer", choices=train.OPTIMIZERS, default=defaults.optimizer,
        help=f"sgd (the chapters'), sgd with momentum 0.9, adam, adamw {chapters('optimizer')}")
    add("--schedule", choices=train.SCHEDULES, default=defaults.schedule, help="learning-rate schedule after warm-up")
    add("--warmup-epochs", type=float, default=defaults.warmup_epochs, help="linear warm-up from 0, in epochs")
    add("--weight-decay", type=float, default=defaults.weight_decay,
        help="L2 for sgd/momentum/adam (as PyTorch's), decoupled for adamw")
    add("--seed", type=int, default=defaults.seed, help="initialisation, data order and dropout")
    add("--workdir", default=None, help=f"where the run writes everything (default: a new runs/{entry}-DATE-TIME)")
    add("--resume", action="store_true", help="continue the run in --workdir from its newest usable checkpoint")
    add("--image-size", type=int, default=defaults.image_size,
        help=f"resize images to this square size {chapters('image_size')}")
    add("--dtype", choices=run.DTYPES, default=defaults.dtype,
        help="compute dtype; parameters, loss, BatchNorm statistics and optimizer state stay float32")
    add("--checkpoint-every", type=int, default=defaults.checkpoint_every,
        help="also checkpoint every N steps (0: only at the end of each epoch)")
    add("--keep-checkpoints", type=int, default=defaults.keep_checkpoints, help="how many recent checkpoints to keep")
    add("--log-every", type=int, default=defaults.log_every,
        help="steps between the records of steps.jsonl (the bar also moves every few seconds)")
    add("--train-examples", type=int, default=None, help="use only the first N training examples")
    add("--test-examples", type=int, default=None, help="use only the first N test examples")
    add("--profile", action="store_true",
        help="write a jax.profiler trace of a few steady-state steps to WORKDIR/profile")
    add("--profile-steps", type=int, default=defaults.profile_steps, help="how many steps --profile traces")
    # fmt: on
    group = parser.add_argument_group("multi-host (jax.distributed)")
    group.add_argument("--coordinator", default=None, help="HOST:PORT of process 0")
    group.add_argument("--num-processes", type=_positive_int, default=None, help="number of processes (hosts)")
    group.add_argument("--process-id", type=_non_negative_int, default=None, help="this process's index")
    if model_flags is not None:
        model_flags(parser.add_argument_group(f"{title} options"), models.options(model))
    return parser


def main(entry: str, model: str, model_flags=None, model_options=None, argv=None) -> int:
    """Parses `argv`, trains, and returns the exit code (see the module's docstring).

    model_flags(group, defaults) adds the model's own flags (defaults: the registry's options);
    model_options(args) turns them into RunConfig.model_options, with "model" naming a variant.
    """
    parser = build_parser(entry, model, model_flags)
    args = parser.parse_args(argv)
    # The run reports in one line what Orbax's threads (and asyncio, when their tasks are collected) log
    # as whole tracebacks: a command's output keeps the line.
    for name in ("absl", "orbax", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    options = model_options(args) if model_options else {}
    model = options.pop("model", model)
    if args.num_processes is not None and args.process_id is not None and args.process_id >= args.num_processes:
        parser.error(f"--process-id {args.process_id} must be less than --num-processes {args.num_processes}")
    if len({args.coordinator is None, args.num_processes is None, args.process_id is None}) > 1:
        parser.error("--coordinator, --num-processes and --process-id go together")
    if args.workdir is None:
        if args.resume:
            parser.error("--resume needs the --workdir of the run to continue")
        if args.num_processes and args.num_processes > 1:
            parser.error("several processes need one shared --workdir")
        args.workdir = f"runs/{entry}-{time.strftime('%Y%m%d-%H%M%S')}"
    elif not args.workdir:
        parser.error("--workdir must not be empty")

    fields = set(run.RunConfig.__dataclass_fields__)
    try:
        config = run.RunConfig(
            model=model, model_options=options, **{k: v for k, v in vars(args).items() if k in fields}
        )
    except run.ConfigError as error:
        if error.field == "model_options":
            parser.error(str(error))
        parser.error(f"argument --{error.field.replace('_', '-')}: must be {error.want}, got {error.value!r}")
    _select_accelerator(parser, args)
    stop = _StopFlag()
    hooks = ConsoleHooks(stop)
    try:
        with stop:
            records = run.train_and_evaluate(config, args.workdir, resume=args.resume, hooks=hooks)
    except run.UsageError as error:
        hooks.close()
        parser.error(str(error))
    except run.Stopped as error:
        hooks.close()
        resume = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--resume"]
        if "--workdir" not in resume:
            resume += ["--workdir", args.workdir]
        _say(
            f"\nstopped by {signal.Signals(error.signum).name} {error.where}; checkpoint saved. "
            f"Resume with: {parser.prog} {shlex.join([*resume, '--resume'])}"
        )
        return error.exit_code
    except run.Diverged as error:
        hooks.close()
        _say(f"\n{error}")
        return error.exit_code
    except run.RunError as error:
        hooks.close()
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return error.exit_code
    if records:
        final = records[-1]
        _say(
            f"done: test accuracy {final['test_accuracy']:.4f}, test loss {final['test_loss']:.4f}; "
            f"outputs in {args.workdir}"
        )
    return 0


def run_command(main) -> None:
    """Runs an experiment's `main` as the process's command: exits with its code.

    The process first re-executes itself with glibc's malloc asking for huge pages, where the kernel
    gives them only on request (`jaxcnn._hugepages`): XLA's per-step temporaries then stop costing
    a page fault per 4 KiB (about 15% of a ResNet-18 step's CPU time at 96 px, in system time).
    Once the run has ended, further Ctrl-Cs or SIGTERMs are ignored: they would only interrupt
    the interpreter's shutdown (Orbax's and JAX's clean-up) with tracebacks.
    """
    _hugepages.reexec_with_huge_pages()
    code = main()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise SystemExit(code)


def _select_accelerator(parser, args) -> None:
    """Fixes JAX's platform before any backend starts (and before jax.distributed), or fails in one line."""
    import jax

    platform_name = {"auto": None, "gpu": "cuda"}.get(args.accelerator, args.accelerator)
    if platform_name:
        jax.config.update("jax_platforms", platform_name)
    if args.coordinator:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    if not platform_name:
        return
    try:
        # Asks for that platform by name: an error if it is missing, even where backends already started.
        jax.devices(platform_name)
    except Exception as error:  # RuntimeError, or an AssertionError from jax's backend code
        jax.config.update("jax_platforms", None)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        hint = ", or install JAX's CUDA plugin: pip install -e '.[cuda]'" if args.accelerator == "gpu" else ""
        parser.error(
            f"--accelerator {args.accelerator}: no {args.accelerator.upper()} is available to JAX here "
            f"({reason}); use --accelerator cpu or auto{hint}"
        )


class _StopFlag:
    """SIGTERM and Ctrl-C ask the run to checkpoint and stop after the current step; a second one ends the
    process at once, as a kill would (the checkpoints already saved are complete; a save in flight is
    never adopted). Raising KeyboardInterrupt instead could land in a garbage-collector callback, where
    Python prints it and carries on.
    """

    signal = 0

    def __enter__(self):
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():  # a signalled run is ending: more signals are ignored
            signal.signal(sig, signal.SIG_IGN if self.signal else handler)

    def _handle(self, signum, frame):
        if self.signal:
            print("\ninterrupted again: stopped at once; the checkpoints saved so far are intact", flush=True)
            os._exit(128 + signum)
        self.signal = signum


class ConsoleHooks(run.Hooks):
    """Prints what the run reports: a tqdm bar on a terminal, plain lines (no carriage returns) elsewhere."""

    def __init__(self, stop: _StopFlag, stream=None):
        import jax

        self.stop = stop
        self.stream = stream or sys.stdout
        self.on = jax.process_index() == 0
        self.tty = self.stream.isatty()
        self.bar = None
        self.epoch = 0

    def stop_requested(self) -> int:
        return self.stop.signal

    def on_start(self, config: dict) -> None:
        options = ", ".join(f"{k}={v}" for k, v in config["model_options"].items())
        model = config["model"] + (f" ({options})" if options else "")
        self._line(
            f"{model} on {config['dataset']}: {config['train_examples']:,} train / "
            f"{config['test_examples']:,} test images at {config['image_size']}px, {config['epochs']} epochs of "
            f"{config['steps_per_epoch']} steps (batch {config['batch_size']}), {len(config['devices'])} device(s): "
            f"{config['devices'][0]}"
        )

    def on_message(self, text: str) -> None:
        self._line(text)

    def on_compile(self, what: str, seconds: float | None) -> None:
        self._line(f"compiling the {what} ..." if seconds is None else f"compiled the {what} in {seconds:.1f} s")

    def on_phase_start(self, phase: str, epoch: int, total: int, done: int) -> None:
        self.epoch, self.phase, self.total = epoch + 1, phase, total
        if self.tty and self.on:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                initial=done,
                desc=f"epoch {epoch + 1} {phase}",
                unit="step",
                file=self.stream,
                leave=False,
                dynamic_ncols=True,
            )

    def on_progress(self, phase: str, done: int, values: dict) -> None:
        text = f"loss {values['loss']:.4f} acc {values['accuracy']:.4f}"
        if "lr" in values:
            text += f" lr {values['lr']:.3g} {values['images_per_sec']:,.0f} img/s"
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix_str(text)
        else:
            where = "step" if phase == "train" else "eval"
            self._line(f"epoch {self.epoch} {where} {done}/{self.total} {text}")

    def on_phase_end(self, phase: str) -> None:
        self.close()

    def on_epoch_end(self, r: dict) -> None:
        self._line(
            f"epoch {r['epoch']}: train loss {r['train_loss']:.4f} acc {r['train_accuracy']:.4f} | "
            f"test loss {r['test_loss']:.4f} acc {r['test_accuracy']:.4f} | lr {r['lr']:.3g} | "
            f"{r['images_per_sec']:,.0f} img/s, {r['seconds']:.1f} s"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _line(self, text: str) -> None:
        if self.on:
            print(text, file=self.stream, flush=True)


def _say(message: str) -> None:
    import jax

    if jax.process_index() == 0:
        print(message, flush=True)
