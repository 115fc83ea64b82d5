"""The GPU and TPU programs, checked on this CPU machine: every registered model's train and eval steps,
built as the runner builds them, exported with `jax.export` for "cuda" and "tpu".

What a GPU would run is the exported StableHLO: `lax.platform_dependent` keeps only the branch of the
platform lowered for, so the CPU fast paths (patch products for convolutions) must be absent from it.
The markers, counted from the model's layers:
- a train step has 3 convolutions per conv layer (forward, input and weight gradients) less one for
  each that reads the images (not differentiated), and 3 dot_generals per dense layer, so a patch
  product (a dot_general in a convolution's place) fails both counts;
- no max pooling is differentiated by reduce_window's select_and_scatter, whose NaN rule is not
  PyTorch's: every platform routes the gradient as PyTorch does (`_lowering.windowed_max` off CPU).

The exports take a batch of 2 images already at the model's chapter size: preprocess does not resize,
so every dot_general in the program is a dense layer's, and tracing costs the same at any size.

A 1-device mesh of this machine's CPU stands for one GPU: export keeps only the mesh's shape and axis
names (shardings become NamedShardings on its AbstractMesh), and the device count, 1.
"""

from __future__ import annotations

import functools
import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxcnn import layers, models, train

PLATFORMS = ("cuda", "tpu")
BATCH = 2
NUM_CLASSES = 10
OP = re.compile(r"\b(stablehlo\.[a-z_]+)")
TENSOR = re.compile(r"tensor<(?:\d+x)*([a-z]+\d*)>")


def spec(tree, sharding):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


@functools.cache
def build(name: str, dtype):
    """(abstract model, (train step, its argument specs), (eval step, its argument specs)) as the runner
    builds them, on a 1-device mesh. The model is nnx.eval_shape's: exporting needs only shapes and dtypes."""
    size = models.default_image_size(name)
    options = {"dtype": dtype} if dtype else {}
    model = nnx.eval_shape(lambda: models.create(name, image_size=size, num_classes=NUM_CLASSES, **options))
    train_def, eval_def, params, batch_stats = train.split_model(model)
    tx = train.make_optimizer("momentum", 0.1, total_steps=10)  # momentum: an optimizer state to check
    mesh = train.data_mesh(jax.devices("cpu")[:1])
    replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    state = jax.eval_shape(functools.partial(train.create_train_state, tx=tx, seed=0), params, batch_stats)
    state, totals = spec(state, replicated), spec(jax.eval_shape(train.zero_totals), replicated)
    images = jax.ShapeDtypeStruct((BATCH, size, size, 1), jnp.uint8, sharding=batch)
    labels = jax.ShapeDtypeStruct((BATCH,), jnp.int32, sharding=batch)
    mask = jax.ShapeDtypeStruct((BATCH,), jnp.bool_, sharding=batch)
    train_step = train.make_train_step(train_def, tx, mesh, image_size=size)
    eval_step = train.make_eval_step(eval_def, mesh, image_size=size)
    eval_args = (state.params, state.batch_stats, totals, images, labels, mask)
    return model, (train_step, (state, totals, images, labels)), (eval_step, eval_args)


@functools.cache
def exported(name: str, platform: str, step: str, dtype=None) -> jax.export.Exported:
    _, train_fn, eval_fn = build(name, dtype)
    fn, args = train_fn if step == "train" else eval_fn
    return jax.export.export(fn, platforms=(platform,))(*args)


def op_counts(module: str) -> Counter:
    return Counter(OP.findall(module))


def layer_counts(model) -> Counter:
    counts = Counter()
    for _, node in nnx.iter_graph(model):
        if isinstance(node, layers.Conv2D):
            counts["conv"] += 1
        elif isinstance(node, nnx.Linear):
            counts["dense"] += 1
        elif isinstance(node, layers.BatchNorm):
            counts["batch_norm"] += 1
    return counts


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("name", models.names())
def test_steps_lower_with_no_cpu_path(name, platform):
    expected = layer_counts(build(name, None)[0])
    train_ops = op_counts(exported(name, platform, "train").mlir_module())
    eval_ops = op_counts(exported(name, platform, "eval").mlir_module())
    assert train_ops["stablehlo.convolution"] == 3 * expected["conv"] - 1  # the first conv reads the images
    assert train_ops["stablehlo.dot_general"] == 3 * expected["dense"]  # dense layers follow convs: all differentiated
    assert train_ops["stablehlo.select_and_scatter"] == 0
    assert eval_ops["stablehlo.convolution"] == expected["conv"]
    assert eval_ops["stablehlo.dot_general"] == expected["dense"]


