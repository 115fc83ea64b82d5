"""Orbax checkpoints of the whole train state, and the final model of a run.

A checkpoint holds the TrainState (params, batch statistics, optimizer state,
step, rng), the running totals of the epoch in progress and a JSON `meta`
(epoch, batch within the epoch): everything needed to continue a run exactly.
Orbax writes each save to a temporary directory and renames it when complete,
so a run killed during a save leaves the previous checkpoints intact; a
checkpoint that is damaged later is skipped with a warning, falling back to
the previous one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils


def manager(directory: str | Path, *, keep: int) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        Path(directory).absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
    )


def save(mngr: ocp.CheckpointManager, step: int, state, totals, meta: dict) -> None:
    """Starts an asynchronous save; orbax finishes it in the background."""
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            totals=ocp.args.StandardSave(totals),
            meta=ocp.args.JsonSave(meta),
        ),
        force=True,
    )


def restore_latest(mngr: ocp.CheckpointManager, state_like, totals_like):
    """(step, state, totals, meta) of the newest checkpoint that restores, or None if there is none.

    `state_like`/`totals_like` are pytrees of arrays or ShapeDtypeStructs
    (with shardings) giving the structure to restore into.
    """
    abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    steps = sorted(mngr.all_steps(), reverse=True)
    damaged = []
    for step in steps:
        try:
            restored = mngr.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract(state_like)),
                    totals=ocp.args.StandardRestore(abstract(totals_like)),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        except Exception as error:  # Orbax and TensorStore raise many kinds for damaged files.
            path = Path(mngr.directory) / str(step)
            reason = str(error).splitlines()[0][:200] if str(error) else ""
            print(f"warning: checkpoint {path} is damaged ({type(error).__name__}: {reason}); "
                  f"moved aside to {path.name}.damaged, trying the previous one", file=sys.stderr)
            damaged.append(path)
            continue
        break
    else:
        step = None
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
    if step is not None:
        return step, restored.state, restored.totals, dict(restored.meta)
    if steps:
        raise ValueError(
            f"no checkpoint in {mngr.directory} could be restored (steps {steps} all damaged); "
            "start a new run in another --workdir"
        )
    return None


def save_model(directory: str | Path, params, batch_stats) -> None:
    """The final model: params and batch statistics, as plain nested dicts."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(
            Path(directory).absolute(),
            {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(batch_stats)},
            force=True,
        )


def load_model(workdir: str | Path):
    """Rebuilds the model a runner workdir trained (config.json) and loads its final weights."""
    from jaxcnn import models

    workdir = Path(workdir)
    config_path, model_path = workdir / "config.json", workdir / "model"
    if not config_path.exists() or not model_path.exists():
        raise ValueError(f"load_model: {workdir} holds no finished run (needs config.json and model/)")
    config = json.loads(config_path.read_text())
    model = models.create(
        config["model"],
        num_classes=config["num_classes"],
        in_channels=config["in_channels"],
        image_size=config["image_size"],
        seed=config["seed"],
        **config["model_options"],
    )
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    target = {"params": nnx.to_pure_dict(nnx.as_pure(params)), "batch_stats": nnx.to_pure_dict(nnx.as_pure(batch_stats))}
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(model_path.absolute(), target)
    nnx.replace_by_pure_dict(params, restored["params"])
    nnx.replace_by_pure_dict(batch_stats, restored["batch_stats"])
    model = nnx.merge(graphdef, params, batch_stats)
    model.eval()
    return model, config
