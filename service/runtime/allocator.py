"""Which malloc the server's processes run on: jemalloc where it is installed, else the C library's.

Why: what was left of the engine process's growth over a soak, once retired model versions were freed, was not
memory it held but pages glibc's malloc kept. Its
per-thread arenas hold the onnxruntime arenas' chunks, the batches' arrays and the new sessions of each hot reload
between longer-lived blocks; `malloc_trim` gives back only whole free pages, so each reload's or burst's step came
back down only in part, and a young engine climbed for minutes before it levelled (docs/reliability.md, "The soak,
with faults"). jemalloc keeps allocations of like sizes together and returns the pages it has not used for a while
(its background thread, `dirty_decay_ms`, 10 s by default), so the same steps come back down whole. In `make soak`
(10 minutes with faults) the engines grew -0.2 to +2.1 MB/min on glibc (2 runs in 3 over the 1 MB/min bar) and
-0.6 and +0.0 on jemalloc, with no change to the code.

How: a process picks its malloc when it starts (LD_PRELOAD), so `attnserve serve` starts itself again, at once and
under the same pid, with `libjemalloc.so.2` preloaded (`exec_with_allocator`); the processes it starts (front-ends,
the engine) inherit the environment. Only the server's command does this: `serve()` called inside another program
keeps that program's malloc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from collections.abc import Mapping
from typing import Literal

log = logging.getLogger(__name__)

AllocatorChoice = Literal["auto", "jemalloc", "system"]

JEMALLOC = "jemalloc"
JEMALLOC_CONF = "background_thread:true"
"""jemalloc's options when the environment sets none (MALLOC_CONF): a thread of its own returns unused pages on its
decay schedule, so an idle process gives memory back too (without it jemalloc decays only as it allocates)."""

EXEC_MARK = "ATTNSERVE_ALLOCATOR_EXEC"
"""Set in the environment of a server that started itself again for its malloc, so that it never does so twice
(a preload that the dynamic loader refused leaves the process on the C library's malloc, and it must go on)."""


def jemalloc_library() -> str | None:
    """The name to preload jemalloc by (as the dynamic loader finds it, e.g. libjemalloc.so.2), or None where it is
    not installed (Debian and Ubuntu: the libjemalloc2 package) or the system is not Linux (LD_PRELOAD is the
    dynamic loader's of Linux; macOS has its own)."""
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.util.find_library(JEMALLOC)


def jemalloc_active() -> bool:
    """True when this process's malloc is jemalloc's (its `mallctl` is among the process's global symbols)."""
    return hasattr(ctypes.CDLL(None), "mallctl")


def active_allocator() -> str:
    """The malloc this process runs on, for the start-up log line: "jemalloc's malloc" or "the C library's malloc"."""
    return "jemalloc's malloc" if jemalloc_active() else "the C library's malloc"


def environment_for(choice: AllocatorChoice, environ: Mapping[str, str], library: str | None) -> dict[str, str] | None:
    """The environment to start a server on `choice`'s malloc with, given jemalloc's `library` (None: not
    installed); None when the current environment is already right. `jemalloc` without the library raises
    RuntimeError (the settings check for that first). The library goes first in LD_PRELOAD, before whatever the
    user preloads; a MALLOC_CONF of the user's is kept."""
    if choice == "system" or environ.get(EXEC_MARK):
        return None
    if library is None:
        if choice == JEMALLOC:
            raise RuntimeError("memory_allocator=jemalloc, but jemalloc is not installed (Debian: libjemalloc2)")
        return None
    preloaded = [entry for entry in environ.get("LD_PRELOAD", "").replace(" ", ":").split(":") if entry]
    if library in preloaded:
        return None
    environment = dict(environ)
    environment["LD_PRELOAD"] = ":".join([library, *preloaded])
    environment.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    environment[EXEC_MARK] = "1"
    return environment


def exec_with_allocator(choice: AllocatorChoice) -> None:
    """Start this server again, in place, on `choice`'s malloc when it is not on it already; returns when nothing
    needs to change. Called by `attnserve serve` after its settings parsed and before any thread or socket exists.
    A malloc cannot change in a running process: the dynamic loader chooses it when a program starts."""
    if choice == "system" or jemalloc_active():
        return
    if os.environ.get(EXEC_MARK):
        log.warning("jemalloc was preloaded (LD_PRELOAD) but is not this process's malloc; serving on the system's")
        return
    environment = environment_for(choice, os.environ, jemalloc_library())
    if environment is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)
