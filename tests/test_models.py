"""jaxcnn.models and jaxcnn.summary: the notes' shapes and parameter counts, modes, precision, jit.

Registered models are built abstractly (nnx.eval_shape, jax.eval_shape, no
parameters drawn, nothing compiled) except LeNet; real forward passes run on
LeNet and on small members of the VGG and ResNet families.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcnn import layers, models
from jaxcnn.models import VGG, Residual, ResNet, ResNeXtBlock, vgg_block
from jaxcnn.summary import summary


def abstract(name, **kw):
    return nnx.eval_shape(lambda: models.create(name, **kw))


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def num_params(model) -> int:
    return count(nnx.state(model, nnx.Param))


def images(n, size, channels=1, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, size, size, channels))


# Real forward passes use small members of each family: every distinct
# parameter shape costs an XLA compile to initialise.
@pytest.fixture(scope="module")
def resnet():
    return ResNet(((1, 64), (1, 128)), image_size=32, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def vgg():
    return VGG(((1, 8), (2, 16)), image_size=16, rngs=nnx.Rngs(0))


# --------------------------------------------------------------------------
# Registry


def test_registry_names_and_chapter_sizes():
    sizes = {"lenet": 28, "lenet_bn": 28, "vgg11": 224, "resnet18": 96, "resnext18": 96}
    sizes |= {"alexnet": 224, "nin": 224, "googlenet": 96, "densenet": 96, "regnetx32": 96}
    sizes |= {"resnet34": 96, "resnet50": 96}
    assert set(sizes) == set(models.names())
    assert {name: models.default_image_size(name) for name in sizes} == sizes


def test_run_defaults_are_the_chapters_runs():
    """d2l's learning rates; every chapter run is SGD, batch 128, 10 epochs."""
    lrs = {name: models.run_defaults(name).lr for name in models.names()}
    assert lrs == {
        "lenet": 0.1, "lenet_bn": 0.1, "alexnet": 0.01, "vgg11": 0.01, "nin": 0.05, "googlenet": 0.01,
        "resnet18": 0.01, "resnext18": 0.01, "densenet": 0.01, "regnetx32": 0.05, "resnet34": 0.01, "resnet50": 0.01,
    }  # fmt: skip
    for name in models.names():
        run = models.run_defaults(name)
        assert (run.optimizer, run.batch_size, run.epochs) == ("sgd", 128, 10)
    assert models.run_defaults("resnet50").title == "ResNet-50"
    with pytest.raises(ValueError, match=r"run_defaults: unknown model 'resnet152'"):
        models.run_defaults("resnet152")


def test_variants_are_partials_not_options():
    """What a name means (lenet_bn's batch norm, resnext18's block) is fixed: not an option to override."""
    lenet_options = {"activation": "sigmoid", "pooling": "avg", "dtype": None}
    assert models.options("lenet_bn") == models.options("lenet") == lenet_options
    assert models.options("resnext18") == models.options("resnet50") == {"dtype": None}
    assert models.options("alexnet") == models.options("nin") == {"dropout": 0.5, "dtype": None}
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['batch_norm'\] for 'lenet_bn'"):
        models.create("lenet_bn", batch_norm=False)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['block'\] for 'resnext18'"):
        models.create("resnext18", block=Residual)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: models.create("resnet152"), r"create: unknown model 'resnet152'; choose one of \['lenet'"),
        (lambda: models.default_image_size("vgg16"), r"default_image_size: unknown model 'vgg16'"),
        (lambda: models.create("vgg11", widht_divisor=2), r"unknown option\(s\) \['widht_divisor'\].*'width_divisor'"),
        (lambda: models.create("resnet18", dropout=0.1), r"allowed: \['dtype'\]"),
        (lambda: models.create("lenet", num_classes=0), r"create: num_classes must be a positive int"),
        (lambda: models.create("lenet", dtype=jnp.int32), r"create: dtype must be None or a floating dtype"),
        (lambda: models.create("lenet", activation="tanh"), r"LeNet: activation must be one of \['relu', 'sigmoid'\]"),
        (lambda: models.create("lenet", pooling="min"), r"LeNet: pooling must be one of \['avg', 'max'\]"),
        (lambda: models.create("lenet", image_size=11), r"LeNet: image_size must be at least 12"),
        (lambda: models.create("vgg11", image_size=16), r"VGG: image_size must be at least 32 for 5 blocks"),
        (lambda: models.create("vgg11", width_divisor=128), r"VGG: width_divisor 128 leaves no channels of 64"),
    ],
)
def test_bad_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_wrong_input_shape_raises_value_error():
    lenet = models.create("lenet")
    with pytest.raises(ValueError, match=r"LeNet: x must be \(N, 28, 28, 1\) NHWC, got shape \(2, 32, 32, 1\)"):
        lenet(jnp.zeros((2, 32, 32, 1)))
    with pytest.raises(ValueError, match=r"ResNet: x must be \(N, H, W, 1\) NHWC, got shape \(2, 32, 32, 3\)"):
        summary(abstract("resnet18"), (2, 32, 32, 3))
    with pytest.raises(ValueError, match=r"VGG: x must be \(N, 224, 224, 1\) NHWC, got shape \(2, 224, 224\)"):
        summary(abstract("vgg11"), (2, 224, 224))


