"""jaxcnn.interop against PyTorch: every registered model, given its PyTorch twin's random weights
(tests/torch_twins.py), computes the twin's eval-mode logits; the export is the twin's state_dict,
key for key and bit for bit; bad state dicts name the key at fault.

PyTorch is a test-only dependency (the `torch` extra, in `test`): without it these tests skip.
"""

import ast
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcnn import interop, layers, models

torch = pytest.importorskip("torch", reason="the interop tests compare with PyTorch: pip install -e '.[torch]'")
import torch_twins  # noqa: E402  (imports torch: after the skip)

# Small inputs keep compiles cheap, each still exercising what the model's size changes: VGG at 64
# and AlexNet at 97 flatten a 2 x 2 map (so the dense rows are permuted), NiN at 67 is its minimum.
# ResNet-50 runs as torchvision's ImageNet model: 3 channels, 1000 classes.
CASES = {
    "lenet": (28, {}),
    "lenet_bn": (28, {}),
    "alexnet": (97, {}),
    "vgg11": (64, {}),
    "nin": (67, {}),
    "googlenet": (32, {}),
    "resnet18": (32, {}),
    "resnext18": (32, {}),
    "densenet": (32, {}),
    "regnetx32": (32, {}),
    "resnet34": (32, {}),
    "resnet50": (32, {"in_channels": 3, "num_classes": 1000}),
}


def abstract(name, size, **kw):
    return nnx.eval_shape(lambda: models.create(name, image_size=size, **kw))


def eval_logits(model, x):
    model.eval()
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x))


def torch_numpy(state_dict) -> dict:
    return {k: v.numpy() for k, v in state_dict.items()}


def test_every_registered_model_has_a_case():
    assert set(CASES) == set(models.names())


@pytest.mark.parametrize("name", CASES)
def test_twin_weights_give_the_twins_logits_and_export_back(name, monkeypatch):
    # The twin and the mapping are what is tested; XLA's conv compiles fastest (the lowerings are
    # checked against each other in test_ops and test_lowering).
    monkeypatch.setenv("JAXCNN_CONV_LOWERING", "xla")
    size, kw = CASES[name]
    twin = torch_twins.build(name, size, **kw)
    model = abstract(name, size, **kw)
    interop.load_torch_state_dict(model, twin.state_dict())  # the abstract model becomes concrete

    channels = kw.get("in_channels", 1)
    x = np.random.default_rng(0).normal(size=(2, size, size, channels)).astype(np.float32)
    with torch.no_grad():
        expected = twin(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    got = eval_logits(model, jnp.asarray(x))
    chex.assert_shape(got, (2, kw.get("num_classes", 10)))
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max(), name

    # Export: the twin's own state_dict, exactly, and torch loads it (strict).
    exported = interop.to_torch_state_dict(model)
    original = torch_numpy(twin.state_dict())
    assert set(exported) == set(original)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()})

    # Round trip: the export loads into a fresh model as the very same state.
    again = abstract(name, size, **kw)
    interop.load_torch_state_dict(again, exported)
    chex.assert_trees_all_equal(nnx.state(again), nnx.state(model))


# --------------------------------------------------------------------------
# Bad state dicts, and the rest of the contract, on LeNet-BN.


@pytest.fixture(scope="module")
def lenet_bn():
    twin = torch_twins.build("lenet_bn", 28)
    return twin, torch_numpy(twin.state_dict())


def loaded(state_dict):
    model = abstract("lenet_bn", 28)
    interop.load_torch_state_dict(model, state_dict)
    return model


def test_flatten_order_and_batch_norm_statistics(lenet_bn):
    _, sd = lenet_bn
    model = loaded(sd)
    # The first dense layer's input is 16 x 5 x 5: torch's column c * 25 + h * 5 + w is jaxcnn's row
    # (h * 5 + w) * 16 + c.
    dense = model.net.layers[9]
    c, h, w = 7, 2, 3
    assert np.array_equal(dense.kernel[...][(h * 5 + w) * 16 + c], sd["net.9.weight"][:, c * 25 + h * 5 + w])
    assert np.array_equal(model.net.layers[0].kernel[...], sd["net.0.weight"].transpose(2, 3, 1, 0))
    bn = model.net.layers[1]
    for attr, key in (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"), ("var", "running_var")):
        assert np.array_equal(getattr(bn, attr)[...], sd[f"net.1.{key}"]), attr


def test_load_casts_and_ignores_num_batches_tracked(lenet_bn):
    _, sd = lenet_bn
    as_f64 = {k: v.astype(np.float64) for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    model = loaded(as_f64)  # no num_batches_tracked at all is fine too
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model))} == {jnp.dtype(jnp.float32)}
    exported = interop.to_torch_state_dict(model)
    assert exported["net.1.num_batches_tracked"].dtype == np.int64 and exported["net.1.num_batches_tracked"] == 0


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda sd: sd.pop("net.4.weight"), r"missing key 'net.4.weight' \(the model's Conv2D 4.kernel\)"),
        (lambda sd: sd.update({"net.99.weight": np.zeros(3)}), r"unexpected key 'net.99.weight'"),
        (lambda sd: sd.update({"net.0.num_batches_tracked": np.zeros(())}), r"unexpected key 'net.0.num_batches"),
        (
            lambda sd: sd.update({"net.0.weight": np.zeros((6, 3, 5, 5))}),
            r"'net.0.weight' has shape \(6, 3, 5, 5\), expected \(6, 1, 5, 5\) for the model's Conv2D 0.kernel",
        ),
        (
            lambda sd: sd.update({"net.15.weight": np.zeros((10, 83))}),
            r"'net.15.weight' has shape \(10, 83\), expected \(10, 84\)",
        ),
    ],
)
def test_bad_state_dicts_name_the_key_and_leave_the_model_alone(lenet_bn, change, message):
    _, sd = lenet_bn
    model = loaded(sd)
    before = jax.tree.map(np.array, nnx.state(model))
    bad = dict(sd)
    change(bad)
    with pytest.raises(ValueError, match=r"load_torch_state_dict: " + message):
        interop.load_torch_state_dict(model, bad)
    chex.assert_trees_all_equal(nnx.state(model), before)


def test_other_bad_input():
    prefixed = {"module." + k: v for k, v in torch_numpy(torch_twins.build("lenet", 28).state_dict()).items()}
    with pytest.raises(ValueError, match=r"missing key 'net.0.weight'.*first key is 'module.net.0.weight'"):
        interop.load_torch_state_dict(abstract("lenet", 28), prefixed)
    with pytest.raises(ValueError, match=r"load_torch_state_dict: state_dict must be a mapping"):
        interop.load_torch_state_dict(abstract("lenet", 28), [np.zeros(3)])
    flax_conv = nnx.Sequential(nnx.Conv(1, 2, (3, 3), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"to_torch_state_dict: no PyTorch name for layers.0.bias of Sequential"):
        interop.to_torch_state_dict(flax_conv)
    with pytest.raises(ValueError, match=r"to_torch_state_dict: the model is abstract"):
        interop.to_torch_state_dict(abstract("lenet", 28))
    with pytest.raises(ValueError, match=r"to_torch_state_dict: model must be an nnx.Sequential or have one as .net"):
        interop.to_torch_state_dict(layers.Conv2D(1, 2, 3, rngs=nnx.Rngs(0)))


def test_the_runtime_never_imports_torch():
    package = pathlib.Path(interop.__file__).parent
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "torch" or n.startswith("torch.") for n in names), path
