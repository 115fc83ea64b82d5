"""The notes' experiments end to end, in-process (one jax import), on their default settings."""

import contextlib
import io
import json
import re

import chex
import numpy as np
import pytest

from experiments import edge_detection, pooling
from jaxcnn import reference


@pytest.fixture(scope="module")
def edge_run(tmp_path_factory):
    """edge_detection on its defaults: its results, what it printed, and its workdir."""
    workdir = tmp_path_factory.mktemp("edge_detection")
    with contextlib.redirect_stdout(io.StringIO()) as out:
        results = edge_detection.main(["--workdir", str(workdir)])
    return results, out.getvalue(), workdir


def test_edge_detection_reproduces_the_notes(edge_run, assert_figure_png, smallest_font):
    results, out, workdir = edge_run

    # The notes' output: 1 at the white-to-black edge, -1 back, nothing on the transposed image.
    np.testing.assert_array_equal(results["Y"], [[0, 1, 0, 0, 0, -1, 0]] * 6)
    np.testing.assert_array_equal(results["Y_transposed_X"], np.zeros((8, 5)))
    assert "[[ 1. -1.]]" in out

    # "step 2, loss 0.846"-like lines every 2 of --steps, agreeing with the losses recorded.
    logged = re.findall(r"^step (\d+), loss (\d+\.\d{3})$", out, re.MULTILINE)
    steps = results["steps"]
    assert [int(e) for e, _ in logged] == list(range(2, steps + 1, 2))
    np.testing.assert_allclose([float(v) for _, v in logged], results["losses"][1::2], atol=6e-4)
    assert all(a > b for a, b in zip(results["losses"], results["losses"][1:]))
    chex.assert_shape(np.asarray(results["kernels"]), (steps + 1, 1, 2))  # the start, then after each step
    assert results["learned_kernel"] == results["kernels"][-1]
    np.testing.assert_allclose(results["learned_kernel"], [[1.0, -1.0]], atol=0.05)

    # The exercise: a diagonal edge is seen by K and by K.T (contrary to the notes' "zero matrix").
    np.testing.assert_array_equal(results["diagonal_corr_K"], np.eye(6, 7))
    np.testing.assert_array_equal(results["diagonal_corr_K_T"], -np.eye(5, 8, k=1))
    np.testing.assert_array_equal(results["diagonal_transposed_corr_K"], -np.eye(8, 5, k=-1))

    assert json.loads((workdir / "results.json").read_text()) == results
    assert_figure_png(workdir / "edge_detection.png", (1200, 850))


def test_edge_detection_figure_draws_what_the_words_say(edge_run, smallest_font):
    """Images grey with 1 white; every kernel and output on one colour scale; the kernel at the image's cell size."""
    fig = edge_detection.figure(edge_run[0])
    grid_axes = [ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]
    by_title = {ax.get_title().split(" (")[0]: ax for ax in grid_axes}
    x_image = by_title["X"].images[0]
    assert x_image.cmap.name == "gray" and x_image.norm.vmin == 0 and x_image.norm.vmax == 1
    signed = [ax.images[0] for title, ax in by_title.items() if "X" != title != "diagonal X"]
    assert len({(im.norm.vmin, im.norm.vmax) for im in signed}) == 1 and signed[0].norm.vmin == -signed[0].norm.vmax
    # Equal axes limits and boxes: a cell is as big in the kernel's panel as in the image's.
    assert by_title["K"].get_xlim() == by_title["X"].get_xlim()
    assert by_title["K"].get_position().width == pytest.approx(by_title["X"].get_position().width)
    # One colour bar for the images and one for everything signed.
    assert sum(ax.get_label() == "<colorbar>" for ax in fig.axes) == 2
    # The learning curve: the losses and the kernel's two entries, step by step.
    loss_ax = next(ax for ax in fig.axes if ax.get_yscale() == "log")
    np.testing.assert_allclose(loss_ax.lines[0].get_ydata(), edge_run[0]["losses"])
    assert smallest_font(fig) >= 9


def test_a_new_dated_workdir_by_default_and_no_second_run_into_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    edge_detection.main(["--steps", "2"])
    (workdir,) = (tmp_path / "runs").iterdir()  # as the trainer names its runs
    assert re.fullmatch(r"edge_detection-\d{8}-\d{6}", workdir.name)
    assert sorted(p.name for p in workdir.iterdir()) == ["edge_detection.png", "results.json"]

    first = (workdir / "results.json").read_text()
    with pytest.raises(SystemExit) as exit_info:
        edge_detection.main(["--workdir", str(workdir), "--steps", "4"])
    assert exit_info.value.code == 2
    assert "already holds results.json, edge_detection.png" in capsys.readouterr().err
    assert (workdir / "results.json").read_text() == first
    assert edge_detection.main(["--workdir", str(workdir), "--steps", "4", "--overwrite"])["steps"] == 4
    assert json.loads((workdir / "results.json").read_text())["steps"] == 4


def test_edge_detection_default_steps_suffice_from_any_start(capsys):
    x = edge_detection.band_image()
    y = reference.corr2d(x, edge_detection.EDGE_KERNEL)
    for seed in range(1, 5):
        kernels, _ = edge_detection.learn_kernel(x, y, seed=seed, lr=3e-2, steps=14)
        np.testing.assert_allclose(kernels[-1], [[1.0, -1.0]], atol=0.05)
    # Why the default is not the notes' 10: from seed 0, 10 steps stop short.
    kernels, _ = edge_detection.learn_kernel(x, y, seed=0, lr=3e-2, steps=10)
    assert np.abs(kernels[-1] - [[1.0, -1.0]]).max() > 0.05


