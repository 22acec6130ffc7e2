"""How long a gRPC call has waited in gRPC core before Python picked it up, as this process can see it.

gRPC core accepts every call a client sends (up to its backlog limits, beyond which it fails calls with
CANCELLED), and holds it until the Python server asks for the next call, one at a time per method, on the event
loop. When the loop is busier than calls come, they wait there, unseen by any queue of ours, and a call's wait
grows with the backlog. Core counts the calls it has taken (channelz: calls started, succeeded, failed); the
calls of those that are neither finished nor held by Python are the backlog, and the rate at which Python picks
calls up while some wait says how long the backlog takes to clear: about how long a call picked up now has
waited (Little's law: the calls behind it arrived while it waited).

Core's counts are read through grpcio's channelz functions, which walk every connection while holding the GIL: a
read takes about 0.1 ms with a few connections and 25 ms with 2,000 (idle ones too), and holds up the event loop
that long. So they are read only while calls are being picked up and a backlog is possible: while the event-loop
thread has been busy (at least BUSY_SHARE of the time since the last look was its own CPU time), or the last read
found calls waiting. A loop with time to spare picks calls up as they come, so core holds none for long. Reads are
at most every SAMPLE_INTERVAL_S, and at most once per READ_COST_MULTIPLE times the last read's cost, so however
many connections there are, reading takes at most a small share of the loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Collection
from typing import Any

from grpc._cython import cygrpc  # channelz: grpcio's only way to read core's per-server call counts

from service.engine_client.admission import MIN_INTERVAL_S, DrainRate

log = logging.getLogger(__name__)

SAMPLE_INTERVAL_S = MIN_INTERVAL_S
"""Whether to read core's counts is decided, and they are read, at most this often: as often as the pickup rate can
be measured."""

BUSY_SHARE = 0.25
"""The event-loop thread's CPU share over the last interval from which calls may be waiting in core's backlog.
Measured on 2 cores, one process, over 50 ms intervals: a median of 0.7 at capacity and under twice its load (the
rest of the time the loop waits for the GIL, which the engine's thread holds between its onnxruntime runs); one
client calling one call at a time keeps it near 0 (about 50 calls/s of well under a millisecond each)."""

READ_COST_MULTIPLE = 20
"""Core's counts are read at most once per this many times what the last read cost (at most 5% of the loop)."""


def server_ids() -> set[int]:
    """The channelz ids of this process's gRPC servers."""
    ids: set[int] = set()
    start = 0
    while True:
        page = json.loads(cygrpc.channelz_get_servers(start))
        servers = page.get("server", [])
        ids.update(int(server["ref"]["serverId"]) for server in servers)
        if page.get("end", True) or not servers:
            return ids
        start = max(ids) + 1


def server_calls(server_id: int) -> tuple[int, int]:
    """(started, finished): calls core has taken for server `server_id`, and those of them that have ended."""
    data = json.loads(cygrpc.channelz_get_server(server_id))["server"]["data"]
    return int(data.get("callsStarted", 0)), int(data.get("callsSucceeded", 0)) + int(data.get("callsFailed", 0))


class CoreBacklog:
    """The calls gRPC core holds for one server that Python has not picked up, and how long they take to clear.

    `server_id`: the server's channelz id (None = unknown: the backlog then always reads 0). The interceptor calls
    `picked_up(task)` for every call in the task that runs it; `waited_s()` is the estimate for a call picked up
    now. `calls` (server_calls), `clock` and `cpu` (the calling thread's CPU seconds) are what it reads, for tests.
    Event-loop thread only.
    """

    def __init__(
        self,
        server_id: int | None,
        clock: Callable[[], float],
        calls: Callable[[int], tuple[int, int]] = server_calls,
        cpu: Callable[[], float] = time.thread_time,
    ) -> None:
        self.server_id = server_id
        self._clock = clock
        self._calls = calls
        self._cpu = cpu
        self._cpu_at_sample = 0.0
        self._interval_s = SAMPLE_INTERVAL_S
        self.reads = 0  # reads of core's counts, ever
        self._held = 0  # calls Python has picked up that have not ended
        self._picked_up = 0  # calls Python has picked up, ever
        self._sampled_at: float | None = None
        self.waiting = 0  # the backlog at the last sample
        self.pickup = DrainRate()

    @classmethod
    def of_new_server(cls, before: Collection[int], clock: Callable[[], float]) -> CoreBacklog:
        """The backlog of the one gRPC server created since `before` (server_ids() then) was read; unknown when
        none or several were (another thread made one too)."""
        try:
            new = server_ids() - set(before)
        except (KeyError, ValueError) as error:  # channelz not there, or a document we do not understand
            log.warning("gRPC core's backlog cannot be read (%s); admission at pickup will not see it", error)
            new = set()
        return cls(next(iter(new)) if len(new) == 1 else None, clock)

    def picked_up(self, task: asyncio.Future[Any]) -> None:
        """`task` runs a call Python just picked up."""
        self._held += 1
        self._picked_up += 1
        task.add_done_callback(self._ended)

    def _ended(self, _task: asyncio.Future[Any]) -> None:
        self._held -= 1

    def waited_s(self) -> float:
        """About how long a call picked up now waited in core's backlog: the backlog over the rate Python has
        been picking calls up while some waited (0 when there is no backlog, or no rate yet)."""
        if self.server_id is None:
            return 0.0
        now = self._clock()
        if self._sampled_at is None or now - self._sampled_at >= self._interval_s:
            cpu = self._cpu()
            busy = self._sampled_at is not None and cpu - self._cpu_at_sample >= BUSY_SHARE * (now - self._sampled_at)
            self._sampled_at, self._cpu_at_sample = now, cpu
            if not busy and not self.waiting:
                self.pickup.observe(now, 0, self._picked_up)  # no backlog: it emptied (a floor, see DrainRate)
                self._interval_s = SAMPLE_INTERVAL_S
                return 0.0
            try:
                started, finished = self._calls(self.server_id)
            except (KeyError, ValueError) as error:  # the server is gone from channelz, or a document we do not know
                log.warning("gRPC core's backlog cannot be read any more (%s); admission stops counting it", error)
                self.server_id = None
                return 0.0
            self.reads += 1
            self._interval_s = max(SAMPLE_INTERVAL_S, READ_COST_MULTIPLE * (self._clock() - now))
            # Calls Python holds have started and not finished in core's count too; a call that just ended in
            # Python may not have ended in core's yet, so the difference can dip below 0 for a moment.
            self.waiting = max(0, started - finished - self._held)
            self.pickup.observe(now, self.waiting, self._picked_up)
        return self.pickup.wait_s(self.waiting) or 0.0
