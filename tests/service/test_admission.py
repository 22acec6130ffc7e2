"""Admission by expected wait (service/engine_client/admission.py) and gRPC core's backlog
(service/grpc_api/backlog.py): exact answers from given counts and times.

The drain rate is measured from samples the test writes down (time, texts waiting, texts that have left the
queue), so every rate, estimate and retry hint below is computed by hand."""

from __future__ import annotations

import asyncio
import math

import pytest

from service.engine_client.admission import (
    LONGEST_RETRY_HINT_S,
    MAX_INTERVAL_S,
    MIN_INTERVAL_S,
    QUEUE_SHARE_KEPT,
    SMOOTHING_S,
    TRUSTED_AFTER_INTERVALS,
    TRUSTED_AFTER_S,
    DrainRate,
    PendingCalls,
    QueueAdmission,
)
from service.errors import QUEUE_FULL, QUEUE_WAIT, InvalidRequest, Overloaded
from service.grpc_api.backlog import BUSY_SHARE, READ_COST_MULTIPLE, SAMPLE_INTERVAL_S, CoreBacklog


def drained(*samples: tuple[float, int, int]) -> DrainRate:
    rate = DrainRate()
    for at, waiting, dequeued in samples:
        rate.observe(at, waiting, dequeued)
    return rate


STEP_S = 0.25
"""The intervals of `backlogged` (a binary fraction: its sums are exact)."""


def backlogged(rate: float, until: float, waiting: int = 100, dequeued: int = 0) -> list[tuple[float, int, int]]:
    """Samples of a queue backlogged (`waiting` items at each) over TRUSTED_AFTER_INTERVALS intervals of STEP_S that
    end at `until`, `rate` items/s leaving it from `dequeued`: after them its rate is known, and exactly `rate`."""
    start = until - STEP_S * TRUSTED_AFTER_INTERVALS
    return [
        (start + STEP_S * step, waiting, dequeued + round(rate * STEP_S * step))
        for step in range(TRUSTED_AFTER_INTERVALS + 1)
    ]


def admission(max_waiting: int = 1000, max_wait_s: float = 0.5, rate: float | None = 500.0) -> QueueAdmission:
    """A QueueAdmission whose drain rate is `rate` texts/s (measured over busy intervals that end at 11 s)."""
    gate = QueueAdmission("dates version 1", max_waiting, max_wait_s)
    if rate is not None:
        for at, waiting, dequeued in backlogged(rate, until=11.0, waiting=50):
            gate.observe(at, waiting, dequeued)
        assert gate.drain.rate == pytest.approx(rate)
    return gate


# ----- the drain rate ---------------------------------------------------------------------------------------


def test_the_rate_is_what_left_a_backlogged_queue_per_second() -> None:
    # Three intervals of 0.25 s in which 100, 150 and 125 left: 375 over 0.75 s.
    samples = ((0.0, 100, 0), (0.25, 100, 100), (0.5, 100, 250), (0.75, 100, 375))
    assert TRUSTED_AFTER_INTERVALS == 3
    assert drained(*samples).rate == pytest.approx(500.0)


def test_no_rate_before_a_first_busy_interval() -> None:
    assert DrainRate().rate is None
    assert drained((0.0, 100, 0)).rate is None


def test_one_interval_sets_no_rate_however_long_it_is() -> None:
    # Nothing left over the first measured interval: a hiccup, or the process stopped for 0.6 s, which no sample
    # sees until it is over. Alone it would refuse every call behind a waiting text.
    drain = drained((0.0, 100, 0), (0.6, 100, 0))
    assert drain.rate is None
    # Intervals that ended with the queue emptied are floors, not measurements: they do not count.
    drain.observe(0.61, 0, 30)
    assert drain.rate is None
    # A second measured interval: two.
    drain.observe(1.0, 100, 30)
    drain.observe(1.1, 100, 330)
    assert drain.rate is None
    # A third: 600 left over the three, 0.8 s in all.
    drain.observe(1.2, 100, 630)
    assert drain.rate == pytest.approx(600 / 0.8)
    # From then on, a moving average.
    drain.observe(1.3, 100, 630)
    assert drain.rate == pytest.approx(750.0 * math.exp(-0.1 / SMOOTHING_S))


