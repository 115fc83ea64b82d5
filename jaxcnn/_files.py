"""Files written whole or not at all, and read back forgivingly: a run's workdir and conv2d's tuning cache."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_atomic(path: Path, content: str | bytes) -> None:
    """Replace `path` with `content` so that a reader (or a kill) sees the old file or the new, never a torn one.

    The temporary file is named for this process: two processes writing the same file (conv2d's tuning
    cache) each rename a whole file of their own, the last one winning."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(content.encode() if isinstance(content, str) else content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path):
    """The JSON in `path`; None if there is no such file, it cannot be read, or it is not JSON (torn, damaged)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
