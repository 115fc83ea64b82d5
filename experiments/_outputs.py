"""Where the notes' experiments write: a new dated directory by default, and never silently over an earlier run.

The trainer behaves alike: its default workdir is dated, and it refuses a
workdir that already holds a run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def dated(stem: str | Path) -> Path:
    """stem-YYYYmmdd-HHMMSS, the trainer's naming for a new run's directory."""
    return Path(f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")


def add_overwrite_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the outputs of an earlier run in the chosen directory"
    )


def refuse_earlier_outputs(parser, flag: str, directory: Path, outputs, overwrite: bool) -> None:
    """Exit with a usage error if directory holds any of outputs (file names) and overwrite is not set."""
    held = [name for name in outputs if (directory / name).exists()]
    if held and not overwrite:
        parser.error(
            f"{flag} {directory} already holds {', '.join(held)} from an earlier run; "
            f"choose another {flag}, or pass --overwrite to replace them (nothing was written)"
        )