# --------------------------------------------------------------------------
# Parameter counts: the notes' PyTorch models, a bias on every conv and dense layer.


def test_parameter_counts_match_the_notes():
    assert num_params(models.create("lenet")) == 61_706
    assert num_params(abstract("vgg11", width_divisor=1)) == 128_806_154
    assert num_params(abstract("vgg11")) == 43_093_322  # quarter width, as the notes train it
    assert num_params(abstract("resnet18")) == 11_178_378


def test_parameter_counts_follow_classes_and_channels():
    # LeNet: conv1 grows by 6 * 25 per extra input channel, the last layer by 85 per class.
    assert num_params(abstract("lenet", num_classes=100, in_channels=3)) == 61_706 + 2 * 150 + 90 * 85
    # BNLeNet: a scale and a bias per channel/unit of its 4 BatchNorms.
    assert num_params(abstract("lenet_bn")) == 61_706 + 2 * (6 + 16 + 120 + 84)
    # The full-width VGG-11's first dense layer sees 512 * 7 * 7 features.
    vgg = abstract("vgg11", width_divisor=1)
    assert vgg.net.layers[6].kernel.shape == (25_088, 4096)


def test_resnext18_parameter_count_from_d2l_block():
    """d2l's block: grouped 3x3 conv with `groups` channels per group, BN after each conv."""
    groups, bot_mul = models.RESNEXT18_GROUPS, models.RESNEXT18_BOT_MUL

    def block(cin, c, shortcut):
        b = round(c * bot_mul)
        convs = (cin * b + b) + (9 * groups * b + b) + (b * c + c) + (cin * c + c if shortcut else 0)
        return convs + 2 * (b + b + c + (c if shortcut else 0))

    expected = 1 * 64 * 49 + 64 + 2 * 64 + 512 * 10 + 10  # stem and head
    cin = 64
    for i, (n, c) in enumerate(models.RESNEXT18_ARCH):
        for j in range(n):
            expected += block(cin, c, cin != c or (j == 0 and i > 0))
            cin = c
    assert num_params(abstract("resnext18")) == expected


# --------------------------------------------------------------------------
# The state contract


@pytest.mark.parametrize("name", models.names())
def test_state_is_params_and_batch_stats_and_starts_in_train_mode(name):
    model = abstract(name)
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)  # raises on any other state
    assert count(params) > 0
    has_bn = any(isinstance(m, layers.BatchNorm) for _, m in nnx.iter_graph(model))
    assert (count(batch_stats) > 0) == has_bn == (name not in ("lenet", "vgg11", "alexnet", "nin", "googlenet"))
    for _, m in nnx.iter_graph(model):
        assert getattr(m, "deterministic", False) is False
        assert getattr(m, "use_running_average", False) is False
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    model.eval()
    eval_def, _, _ = nnx.split(model, nnx.Param, nnx.BatchStat)
    assert (eval_def != graphdef) == (name not in ("lenet", "googlenet"))  # neither dropout nor BatchNorm


# --------------------------------------------------------------------------
# Summary: the notes' layer_summary shapes, in NHWC.

