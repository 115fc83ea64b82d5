"""Orbax checkpoints of the whole train state, and the final model of a run.

A checkpoint holds the TrainState (params, batch statistics, optimizer state,
step, rng), the running totals of the epoch in progress and a JSON `meta`
(epoch, batch within the epoch): everything needed to continue a run exactly.
Orbax writes each save to a temporary directory and renames it when complete,
so a run killed during a save leaves the previous checkpoints intact; a
checkpoint that is damaged later, or holds arrays that no longer match its
checksums, or belongs to another run, is set aside and the previous one used.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils


def manager(directory: str | Path, *, keep: int) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        Path(directory).absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
    )


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's finaliser: a bijection of uint32 that spreads every input bit over the output."""
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


@jax.jit
def checksums(tree) -> jax.Array:
    """uint32 (leaves, 2): two sums of each array's hashed 32-bit words, computed where the arrays are.

    Each word is hashed with its position and a seed by a bijection, so changing any one word (any
    bit of it) changes both sums; other damage goes unnoticed with odds of about 2**-64. One pass over
    the state: cheap enough for every save.
    """
    sums = []
    for leaf in jax.tree.leaves(tree):
        leaf = jnp.asarray(leaf)
        if leaf.dtype == jnp.bool_:
            leaf = leaf.astype(jnp.uint8)
        if leaf.dtype.itemsize >= 4:  # 8-byte words become pairs of 32-bit ones
            words = jax.lax.bitcast_convert_type(leaf, jnp.uint32)
        else:
            words = jax.lax.bitcast_convert_type(leaf, {2: jnp.uint16, 1: jnp.uint8}[leaf.dtype.itemsize])
        words = words.astype(jnp.uint32).ravel()
        position = jnp.arange(words.size, dtype=jnp.uint32) * jnp.uint32(0x9E3779B1)
        seeds = (jnp.uint32(0x1B873593), jnp.uint32(0xCC9E2D51))
        sums.append(jnp.stack([jnp.sum(_fmix32(words ^ (position + seed))) for seed in seeds]))
    return jnp.stack(sums) if sums else jnp.zeros((0, 2), jnp.uint32)


def _checksum(state, totals) -> list[list[int]]:
    return np.asarray(checksums((state, totals))).tolist()


class SaveError(OSError):
    """Orbax could not write a checkpoint (a full disk, a read-only filesystem): one line, as an OSError."""


@contextlib.contextmanager
def _writing(what: str):
    """Orbax reports a failed write from its threads as ValueErrors with whole tracebacks: make it one OSError."""
    try:
        yield
    except (ValueError, RuntimeError, OSError) as error:
        first = str(error).splitlines()[0][:600] if str(error) else type(error).__name__
        raise SaveError(f"{what}: {first}") from None


def wait(mngr: ocp.CheckpointManager) -> None:
    """Waits for the save in flight; raises SaveError if it failed."""
    with _writing("checkpoint save failed"):
        mngr.wait_until_finished()


def close(mngr: ocp.CheckpointManager) -> None:
    """Waits for the save in flight and closes the manager; raises SaveError if the save failed."""
    with _writing("checkpoint save failed"):
        mngr.close()


def save(mngr: ocp.CheckpointManager, step: int, state, totals, meta: dict) -> None:
    """Starts an asynchronous save of step `step`; orbax finishes it in the background.

    meta (JSON) must hold the run's place: "epoch" and "batch" within it, "config" (with its
    "run_id"). The save adds "step" and the checksums of state and totals, which restore checks.
    """
    # A copy: Orbax writes the JSON from a thread, after the caller may have changed its lists.
    meta = json.loads(json.dumps({**meta, "step": int(step), "checksums": _checksum(state, totals)}))
    with _writing(f"checkpoint {step} could not be saved"):
        mngr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                totals=ocp.args.StandardSave(totals),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )


def latest_meta(mngr: ocp.CheckpointManager) -> dict:
    """The meta of the newest checkpoint that has a readable one ({} if none)."""
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            with quiet_orbax():
                meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception:  # damaged: restore_latest will say so and set it aside
            continue
        if isinstance(meta, dict):
            return dict(meta)
    return {}


