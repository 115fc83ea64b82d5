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


def environ_with_huge_pages(environ=os.environ, thp_enabled: Path = THP_ENABLED) -> dict | None:
    """`environ` with glibc's malloc asking for huge pages, or None where that would change nothing:
    not glibc (or too old for the tunable), huge pages "always" or "never", or the tunable already set
    (to either value: GLIBC_TUNABLES=glibc.malloc.hugetlb=0 opts out)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if TUNABLE in tunables:
        return None
    try:
        libc, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
        if libc != "glibc" or tuple(map(int, version.split(".")[:2])) < MIN_GLIBC:
            return None
        if "[madvise]" not in thp_enabled.read_text():
            return None
    except (AttributeError, ValueError, OSError):  # no confstr name (not Linux), no THP file
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, (tunables, f"{TUNABLE}=1")))}


def reexec_with_huge_pages() -> None:
    """Replaces this process with itself (same pid, arguments and open files) under
    `environ_with_huge_pages()`, if that gives an environment. Call it first thing in a command's
    main, before any output or threads."""
    environ = environ_with_huge_pages()
    if environ is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
