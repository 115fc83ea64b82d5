"""jaxcnn.analysis on the registered models: receptive fields (the notes' numbers, and every
output element's field against its gradient support) and per-model cost against XLA.

Small images keep compiles cheap; a VGG at 1/16 width has the same fields.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcnn import analysis, layers, models

# name: (create options, input height and width)
MODELS = {
    "lenet": ({}, 28),
    "vgg11": ({"image_size": 32, "width_divisor": 16}, 32),
    "resnet18": ({"image_size": 64}, 64),
    "resnext18": ({"image_size": 32}, 32),  # grouped 3x3 convs, three-conv main path
    # The modern-CNN chapter's other kinds of block, at small sizes.
    "googlenet": ({"image_size": 32}, 32),  # Inception: four concatenated branches, one a pool
    "densenet": ({"image_size": 32}, 32),  # dense blocks: the input concatenated to what each conv adds
    "resnet50": ({"image_size": 32}, 32),  # bottlenecks, a 1x1 conv and BatchNorm on the shortcut
}
# The rest are made of the kinds above (AlexNet and NiN are plain Sequentials, as VGG; RegNetX-32's
# stages are ResNeXt blocks; ResNet-34's BasicBlock is Residual with ResNet-50's shortcut): their
# fields and costs are computed, not compiled, at the smallest size that keeps all their layers.
OTHERS = {"alexnet": 65, "nin": 67, "regnetx32": 32, "resnet34": 32}


@functools.cache
def model(name):
    """LeNet for real; VGG and ResNet abstract (nnx.eval_shape): the analysis reads only
    shapes and attributes, and initialising VGG's 4096-unit dense layers costs seconds."""
    create = functools.partial(models.create, name, **MODELS[name][0])
    return create() if name == "lenet" else nnx.eval_shape(create)


def by_name(rows) -> dict:
    return {r.name: r for r in rows}


def clipped_boxes(field, input_hw) -> np.ndarray:
    """bool (H_o, W_o, H, W): output (i, j)'s box start + i * jump + [0, size), clipped to the input."""
    masks = []
    for n_out, n_in, a, j, r in zip(field.out_hw, input_hw, field.start, field.jump, field.size):
        lo = a + j * np.arange(n_out)[:, None]
        pixel = np.arange(n_in)
        masks.append((pixel >= lo) & (pixel < lo + r))
    return masks[0][:, None, :, None] & masks[1][None, :, None, :]


# --------------------------------------------------------------------------
# The arithmetic, by hand.


def test_lenet_fields_are_the_notes():
    rows = analysis.receptive_fields(model("lenet"))
    got = [(r.name, r.layer, r.size[0], r.jump[0], r.start[0], r.out_hw) for r in rows]
    assert got == [
        ("0", "Conv2D", 5, 1, -2, (28, 28)),  # 5x5, padding 2
        ("2", "AvgPool2D", 6, 2, -2, (14, 14)),
        ("3", "Conv2D", 14, 2, -2, (10, 10)),
        ("5", "AvgPool2D", 16, 4, -2, (5, 5)),
    ]
    assert all(r.size[0] == r.size[1] and r.jump[0] == r.jump[1] and r.start[0] == r.start[1] for r in rows)
    # The centre output of conv2 sees rows -2 + 5 * 2 = 8 up to 21.
    assert rows[2].box((5, 5)) == ((8, 22), (8, 22))


def test_resnet18_fields():
    rows = analysis.receptive_fields(model("resnet18"), 64)
    f = by_name(rows)
    assert (f["0.0"].size, f["0.0"].jump) == ((7, 7), (2, 2))  # 7x7/2 stem
    assert (f["0.3"].layer, f["0.3"].size, f["0.3"].jump) == ("MaxPool2D", (11, 11), (4, 4))
    # Each 3x3 conv adds 2 jumps; the last stage ends at 435 pixels, 32 apart.
    assert (f["4.1"].size, f["4.1"].jump) == ((435, 435), (32, 32))
    assert (f["5.0"].layer, f["5.0"].out_hw, f["5.0"].size) == ("GlobalAvgPool2D", (1, 1), (435 + 32, 435 + 32))
    # A block's field is its main path's; the shortcut's (identity or 1x1 conv) lies inside it.
    blocks = [r for r in rows if r.layer == "Residual"]
    assert len(blocks) == 8
    for block in blocks:
        main = f[f"{block.name}.conv2"]
        assert (block.size, block.jump, block.start) == (main.size, main.jump, main.start)
        if f"{block.name}.conv3" in f:
            shortcut = f[f"{block.name}.conv3"]
            (lo, hi), _ = shortcut.box((0, 0))
            assert block.start[0] < lo and hi < block.start[0] + block.size[0]


