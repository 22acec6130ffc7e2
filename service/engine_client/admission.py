"""Admission by expected wait: refuse a call now, cheaply, when it could not start within `max_queue_wait_s`.

A queue limit counts texts; what a caller feels is time. A model version's queue drains at the rate its engine
takes texts into the batch, so the wait of a call arriving now is about

    (texts waiting in the engine's queue + texts picked up here but not yet counted there) / drain rate

When that is over the bound the call is refused before it is tokenized or queued (RESOURCE_EXHAUSTED, with a
retry hint: how long until the queue ahead of it would be short enough, were nothing else to arrive), so the
wait of the calls that are admitted stays bounded and a refused client learns at once to go elsewhere or come
back later, instead of waiting in a backlog.

The drain rate is measured, not configured: texts that left the queue per second, over intervals that began
and ended with texts waiting (then the engine took texts as fast as it could; while the queue is empty the count
says how fast texts arrived, not how fast they could leave). Until there are TRUSTED_AFTER_INTERVALS such
intervals adding up to TRUSTED_AFTER_S there is no estimate and calls are admitted (the queue limit,
max_waiting_requests, still bounds the queue); the first estimate is what left over all of them, per second of
them, and later intervals move it as a moving average. One interval is not enough: a continuous-batching engine's
queue empties at every step it keeps up with, so a queue that is backlogged at two samples 50 ms apart is rare
under a normal load, and the first time it happens may well be a hiccup that measures 0: a step the OS preempted,
a collection, or the whole process stopped for a while (a container whose CPU quota ran out, a paused host), which
no sample sees until it is over and which reads as one long interval in which nothing moved. Taken alone, such a
first interval once had a server that was keeping up with 64 calls in flight refuse 778 of them.

An interval that ends with the queue emptied is no measurement, but it gives a floor: what left over a span of at
least MIN_INTERVAL_S, per second, is a rate the queue has drained at, so it drains at least that fast. The span
runs from the end of the last measurement or floor to a sample that finds the queue emptied, so under a steady load
whose samples come every fraction of a millisecond the floor is the throughput over the last 50 ms or so, not the
few texts of the last sample's interval. A known rate below the floor moves toward it as the moving average would
toward a measurement over the same span; a floor never lowers the rate. The move is no jump because texts that
expire or are cancelled in the queue count as having left, and many can leave at once. Without the floor, the rate
could stick at 0 while the engine keeps up. A continuous-batching engine takes every waiting text at its next step,
so its queue empties at each step, and the only intervals that end with texts waiting are those a slow step cuts
short (a new shape's first run on a GPU): they measure 0. From then on, the wait of any call behind a single text
reads as forever, the call is refused, and with calls refused the queue never stays backlogged long enough to
measure the rate again. With the floor the rate recovers within about SMOOTHING_S. (Floors taken over each sample's
interval alone, as they were, said 200 texts/s of a queue that drained 2,500: a rate at 0 took 1.1 s to admit a
call behind 64 texts, refusing every such call meanwhile.) The same holds for the other queues measured with
DrainRate: the calls picked up and not yet in a model queue (PendingCalls) and gRPC core's backlog
(service/grpc_api/backlog.py).

Everything here is plain arithmetic on counts and a clock the caller passes in, so a test gives exact inputs
and checks exact answers. Nothing here knows of gRPC, HTTP or processes: the engine clients feed it what they
see of the engine (service/engine_client/).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any

from service.errors import QUEUE_FULL, QUEUE_WAIT, InvalidRequest, Overloaded

MIN_INTERVAL_S = 0.05
"""The shortest interval a drain-rate sample is taken over: shorter ones count a step's worth of texts over
almost no time, and say more about when the step ended than about the rate."""

MAX_INTERVAL_S = 1.0
"""The longest: samples further apart than this may hide a moment when the queue was empty (and the engine idle)
between them, so such an interval gives no measurement."""

TRUSTED_AFTER_S = 0.5
"""A queue's rate is known once its measured intervals add up to this much (ten of the shortest): half the moving
average's time constant, so that a queue that is backlogged for real has a rate well before its calls have waited
the default bound (500 ms)."""

TRUSTED_AFTER_INTERVALS = 3
"""... and number at least this many, so that no single interval sets the rate alone, however long (a process
stopped for 0.6 s measures one interval of 0.6 s)."""

SMOOTHING_S = 1.0
"""Time constant of the drain rate's moving average: a sample over `dt` seconds weighs 1 - exp(-dt / this)."""

QUEUE_SHARE_KEPT = 0.2
"""However long a call waited before it was picked up, a model queue may still make it wait this share of the bound:
the time spent before pickup is gone, and refusing the call gives it back to nobody (a client that keeps its calls
in flight sends the next at once), but a queue cut below what keeps the batch full wastes the engine."""