def test_short_intervals_set_no_rate_until_they_add_up_to_the_trusted_length() -> None:
    interval_s = 1 / 16  # longer than MIN_INTERVAL_S; eight of them make TRUSTED_AFTER_S
    assert interval_s >= MIN_INTERVAL_S and 8 * interval_s == TRUSTED_AFTER_S
    drain = drained((0.0, 100, 0))
    for step in range(1, 8):
        drain.observe(step * interval_s, 100, 25 * step)
        assert drain.rate is None
    drain.observe(8 * interval_s, 100, 8 * 25)
    assert drain.rate == pytest.approx(25 / interval_s)


def test_an_interval_that_began_or_ended_with_an_empty_queue_measures_nothing() -> None:
    # While the queue is empty, texts leave as fast as they arrive: that says nothing of what the engine can do.
    assert drained((0.0, 0, 0), (0.5, 10, 5)).rate is None
    assert drained((0.0, 10, 0), (0.5, 0, 10)).rate is None
    # An empty sample in between, even a short one, restarts the interval.
    assert drained((0.0, 10, 0), (0.01, 0, 10), (0.5, 10, 20)).rate is None
    samples = ((0.0, 10, 0), (0.01, 0, 10), *backlogged(500, until=1.25, waiting=10, dequeued=20))
    assert drained(*samples).rate == pytest.approx(500.0)


def test_a_queue_emptied_within_an_interval_moves_a_lower_rate_toward_what_left_over_it() -> None:
    at_20 = backlogged(20, until=0.75, waiting=90)  # measured: 20/s, 15 left by 0.75 s
    # The other 90 left within the next 0.4 s: at least 225/s, averaged in over those 0.4 s.
    assert drained(*at_20, (1.15, 0, 105)).rate == pytest.approx(20.0 + (1 - math.exp(-0.4 / SMOOTHING_S)) * 205.0)
    # Within 0.01 s: a span shorter than MIN_INTERVAL_S gives no floor yet; it goes on to the next time the queue
    # is found emptied, here 0.05 s after the measurement, by when 8 more came and left: 98 over 0.05 s.
    drain = drained(*at_20, (0.76, 0, 105))
    assert drain.rate == pytest.approx(20.0)
    drain.observe(0.77, 8, 105)
    drain.observe(0.8, 0, 113)
    assert drain.rate == pytest.approx(20.0 + (1 - math.exp(-0.05 / SMOOTHING_S)) * (98 / 0.05 - 20.0))
    # A floor holds over any length, a long one too: 90 within 2 s.
    long_s = MAX_INTERVAL_S + 1.0
    assert drained(*at_20, (0.75 + long_s, 0, 105)).rate == pytest.approx(
        20.0 + (1 - math.exp(-long_s / SMOOTHING_S)) * (90 / long_s - 20.0)
    )


def test_a_floor_under_the_rate_changes_nothing_and_none_makes_a_first_rate() -> None:
    at_500 = backlogged(500, until=0.75, waiting=50)  # 375 left by 0.75 s
    assert drained(*at_500, (1.75, 0, 425)).rate == pytest.approx(500.0)  # 50 within 1 s: at least 50/s
    assert drained((0.0, 10, 0), (0.5, 0, 10)).rate is None


def test_texts_that_leave_all_at_once_raise_the_rate_only_by_their_share_of_the_average() -> None:
    # 1,000/s measured; then 300 waiting texts expire within 10 ms and the queue is empty; 5 more come and go by
    # 0.8 s: 305 left over the 0.05 s span, a floor of 6,100/s, which weighs what 0.05 s of the average does.
    drain = drained(*backlogged(1000, until=0.75, waiting=500))
    assert drain.rate == pytest.approx(1000.0)
    drain.observe(0.76, 0, 1050)
    drain.observe(0.79, 5, 1050)
    drain.observe(0.8, 0, 1055)
    assert drain.rate == pytest.approx(1000.0 + (1 - math.exp(-0.05 / SMOOTHING_S)) * (305 / 0.05 - 1000.0))
    assert drain.rate < 1.25 * 1000.0