def test_vgg11_fields_do_not_depend_on_width_or_image_size():
    def fields(**options):
        vgg = nnx.eval_shape(lambda: models.create("vgg11", **options))
        return [(r.name, r.size, r.jump, r.start) for r in analysis.receptive_fields(vgg)]

    narrow = fields(image_size=32, width_divisor=16)
    assert narrow == fields(image_size=64, width_divisor=8)
    # 3x3 convs add 2 jumps, 2x2/2 pools 1: 3 4 | 8 10 | 18 26 30 | 46 62 70 | 102 134 150.
    assert [r[1][0] for r in narrow] == [3, 4, 8, 10, 18, 26, 30, 46, 62, 70, 102, 134, 150]
    assert narrow[-1][2] == (32, 32)


# --------------------------------------------------------------------------
# The arithmetic against JAX's derivatives.


@pytest.mark.parametrize("name", MODELS)
def test_every_field_is_the_gradient_support(name):
    m, hw = model(name), MODELS[name][1]
    rows = analysis.receptive_fields(m, hw)
    support = analysis.gradient_support(m, hw)
    assert list(support) == [r.name for r in rows]
    for r in rows:
        chex.assert_shape(support[r.name], (*r.out_hw, hw, hw))
        np.testing.assert_array_equal(support[r.name], clipped_boxes(r, (hw, hw)), err_msg=f"{name} {r.name}")
    # The check has teeth: a corner element's field is cut by the border, and for the
    # early layers the centre element's lies wholly inside the input.
    first = rows[0]
    (lo, hi), _ = first.box((0, 0))
    assert support[first.name][0, 0].sum() == (hi - max(lo, 0)) ** 2
    assert (support[first.name][0, 0].sum() < first.size[0] ** 2) == (lo < 0)  # NiN's first conv has no padding
    for r in rows[:3]:
        centre = tuple(n // 2 for n in r.out_hw)
        assert support[r.name][centre].sum() == r.size[0] * r.size[1]


def test_support_of_strided_same_ceil_mode_and_dilated_layers():
    """Asymmetric "SAME" padding, ceil mode, non-square kernels and input; dilation leaves holes in the box."""
    rngs = nnx.Rngs(0)
    net = nnx.Sequential(
        layers.Conv2D(1, 2, 3, stride=2, padding="SAME", rngs=rngs),
        jax.nn.relu,
        layers.MaxPool2D(3, stride=2, padding=1, ceil_mode=True),
        layers.Conv2D(2, 2, (3, 1), padding=(1, 0), rngs=rngs),
        layers.AvgPool2D((1, 2)),
        layers.Conv2D(2, 1, 2, dilation=2, rngs=rngs),
    )
    hw = (14, 19)
    rows = analysis.receptive_fields(net, hw)
    assert [r.out_hw for r in rows] == [(7, 10), (4, 6), (4, 6), (4, 3), (2, 1)]
    # "SAME" pads (0, 1) rows for 14 but (1, 1) columns for 19: the first field starts at (0, -1).
    assert rows[0].start == (0, -1)
    support = analysis.gradient_support(net, hw)
    for r in rows[:-1]:
        np.testing.assert_array_equal(support[r.name], clipped_boxes(r, hw), err_msg=r.name)
    # The dilated 2x2 kernel skips the middle of its span: its box holds pixels no path reaches.
    last = rows[-1]
    box = clipped_boxes(last, hw)
    assert (support[last.name] <= box).all() and support[last.name].sum() < box.sum()


# --------------------------------------------------------------------------
# Cost.


def xla_flops(m, input_shape) -> float:
    graphdef, state = nnx.split(m)

    def forward(state, x):
        copy = nnx.merge(graphdef, state)
        copy.eval()
        return copy(x)

    x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    return jax.jit(forward).lower(state, x).compile().cost_analysis()["flops"]


@pytest.mark.parametrize("name", MODELS)
def test_model_cost_matches_xla(name, monkeypatch):
    # XLA's own convolution: a patches-and-matmul lowering of ops.conv2d would also multiply the padding.
    monkeypatch.setenv("JAXCNN_CONV_LOWERING", "xla")
    m, hw = model(name), MODELS[name][1]
    shape = (2, hw, hw, 1)
    rows, total = analysis.model_cost(m, shape)

    # A row per conv and dense layer of the model, each doing |kernel| multiply-adds per output position.
    modules = {
        ".".join(str(k) for k in path[1:] if k != "layers"): node  # path[0] is the model's .net
        for path, node in nnx.iter_graph(m)
        if isinstance(node, (layers.Conv2D, nnx.Linear))
    }
    assert sorted(r["name"] for r in rows) == sorted(modules)
    for r in rows:
        positions = int(np.prod(r["output_shape"][:-1]))
        assert r["macs"] == modules[r["name"]].kernel.size * positions, r["name"]
        assert r["macs_unpadded"] <= r["macs"] and r["flops"] >= 2 * r["macs_unpadded"]
    assert total["macs"] == sum(r["macs"] for r in rows)

    # XLA counts our flops exactly, plus elementwise and windowed work: a few flops per
    # element of each conv or dense output (batch norm, activation, pooling, residual add).
    xla = xla_flops(m, shape)
    activations = sum(np.prod(r["output_shape"]) for r in rows)
    # (DenseNet reads 10.1 per element: its 2x2 average pools, a sum of views, are counted with their producers.)
    assert total["flops"] <= xla <= total["flops"] + 12 * activations
    if name == "resnet18":
        assert xla - total["flops"] < 0.01 * xla  # the convolutions dominate


# --------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("name", OTHERS)
def test_fields_and_cost_of_the_other_models(name):
    hw = OTHERS[name]
    m = nnx.eval_shape(lambda: models.create(name, image_size=hw))
    rows = analysis.receptive_fields(m, hw)
    assert rows and all(r.out_hw is not None and r.size[0] >= 1 for r in rows)
    assert rows[-1].layer == ("MaxPool2D" if name == "alexnet" else "GlobalAvgPool2D")
    convs = [node for _, node in nnx.iter_graph(m) if isinstance(node, layers.Conv2D)]
    cost_rows, total = analysis.model_cost(m, (1, hw, hw, 1))
    assert sum(r["layer"] == "Conv2D" for r in cost_rows) == len(convs)
    assert total["macs"] == sum(r["macs"] for r in cost_rows) > 0


def test_bad_input_raises():
    resnet = model("resnet18")
    with pytest.raises(ValueError, match="receptive_fields: model must be an nnx.Sequential"):
        analysis.receptive_fields(object())
    with pytest.raises(ValueError, match="receptive_fields: GlobalAvgPool2D.*pass input_hw"):
        analysis.receptive_fields(resnet)  # ResNet pools globally and has no fixed image size
    with pytest.raises(ValueError, match="receptive_fields: input_hw"):
        analysis.receptive_fields(resnet, (64, 0))
    with pytest.raises(ValueError, match="receptive_fields: no receptive-field rule for layer Conv"):
        analysis.receptive_fields(nnx.Sequential(nnx.Conv(1, 1, (3, 3), rngs=nnx.Rngs(0))), 8)
    with pytest.raises(ValueError, match="gradient_support: the model has no image_size"):
        analysis.gradient_support(nnx.Sequential(layers.Conv2D(1, 1, 3, rngs=nnx.Rngs(0))))
    for shape in [(28, 28, 1), (1, 28, 28, 0), [1, 28.0, 28, 1], "1x28x28x1"]:
        with pytest.raises(ValueError, match="model_cost: input_shape must be 4 positive ints"):
            analysis.model_cost(model("lenet"), shape)
    with pytest.raises(ValueError, match="LeNet: x must be"):
        analysis.model_cost(model("lenet"), (1, 32, 32, 1))