def restore_latest(
    mngr: ocp.CheckpointManager, state_like, totals_like, *, run_id: str, steps_per_epoch: int, on_damaged=None
):
    """(step, state, totals, meta) of the newest checkpoint that restores and checks out, or None if there is none.

    `state_like`/`totals_like` are pytrees of arrays or ShapeDtypeStructs (with shardings) giving the
    structure to restore into. A checkpoint is used only if it restores, its arrays match its checksums,
    it belongs to run `run_id`, and its step agrees with its meta and with the state's own step. Any
    other is moved aside to `<step>.damaged` (never deleted), `on_damaged` is told why, and the one
    before is tried. Raises ValueError when checkpoints exist but none is usable.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, (state_like, totals_like))
    steps = sorted(mngr.all_steps(), reverse=True)
    damaged = []
    found = None
    for step in steps:
        path = Path(mngr.directory) / str(step)
        try:
            with quiet_orbax():
                restored = mngr.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract[0]),
                        totals=ocp.args.StandardRestore(abstract[1]),
                        meta=ocp.args.JsonRestore(),
                    ),
                )
            problem = _problem(step, restored, run_id, steps_per_epoch)
        except Exception as error:  # Orbax and TensorStore raise many kinds for damaged files.
            problem = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        if jax.process_count() > 1:  # the hosts must adopt the same checkpoint, or they would diverge
            usable = multihost_utils.process_allgather(np.int32(problem is None))
            if problem is None and not usable.all():
                problem = "another process could not use it"
        if problem is None:
            found = step, restored.state, restored.totals, dict(restored.meta)
            break
        if on_damaged is not None and jax.process_index() == 0:
            on_damaged(
                f"checkpoint {path} is damaged ({problem}); moved aside to {path.name}.damaged, trying the previous one"
            )
        damaged.append(path)
    if damaged:
        # Set the damaged ones aside (never delete) so this run can save those steps again.
        if jax.process_index() == 0:
            for path in damaged:
                target, n = path.with_name(f"{path.name}.damaged"), 1
                while target.exists():
                    target, n = path.with_name(f"{path.name}.damaged{n}"), n + 1
                path.rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("jaxcnn: damaged checkpoints moved")
        mngr.reload()
    if found is None and steps:
        raise ValueError(
            f"no checkpoint in {mngr.directory} could be restored (steps {steps} all damaged or from "
            "another run); start a new run in another workdir"
        )
    return found


def _problem(step: int, restored, run_id: str, steps_per_epoch: int) -> str | None:
    """Why a restored checkpoint cannot be used, or None."""
    meta = restored.meta
    want = {"epoch": int, "batch": int, "step": int, "history": list, "config": dict, "checksums": list}
    if not isinstance(meta, dict) or any(not isinstance(meta.get(k), t) for k, t in want.items()):
        return "its meta lacks " + ", ".join(k for k, t in want.items() if not isinstance(meta.get(k), t))
    if len(meta["history"]) != meta["epoch"]:
        return f"its history holds {len(meta['history'])} epochs, not its epoch {meta['epoch']}"
    if meta["config"].get("run_id") != run_id:
        return f"it belongs to run {meta['config'].get('run_id')!r}, not this workdir's {run_id!r}"
    place = meta["epoch"] * steps_per_epoch + meta["batch"]
    state_step = int(restored.state.step)
    if not (step == meta["step"] == place == state_step) or not 0 <= meta["batch"] < steps_per_epoch:
        return (
            f"its step {step} disagrees with its meta (step {meta['step']}, epoch {meta['epoch']}, "
            f"batch {meta['batch']}) or its state's step {state_step}"
        )
    if meta["checksums"] != _checksum(restored.state, restored.totals):
        return "its arrays do not match their checksums"
    return None


@contextlib.contextmanager
def quiet_orbax():
    """Orbax and absl log whole tracebacks for a damaged checkpoint or a failed save; the run says it in one line."""
    loggers = [logging.getLogger(name) for name in ("absl", "orbax", "asyncio", "tensorstore")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def save_model(directory: str | Path, params, batch_stats) -> None:
    """The final model: params and batch statistics, as plain nested dicts."""
    with _writing(f"the final model could not be saved to {directory}"), ocp.StandardCheckpointer() as ckptr:
        ckptr.save(
            Path(directory).absolute(),
            {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(batch_stats)},
            force=True,
        )


def load_model(workdir: str | Path):
    """(model, config) of a finished run: the model it trained (its dtype too), in eval mode, with its final weights."""
    from jaxcnn import run

    workdir = Path(workdir)
    config_path, model_path = workdir / "config.json", workdir / "model"
    if not config_path.exists() or not model_path.exists():
        raise ValueError(f"load_model: {workdir} holds no finished run (needs config.json and model/)")
    try:
        config = json.loads(config_path.read_text())
        run_config = run.RunConfig.from_json(config)
        model = run.create_model(run_config, num_classes=config["num_classes"], in_channels=config["in_channels"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"load_model: {config_path} is not a run's config ({error})") from None
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    target = {
        "params": nnx.to_pure_dict(nnx.as_pure(params)),
        "batch_stats": nnx.to_pure_dict(nnx.as_pure(batch_stats)),
    }
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(model_path.absolute(), target)
    nnx.replace_by_pure_dict(params, restored["params"])
    nnx.replace_by_pure_dict(batch_stats, restored["batch_stats"])
    model = nnx.merge(graphdef, params, batch_stats)
    model.eval()
    return model, config