def element_types(module: str, op: str) -> list[list[str]]:
    """The element types in the type signature ending each line that holds `op`, operands then results."""
    return [TENSOR.findall(line.rsplit(" : ", 1)[1]) for line in module.splitlines() if re.search(rf"\b{op}\b", line)]


@pytest.mark.parametrize("name", models.names())
def test_bfloat16_computes_in_bfloat16_and_keeps_float32_state(name):
    """Under dtype=bfloat16 (the GPU policy) every convolution and matrix product of the cuda train step
    takes bf16 operands, the softmax cross-entropy runs in float32, and the step returns the state in the
    avals it took: float32 parameters, BatchNorm statistics and optimizer state (donation reuses them)."""
    exp = exported(name, "cuda", "train", jnp.bfloat16)
    module = exp.mlir_module()
    expected = layer_counts(build(name, jnp.bfloat16)[0])
    assert op_counts(module)["stablehlo.convolution"] == 3 * expected["conv"] - 1
    products = element_types(module, "stablehlo.convolution") + element_types(module, "stablehlo.dot_general")
    assert products and all(types[:2] == ["bf16", "bf16"] for types in products), products
    # The loss's log-sum-exp: exp of the (batch, classes) logits, log of the (batch,) sums.
    loss_op = rf"stablehlo\.(?:exponential|log) %\S+ : tensor<{BATCH}(?:x{NUM_CLASSES})?x([a-z]+\d*)>"
    loss_types = re.findall(loss_op, module)
    assert len(loss_types) >= 2 and set(loss_types) == {"f32"}, loss_types

    # (state, totals) come back as they went in: donation reuses their buffers, and nothing became bf16.
    out = [(a.shape, a.dtype) for a in exp.out_avals]
    assert out == [(a.shape, a.dtype) for a in exp.in_avals[: len(out)]]
    state, totals = jax.tree.unflatten(exp.out_tree, exp.out_avals)
    kept = jax.tree.leaves((state.params, state.batch_stats, state.opt_state, totals["loss"]))
    assert {a.dtype for a in kept if jnp.issubdtype(a.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}


@nnx.jit  # one compile per layer, not one per op
def updated_statistics(norm: layers.BatchNorm, x):
    """(output, running mean, running var) after one training-mode call."""
    y = norm(x, use_running_average=False)
    return y, norm.mean[...], norm.var[...]


def test_bfloat16_batch_norm_statistics_are_float32():
    """Every BatchNorm of every model, built with dtype=bfloat16, computes and keeps its statistics in float32.

    Values, not op types, tell: jnp.mean accumulates bf16 in float32 already, so a BatchNorm keeping bf16
    statistics exports the same float32 reductions. Rows 100, 100.5, 101, 101.5 (exact in bf16) have
    variance 0.3125, which float32 gets exactly and bf16 loses (E[x^2] ~ 10150 rounds to a multiple of 64);
    running statistics of 1 + 2^-10 are not bf16 numbers, so a bf16 update would round them to 1.
    """
    rows = jnp.asarray([100, 100.5, 101, 101.5], jnp.bfloat16)
    old = np.float32(1 + 2**-10)
    checked = set()
    for name in models.names():
        for _, node in nnx.iter_graph(build(name, jnp.bfloat16)[0]):
            if not isinstance(node, layers.BatchNorm) or node.num_features in checked:
                continue
            norm = nnx.clone(node)  # abstract, as built: give every variable the value `old`
            nnx.update(norm, jax.tree.map(lambda a: jnp.full(a.shape, old, a.dtype), nnx.state(norm)))
            y, mean, var = updated_statistics(norm, jnp.broadcast_to(rows[:, None], (4, norm.num_features)))
            assert y.dtype == jnp.bfloat16 and mean.dtype == var.dtype == jnp.float32
            np.testing.assert_allclose(mean, 0.9 * old + 0.1 * 100.75, rtol=1e-6)
            np.testing.assert_allclose(var, 0.9 * old + 0.1 * 0.3125 * 4 / 3, rtol=1e-6)  # unbiased, as torch's
            checked.add(node.num_features)
    assert checked  # some registered model has BatchNorm
