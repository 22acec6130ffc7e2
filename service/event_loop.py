"""The asyncio event loop each server process runs on: uvloop's where RPCs are served, asyncio's own elsewhere.

Why uvloop: a call's cost beyond its work is mostly the event loop's: gRPC's completion events, the tasks and
futures of each call, and the socket reads that wake the loop. uvloop does the same in C on libuv and leaves the
Python code as it is. Measured on two cores (`python -m loadtests.rpc_cost`, docs/benchmarks.md): a bare grpc.aio
server answered about a third more calls/s at 64 in flight on it, and attnserve in one process 14-21% more.

Why not everywhere: in the engine process of `--frontends N`, which moves messages between the front-ends and its
engines' worker threads, uvloop measured 20-30% fewer calls/s at 64 in flight. Not its own code: the engines'
decoder steps took about a tenth longer at the same batches, for reasons not found (docs/benchmarks.md). So `auto`
means uvloop for a process that serves RPCs (one process, a front-end) and asyncio's own loop for the engine
process and the supervisor; `uvloop` and `asyncio` put every process on that loop. Without uvloop installed
(Windows) `auto` is asyncio's loop everywhere.

Everything the server does runs unchanged on both loops (the test suite runs its servers as `auto` does).
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


def resolved(choice: EventLoopChoice, serves_rpcs: bool = True) -> Literal["uvloop", "asyncio"]:
    """The loop `choice` means for a process that `serves_rpcs` (one process, a front-end) or not (the engine
    process, the supervisor) on this machine: auto is uvloop for the first where it is installed, else asyncio's
    own. Raises RuntimeError for uvloop asked for by name and not installed."""
    if choice == "asyncio" or (choice == "auto" and not serves_rpcs):
        return "asyncio"
    if uvloop_installed():
        return "uvloop"
    if choice == "uvloop":
        raise RuntimeError(
            "event_loop=uvloop, but uvloop is not installed (pip install uvloop, or --event-loop asyncio)"
        )
    return "asyncio"


def loop_factory(choice: EventLoopChoice, serves_rpcs: bool = True) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """A function that makes a new loop of `choice` (resolved); None for asyncio's default."""
    if resolved(choice, serves_rpcs) == "asyncio":
        return None
    import uvloop

    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], choice: EventLoopChoice, *, serves_rpcs: bool = True) -> T:
    """asyncio.run(main) on a new loop of `choice` for a process that `serves_rpcs` or not (see resolved). The
    loop is made for this run only: the process's event loop policy is left alone, so other loops made in the
    process (a test's) stay what they were."""
    with asyncio.Runner(loop_factory=loop_factory(choice, serves_rpcs)) as runner:
        return runner.run(main)


def running_loop_name() -> str:
    """'uvloop' or 'asyncio': the loop this coroutine runs on (for the start-up log line)."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"
