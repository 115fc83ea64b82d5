"""The package as installed: one version, its licenses, and the lint settings CI enforces."""

import importlib.metadata
import tomllib
from pathlib import Path

import jaxcnn

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads(ROOT.joinpath("pyproject.toml").read_text())


def test_the_version_has_one_source():
    # pyproject names no version of its own: setuptools reads jaxcnn.__version__, for a wheel and an editable install.
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "jaxcnn.__version__"}
    assert importlib.metadata.version("jaxcnn") == jaxcnn.__version__


def test_licenses_are_stated_and_shipped():
    project = PYPROJECT["project"]
    assert project["license"] == "MIT AND CC-BY-SA-3.0"
    assert all(ROOT.joinpath(path).is_file() for path in project["license-files"])
    assert ROOT.joinpath("LICENSE").read_text().startswith("MIT License\n\nCopyright (c) 2026 the jaxcnn authors\n")
    digits = ROOT.joinpath("jaxcnn", "datasets", "mnist_10k", "README.md")
    assert str(digits.relative_to(ROOT)) in project["license-files"]
    assert "Creative Commons Attribution-Share Alike 3.0 license (CC BY-SA 3.0" in " ".join(digits.read_text().split())


def test_ci_fails_on_a_lint_error():
    assert PYPROJECT["tool"]["ruff"]["line-length"] == 120
    assert any(dep.startswith("ruff") for dep in PYPROJECT["project"]["optional-dependencies"]["test"])
    ci = ROOT.joinpath(".ci", "run").read_text()
    assert ".venv/bin/ruff check . || lint=1" in ci and ".venv/bin/ruff format --check . || lint=1" in ci
