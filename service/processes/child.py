"""What every child process of the supervisor shares: how it is started, how it says it is ready, how it
stops with its supervisor.

A child is `python -m service.processes ROLE RUNTIME_DIR SUPERVISOR_PID -- FLAGS...` (__main__.py).
"""

from __future__ import annotations

import json
import os
import signal
import sys

ENGINE_SOCKET = "engine.sock"
"""The engine process's Unix socket, in the supervisor's private runtime directory."""
PR_SET_PDEATHSIG = 1  # prctl(2)
M_MMAP_THRESHOLD = -3  # mallopt(3)
FRONTEND_MMAP_THRESHOLD_BYTES = 128 * 1024
"""Blocks from this size up get mappings of their own in a front-end process (map_large_blocks); glibc's starting
threshold."""


def announce(**ready: object) -> None:
    """Tell the supervisor this process is ready (one JSON line on stdout)."""
    sys.stdout.write(json.dumps(ready) + "\n")
    sys.stdout.flush()


def stop_with_parent(supervisor: int) -> None:
    """Have the kernel send this process SIGTERM when its supervisor dies, whatever killed it (Linux), so no
    front-end outlives it holding the port. A supervisor already gone by now means: stop at once."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the supervisor's own shutdown still stops its children
        return
    if os.getppid() != supervisor:
        os.kill(os.getpid(), signal.SIGTERM)


def map_large_blocks(threshold: int = FRONTEND_MMAP_THRESHOLD_BYTES) -> bool:
    """Have glibc serve every allocation of `threshold` bytes or more with a mapping of its own, given back to the
    system when freed. Returns whether it could (glibc only; elsewhere nothing changes).

    Why, in a front-end: by default glibc raises that threshold to the largest block freed so far (up to 32 MiB) and
    serves later large blocks from the heap, where what is freed stays resident between blocks still in use. A
    front-end's large blocks are its connections' buffers, which come and go with its clients: in 6-minute soaks its
    RSS grew 0.5-1.2 MB a minute (eight processes, median 0.9) with the default, 0.2-0.5 (six) with the threshold
    fixed. Not in the engine: its batches' arrays are allocated anew at every change of shape, and mapping each one
    afresh cost latency there."""
    import ctypes

    try:
        return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False
