"""`python -m service.processes {engine,frontend} RUNTIME_DIR SUPERVISOR_PID -- FLAGS...`: a child process of the
supervisor (service/processes/supervisor.py starts them)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from service import event_loop
from service.lifecycle import settings_from
from service.processes.child import stop_with_parent
from service.runtime.allocator import active_allocator

log = logging.getLogger("attnserve.processes")


def child_main(argv: list[str]) -> int:
    """`python -m service.processes {engine,frontend} RUNTIME_DIR SUPERVISOR_PID -- FLAGS...`"""
    role, runtime_dir, supervisor, separator, *flags = argv
    if separator != "--" or role not in ("engine", "frontend") or not supervisor.isdigit():
        print(
            "usage: python -m service.processes {engine,frontend} RUNTIME_DIR SUPERVISOR_PID -- FLAGS...",
            file=sys.stderr,
        )
        return 2
    stop_with_parent(int(supervisor))
    settings = settings_from(flags)
    if settings is None:
        return 2
    if role == "engine":
        from service.processes.engine import run_engine as run
    else:
        from service.processes.frontend import run_frontend as run
    name = "front-end" if role == "frontend" else "engine"

    async def announced() -> int:
        log.info(
            "%s process %d on %s's event loop and %s",
            name,
            os.getpid(),
            event_loop.running_loop_name(),
            active_allocator(),
        )
        return await run(settings, Path(runtime_dir))

    return event_loop.run(announced(), settings.event_loop, serves_rpcs=role == "frontend")


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
