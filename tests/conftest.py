"""Shared pytest setup: Hypothesis profiles, a scratch conv tuning cache for each test, and checks
of the figures the experiments draw.

"ci" is derandomized (the same examples on every run, so a red build is
reproducible) and keeps no example database. It is picked with
`pytest --hypothesis-profile=ci`, HYPOTHESIS_PROFILE=ci, or automatically
when CI is set. Tests still bound their own max_examples: every new array
shape is a fresh XLA compile.
"""

import atexit
import os
import shutil
import tempfile

import jax
import numpy as np
import pytest
from hypothesis import settings

from jaxcnn import _hugepages, _lowering

settings.register_profile("ci", derandomize=True, database=None, print_blob=True, deadline=None)
settings.register_profile("dev", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

# The experiments' and benchmarks' commands re-execute themselves with glibc's huge-page tunable where it
# helps (`jaxcnn._hugepages`); the tests' subprocesses start with it, as those commands end up, not twice.
os.environ.update(_hugepages.environ_with_huge_pages() or {})

# One XLA compilation cache for the session (unless one is set already): the pytest-xdist workers
# inherit the controller's environment, and so do the subprocesses (the experiments' commands, the
# benchmarks), which compile the same tiny LeNet steps again and again: it halves the kill-and-resume
# tests. A fresh directory each session, so the suite takes a clean machine's time. A test that
# watches XLA compile counts a cache hit's retrieval as a compile (test_run's `finished`).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxcnn-tests-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
# Every compile, not only those over JAX's default of a second: building a model is some 30 compiles of
# 0.2 s (a random draw per weight shape), which every process that builds it made again.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs", float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"])
)


@pytest.fixture(autouse=True)
def tune_cache(tmp_path_factory, monkeypatch):
    """conv2d's tuning cache, a fresh file (not yet written) for each test: never the user's, whose
    timings would change "auto"'s choices, and no test's timings reach another's."""
    path = tmp_path_factory.mktemp("tune") / "conv_lowerings.json"
    monkeypatch.setenv(_lowering.TUNE_CACHE_ENV, str(path))
    return path


@pytest.fixture
def assert_figure_png():
    """Check a PNG the experiments wrote: at least min_size (width, height) pixels at 100 dpi, and not blank."""

    from PIL import Image

    def check(path, min_size):
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1], image.size
            assert all(round(d) >= 100 for d in image.info["dpi"]), image.info["dpi"]
            pixels = np.asarray(image.convert("RGB"))
        drawn = (pixels != 255).any(axis=-1).mean()  # the page is white
        colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
        assert drawn > 0.05 and colours > 50, (drawn, colours)

    return check


@pytest.fixture
def smallest_font():
    """The smallest font size, in points, of any text a matplotlib figure draws."""
    from matplotlib.text import Text

    def size(fig) -> float:
        fig.draw_without_rendering()
        return min(t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and t.get_text())

    return size


def pytest_collection_modifyitems(items):
    """The five longest files first, longest first: under `--dist loadfile` each file goes whole to one
    worker, in this order (pyproject's `--no-loadscope-reorder`; else xdist orders them by their number of
    tests), and a long file handed out last leaves the other worker idle."""
    longest = ("test_runner.py", "test_lowering.py", "test_benchmarks.py", "test_ops.py", "test_export.py")
    rank = {name: i for i, name in enumerate(longest)}
    items.sort(key=lambda item: rank.get(item.path.name, len(longest)))  # stable: each file keeps its order