LENET_SHAPES = [(28, 28, 6), (28, 28, 6), (14, 14, 6), (10, 10, 16), (10, 10, 16), (5, 5, 16), (400,),
                (120,), (120,), (84,), (84,), (10,)]  # fmt: skip


@pytest.mark.parametrize("batch", [1, 3])
def test_summary_lenet(batch, capsys):
    rows = summary(models.create("lenet"), (batch, 28, 28, 1))
    assert [r[1] for r in rows] == [(batch, *s) for s in LENET_SHAPES]
    assert [r[0] for r in rows][:3] == ["Conv2D", "sigmoid", "AvgPool2D"]
    assert [r[2] for r in rows if r[2]] == [156, 2_416, 48_120, 10_164, 850]
    assert sum(r[2] for r in rows) == 61_706
    assert "61,706" in capsys.readouterr().out.splitlines()[-1]


def test_summary_lenet_options():
    rows = summary(abstract("lenet_bn", activation="relu", pooling="max"), (2, 28, 28, 1), print_table=False)
    names = [r[0] for r in rows]
    assert names[:4] == ["Conv2D", "BatchNorm", "relu", "MaxPool2D"]
    assert names.count("BatchNorm") == 4 and "sigmoid" not in names


def test_summary_vgg11_full_width():
    rows = summary(abstract("vgg11", width_divisor=1), (1, 224, 224, 1), print_table=False)
    chex.assert_equal(
        [r[1] for r in rows],
        [(1, 112, 112, 64), (1, 56, 56, 128), (1, 28, 28, 256), (1, 14, 14, 512), (1, 7, 7, 512), (1, 25_088)]
        + [(1, 4096)] * 6
        + [(1, 10)],
    )
    assert [r[0] for r in rows][5:] == ["Flatten"] + ["Linear", "relu", "Dropout"] * 2 + ["Linear"]
    assert sum(r[2] for r in rows) == 128_806_154


def test_summary_vgg11_quarter_width_small_images():
    rows = summary(abstract("vgg11", image_size=64), (5, 64, 64, 1), print_table=False)
    blocks = [r[1] for r in rows[:6]]
    assert blocks == [(5, 32, 32, 16), (5, 16, 16, 32), (5, 8, 8, 64), (5, 4, 4, 128), (5, 2, 2, 128), (5, 512)]
    # A block on its own (an nnx.Sequential): two 3x3 convs with padding 1 keep the size, the pool halves it.
    block = nnx.eval_shape(lambda: vgg_block(2, 3, 8, rngs=nnx.Rngs(0)))
    rows = summary(block, (2, 10, 10, 3), print_table=False)
    assert rows == [
        ("Conv2D", (2, 10, 10, 8), 3 * 9 * 8 + 8),
        ("relu", (2, 10, 10, 8), 0),
        ("Conv2D", (2, 10, 10, 8), 8 * 9 * 8 + 8),
        ("relu", (2, 10, 10, 8), 0),
        ("MaxPool2D", (2, 5, 5, 8), 0),
    ]