def stalled(gate: QueueAdmission, waiting: int, until: float) -> None:
    """`waiting` texts sat in `gate`'s queue, none leaving, over TRUSTED_AFTER_INTERVALS intervals ending at `until`
    (the samples of calls arriving meanwhile): its rate is then known, and 0."""
    for at, queued, dequeued in backlogged(0.0, until=until, waiting=waiting):
        gate.observe(at, queued, dequeued)
    assert gate.drain.rate == 0.0


def test_a_cold_step_does_not_leave_the_rate_at_zero_once_the_engine_keeps_up_again() -> None:
    # A first step at a new shape (on a GPU, seconds) holds 12 texts for 0.75 s: measured 0/s, and any call behind
    # a waiting text is refused. Then the engine takes every waiting text at each step, every 10 ms: the queue
    # empties at each step, and 5 texts arrive before the next.
    gate = QueueAdmission("dates version 1", 1000, 0.5)
    stalled(gate, 12, until=0.75)
    assert gate.estimate(waiting=5, picked_up=0) is not None
    gate.observe(0.76, 0, 12)  # the cold step ends and takes all 12
    assert gate.estimate(waiting=5, picked_up=0) is not None  # no floor yet: a span of 0.01 s
    at, dequeued, rates = 0.76, 12, []
    for _ in range(100):  # a second of steps
        gate.observe(at + 0.001, 5, dequeued)  # the next arrivals
        at, dequeued = at + 0.01, dequeued + 5
        gate.observe(at, 0, dequeued)  # the step took them all
        rates.append(gate.drain.rate)
    assert rates == sorted(rates) and rates[-1] < 5 / 0.01  # toward the throughput, never past it
    assert gate.estimate(waiting=5, picked_up=0) is None


def test_a_rate_at_zero_recovers_from_the_throughput_not_from_the_last_samples_few_texts() -> None:
    # A stall of 0.75 s (rate 0), then a steady 2,500 texts/s: a step every 4 ms takes the 10 texts that arrived
    # since the last, one every 0.4 ms, each arrival a sample. A call behind 64 texts fits the 0.5 s bound once
    # the rate is 128/s. Floors over each sample's interval alone (10 texts in 0.4 ms, counted over 50 ms: 200/s)
    # took 1.1 s of steps to get there; over spans of at least MIN_INTERVAL_S they see the 2,500/s.
    gate = QueueAdmission("dates version 1", 1000, 0.5)
    stalled(gate, 12, until=0.75)
    floors: list[float] = []
    step, dequeued, admitted_after = 0, 0, None
    while admitted_after is None and step < 1000:
        start = 0.75 + step * 0.004
        for arrived in range(1, 10):
            gate.observe(start + arrived * 0.0004, arrived, dequeued)
        step, dequeued = step + 1, dequeued + 10
        before = gate.drain.rate
        gate.observe(0.75 + step * 0.004, 0, dequeued)
        if gate.drain.rate != before:
            floors.append(gate.drain.rate)
        if gate.estimate(waiting=64, picked_up=0) is None:
            admitted_after = step * 0.004
    # The first floor comes at the 13th step (52 ms: 130 texts, 2,500/s) and lifts the rate to 127.5/s; the second,
    # 13 steps later, past 128/s.
    weight = 1 - math.exp(-0.052 / SMOOTHING_S)
    assert floors == pytest.approx([weight * 2500.0, weight * 2500.0 * (2 - weight)])
    assert admitted_after == pytest.approx(26 * 0.004)


def test_samples_closer_than_the_shortest_interval_extend_it() -> None:
    half = MIN_INTERVAL_S / 2
    rate = drained((0.0, 100, 0), (half, 100, 7))
    assert rate.rate is None
    rate.observe(0.25, 100, 40)  # measured from the interval's start, at 0: one interval, not two
    rate.observe(0.5, 100, 140)
    assert rate.rate is None
    rate.observe(0.75, 100, 240)
    assert rate.rate == pytest.approx(240 / 0.75)


