"""Which malloc the server's processes run on: jemalloc where it is installed, else the C library's.

Why: what was left of the engine process's growth over a soak, once retired model versions were freed, was not
memory it held but pages glibc's malloc kept. Its per-thread arenas hold the onnxruntime arenas' chunks, the
batches' arrays and the new sessions of each hot reload between longer-lived blocks; `malloc_trim` gives back only
whole free pages, so each reload's or burst's step came back down only in part, and a young engine climbed for
minutes before it levelled (docs/reliability.md, "A malloc that gives back"). jemalloc keeps allocations of like
sizes together and returns the pages it has not used for a while (its background thread, `dirty_decay_ms`, 10 s by
default), so the same steps come back down whole. In `make soak` (10 minutes with faults) the same code's engines
grew -0.2 to +2.1 MB/min on glibc (2 runs in 3 over the 1 MB/min bar), and -0.6 and +0.0 with jemalloc preloaded
by hand, +0.5 and -1.1 with this module choosing it.

How: a process gets its malloc when it starts (the dynamic loader's LD_PRELOAD), so `attnserve serve` starts itself
again, at once and under the same pid, with jemalloc preloaded (`exec_with_allocator`), and the processes it starts
(front-ends, the engine) inherit the environment. Only the command's own process does this (service/cli.py):
`serve()` called inside another program keeps that program's malloc.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

AllocatorChoice = Literal["auto", "jemalloc", "system"]

JEMALLOC_SONAME = "libjemalloc.so.2"
JEMALLOC_CONF = "background_thread:true"
"""jemalloc's options when the environment sets none (MALLOC_CONF): a thread of its own returns unused pages on its
decay schedule, so an idle process gives memory back too (without it jemalloc decays only as it allocates)."""

EXEC_MARK = "_ATTNSERVE_MALLOC_EXEC"
"""In the environment of a server that has just started itself again for its malloc (and taken out at once), so that
it never does so twice: a preload that the dynamic loader refused leaves the process on another malloc."""


def jemalloc_library() -> str | None:
    """The path of jemalloc's shared library (Debian and Ubuntu: the libjemalloc2 package), or None where it is not
    installed or the system is not Linux (LD_PRELOAD is Linux's dynamic loader's; macOS has its own). Looked for
    where distributions install it, without starting a program (ctypes.util.find_library runs ldconfig or gcc)."""
    if not sys.platform.startswith("linux"):
        return None
    multiarch = f"{platform.machine()}-linux-gnu"
    for folder in ("/usr/local/lib", f"/usr/lib/{multiarch}", f"/lib/{multiarch}", "/usr/lib64", "/usr/lib"):
        path = Path(folder) / JEMALLOC_SONAME
        if path.is_file():
            return str(path)
    return None


PROBE_BYTES = 1 << 20
"""The block `jemalloc_active` asks the process's malloc for."""


def jemalloc_active() -> bool:
    """True when this process's malloc is jemalloc's. Loaded is not enough (a library preloaded before it, another
    malloc or a memory profiler, would be what the process calls), and comparing function addresses is wrong in a
    program that is not position-independent (Debian's python3: there `malloc` resolves to the program's own
    stub). So it asks: a block from the process's malloc must show in jemalloc's count of this thread's bytes."""
    try:
        jemalloc = ctypes.CDLL(JEMALLOC_SONAME, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)  # only if already loaded
    except OSError:
        return False
    process = ctypes.CDLL(None)
    process.malloc.restype = ctypes.c_void_p
    process.malloc.argtypes = [ctypes.c_size_t]
    process.free.argtypes = [ctypes.c_void_p]

    def allocated_by_this_thread() -> int | None:
        count, size = ctypes.c_uint64(), ctypes.c_size_t(ctypes.sizeof(ctypes.c_uint64))
        if jemalloc.mallctl(b"thread.allocated", ctypes.byref(count), ctypes.byref(size), None, 0) != 0:
            return None  # a jemalloc built without statistics
        return count.value

    before = allocated_by_this_thread()
    block = process.malloc(PROBE_BYTES)
    after = allocated_by_this_thread()
    process.free(block)
    return before is not None and after is not None and after - before >= PROBE_BYTES


def active_allocator() -> str:
    """The malloc this process runs on, for the start-up log line: "jemalloc's malloc" or "the C library's malloc"
    (or a preloaded library's: anything but jemalloc reads as the C library's)."""
    return "jemalloc's malloc" if jemalloc_active() else "the C library's malloc"


class AllocatorError(RuntimeError):
    """jemalloc was asked for by name (memory_allocator=jemalloc) and the process could not be put on it."""


def environment_for(choice: AllocatorChoice, environ: Mapping[str, str], library: str | None) -> dict[str, str] | None:
    """The environment to start a server on `choice`'s malloc with, given jemalloc's `library` (None: not
    installed); None when the current environment is already right. `jemalloc` without the library raises
    AllocatorError (the settings check that first). jemalloc goes last in LD_PRELOAD: whatever the user preloads
    comes before it, so a memory profiler still sees every call and passes it on to jemalloc. A MALLOC_CONF of the
    user's is kept."""
    if choice == "system":
        return None
    if library is None:
        if choice == "jemalloc":
            raise AllocatorError("memory_allocator=jemalloc, but jemalloc is not installed (Debian: libjemalloc2)")
        return None
    preloaded = [entry for entry in environ.get("LD_PRELOAD", "").replace(" ", ":").split(":") if entry]
    if any(Path(entry).name == JEMALLOC_SONAME for entry in preloaded):
        return None
    environment = dict(environ)
    environment["LD_PRELOAD"] = ":".join([*preloaded, library])
    environment.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    environment[EXEC_MARK] = "1"
    return environment


def exec_with_allocator(choice: AllocatorChoice) -> None:
    """Start this server's command again, in place, on `choice`'s malloc when the process is not on it already;
    returns when nothing needs to change, or when `auto` could not change it (logged). Raises AllocatorError when
    `jemalloc` was asked for and could not be had. Called by `attnserve serve` in its own process once its settings
    are known and before it starts anything: exec ends whatever the imports started (numpy's threads), and the
    command starts again from its first line with the same arguments."""
    just_started_again = os.environ.pop(EXEC_MARK, None) is not None
    if choice == "system" or jemalloc_active():
        return
    if just_started_again:
        why = f"jemalloc is preloaded (LD_PRELOAD={os.environ.get('LD_PRELOAD', '')}) but is not this process's malloc"
        if choice == "jemalloc":
            raise AllocatorError(why)
        log.warning("%s: serving on the malloc the process has", why)
        return
    environment = environment_for(choice, os.environ, jemalloc_library())
    if environment is None:
        return
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)
    except OSError as error:
        why = f"could not start the server again with jemalloc preloaded: {error}"
        if choice == "jemalloc":
            raise AllocatorError(why) from error
        log.warning("%s: serving on the C library's malloc", why)
