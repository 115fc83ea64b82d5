"""Huge pages for XLA's per-call temporaries on Linux: what a command line (a run, a benchmark) sets for itself.

XLA's CPU runtime allocates each call's temporaries as one buffer, on a worker thread: about 1 GB
for a ResNet-18 train step at 96 px, batch 128. glibc maps a buffer that large afresh on every
call and frees it after, so the kernel faults it in again 4 KiB at a time: 243k faults and
0.64-0.72 s of system time per 2.2-3.2 s step (2-core AMD EPYC VM). Where the kernel gives huge
pages only to memory that asks for them (transparent_hugepage "madvise", a common default),
glibc's `glibc.malloc.hugetlb=1` tunable makes malloc ask: 800 faults, 0.13-0.19 s. glibc reads
tunables when a process starts, so a command re-executes itself once with it set; a library
caller sets it before starting Python (README, "Performance").
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")
# The first glibc with the tunable.
MIN_GLIBC = (2, 35)
# Set in the re-executed process: never a second exec, even where glibc drops GLIBC_TUNABLES
# (a setuid or file-capability interpreter).
REEXECUTED = "JAXCNN_HUGEPAGES_REEXECUTED"


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library if it is glibc, else None (musl, macOS, Windows)."""
    try:
        libc, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
        return tuple(map(int, version.split(".")[:2])) if libc == "glibc" else None
    except (AttributeError, ValueError, OSError):  # no confstr, or no such name
        return None


def environ_with_huge_pages(environ=os.environ, thp_enabled: Path | None = None) -> dict | None:
    """`environ` with glibc's malloc asking for huge pages, or None where that would change nothing:
    not glibc (or too old for the tunable), huge pages "always" or "never", the tunable already set
    (to either value: GLIBC_TUNABLES=glibc.malloc.hugetlb=0 opts out), or a process that already
    re-executed itself."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if TUNABLE in tunables or REEXECUTED in environ:
        return None
    version = glibc_version()
    if version is None or version < MIN_GLIBC:
        return None
    try:
        if "[madvise]" not in (thp_enabled or THP_ENABLED).read_text():
            return None
    except OSError:  # no THP
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, (tunables, f"{TUNABLE}=1"))), REEXECUTED: "1"}


def reexec_with_huge_pages() -> None:
    """Replaces this process with itself (same pid and arguments; inherited descriptors, not the
    files Python opened) under `environ_with_huge_pages()`, if that gives an environment. Call it
    first thing in a command, before any output, threads or clean-up to run: atexit handlers and
    finally blocks do not run across the exec. If the exec fails, the command runs as it is."""
    environ = environ_with_huge_pages()
    if environ is None:
        return
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
    except OSError:  # no interpreter path to run (embedded Python), or exec refused
        pass
