"""experiments.feature_maps end to end, on a LeNet trained in-process for one tiny epoch."""

import json
import re

import chex
import jax
import numpy as np
import pytest

from experiments import feature_maps, lenet
from jaxcnn import checkpoint, data, models


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lenet") / "run"
    argv = ["--dataset", "mnist_10k", "--train-examples", "256", "--test-examples", "64", "--batch-size", "32",
            "--epochs", "1", "--workdir", str(workdir)]  # fmt: skip
    assert lenet.main(argv) == 0
    return workdir


def test_feature_maps_of_a_trained_lenet(run, capsys, assert_figure_png):
    results = feature_maps.main(["--workdir", str(run), "--images", "3,0"])
    out = capsys.readouterr().out

    assert results["shapes"] == {"conv1": (28, 28, 6), "conv2": (10, 10, 16)}
    assert "conv1: activations (28, 28, 6)" in out and "conv2: activations (10, 10, 16)" in out
    maps = results["activations"]
    chex.assert_shape([maps["conv1"], maps["conv2"]], [(2, 28, 28, 6), (2, 10, 10, 16)])
    (out_dir,) = run.glob("feature_maps-*")  # a new dated directory in the run's
    assert re.fullmatch(r"feature_maps-\d{8}-\d{6}", out_dir.name)
    # A row per image, a column per channel and the input, each at least ~1 inch at 100 dpi.
    for name, size in (("conv1", (700, 300)), ("conv2", (1800, 300))):
        assert results["files"][name] == str(out_dir / f"{name}.png")
        assert_figure_png(out_dir / f"{name}.png", size)

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
    bn.scale[...] = bn.scale[...] * 3.0  # so that skipping batch norm would show
    bn.bias[...] = bn.bias[...] - 0.1
    x = np.random.default_rng(0).uniform(size=(2, 28, 28, 1)).astype(np.float32)
    maps = feature_maps.conv_activations(model, x)
    assert list(maps) == ["conv1", "conv2"]
    chex.assert_shape([maps["conv1"], maps["conv2"]], [(2, 28, 28, 6), (2, 10, 10, 16)])
    np.testing.assert_allclose(maps["conv1"], jax.nn.relu(bn(conv(x))), rtol=1e-5, atol=1e-6)
    assert (maps["conv1"] == 0).any()  # ReLU's zeros, not the pre-activation


def test_figure_text_is_readable(smallest_font):
    maps = np.random.default_rng(0).uniform(size=(3, 10, 10, 16))
    fig = feature_maps.figure(np.zeros((3, 28, 28, 1)), maps, ["#0 (label 7)", "#1 (label 2)", "#2 (label 1)"], "conv2")
    assert smallest_font(fig) >= 9


def test_out_directory_is_not_overwritten_unless_asked(run, tmp_path, capsys):
    def maps_of(image: str, *extra):
        return feature_maps.main(["--workdir", str(run), "--images", image, "--out", str(tmp_path / "maps"), *extra])

    maps_of("1")
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["conv1.png", "conv2.png"]
    before = (tmp_path / "maps" / "conv1.png").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        maps_of("0")
    assert exit_info.value.code == 2
    assert "already holds conv1.png, conv2.png" in capsys.readouterr().err
    assert (tmp_path / "maps" / "conv1.png").read_bytes() == before
    assert maps_of("0", "--overwrite")["images"] == [0]
    assert (tmp_path / "maps" / "conv1.png").read_bytes() != before


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


def test_help_states_each_default_once(capsys):
    with pytest.raises(SystemExit) as exit_info:
        feature_maps.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    entries = {entry.split()[0]: " ".join(entry.split()) for entry in re.split(r"\n  (?=-)", out)[1:]}
    assert "(default: 0,1,2)" in entries["--images"]
    assert "(default: a new WORKDIR/feature_maps-DATE-TIME/)" in entries["--out"]
    assert "--workdir" in entries and "--overwrite" in entries
    assert all(entry.count("default") <= 1 for entry in entries.values()), entries