LONGEST_RETRY_HINT_S = 30.0
"""The retry hint is never longer than this (a stalled engine, whose rate is 0, would otherwise say forever)."""


@dataclass(frozen=True)
class WaitEstimate:
    """Why a call is refused: `ahead` texts before it (waiting in the engine and picked up here), draining at
    `drain_rate` texts/s, so it would wait about `wait_s` seconds, over `bound_s`. `retry_after_s`: when the
    queue ahead would be short enough, had nothing else arrived meanwhile (at most LONGEST_RETRY_HINT_S)."""

    ahead: int
    drain_rate: float
    wait_s: float
    bound_s: float

    @property
    def retry_after_s(self) -> float:
        return min(self.wait_s - self.bound_s, LONGEST_RETRY_HINT_S)


class DrainRate:
    """How fast one queue empties while it is backlogged: a moving average of the rates measured over intervals
    that began and ended with something waiting, raised toward floors: what left per second over spans that ended
    with the queue emptied (see the module's docstring). `rate` (items/s) is None until there are
    TRUSTED_AFTER_INTERVALS measured intervals adding up to TRUSTED_AFTER_S; it is then what left over them, per
    second, and a moving average from there on."""

    def __init__(self) -> None:
        self.rate: float | None = None
        self._start: tuple[float, int, int] | None = None  # (at, waiting, dequeued) where the interval began
        self._floor_from: tuple[float, int] | None = None  # (at, dequeued) where the span of the next floor began
        # What the intervals measured while the rate is not known yet add up to: items that left, seconds, intervals.
        self._untrusted_left, self._untrusted_s, self._untrusted_intervals = 0, 0.0, 0

    def observe(self, at: float, waiting: int, dequeued: int) -> None:
        """Take what the queue holds at time `at` (seconds of the caller's monotonic clock): `waiting` items, and
        `dequeued` items that have left it since it was made (a count that only grows).

        An interval begins at the first sample with something waiting. A later sample with something waiting
        ends it with a measurement when it is at least MIN_INTERVAL_S after the start (closer ones only extend
        it) and at most MAX_INTERVAL_S (a longer one may hide a moment when the queue was empty). A sample with
        the queue emptied ends it, and gives a floor once the span since the last measurement or floor is at least
        MIN_INTERVAL_S long. A count that went backwards (a new engine for the same version) ends the interval and
        the span with neither."""
        start, floor_from = self._start, self._floor_from
        if start is None or floor_from is None or dequeued < start[2] or dequeued < floor_from[1]:
            self._start, self._floor_from = (at, waiting, dequeued), (at, dequeued)
            return
        if start[1] <= 0:
            self._start = (at, waiting, dequeued)
            return
        elapsed = at - start[0]
        if waiting > 0:
            if elapsed < MIN_INTERVAL_S:
                return
            if elapsed <= MAX_INTERVAL_S:
                self._measured(dequeued - start[2], elapsed)
            self._floor_from = (at, dequeued)
        else:
            span = at - floor_from[0]
            if span >= MIN_INTERVAL_S:
                floor = (dequeued - floor_from[1]) / span
                if self.rate is not None and floor > self.rate:
                    self._average(floor, span)
                self._floor_from = (at, dequeued)
        self._start = (at, waiting, dequeued)

    def _measured(self, left: int, over_s: float) -> None:
        """`left` items left the queue over `over_s` seconds in which it stayed backlogged."""
        if self.rate is not None:
            self._average(left / over_s, over_s)
            return
        self._untrusted_left += left
        self._untrusted_s += over_s
        self._untrusted_intervals += 1
        if self._untrusted_s >= TRUSTED_AFTER_S and self._untrusted_intervals >= TRUSTED_AFTER_INTERVALS:
            self.rate = self._untrusted_left / self._untrusted_s

    def _average(self, value: float, over_s: float) -> None:
        """Move the known rate toward `value`, which holds over the last `over_s` seconds."""
        assert self.rate is not None
        self.rate += (1.0 - math.exp(-over_s / SMOOTHING_S)) * (value - self.rate)

    def wait_s(self, ahead: int) -> float | None:
        """Seconds until `ahead` items have left at the measured rate (infinite when it is 0), 0 when nothing is
        ahead, None when there is no rate yet."""
        if ahead <= 0:
            return 0.0
        rate = self.rate
        if rate is None:
            return None
        return ahead / rate if rate > 0.0 else math.inf