def test_pooling_reproduces_the_notes(tmp_path, capsys, assert_figure_png):
    results = pooling.main(["--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    x = np.asarray(results["input"])[None, :, :, None]
    pools = results["pools"]

    # nn.MaxPool2d(3, padding=1, stride=2) on arange(16) in the notes.
    np.testing.assert_array_equal(pools["max"], [[5, 7], [13, 15]])
    geometry = dict(stride=2, padding=1)
    np.testing.assert_allclose(pools["avg"], reference.avg_pool2d(x, 3, **geometry)[0, :, :, 0], rtol=1e-6)
    np.testing.assert_allclose(pools["min"], reference.min_pool2d(x, 3, **geometry)[0, :, :, 0])
    soft = np.asarray(pools["soft T=1"])
    assert np.all(soft >= np.asarray(pools["avg"]) - 1e-5) and np.all(soft <= np.asarray(pools["max"]) + 1e-5)
    assert "max:\n[[ 5.  7.]\n [13. 15.]]" in out

    changed = {(r["shift"], r["stage"]): r["changed"] / r["total"] for r in results["shift"]}
    for shift in (-1, 1):
        assert changed[shift, "conv"] == 24 / 42  # the two edge columns left and arrived, every row
        assert changed[shift, "max 2x2 stride 1"] < changed[shift, "conv"]
    # Stride-2 pooling absorbs a shift that keeps each edge inside its window, and not one that crosses it.
    assert changed[-1, "max 2x2 stride 2"] == 0
    assert re.search(r"shift -1  max 2x2 stride 2\s+0 / 9", out)
    for stage in ("max 2x2 stride 2", "avg 2x2 stride 2", "max 2x2 stride 2 of |conv|"):
        assert changed[1, stage] > 0.5

    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert_figure_png(tmp_path / "pooling.png", (1300, 1350))


def test_pooling_invariance_is_not_only_a_lost_negative_edge():
    """Max pooling the signed edge map drops its -1 edge; average pooling and max pooling of |conv| keep both
    edges, and a shift within the window still changes nothing."""
    rows, maps = pooling.shift_sensitivity(pooling.band_image(), 1)
    changed = {(r["shift"], r["stage"]): r["changed"] for r in rows}
    assert maps["max 2x2 stride 2"][0].min() == 0  # the -1 edge is gone
    np.testing.assert_array_equal(maps["avg 2x2 stride 2"][0], [[0.5, 0, -0.5]] * 3)
    np.testing.assert_array_equal(maps["max 2x2 stride 2 of |conv|"][0], [[1, 0, 1]] * 3)
    assert changed[-1, "avg 2x2 stride 2"] == changed[-1, "max 2x2 stride 2 of |conv|"] == 0


def test_pooling_figure_draws_the_counts_and_average_beside_max(smallest_font):
    x = np.arange(16, dtype=np.float32).reshape(4, 4)
    rows, maps = pooling.shift_sensitivity(pooling.band_image(), 1)
    fig = pooling.figure(x, pooling.pool_all(x, 3, 2, 1, 1.0), pooling.band_image(), 1, rows, maps, "3x3")
    titles = [ax.get_title() for ax in fig.axes]
    for stage in pooling.DRAWN_STAGES:
        assert sum(t.startswith(f"{stage} (") for t in titles) == 3  # shift -1, unshifted, +1
    bars = next(ax for ax in fig.axes if ax.containers)
    for container, shift in zip(bars.containers, (-1, 1)):
        expected = [r["changed"] / r["total"] for r in rows if r["shift"] == shift]
        np.testing.assert_allclose([bar.get_height() for bar in container], expected)
    assert smallest_font(fig) >= 9


def test_pooling_flags_change_the_geometry(tmp_path, capsys):
    argv = "--window 2 --stride 1 --padding 0 --temperature 0.5 --shift 2".split()
    results = pooling.main([*argv, "--workdir", str(tmp_path)])
    x = np.asarray(results["input"])
    np.testing.assert_array_equal(results["pools"]["max"], reference.pool2d(x, (2, 2)))
    np.testing.assert_allclose(results["pools"]["avg"], reference.pool2d(x, (2, 2), mode="avg"), rtol=1e-6)
    assert "soft T=0.5" in results["pools"]
    assert {r["shift"] for r in results["shift"]} == {-2, 2}


@pytest.mark.parametrize(
    "main, argv",
    [
        (edge_detection.main, ["--steps", "0"]),
        (edge_detection.main, ["--lr", "-1"]),
        (edge_detection.main, ["--lr", "fast"]),
        (edge_detection.main, ["--bogus"]),
        (pooling.main, ["--window", "2", "--padding", "2"]),
        (pooling.main, ["--window", "7"]),
        (pooling.main, ["--temperature", "0"]),
        (pooling.main, ["--shift", "8"]),
        (pooling.main, ["--stride", "x"]),
    ],
)
def test_experiments_reject_bad_flags(main, argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--workdir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize(
    "main, defaults",
    [
        (edge_detection.main, {"--seed": "0", "--lr": "0.03", "--steps": "14", "--workdir": "a new runs/edge_det"}),
        (
            pooling.main,
            {"--window": "3", "--padding": "1", "--temperature": "1", "--shift": "1", "--workdir": "a new runs/pool"},
        ),
    ],
)
def test_help_states_each_default_once(main, defaults, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    entries = {entry.split()[0]: " ".join(entry.split()) for entry in re.split(r"\n  (?=-)", out)[1:]}
    for flag, default in defaults.items():
        assert f"(default: {default}" in entries[flag]
    assert "--overwrite" in entries
    assert all(entry.count("default") <= 1 for entry in entries.values()), entries
