"""The README's promises: its two quick-start commands, CI running exactly its test command, the models table."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    section = ROOT.joinpath("README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)


def test_quick_start_is_two_commands():
    commands = quick_start_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    main, tests = commands
    assert "-m experiments.lenet" in main and "--dataset mnist_10k" in main
    assert tests.endswith("-m pytest")


def test_ci_runs_the_readme_test_command():
    ci_lines = ROOT.joinpath(".ci", "run").read_text().splitlines()
    assert quick_start_commands()[1] in ci_lines


def test_models_table_lists_the_registry():
    from jaxcnn import models

    section = ROOT.joinpath("README.md").read_text().split("## Models", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \|.*\| (\d+) \| ([\d,]+) \| ([\d.]+) \|$", section, flags=re.MULTILINE)
    assert [r[0] for r in rows] == models.names()
    for name, size, _, lr in rows:
        assert int(size) == models.default_image_size(name) and float(lr) == models.run_defaults(name).lr, name