@pytest.mark.parametrize("name", ["resnet18", "resnext18"])
@pytest.mark.parametrize("batch, size", [(1, 96), (2, 64)])
def test_summary_resnet18(name, batch, size):
    rows = summary(abstract(name), (batch, size, size, 1), print_table=False)
    s = size // 4
    expected = [(s, s, 64), (s, s, 64), (s // 2, s // 2, 128), (s // 4, s // 4, 256), (s // 8, s // 8, 512)]
    assert [r[1] for r in rows] == [(batch, *e) for e in expected] + [(batch, 10)]
    assert [r[0] for r in rows] == ["Sequential"] * 6


def test_summary_rejects_bad_input():
    with pytest.raises(ValueError, match=r"summary: input_shape must be a sequence of positive ints"):
        summary(abstract("lenet"), (1, 28, 28, 0))
    with pytest.raises(ValueError, match=r"LeNet: x must be"):
        summary(abstract("lenet"), (1, 32, 32, 1))


# --------------------------------------------------------------------------
# Blocks (the notes' examples)


def output(make_block, input_shape):
    """The block's output, abstractly: no parameters are drawn and nothing is compiled."""
    graphdef, state = nnx.split(nnx.eval_shape(make_block))
    return jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, jax.ShapeDtypeStruct(input_shape, jnp.float32))


def test_residual_shapes():
    chex.assert_shape(output(lambda: Residual(3, 3, rngs=nnx.Rngs(0)), (4, 6, 6, 3)), (4, 6, 6, 3))
    down = output(lambda: Residual(3, 6, use_1x1conv=True, strides=2, rngs=nnx.Rngs(0)), (4, 6, 6, 3))
    chex.assert_shape(down, (4, 3, 3, 6))
    chex.assert_shape(output(lambda: Residual(3, 6, use_1x1conv=True, rngs=nnx.Rngs(0)), (1, 5, 7, 3)), (1, 5, 7, 6))
    with pytest.raises(ValueError, match=r"Residual: .*needs use_1x1conv=True"):
        Residual(3, 6, rngs=nnx.Rngs(0))


def test_resnext_block():
    make = lambda: ResNeXtBlock(32, 32, 16, 1, rngs=nnx.Rngs(0))  # d2l's ResNeXtBlock(32, 16, 1)
    chex.assert_shape(output(make, (4, 6, 6, 32)), (4, 6, 6, 32))
    assert nnx.eval_shape(make).conv2.kernel.shape == (3, 3, 16, 32)  # 32 // 16 = 2 groups of 16 channels
    make = lambda: ResNeXtBlock(32, 64, 8, 0.5, use_1x1conv=True, strides=2, rngs=nnx.Rngs(0))
    chex.assert_shape(output(make, (2, 6, 6, 32)), (2, 3, 3, 64))
    assert nnx.eval_shape(make).conv2.kernel.shape == (3, 3, 8, 32)  # 32 // 8 = 4 groups of 8
    with pytest.raises(ValueError, match=r"ResNeXtBlock: groups=12 .* must divide bot_channels=.* = 32"):
        ResNeXtBlock(32, 32, 12, 1, rngs=nnx.Rngs(0))


# --------------------------------------------------------------------------
# Train and eval modes


def test_dropout_only_in_train_mode_with_rngs(vgg):
    x = images(2, 16)
    key = lambda k: nnx.Rngs(dropout=k)
    vgg.train()
    a, b, a2 = vgg(x, rngs=key(1)), vgg(x, rngs=key(2)), vgg(x, rngs=key(1))
    chex.assert_shape(a, (2, 10))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, a2)
    with pytest.raises(ValueError, match="no `rngs`"):
        vgg(x)
    vgg.eval()
    e = vgg(x)
    np.testing.assert_array_equal(e, vgg(x, rngs=key(1)))
    np.testing.assert_array_equal(e, vgg(x, rngs=key(2)))
    assert not np.allclose(e, a)
    vgg.train()


def test_batch_norm_train_updates_stats_eval_uses_them():
    model = models.create("lenet_bn")
    forward = nnx.jit(lambda m, x: m(x))  # one compile per mode and shape instead of one per op
    x = images(4, 28)
    stats = lambda: [np.array(v) for v in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]  # copies
    before = stats()
    y_train = forward(model, x)
    after = stats()
    assert len(after) == 8 and all(not np.allclose(u, v) for u, v in zip(before, after))
    # Train mode normalises with the batch's statistics: an example's logits depend on the others.
    others = x.at[1:].set(images(3, 28, seed=1))
    assert not np.allclose(forward(model, others)[0], y_train[0], atol=1e-4)
    trained = stats()
    model.eval()
    y_eval = forward(model, x)
    chex.assert_trees_all_equal(stats(), trained)  # eval leaves the running statistics alone
    # Eval mode uses the running statistics: each example on its own.
    np.testing.assert_allclose(forward(model, others)[0], y_eval[0], rtol=1e-5, atol=1e-5)
    assert not np.allclose(y_eval, y_train, atol=1e-3)


# --------------------------------------------------------------------------
# Precision


def _eqns(jaxpr):
    """Every equation, including those inside sub-jaxprs (jit, cond, custom_jvp, platform_dependent)."""
    for e in jaxpr.eqns:
        yield e
        for p in jax.tree.leaves(list(e.params.values()), is_leaf=lambda v: isinstance(v, jax.extend.core.ClosedJaxpr)):
            sub = getattr(p, "jaxpr", p)
            if isinstance(sub, jax.extend.core.Jaxpr):
                yield from _eqns(sub)


