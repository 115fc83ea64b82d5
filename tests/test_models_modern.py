"""The rest of the modern-CNN chapter (AlexNet, NiN, GoogLeNet, DenseNet, RegNetX-32) and torchvision's
ResNet-34/50: parameter counts, the text's shapes per block, the blocks, bad arguments, and one
jitted train and eval step each over split state.

Shapes and counts come from abstract models (nnx.eval_shape: nothing drawn or compiled); the
steps run each model for real at the smallest size its layers allow, batch 2.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxcnn import layers, models, train
from jaxcnn.models import (
    BasicBlock,
    Bottleneck,
    DenseBlock,
    Inception,
    nin_block,
    transition_block,
)
from jaxcnn.models.regnet import stage
from jaxcnn.summary import summary

NEW = ["alexnet", "nin", "googlenet", "densenet", "regnetx32", "resnet34", "resnet50"]
# The smallest input each keeps all its layers at (or a small one, for those that pool from any size).
SMALL = {"alexnet": 65, "nin": 67, "googlenet": 32, "densenet": 32, "regnetx32": 32, "resnet34": 32, "resnet50": 32}


@functools.cache
def abstract(name, image_size=None, in_channels=1, num_classes=10):
    """The model without its weights (nnx.eval_shape), once per configuration: the tests only read it."""
    return nnx.eval_shape(
        lambda: models.create(name, image_size=image_size, in_channels=in_channels, num_classes=num_classes)
    )


def num_params(model) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def shapes(name, batch=1, size=None, **kw):
    size = size or models.default_image_size(name)
    channels = kw.get("in_channels", 1)
    rows = summary(abstract(name, size, **kw), (batch, size, size, channels), print_table=False)
    return [r[1][1:] for r in rows]


def output(make_block, input_shape):
    """The block's output, abstractly: no parameters are drawn and nothing is compiled."""
    graphdef, state = nnx.split(nnx.eval_shape(make_block))
    return jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, jax.ShapeDtypeStruct(input_shape, jnp.float32))


# --------------------------------------------------------------------------
# Parameter counts: the PyTorch definitions' (d2l's; torchvision's for ResNet-34/50).


def test_parameter_counts():
    counts = {name: num_params(abstract(name, models.default_image_size(name))) for name in NEW}
    assert counts == {
        "alexnet": 46_764_746,
        "nin": 1_992_166,
        "googlenet": 5_977_530,
        "densenet": 758_226,
        "regnetx32": 179_290,
        "resnet34": 21_283_530,
        "resnet50": 23_522_250,
    }
    # torchvision's ImageNet models: 3 input channels, 1000 classes.
    assert num_params(abstract("resnet34", 224, in_channels=3, num_classes=1000)) == 21_797_672
    assert num_params(abstract("resnet50", 224, in_channels=3, num_classes=1000)) == 25_557_032


def test_torchvision_resnets_have_no_conv_biases():
    for name in ("resnet34", "resnet50"):
        model = abstract(name, 96)
        convs = [m for _, m in nnx.iter_graph(model) if isinstance(m, layers.Conv2D)]
        assert len(convs) == (36 if name == "resnet34" else 53)  # 33 / 49 in the blocks and the stem, 3 / 4 shortcuts
        assert all(c.bias is None for c in convs)
        assert model.net.layers[-1].layers[-1].bias is not None  # fc has one


# --------------------------------------------------------------------------
# The text's shapes per block (layer_summary in NHWC).


def test_alexnet_shapes():
    assert shapes("alexnet") == [
        (54, 54, 96), (54, 54, 96), (26, 26, 96),
        (26, 26, 256), (26, 26, 256), (12, 12, 256),
        (12, 12, 384), (12, 12, 384), (12, 12, 384), (12, 12, 384), (12, 12, 256), (12, 12, 256), (5, 5, 256),
        (6400,), (4096,), (4096,), (4096,), (4096,), (4096,), (4096,), (10,),
    ]  # fmt: skip


def test_nin_shapes():
    assert shapes("nin") == [
        (54, 54, 96), (26, 26, 96), (26, 26, 256), (12, 12, 256), (12, 12, 384), (5, 5, 384),
        (5, 5, 384), (5, 5, 10), (1, 1, 10), (10,),
    ]  # fmt: skip


