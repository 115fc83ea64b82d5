"""Training as pure functions: a TrainState pytree and jitted, donated steps.

The model lives as a static `graphdef` plus pure pytrees (params, batch
statistics) split off with `nnx.split`; `train_step` and `eval_step` are plain
`jax.jit` functions of those pytrees (flax's performance guide: the hot loop
should not go through `nnx.jit`). Data parallelism is `jax.sharding`: the
batch is sharded on the mesh's 'data' axis and the state replicated, so XLA
inserts the gradient all-reduce and BatchNorm sees the global batch. One
device is the same code path.

Metrics are summed on device inside the steps (`Totals`), so the loop never
waits on the host; the run fetches them once per log interval (or every few seconds).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxcnn import data

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
SCHEDULES = ("constant", "cosine")


class TrainState(struct.PyTreeNode):
    """Everything a step changes: a pure pytree, donated to each step."""

    params: Any  # nnx.State of arrays
    batch_stats: Any  # nnx.State of arrays (empty for models without BatchNorm)
    opt_state: Any
    step: jax.Array  # int32 scalar: optimizer steps taken
    rng: jax.Array  # uint32[2] key; dropout uses fold_in(rng, step)


def split_model(model: nnx.Module):
    """(train graphdef, eval graphdef, params, batch_stats) of a model, states as pure arrays."""
    model.train()
    train_def, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    model.eval()
    eval_def, _, _ = nnx.split(model, nnx.Param, nnx.BatchStat)
    model.train()
    return train_def, eval_def, nnx.as_pure(params), nnx.as_pure(batch_stats)


def make_schedule(
    learning_rate: float, *, total_steps: int, schedule: str = "constant", warmup_steps: int = 0
) -> optax.Schedule:
    """The learning rate at each step (counting from 0): linear warm-up from 0, then constant or cosine to 0."""
    if schedule not in SCHEDULES:
        raise ValueError(f"make_schedule: schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, learning_rate, warmup_steps, max(total_steps, warmup_steps + 1), end_value=0.0
        )
    if warmup_steps:
        return optax.warmup_constant_schedule(0.0, learning_rate, warmup_steps)
    return optax.constant_schedule(learning_rate)


def make_optimizer(
    name: str,
    learning_rate: float,
    *,
    total_steps: int,
    schedule: str = "constant",
    warmup_steps: int = 0,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
    """optax optimizer as PyTorch's: weight_decay is L2 for sgd/momentum/adam, decoupled for adamw."""
    if name not in OPTIMIZERS:
        raise ValueError(f"make_optimizer: optimizer must be one of {OPTIMIZERS}, got {name!r}")
    lr = make_schedule(learning_rate, total_steps=total_steps, schedule=schedule, warmup_steps=warmup_steps)
    if schedule == "constant" and not warmup_steps:
        lr = learning_rate  # a float, not a schedule: the optimizer state keeps no count for it
    if name == "adamw":
        return optax.adamw(lr, weight_decay=weight_decay)
    base = {
        "sgd": lambda: optax.sgd(lr),
        "momentum": lambda: optax.sgd(lr, momentum=momentum),
        "adam": lambda: optax.adam(lr),
    }[name]()
    return optax.chain(optax.add_decayed_weights(weight_decay), base) if weight_decay else base


def create_train_state(params, batch_stats, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.PRNGKey(seed),
    )


# --------------------------------------------------------------------------
# Metrics summed on device.


def zero_totals() -> dict[str, jax.Array]:
    """Running sums of a phase (train or eval); `first_bad_step` is -1 until a loss or gradient is non-finite."""
    return {
        "loss": jnp.zeros((), jnp.float32),
        "correct": jnp.zeros((), jnp.int32),
        "count": jnp.zeros((), jnp.int32),
        "first_bad_step": jnp.full((), -1, jnp.int32),
    }


def summarize(totals) -> dict[str, float | int]:
    """Host-side means of fetched totals."""
    totals = jax.device_get(totals)
    count = max(int(totals["count"]), 1)
    return {
        "loss": float(totals["loss"]) / count,
        "accuracy": int(totals["correct"]) / count,
        "count": int(totals["count"]),
        "first_bad_step": int(totals["first_bad_step"]),
    }


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


# --------------------------------------------------------------------------
# The steps.


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh over every visible device (all hosts), its axis named 'data'."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices, ("data",))


def replicator(mesh: Mesh):
    """A jitted identity that places a pytree replicated on every device of every process of `mesh`.

    It copies, so donating its output to a step leaves the input's arrays alive.
    """
    return jax.jit(lambda tree: tree, out_shardings=NamedSharding(mesh, P()))


def make_train_step(graphdef, tx: optax.GradientTransformation, mesh: Mesh, *, image_size: int | None):
    """train_step(state, totals, images, labels) -> (state, totals), jitted with state and totals donated."""
    replicated = NamedSharding(mesh, P())

    @functools.partial(jax.jit, donate_argnums=(0, 1), out_shardings=(replicated, replicated))
    def train_step(state: TrainState, totals, images, labels):
        x = data.preprocess(images, image_size)
        dropout_key = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params):
            model = nnx.merge(graphdef, params, state.batch_stats)
            logits = model(x, rngs=nnx.Rngs(dropout=dropout_key))
            loss = cross_entropy(logits, labels).mean()
            return loss, (logits, nnx.as_pure(nnx.state(model, nnx.BatchStat)))

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        state = state.replace(
            params=optax.apply_updates(state.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
            step=state.step + 1,
        )
        finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
        n = labels.shape[0]
        totals = {
            "loss": totals["loss"] + loss * n,
            "correct": totals["correct"] + jnp.sum(jnp.argmax(logits, -1) == labels),
            "count": totals["count"] + n,
            # The step number as users count it: the first step is 1.
            "first_bad_step": jnp.where((totals["first_bad_step"] < 0) & ~finite, state.step, totals["first_bad_step"]),
        }
        return state, totals

    return train_step


def make_eval_step(graphdef, mesh: Mesh, *, image_size: int | None):
    """eval_step(params, batch_stats, totals, images, labels, mask) -> totals, not counting padding (mask False)."""
    replicated = NamedSharding(mesh, P())

    @functools.partial(jax.jit, donate_argnums=(2,), out_shardings=replicated)
    def eval_step(params, batch_stats, totals, images, labels, mask):
        model = nnx.merge(graphdef, params, batch_stats)
        logits = model(data.preprocess(images, image_size))
        loss = cross_entropy(logits, labels)
        return {
            "loss": totals["loss"] + jnp.sum(jnp.where(mask, loss, 0.0)),
            "correct": totals["correct"] + jnp.sum((jnp.argmax(logits, -1) == labels) & mask),
            "count": totals["count"] + jnp.sum(mask, dtype=jnp.int32),
            "first_bad_step": totals["first_bad_step"],
        }

    return eval_step