@pytest.mark.parametrize("name", [n for n in models.names() if n != "lenet"])
def test_bf16_computes_in_bf16_with_f32_params_and_logits(name):
    size = {"lenet_bn": 28, "alexnet": 65, "nin": 67}.get(name, 32)
    model = abstract(name, image_size=size, dtype="bfloat16" if name == "lenet_bn" else jnp.bfloat16)
    for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)) + jax.tree.leaves(nnx.state(model, nnx.BatchStat)):
        assert leaf.dtype == jnp.float32
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((2, size, size, 1), jnp.float32)

    def layer_outputs(state, x):
        m = nnx.merge(graphdef, state)
        m.eval()  # no dropout key needed
        outputs, h = [], x
        for layer in m.net.layers:
            h = layer(h)
            outputs.append(h)
        return outputs, m(x)

    outputs, logits = jax.eval_shape(layer_outputs, state, x)
    assert [o.dtype for o in outputs] == [jnp.bfloat16] * len(outputs)  # activations, the last layer's logits too
    assert logits.dtype == jnp.float32  # ... which the model returns as float32
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x, rngs=nnx.Rngs(dropout=0)))(state, x)  # train mode
    products = [e for e in _eqns(jaxpr.jaxpr) if e.primitive.name in ("conv_general_dilated", "dot_general")]
    assert products
    for e in products:
        assert [v.aval.dtype for v in e.invars] == [jnp.bfloat16] * 2, e


def test_bf16_lenet_runs_close_to_f32():
    x = images(2, 28)
    forward = nnx.jit(lambda m, x: m(x))
    y32 = forward(models.create("lenet", activation="relu"), x)
    y16 = forward(models.create("lenet", activation="relu", dtype=jnp.bfloat16), x)
    chex.assert_type(y16, jnp.float32)
    np.testing.assert_allclose(y16, y32, rtol=0.1, atol=0.05)


# --------------------------------------------------------------------------
# Plain jax.jit over split state (the trainer's way)


def _train_step_grads(graphdef):
    """The trainer's shape of step: plain jax.jit over pure params and batch stats."""

    def loss(params, batch_stats, x, key):
        model = nnx.merge(graphdef, params, batch_stats)
        logits = model(x, rngs=nnx.Rngs(dropout=key))
        loss = jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[:, 0])  # cross-entropy, label 0
        return loss, (logits, nnx.as_pure(nnx.state(model, nnx.BatchStat)))

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.mark.parametrize("name", ["resnet", "vgg"])
def test_jit_over_split_state(name, resnet, vgg):
    model, size = (resnet, 32) if name == "resnet" else (vgg, 16)
    model.train()
    x = images(2, size, seed=3)
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    params, batch_stats = nnx.as_pure(params), nnx.as_pure(batch_stats)
    (loss, (logits, new_stats)), grads = _train_step_grads(graphdef)(params, batch_stats, x, jax.random.key(0))
    chex.assert_shape(logits, (2, 10))
    chex.assert_type([logits, loss], jnp.float32)
    chex.assert_tree_all_finite((loss, grads))
    chex.assert_trees_all_equal_shapes_and_dtypes(grads, params)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads)[-2:])  # the classifier learns
    chex.assert_trees_all_equal_structs(new_stats, batch_stats)
    if name == "resnet":
        assert not np.allclose(jax.tree.leaves(new_stats)[0], jax.tree.leaves(batch_stats)[0])
    # The eval graphdef, merged under jit, is in eval mode: running statistics and no dropout,
    # so its logits differ from the train-mode ones (and need no key).
    model.eval()
    eval_def, _, _ = nnx.split(model, nnx.Param, nnx.BatchStat)
    model.train()
    assert eval_def != graphdef
    y = jax.jit(lambda p, b, x: nnx.merge(eval_def, p, b)(x))(params, batch_stats, x)
    chex.assert_tree_all_finite(y)
    assert not np.allclose(y, logits, atol=1e-3)
