"""Admission by expected wait: refuse a call now, cheaply, when it could not start within `max_queue_wait_s`.

A queue limit counts texts; what a caller feels is time. A model version's queue drains at the rate its engine
takes texts into the batch, so the wait of a call arriving now is about

    (texts waiting in the engine's queue + texts picked up here but not yet counted there) / drain rate

When that is over the bound the call is refused before it is tokenized or queued (RESOURCE_EXHAUSTED, with a
retry hint: how long until the queue ahead of it would be short enough, were nothing else to arrive), so the
wait of the calls that are admitted stays bounded and a refused client learns at once to go elsewhere or come
back later, instead of waiting in a backlog.

The drain rate is measured, not configured: texts that left the queue per second, over intervals in which the
queue stayed non-empty (then the engine took texts as fast as it could; while the queue is empty the count says
how fast texts arrived, not how fast they could leave). Until a first such interval there is no estimate and
calls are admitted (the queue limit, max_waiting_requests, still bounds the queue).

Everything here is plain arithmetic on counts and a clock the caller passes in, so a test gives exact inputs
and checks exact answers. Nothing here knows of gRPC, HTTP or processes: the engine clients feed it what they
see of the engine (service/engine_client/).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from service.errors import QUEUE_FULL, QUEUE_WAIT, InvalidRequest, Overloaded

MIN_INTERVAL_S = 0.05
"""The shortest interval a drain-rate sample is taken over: shorter ones count a step's worth of texts over
almost no time, and say more about when the step ended than about the rate."""

MAX_INTERVAL_S = 1.0
"""The longest: samples further apart than this may hide a moment when the queue was empty (and the engine idle)
between them, so such an interval gives no measurement."""

SMOOTHING_S = 1.0
"""Time constant of the drain rate's moving average: a sample over `dt` seconds weighs 1 - exp(-dt / this)."""

LONGEST_RETRY_HINT_S = 30.0
"""The retry hint is never longer than this (a stalled engine, whose rate is 0, would otherwise say forever)."""


@dataclass(frozen=True)
class QueueSample:
    """What one engine queue held at time `at` (seconds of the caller's monotonic clock): `waiting` texts
    queued, and `dequeued` texts that have left the queue since the engine started (into the batch, or
    cancelled or expired while waiting), a count that only grows."""

    at: float
    waiting: int
    dequeued: int


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
    """Texts per second one queue loses while it is backlogged: a moving average of the rates measured over
    intervals that began and ended with texts waiting. `rate` is None until the first such interval."""

    def __init__(self) -> None:
        self.rate: float | None = None
        self._start: QueueSample | None = None

    def observe(self, sample: QueueSample) -> None:
        """Take what the queue holds now. A sample with an empty queue ends the interval without a measurement,
        as does one whose count went backwards (a new engine for the same version) or one more than MAX_INTERVAL_S
        after the interval's start; other samples closer than MIN_INTERVAL_S to the start only extend it."""
        start = self._start
        if start is None or sample.waiting <= 0 or sample.dequeued < start.dequeued:
            self._start = sample
            return
        elapsed = sample.at - start.at
        if elapsed < MIN_INTERVAL_S:
            return
        if start.waiting > 0 and elapsed <= MAX_INTERVAL_S:
            measured = (sample.dequeued - start.dequeued) / elapsed
            if self.rate is None:
                self.rate = measured
            else:
                weight = 1.0 - math.exp(-elapsed / SMOOTHING_S)
                self.rate += weight * (measured - self.rate)
        self._start = sample


class QueueAdmission:
    """The admission decision for one model version's queue: the queue limit (`max_waiting` texts) and the wait
    bound (`max_wait_s`; <= 0 turns it off). `label` names the version in messages ('dates version 1'). Use from
    one thread."""

    def __init__(self, label: str, max_waiting: int, max_wait_s: float) -> None:
        self.label = label
        self.max_waiting = max_waiting
        self.max_wait_s = max_wait_s
        self.drain = DrainRate()

    def observe(self, sample: QueueSample) -> None:
        """Feed the drain rate with what the queue holds now."""
        self.drain.observe(sample)

    def estimate(self, waiting: int, picked_up: int) -> WaitEstimate | None:
        """The wait of a call that arrives now behind `waiting` texts in the engine's queue and `picked_up` texts
        this process has sent the engine but the engine's count does not show yet, or None when it is within
        the bound (or nothing is known yet, or the bound is off)."""
        ahead = waiting + picked_up
        rate = self.drain.rate
        if self.max_wait_s <= 0.0 or rate is None or ahead <= 0:
            return None
        wait_s = ahead / rate if rate > 0.0 else math.inf
        if wait_s <= self.max_wait_s:
            return None
        return WaitEstimate(ahead=ahead, drain_rate=rate, wait_s=wait_s, bound_s=self.max_wait_s)

    def check(self, count: int, waiting: int, picked_up: int = 0) -> None:
        """Raise unless a call of `count` texts may be queued now behind `waiting` + `picked_up` texts (see
        estimate): InvalidRequest when it never fits the queue, Overloaded (reason QUEUE_FULL) when the queue
        has no room for it, Overloaded (reason QUEUE_WAIT) when it could not start within the bound. Both
        Overloaded carry a retry hint when the drain rate is known."""
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
        estimate = self.estimate(waiting, picked_up)
        if estimate is not None:
            drains = (
                f"the queue drains {estimate.drain_rate:.0f} texts/s"
                if estimate.drain_rate > 0.0
                else "the queue has not moved lately"
            )
            raise Overloaded(
                f"model {self.label} cannot start this call within {self.max_wait_s:.3f} s (max_queue_wait_ms): "
                f"{estimate.ahead} texts are ahead of it and {drains}; retry later",
                reason=QUEUE_WAIT,
                retry_after_s=estimate.retry_after_s,
            )