def test_googlenet_shapes():
    # b1 and b2 quarter and halve 96; Inception blocks give 256 + 480, 5 x ... 832, 832 + 1024 channels.
    assert shapes("googlenet") == [(24, 24, 64), (12, 12, 192), (6, 6, 480), (3, 3, 832), (1024,), (10,)]


def test_densenet_shapes():
    # Each dense block adds 4 x 32 channels; each transition halves channels, height and width.
    assert shapes("densenet") == [
        (24, 24, 64), (24, 24, 192), (12, 12, 96), (12, 12, 224), (6, 6, 112), (6, 6, 240), (3, 3, 120),
        (3, 3, 248), (10,),
    ]  # fmt: skip


def test_regnetx32_shapes():
    assert shapes("regnetx32") == [(48, 48, 32), (24, 24, 32), (12, 12, 80), (10,)]


@pytest.mark.parametrize("name, widths", [("resnet34", (64, 128, 256, 512)), ("resnet50", (256, 512, 1024, 2048))])
def test_torchvision_resnet_shapes(name, widths):
    assert shapes(name) == [(24, 24, 64), (24, 24, widths[0]), (12, 12, widths[1]), (6, 6, widths[2])] + [
        (3, 3, widths[3]),
        (10,),
    ]
    imagenet = shapes(name, size=224, in_channels=3, num_classes=1000)
    assert imagenet == [(56, 56, 64), (56, 56, widths[0]), (28, 28, widths[1]), (14, 14, widths[2])] + [
        (7, 7, widths[3]),
        (1000,),
    ]


# --------------------------------------------------------------------------
# The blocks.


def test_nin_block():
    block = lambda: nin_block(1, 96, 11, 4, 0, rngs=nnx.Rngs(0))
    chex.assert_shape(output(block, (2, 224, 224, 1)), (2, 54, 54, 96))
    kernels = [m.kernel.shape for m in nnx.eval_shape(block).layers if isinstance(m, layers.Conv2D)]
    assert kernels == [(11, 11, 1, 96), (1, 1, 96, 96), (1, 1, 96, 96)]


def test_inception_concatenates_its_four_branches():
    make = lambda: Inception(192, 64, (96, 128), (16, 32), 32, rngs=nnx.Rngs(0))  # b3's first
    chex.assert_shape(output(make, (2, 12, 12, 192)), (2, 12, 12, 64 + 128 + 32 + 32))
    block = nnx.eval_shape(make)
    assert block.out_channels == 256
    assert [block.b2_2.kernel.shape, block.b3_2.kernel.shape] == [(3, 3, 96, 128), (5, 5, 16, 32)]
    assert (block.b4_1.window, block.b4_1.stride, block.b4_1.padding) == ((3, 3), (1, 1), (1, 1))


def test_dense_and_transition_blocks():
    """The text's example: DenseBlock(2, 10) on 3 channels gives 3 + 2 * 10 = 23; transition_block(10) halves H, W."""
    chex.assert_shape(output(lambda: DenseBlock(2, 3, 10, rngs=nnx.Rngs(0)), (4, 8, 8, 3)), (4, 8, 8, 23))
    chex.assert_shape(output(lambda: transition_block(23, 10, rngs=nnx.Rngs(0)), (4, 8, 8, 23)), (4, 4, 4, 10))
    block = nnx.eval_shape(lambda: DenseBlock(2, 3, 10, rngs=nnx.Rngs(0)))
    assert [b.layers[-1].kernel.shape for b in block.net.layers] == [(3, 3, 3, 10), (3, 3, 13, 10)]


def test_anynet_stage_halves_first():
    make = lambda: stage(4, 32, 32, 16, 1.0, rngs=nnx.Rngs(0))
    chex.assert_shape(output(make, (2, 48, 48, 32)), (2, 24, 24, 32))
    blocks = nnx.eval_shape(make).layers
    # The first block strides and has the 1x1 shortcut even though the channels stay 32, as d2l's stage.
    assert [(b.conv2.stride, b.conv4 is not None) for b in blocks] == [((2, 2), True)] + [((1, 1), False)] * 3


