"""experiments.feature_maps end to end, on a LeNet trained in-process for one tiny epoch."""

import json
import re

import chex
import jax
import numpy as np
import pytest

from experiments import feature_maps, lenet
from jaxcnn import checkpoint, data, models

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lenet") / "run"
    argv = ["--dataset", "mnist_10k", "--train-examples", "256", "--test-examples", "64", "--batch-size", "32",
            "--epochs", "1", "--workdir", str(workdir)]  # fmt: skip
    assert lenet.main(argv) == 0
    return workdir


def test_feature_maps_of_a_trained_lenet(run, capsys):
    results = feature_maps.main(["--workdir", str(run), "--images", "3,0"])
    out = capsys.readouterr().out

    assert results["shapes"] == {"conv1": (28, 28, 6), "conv2": (10, 10, 16)}
    assert "conv1: activations (28, 28, 6)" in out and "conv2: activations (10, 10, 16)" in out
    maps = results["activations"]
    chex.assert_shape([maps["conv1"], maps["conv2"]], [(2, 28, 28, 6), (2, 10, 10, 16)])
    for name in ("conv1", "conv2"):
        png = (run / "feature_maps" / f"{name}.png").read_bytes()
        assert png[:8] == PNG_MAGIC and len(png) > 1000
        assert results["files"][name] == str(run / "feature_maps" / f"{name}.png")

    # The maps are the trained model's own: sigmoid(conv1(x)) of the chosen test images, in order.
    model, _ = checkpoint.load_model(run)
    test = data.load("mnist_10k").test
    assert results["labels"] == [int(test.labels[3]), int(test.labels[0])]
    x = data.preprocess(test.images[[3, 0]], 28)
    expected = jax.nn.sigmoid(model.net.layers[0](x))
    np.testing.assert_allclose(results["activations"]["conv1"], expected, rtol=1e-5, atol=1e-6)
    conv2 = results["activations"]["conv2"]
    assert 0 < conv2.min() and conv2.max() < 1 and conv2[0].std() > 0
    assert not np.allclose(conv2[0], conv2[1])  # two different digits


def test_lenet_bn_maps_come_after_batch_norm_and_the_activation():
    model = models.create("lenet_bn", activation="relu")
    model.eval()
    conv, bn = model.net.layers[0], model.net.layers[1]
    bn.scale.value = bn.scale.value * 3.0  # so that skipping batch norm would show
    bn.bias.value = bn.bias.value - 0.1
    x = np.random.default_rng(0).uniform(size=(2, 28, 28, 1)).astype(np.float32)
    maps = feature_maps.conv_activations(model, x)
    assert list(maps) == ["conv1", "conv2"]
    chex.assert_shape([maps["conv1"], maps["conv2"]], [(2, 28, 28, 6), (2, 10, 10, 16)])
    np.testing.assert_allclose(maps["conv1"], jax.nn.relu(bn(conv(x))), rtol=1e-5, atol=1e-6)
    assert (maps["conv1"] == 0).any()  # ReLU's zeros, not the pre-activation


def test_out_directory(run, tmp_path, capsys):
    feature_maps.main(["--workdir", str(run), "--images", "1", "--out", str(tmp_path / "maps")])
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["conv1.png", "conv2.png"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--images", "0,x"], "must be comma-separated indices such as 0,1,2"),
        (["--images", "-1"], "indices must be >= 0"),
        (["--images", "0,99999"], r"--images \[99999\] outside the \d+ test images of mnist_10k"),
    ],
)
def test_bad_images(run, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        feature_maps.main(["--workdir", str(run), *argv])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_bad_workdirs(tmp_path, capsys):
    def error(workdir) -> str:
        with pytest.raises(SystemExit) as exit_info:
            feature_maps.main(["--workdir", str(workdir)])
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    assert "no finished run" in error(tmp_path / "missing")
    unfinished = tmp_path / "unfinished"  # a run stopped before writing model/
    unfinished.mkdir()
    (unfinished / "config.json").write_text(json.dumps({"model": "lenet"}))
    assert "no finished run" in error(unfinished)
    vgg = tmp_path / "vgg"
    vgg.mkdir()
    (vgg / "config.json").write_text(json.dumps({"model": "vgg11"}))
    assert "holds a 'vgg11' run; feature maps need a LeNet" in error(vgg)


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        feature_maps.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--workdir" in out and "--images" in out and "--out" in out