def test_an_interval_longer_than_the_longest_measures_nothing() -> None:
    # The queue may have been empty (and the engine idle) in between without any sample showing it.
    assert drained((0.0, 10, 0), (MAX_INTERVAL_S + 0.5, 10, 30)).rate is None


def test_a_count_that_goes_backwards_starts_over() -> None:
    # A new engine for the same version counts from 0 again.
    assert drained((0.0, 10, 500), (0.25, 10, 3)).rate is None
    samples = ((0.0, 10, 500), (0.25, 10, 3), (0.5, 10, 128), (0.75, 10, 253), (1.0, 10, 378))
    assert drained(*samples).rate == pytest.approx(500.0)


def test_later_intervals_are_averaged_by_their_length() -> None:
    rate = drained(*backlogged(500, until=0.75))  # 500/s; 375 left by 0.75 s
    rate.observe(0.95, 100, 375 + 200)  # 1000/s over 0.2 s
    weight = 1.0 - math.exp(-0.2 / SMOOTHING_S)
    assert rate.rate == pytest.approx(500.0 + weight * (1000.0 - 500.0))


def test_a_stalled_queue_has_rate_zero() -> None:
    assert drained(*backlogged(0.0, until=0.75, waiting=10, dequeued=7)).rate == 0.0


# ----- the decision ------------------------------------------------------------------------------------------


def test_a_call_that_could_start_within_the_bound_is_admitted() -> None:
    gate = admission(rate=500.0)
    assert gate.estimate(waiting=250, picked_up=0) is None  # 0.5 s: exactly the bound
    gate.check(count=1, waiting=250)


def test_a_call_that_could_not_start_within_the_bound_is_refused_with_a_retry_hint() -> None:
    gate = admission(rate=500.0, max_wait_s=0.5)
    estimate = gate.estimate(waiting=300, picked_up=0)
    assert estimate is not None
    assert (estimate.ahead, estimate.drain_rate) == (300, 500.0)
    assert estimate.wait_s == pytest.approx(0.6)
    assert estimate.retry_after_s == pytest.approx(0.1)
    with pytest.raises(Overloaded) as refused:
        gate.check(count=1, waiting=300)
    assert refused.value.reason == QUEUE_WAIT
    assert refused.value.retry_after_s == pytest.approx(0.1)
    assert refused.value.message == (
        "model dates version 1 cannot start this call within 0.500 s (max_queue_wait_ms): 300 texts are ahead of "
        "it and the queue drains 500 texts/s; retry later"
    )


def test_texts_picked_up_but_not_yet_in_the_engines_count_are_ahead_too() -> None:
    gate = admission(rate=500.0, max_wait_s=0.5)
    assert gate.estimate(waiting=200, picked_up=50) is None  # 250 ahead: 0.5 s
    estimate = gate.estimate(waiting=200, picked_up=100)
    assert estimate is not None and estimate.ahead == 300
    with pytest.raises(Overloaded, match="300 texts are ahead of it"):
        gate.check(count=1, waiting=200, picked_up=100)


def test_nothing_is_refused_for_time_before_the_rate_is_known_or_when_the_bound_is_off() -> None:
    assert admission(rate=None).estimate(waiting=999, picked_up=0) is None
    assert admission(max_wait_s=0.0).estimate(waiting=999, picked_up=0) is None
    admission(rate=None).check(count=1, waiting=999)


def test_a_stalled_queue_refuses_with_the_longest_hint() -> None:
    gate = QueueAdmission("dates version 1", 1000, 0.5)
    stalled(gate, 10, until=0.75)
    estimate = gate.estimate(waiting=10, picked_up=0)
    assert estimate is not None and estimate.wait_s == math.inf
    assert estimate.retry_after_s == LONGEST_RETRY_HINT_S
    with pytest.raises(Overloaded, match="the queue has not moved lately; retry later"):
        gate.check(count=1, waiting=10)


