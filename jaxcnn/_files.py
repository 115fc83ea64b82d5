"""Files written whole or not at all, and read back forgivingly: a run's workdir and conv2d's tuning cache."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, content: str | bytes) -> None:
    """Replace `path` with `content` so that a reader (or a kill) sees the old file or the new, never a torn one.

    The temporary file beside it has a name of its own (two processes writing conv2d's tuning cache
    each rename a whole file, the last one winning), and is removed if the write fails."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_json(path: Path):
    """The JSON in `path`; None if there is no such file, it cannot be read, or it is not JSON (torn, damaged)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