def test_basic_block_and_bottleneck():
    chex.assert_shape(output(lambda: BasicBlock(8, 8, rngs=nnx.Rngs(0)), (2, 6, 6, 8)), (2, 6, 6, 8))
    down = lambda: BasicBlock(8, 16, use_1x1conv=True, strides=2, rngs=nnx.Rngs(0))
    chex.assert_shape(output(down, (2, 6, 6, 8)), (2, 3, 3, 16))
    assert [type(m).__name__ for m in nnx.eval_shape(down).downsample.layers] == ["Conv2D", "BatchNorm"]
    # ResNet-50's first block: 64 -> 256 at stride 1, so it has a shortcut conv; 1x1 convs to 64, then 256.
    first = nnx.eval_shape(lambda: Bottleneck(64, 256, use_1x1conv=True, rngs=nnx.Rngs(0)))
    assert [first.conv1.kernel.shape, first.conv2.kernel.shape, first.conv3.kernel.shape] == [
        (1, 1, 64, 64),
        (3, 3, 64, 64),
        (1, 1, 64, 256),
    ]
    # v1.5: the stride is on the 3x3 conv, not the first 1x1.
    strided = lambda: Bottleneck(256, 512, use_1x1conv=True, strides=2, rngs=nnx.Rngs(0))
    chex.assert_shape(output(strided, (2, 8, 8, 256)), (2, 4, 4, 512))
    block = nnx.eval_shape(strided)
    assert (block.conv1.stride, block.conv2.stride, block.downsample.layers[0].stride) == ((1, 1), (2, 2), (2, 2))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: models.create("alexnet", image_size=64), r"AlexNet: image_size must be at least 65, got 64"),
        (lambda: models.create("alexnet", dropout=1.0), r"AlexNet: dropout must be in \[0, 1\)"),
        (lambda: models.create("nin", image_size=66), r"NiN: image_size must be at least 67, got 66"),
        (lambda: models.create("densenet", image_size=28), r"DenseNet: image_size must be at least 29 for 4 dense"),
        (lambda: models.create("densenet", growth_rate=8), r"unknown option\(s\) \['growth_rate'\]"),
        (lambda: Bottleneck(64, 30, rngs=nnx.Rngs(0)), r"Bottleneck: num_channels must divide by 4, got 30"),
        (lambda: Bottleneck(64, 256, rngs=nnx.Rngs(0)), r"Bottleneck: .*needs use_1x1conv=True"),
        (lambda: BasicBlock(8, 8, strides=2, rngs=nnx.Rngs(0)), r"BasicBlock: .*needs use_1x1conv=True"),
    ],
)
def test_bad_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        nnx.eval_shape(call)


def test_smallest_sizes_work_and_global_pooling_models_take_any_size():
    assert shapes("alexnet", size=65)[12:14] == [(1, 1, 256), (256,)]
    assert shapes("nin", size=67)[5] == (1, 1, 384)
    assert shapes("densenet", size=29)[-2] == (1, 1, 248)
    assert shapes("googlenet", size=1)[-1] == (10,)  # every pool is padded
    with pytest.raises(ValueError, match=r"GoogLeNet: x must be \(N, H, W, 1\) NHWC, got shape \(2, 32, 32, 3\)"):
        summary(abstract("googlenet", 96), (2, 32, 32, 3))


# --------------------------------------------------------------------------
# Train and eval modes over split state, as the trainer runs them.


def loss_and_stats(graphdef):
    def loss(params, batch_stats, x, labels, key):
        model = nnx.merge(graphdef, params, batch_stats)
        logits = model(x, rngs=nnx.Rngs(dropout=key))
        return train.cross_entropy(logits, labels).mean(), (logits, nnx.as_pure(nnx.state(model, nnx.BatchStat)))

    return jax.value_and_grad(loss, has_aux=True)


@pytest.mark.parametrize("name", NEW)
def test_train_and_eval_modes_trace_over_split_state(name, monkeypatch):
    """Every full model, traced (jax.eval_shape: no compile) in the trainer's shape of step."""
    monkeypatch.setenv("JAXCNN_CONV_LOWERING", "xla")  # the shapes are the same; XLA's conv traces faster
    size = SMALL[name]
    train_def, eval_def, params, batch_stats = train.split_model(abstract(name, size))
    x, labels = jax.ShapeDtypeStruct((2, size, size, 1), jnp.float32), jnp.array([3, 7])
    (loss, (logits, new_stats)), grads = jax.eval_shape(
        loss_and_stats(train_def), params, batch_stats, x, labels, jax.random.key(0)
    )
    chex.assert_shape(logits, (2, 10))
    chex.assert_type([loss, logits], jnp.float32)
    chex.assert_trees_all_equal_shapes_and_dtypes(grads, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_stats, batch_stats)
    assert bool(jax.tree.leaves(batch_stats)) == (name not in ("alexnet", "nin", "googlenet"))
    eval_logits = jax.eval_shape(lambda p, b, x: nnx.merge(eval_def, p, b)(x), params, batch_stats, x)
    chex.assert_shape(eval_logits, (2, 10))
    assert (eval_def != train_def) == (name != "googlenet")  # GoogLeNet has neither dropout nor BatchNorm