def test_the_queue_limit_still_holds_and_says_when_there_will_be_room() -> None:
    gate = admission(max_waiting=100, rate=500.0)
    gate.check(count=4, waiting=96)  # exactly full after it (and 96 / 500 s is within the bound)
    with pytest.raises(Overloaded) as refused:
        gate.check(count=4, waiting=97)
    assert refused.value.reason == QUEUE_FULL
    assert refused.value.retry_after_s == pytest.approx(1 / 500.0)  # one text must leave first
    assert refused.value.message == (
        "model dates version 1 has 97 requests waiting and this call brings 4; the limit is 100; retry later"
    )
    with pytest.raises(Overloaded) as unknown_rate:
        admission(max_waiting=100, rate=None).check(count=4, waiting=97)
    assert unknown_rate.value.retry_after_s is None


def test_a_call_larger_than_the_queue_is_invalid_not_overload() -> None:
    with pytest.raises(InvalidRequest, match="this call brings 101 texts but model dates version 1 queues at most 100"):
        admission(max_waiting=100).check(count=101, waiting=0)


def test_a_call_that_waited_to_be_picked_up_has_less_of_the_bound_left_but_never_less_than_a_share() -> None:
    gate = admission(rate=500.0, max_wait_s=0.5)
    assert gate.estimate(waiting=200, picked_up=0, waited_s=0.0) is None  # 0.4 s of 0.5
    estimate = gate.estimate(waiting=200, picked_up=0, waited_s=0.2)  # 0.4 s of the 0.3 s left
    assert estimate is not None and estimate.bound_s == pytest.approx(0.3)
    assert estimate.retry_after_s == pytest.approx(0.1)
    # However long it waited, the queue may still hold QUEUE_SHARE_KEPT of the bound's worth of texts.
    kept = QUEUE_SHARE_KEPT * 0.5
    assert gate.estimate(waiting=round(kept * 500), picked_up=0, waited_s=5.0) is None
    assert gate.estimate(waiting=round(kept * 500) + 1, picked_up=0, waited_s=5.0) is not None
    with pytest.raises(Overloaded, match="after it waited 5.000 s to be picked up: 51 texts are ahead of it"):
        gate.check(count=1, waiting=51, waited_s=5.0)


def test_an_interval_begins_at_the_first_sample_with_something_waiting() -> None:
    # Begun at 0.25 s: 375 over 0.75 s. (Begun at 0, with the queue empty, it would read 375 over 1 s.)
    samples = ((0.0, 0, 0), (0.25, 10, 0), (0.5, 10, 125), (0.75, 10, 250), (1.0, 10, 375))
    assert drained(*samples).rate == pytest.approx(500.0)


def test_pending_calls_are_counted_until_they_reach_the_dataplane_or_end() -> None:
    async def scenario() -> None:
        pending = PendingCalls()
        release = asyncio.Event()
        reached = asyncio.get_running_loop().create_task(release.wait())
        abandoned = asyncio.get_running_loop().create_task(release.wait())
        pending.add(reached, waited_s=0.25)
        pending.add(abandoned)
        pending.add(reached, waited_s=9.0)  # once per call
        assert pending.count == 2
        pending.observe(0.0)
        assert pending.remove(reached) == 0.25
        assert pending.remove(reached) == 0.0  # idempotent
        abandoned.cancel()  # the client went away before its call reached the dataplane
        await asyncio.gather(abandoned, return_exceptions=True)
        assert pending.count == 0
        release.set()
        await reached
        pending.observe(0.0)

    asyncio.run(scenario())


