"""The train state, the jitted steps and the optimizers, on a small LeNet."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcnn import data, models, train

BATCH = 16


@pytest.fixture(scope="module")
def digits():
    split = data.load("mnist_10k").train
    return split.images[: 4 * BATCH], split.labels[: 4 * BATCH]


def setup(name="lenet", optimizer="adam", lr=1e-3, **options):
    model = models.create(name, **options)
    train_def, eval_def, params, batch_stats = train.split_model(model)
    tx = train.make_optimizer(optimizer, lr, total_steps=100)
    mesh = train.data_mesh()
    state = train.create_train_state(params, batch_stats, tx, seed=0)
    return (
        state,
        train.make_train_step(train_def, tx, mesh, image_size=28),
        train.make_eval_step(eval_def, mesh, image_size=28),
    )


def test_state_is_a_pure_pytree_of_arrays():
    state, _, _ = setup("lenet_bn")
    leaves = jax.tree.leaves(state)
    assert leaves and all(isinstance(leaf, jax.Array) for leaf in leaves)
    assert jax.tree.leaves(state.batch_stats)  # lenet_bn has running statistics
    chex.assert_shape(state.step, ())
    chex.assert_shape(state.rng, (2,))


def test_train_steps_lower_the_loss_and_count(digits):
    images, labels = digits
    state, train_step, _ = setup(activation="relu", lr=3e-3)
    losses = []
    for _ in range(15):
        totals = train.zero_totals()
        state, totals = train_step(state, totals, images[:BATCH], labels[:BATCH])
        losses.append(train.summarize(totals)["loss"])
    assert int(state.step) == 15
    assert losses[-1] < 0.5 * losses[0]
    summary = train.summarize(totals)
    assert summary["count"] == BATCH and summary["first_bad_step"] == -1


def test_train_step_donates_the_state(digits):
    images, labels = digits
    state, train_step, _ = setup()
    old_leaf = jax.tree.leaves(state.params)[0]
    state, _ = train_step(state, train.zero_totals(), images[:BATCH], labels[:BATCH])
    assert old_leaf.is_deleted()


def test_batch_statistics_update_in_train_steps_only(digits):
    images, labels = digits
    state, train_step, eval_step = setup("lenet_bn")
    before = jax.tree.map(np.asarray, state.batch_stats)
    eval_step(
        state.params, state.batch_stats, train.zero_totals(), images[:BATCH], labels[:BATCH], np.ones(BATCH, bool)
    )
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, state.batch_stats), before)
    state, _ = train_step(state, train.zero_totals(), images[:BATCH], labels[:BATCH])
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), jax.tree.map(np.asarray, state.batch_stats), before)
    assert all(jax.tree.leaves(changed))


def test_eval_step_ignores_padded_examples(digits):
    images, labels = digits
    state, _, eval_step = setup()
    mask = np.arange(BATCH) < 10
    padded = eval_step(state.params, state.batch_stats, train.zero_totals(), images[:BATCH], labels[:BATCH], mask)
    garbage = images[:BATCH].copy()
    garbage[10:] = 255
    other = eval_step(state.params, state.batch_stats, train.zero_totals(), garbage, labels[:BATCH], mask)
    assert train.summarize(padded) == pytest.approx(train.summarize(other))
    assert train.summarize(padded)["count"] == 10


def test_a_blown_up_step_is_named(digits):
    images, labels = digits
    state, train_step, _ = setup(optimizer="sgd", lr=1e30, activation="relu")
    totals = train.zero_totals()
    for _ in range(3):
        state, totals = train_step(state, totals, images[:BATCH], labels[:BATCH])
    first_bad = train.summarize(totals)["first_bad_step"]
    assert 1 <= first_bad <= 3


def test_dropout_uses_a_fresh_key_every_step(digits):
    """VGG's dropout: two steps on the same batch from the same params differ only through the key."""
    images, labels = digits
    model = models.create("vgg11", width_divisor=32, image_size=32)
    train_def, _, params, batch_stats = train.split_model(model)
    tx = optax.sgd(0.0)
    step = train.make_train_step(train_def, tx, train.data_mesh(), image_size=32)
    state = train.create_train_state(params, batch_stats, tx, seed=0)
    losses = []
    for _ in range(2):
        state, totals = step(state, train.zero_totals(), images[:BATCH], labels[:BATCH])
        losses.append(train.summarize(totals)["loss"])
    assert losses[0] != losses[1]


@pytest.mark.parametrize("name", train.OPTIMIZERS)
@pytest.mark.parametrize("schedule", train.SCHEDULES)
def test_optimizers_and_schedules(name, schedule):
    tx = train.make_optimizer(name, 0.1, total_steps=10, schedule=schedule, warmup_steps=2, weight_decay=1e-4)
    params = {"w": jnp.ones(3)}
    opt_state = tx.init(params)
    updates, _ = tx.update({"w": jnp.ones(3)}, opt_state, params)
    assert updates["w"].shape == (3,)
    assert float(updates["w"][0]) == 0.0  # warm-up starts from a learning rate of 0


def test_sgd_is_the_chapters_update():
    tx = train.make_optimizer("sgd", 0.1, total_steps=10)
    params = {"w": jnp.array([1.0, 2.0])}
    updates, _ = tx.update({"w": jnp.array([0.5, -1.0])}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], [-0.05, 0.1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="rmsprop"), "optimizer must be one of"),
        (dict(name="sgd", schedule="step"), "schedule must be one of"),
    ],
)
def test_make_optimizer_rejects_unknowns(kwargs, message):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=message):
        train.make_optimizer(name, 0.1, total_steps=10, **kwargs)
