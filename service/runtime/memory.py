"""Giving the OS back the memory a long-running server process holds but no longer uses.

Why: a server's batches vary in rows and source length, so the memory a step needs varies too. Two allocators keep
what they once needed:
- onnxruntime's CPU arena (one per session) grows in chunks and keeps every chunk;
- glibc's malloc keeps freed blocks in its heaps, resident, for the process's next allocations.
So without help a process's RSS is the most it has ever needed. Each alone frees nothing: what the arena gives back
glibc keeps, and glibc can only return pages the arena has given back. Measured with one process serving `dates`
(`python -m loadtests.reliability.after_burst`): a 15 s burst of 64-text beam-4 calls took RSS from 112 to 150 MB; in
the light load after it RSS stayed at 142-145 MB without this, and went back to 126-129 MB with the arenas shrunk
and the heap trimmed, 120-123 MB with the engine's batch renewed too.

`MemoryReturner` does both, every `memory_return_seconds`: it asks each loaded model's sessions to free the arena
chunks they do not use at the end of their next run (onnxruntime's `memory.enable_memory_arena_shrinkage` run
option, `OnnxStepModel.shrink_arenas_at_next_run`), and each engine to give back what its batch holds beyond its
needs (`EngineCore.release_unused_memory`: a batch's tables keep the most rows they ever held, so a busy batch gets
smaller memory and state tensors and an empty one is replaced), and has glibc return the free pages of its heaps
(`malloc_trim`), which frees what the previous round's engines gave back. A round costs
little: at 256 rows of `dates`, `malloc_trim` took 0.4 ms (with the GIL released) and the decoder run after it 3.2 ms
instead of 1.2, while its arena grew back.

On jemalloc's malloc (the `memory_allocator` setting, service/runtime/allocator.py) the heap's part is jemalloc's
own: its background thread returns the pages it has not used for a while, and `malloc_trim`, glibc's, finds nothing
to trim. The arenas and the engines' batches are asked as before.

The engine's largest arrays, its batch's memory and state tensors, are made by `zeros_mapped_apart`: each in a
mapping of its own, which the OS takes back the moment the array is freed. Why: glibc maps a large block apart only
below a threshold that moves up to the largest mapped block freed so far, so once a batch has freed one large
tensor, the next ones come from glibc's heaps, where what they leave behind when freed stays resident between
smaller blocks. In a 6-minute soak with the engine killed and restarted at minute 1.5, the restarted engine's RSS
rose from 118 to 131 and 151 MB in two runs, while what it held through malloc rose for two minutes (mostly these
tensors, as its rows peaked) and then fell back. Mapping every large block apart (glibc's threshold fixed) kept it at
119-120 MB, but made each large block costly to allocate (a 512 KiB copy took 300 us instead of 10: every page
faulted in anew), and a step's outputs can be that large; these tensors are allocated only when the batch grows,
re-lays its source axis out or gives memory back.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import math
import mmap
import platform
from collections.abc import Awaitable, Callable
from functools import cache

import numpy as np

log = logging.getLogger(__name__)


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None where the C library is not glibc (musl has no such call)."""
    if platform.libc_ver()[0] != "glibc":
        return None
    trim: Callable[[int], int] | None = getattr(ctypes.CDLL(None), "malloc_trim", None)
    return trim


def trim_heap() -> bool:
    """Have glibc return its heaps' free pages to the OS (`malloc_trim(0)`); False where that is not possible.
    ctypes releases the GIL for the call, so other threads run meanwhile."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


OWN_MAPPING_BYTES = 1 << 20
"""Arrays from `zeros_mapped_apart` of this size or more get a mapping of their own."""


def zeros_mapped_apart(shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """Like np.zeros, but an array of OWN_MAPPING_BYTES or more lives in an anonymous private mapping of its own,
    zero-filled by the OS, which is unmapped as soon as the array and every view of it are freed (see the module
    docstring). For large arrays allocated seldom: the first touch of each of its pages costs a page fault."""
    dtype = np.dtype(dtype)
    count = math.prod(shape)
    if count * dtype.itemsize < OWN_MAPPING_BYTES:
        return np.zeros(shape, dtype)
    mapping = mmap.mmap(-1, count * dtype.itemsize, flags=mmap.MAP_PRIVATE)
    return np.frombuffer(mapping, dtype=dtype, count=count).reshape(shape)


class MemoryReturner:
    """Every `interval_s` seconds, the heap is trimmed and `release()` has the process's engines give back what they
    hold and do not use (ModelManager.release_unused_memory; none in a front-end); see the module docstring.
    `sleep` is the wait between rounds (tests pass one they control)."""

    def __init__(
        self,
        interval_s: float,
        release: Callable[[], None] | None = None,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.interval_s = interval_s
        self._release = release
        self._sleep = sleep
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0

    def start(self) -> None:
        """Start the rounds on the running loop; nothing happens when the interval is 0."""
        if self.interval_s > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="memory return")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def return_now(self) -> None:
        """One round: the heap's free pages go back (among them what the engines gave back since the last round),
        then the engines are asked to give back what they hold and do not use, at their next step and runs."""
        trim_heap()
        if self._release is not None:
            self._release()
        self.rounds += 1

    async def _run(self) -> None:
        while True:
            await self._sleep(self.interval_s)
            try:
                self.return_now()
            except Exception:  # never let housekeeping end the process's task; try again next round
                log.exception("returning free memory to the OS failed; trying again in %.0f s", self.interval_s)