def test_core_backlog_is_the_calls_core_holds_that_python_does_not_over_the_pickup_rate() -> None:
    async def scenario() -> None:
        clock, cpu = Clock(), Clock()
        counts = {"started": 0, "finished": 0}
        backlog = CoreBacklog(7, clock, lambda server_id: (counts["started"], counts["finished"]), cpu)
        release = asyncio.Event()
        held = [asyncio.get_running_loop().create_task(release.wait()) for _ in range(3)]
        for task in held:
            backlog.picked_up(task)
        assert backlog.waited_s() == 0.0  # the first look: nothing to judge the loop's load by
        clock.now += SAMPLE_INTERVAL_S
        cpu.now += 2 * BUSY_SHARE * SAMPLE_INTERVAL_S  # the loop was busy
        counts["started"] = 3 + 100  # core took 103 calls; Python holds 3 of them
        assert backlog.waited_s() == 0.0  # a backlog of 100, but no pickup rate yet
        assert backlog.waiting == 100
        for interval in range(TRUSTED_AFTER_INTERVALS):
            clock.now += STEP_S  # 50 more picked up (and ended) while 100 still waited; the loop idled
            for _ in range(50):
                done = asyncio.get_running_loop().create_future()
                backlog.picked_up(done)
                done.set_result(None)
            counts["started"] += 50
            counts["finished"] += 50
            await asyncio.sleep(0)  # the done callbacks run
            # Read again although the loop was not busy: the last read found calls waiting. A rate, and so an
            # estimate, once the intervals are enough.
            waited_s = backlog.waited_s()
            assert waited_s == (0.0 if interval < TRUSTED_AFTER_INTERVALS - 1 else pytest.approx(100 / (50 / STEP_S)))
        assert backlog.reads == 1 + TRUSTED_AFTER_INTERVALS
        release.set()
        await asyncio.gather(*held)
        assert CoreBacklog(None, clock).waited_s() == 0.0  # unknown server: no backlog

    asyncio.run(scenario())


def test_core_counts_are_not_read_while_the_loop_has_time_to_spare() -> None:
    """A read walks every connection holding the GIL (25 ms with 2,000 idle ones): a loop that is mostly idle picks
    calls up as they come, so it does not read, whatever core would say."""
    clock, cpu = Clock(), Clock()
    reads: list[int] = []

    def calls(server_id: int) -> tuple[int, int]:
        reads.append(server_id)
        return 500, 0

    backlog = CoreBacklog(7, clock, calls, cpu)
    step_s = 2 * SAMPLE_INTERVAL_S  # (a whole interval, whatever the sums' rounding)
    for _ in range(100):
        assert backlog.waited_s() == 0.0
        clock.now += step_s
        cpu.now += 0.9 * BUSY_SHARE * step_s
    assert reads == []
    cpu.now += 0.2 * BUSY_SHARE * step_s  # now busy for more than BUSY_SHARE of the last interval
    backlog.waited_s()
    assert reads == [7] and backlog.waiting == 500


def test_core_counts_are_read_at_most_once_per_multiple_of_what_a_read_costs() -> None:
    clock, cpu = Clock(), Clock()
    read_cost_s = 0.01  # READ_COST_MULTIPLE x this is four sampling intervals

    def calls(server_id: int) -> tuple[int, int]:
        clock.now += read_cost_s
        return 10, 0

    backlog = CoreBacklog(7, clock, calls, cpu)
    backlog.waited_s()
    read_at: list[float] = []
    for _ in range(100):
        clock.now += SAMPLE_INTERVAL_S / 10
        cpu.now += SAMPLE_INTERVAL_S / 10  # flat out
        before = backlog.reads
        backlog.waited_s()
        if backlog.reads > before:
            read_at.append(clock.now)
    gaps = [later - earlier for earlier, later in zip(read_at, read_at[1:], strict=False)]
    assert len(read_at) >= 2
    assert min(gaps) >= READ_COST_MULTIPLE * read_cost_s


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_core_backlog_that_cannot_be_read_reads_0_and_stops_reading() -> None:
    reads: list[int] = []

    def gone(server_id: int) -> tuple[int, int]:
        reads.append(server_id)
        raise ValueError("Failed to get the server, please ensure the server_id is valid")

    clock, cpu = Clock(), Clock()
    backlog = CoreBacklog(7, clock, gone, cpu)
    for _ in range(3):
        assert backlog.waited_s() == 0.0
        clock.now += 2 * SAMPLE_INTERVAL_S
        cpu.now += 2 * SAMPLE_INTERVAL_S  # flat out: a read is due each time
    assert reads == [7]
