"""The asyncio event loop every server process runs on: uvloop's by default, asyncio's own on request.

Why uvloop: a call's cost beyond its work is mostly the event loop's, gRPC's completion events, the tasks and
futures of each call, and the socket reads that wake the loop. uvloop does the same in C on libuv and leaves the
Python code as it is. Measured on two cores with the default models (`python -m loadtests.rpc_cost`, see
docs/benchmarks.md): about a fifth more calls/s at 64 in flight and a few percent less CPU per call; a bare
grpc.aio server gains as much.

Everything the server does runs unchanged on both loops (the test suite runs its servers on the default), so
`asyncio` is there to rule the loop out when hunting a problem, and for platforms without uvloop (Windows), where
`auto` falls back to it.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

EventLoopChoice = Literal["auto", "uvloop", "asyncio"]

T = TypeVar("T")


def uvloop_installed() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def resolved(choice: EventLoopChoice) -> Literal["uvloop", "asyncio"]:
    """The loop `choice` means on this machine: auto is uvloop where it is installed, else asyncio's own.
    Raises RuntimeError for uvloop asked for by name and not installed."""
    if choice == "asyncio":
        return "asyncio"
    if uvloop_installed():
        return "uvloop"
    if choice == "uvloop":
        raise RuntimeError(
            "event_loop=uvloop, but uvloop is not installed (pip install uvloop, or --event-loop asyncio)"
        )
    return "asyncio"


def loop_factory(choice: EventLoopChoice) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """A function that makes a new loop of `choice` (None: asyncio's default)."""
    if resolved(choice) == "asyncio":
        return None
    import uvloop

    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], choice: EventLoopChoice) -> T:
    """asyncio.run(main) on a new loop of `choice`. The loop is made for this run only: the process's event loop
    policy is left alone, so other loops made in the process (a test's) stay what they were."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)


def running_loop_name() -> str:
    """'uvloop' or 'asyncio': the loop this coroutine runs on (for the start-up log line)."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"