class PendingCalls:
    """The first stage a call passes: picked up by a transport, its handler not yet in the dataplane (waiting for
    its request to arrive, or for the event loop). `count` calls are there; `drain` measures the rate they leave it
    at while some wait. A call is held by the asyncio task that runs it, with how long it waited before it was
    picked up, and leaves when that task reaches the dataplane or ends, so a call the client abandons on the way is
    never left counted. Event-loop thread only."""

    def __init__(self) -> None:
        self.drain = DrainRate()
        self._tasks: dict[asyncio.Future[Any], float] = {}
        self._left = 0

    @property
    def count(self) -> int:
        return len(self._tasks)

    def observe(self, at: float) -> None:
        """Feed the drain rate with what is pending at time `at`."""
        self.drain.observe(at, len(self._tasks), self._left)

    def add(self, task: asyncio.Future[Any], waited_s: float = 0.0) -> None:
        """`task` runs a call just picked up after waiting `waited_s` seconds (a task is added once; adding it
        again changes nothing)."""
        if task not in self._tasks:
            self._tasks[task] = waited_s
            task.add_done_callback(self.remove)

    def remove(self, task: asyncio.Future[Any]) -> float:
        """`task`'s call reached the dataplane or ended: how long it waited before it was picked up (0 for a task
        that was not pending; idempotent)."""
        waited_s = self._tasks.pop(task, None)
        if waited_s is None:
            return 0.0
        self._left += 1
        return waited_s


class QueueAdmission:
    """The admission decision for one model version's queue: the queue limit (`max_waiting` texts) and the wait
    bound (`max_wait_s`; <= 0 turns it off). `label` names the version in messages ('dates version 1'). Use from
    one thread."""

    def __init__(self, label: str, max_waiting: int, max_wait_s: float) -> None:
        self.label = label
        self.max_waiting = max_waiting
        self.max_wait_s = max_wait_s
        self.drain = DrainRate()

    def observe(self, at: float, waiting: int, dequeued: int) -> None:
        """Feed the drain rate with what the queue holds at `at` (DrainRate.observe)."""
        self.drain.observe(at, waiting, dequeued)

    def estimate(self, waiting: int, picked_up: int, waited_s: float = 0.0) -> WaitEstimate | None:
        """The wait in this queue of a call that arrives now behind `waiting` texts in the engine's queue and
        `picked_up` texts this process has sent the engine but the engine's count does not show yet, or None when
        it is within the bound (or nothing is known yet, or the bound is off). A call that already waited
        `waited_s` seconds to be picked up has that much less of the bound left, but never less than
        QUEUE_SHARE_KEPT of it."""
        ahead = waiting + picked_up
        wait_s = self.drain.wait_s(ahead)
        if self.max_wait_s <= 0.0 or wait_s is None:
            return None
        bound_s = max(self.max_wait_s - waited_s, QUEUE_SHARE_KEPT * self.max_wait_s)
        if wait_s <= bound_s:
            return None
        return WaitEstimate(ahead=ahead, drain_rate=self.drain.rate or 0.0, wait_s=wait_s, bound_s=bound_s)

    def expected_wait_s(self, waiting: int, picked_up: int = 0) -> float:
        """The wait of a call that arrives now (as estimate), 0 when the rate is not known yet."""
        return self.drain.wait_s(waiting + picked_up) or 0.0

    def check(self, count: int, waiting: int, picked_up: int = 0, waited_s: float = 0.0) -> None:
        """Raise unless a call of `count` texts, which waited `waited_s` seconds to be picked up, may be queued now
        behind `waiting` + `picked_up` texts (see estimate): InvalidRequest when it never fits the queue,
        Overloaded (reason QUEUE_FULL) when the queue has no room for it, Overloaded (reason QUEUE_WAIT) when it
        could not start within the bound. Both Overloaded carry a retry hint when the drain rate is known."""
        if count > self.max_waiting:
            raise InvalidRequest(
                f"this call brings {count} texts but model {self.label} queues at most {self.max_waiting}; "
                "send fewer texts per call"
            )
        ahead = waiting + picked_up
        if count > self.max_waiting - ahead:
            rate = self.drain.rate
            excess = ahead + count - self.max_waiting
            raise Overloaded(
                f"model {self.label} has {ahead} requests waiting and this call brings {count}; the limit is "
                f"{self.max_waiting}; retry later",
                reason=QUEUE_FULL,
                retry_after_s=None if not rate else min(excess / rate, LONGEST_RETRY_HINT_S),
            )
        estimate = self.estimate(waiting, picked_up, waited_s)
        if estimate is not None:
            drains = (
                f"the queue drains {estimate.drain_rate:.0f} texts/s"
                if estimate.drain_rate > 0.0
                else "the queue has not moved lately"
            )
            before = f" after it waited {waited_s:.3f} s to be picked up" if waited_s > 0.0 else ""
            raise Overloaded(
                f"model {self.label} cannot start this call within {self.max_wait_s:.3f} s (max_queue_wait_ms)"
                f"{before}: {estimate.ahead} texts are ahead of it and {drains}; retry later",
                reason=QUEUE_WAIT,
                retry_after_s=estimate.retry_after_s,
            )
