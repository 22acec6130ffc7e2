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