def materialise(model, seed=0):
    """An abstract model's state filled from NumPy (He-normal weights, small biases and scales, running
    mean 0 and variance 1): no XLA compile per parameter shape, as jax.random's initialisers need."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if leaf.ndim > 1:
            value = rng.normal(0.0, (2.0 / np.prod(leaf.shape[:-1])) ** 0.5, leaf.shape)
        elif "var" in jax.tree_util.keystr(path):
            value = np.ones(leaf.shape)
        elif "mean" in jax.tree_util.keystr(path):
            value = np.zeros(leaf.shape)
        else:
            value = (
                1.0 + rng.normal(0.0, 0.1, leaf.shape)
                if "scale" in jax.tree_util.keystr(path)
                else np.zeros(leaf.shape)
            )
        return jnp.asarray(value, leaf.dtype)

    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def every_new_block():
    """One small network of every block above: nin_block, Inception, DenseBlock and transition_block,
    an AnyNet stage (ResNeXt blocks), BasicBlock and Bottleneck, each with its shortcut."""
    rngs = nnx.Rngs(0)
    return nnx.Sequential(
        nin_block(1, 8, 3, 1, 1, rngs=rngs),
        layers.MaxPool2D(3, stride=2, padding=1),  # 16 -> 8
        Inception(8, 4, (4, 8), (2, 4), 4, rngs=rngs),  # 20 channels
        DenseBlock(2, 20, 4, rngs=rngs),  # 28
        transition_block(28, 16, rngs=rngs),  # 4 x 4
        stage(2, 16, 16, 8, 1.0, rngs=rngs),  # 2 x 2
        BasicBlock(16, 32, use_1x1conv=True, rngs=rngs),
        Bottleneck(32, 32, rngs=rngs),
        nnx.Dropout(0.5),
        layers.GlobalAvgPool2D(),
        layers.Flatten(),
        layers.linear(32, 10, rngs=rngs),
    )


def test_every_new_block_trains_and_evaluates_under_jit(monkeypatch):
    """The blocks for real: a step of the trainer's jitted train step, then eval mode under jit."""
    monkeypatch.setenv("JAXCNN_CONV_LOWERING", "xla")  # compiles fastest; test_ops and test_lowering check the rest
    model = materialise(nnx.eval_shape(every_new_block))
    train_def, eval_def, params, batch_stats = train.split_model(model)
    before = jax.tree.map(np.array, (params, batch_stats))  # copies: the step donates the state
    tx = optax.sgd(0.01)
    state = train.create_train_state(params, batch_stats, tx, seed=0)
    mesh = train.data_mesh()
    images = jax.random.randint(jax.random.key(1), (4, 16, 16, 1), 0, 256).astype(jnp.uint8)
    labels = jnp.array([3, 7, 0, 9])
    stepped, totals = train.make_train_step(train_def, tx, mesh, image_size=None)(
        state, train.zero_totals(), images, labels
    )
    assert int(stepped.step) == 1 and int(totals["first_bad_step"]) == -1 and int(totals["count"]) == 4
    changed = lambda a, b: jax.tree.leaves(jax.tree.map(lambda u, v: bool(np.any(u != v)), a, b))
    assert all(changed(before[0], stepped.params))  # every parameter got a gradient
    assert all(changed(before[1], stepped.batch_stats))  # train mode updated every running statistic

    # Eval mode: running statistics and no dropout, so an example's logits do not depend on the batch.
    forward = jax.jit(lambda p, b, x: nnx.merge(eval_def, p, b)(x))
    x = images.astype(jnp.float32) / 255
    y = forward(stepped.params, stepped.batch_stats, x)
    y_swapped = forward(stepped.params, stepped.batch_stats, x[::-1])
    chex.assert_tree_all_finite(y)
    np.testing.assert_allclose(y_swapped[::-1], y, rtol=1e-5, atol=1e-6)
