"""The dataplane's turns (service/engine_client/gate.py): at most `limit` calls in the engines, the others waiting
in one line per client, the lines served round-robin. Exact orders and counts; the one rate (for the bound) is
timed by an injected clock."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable

import pytest

from service.engine_client.admission import TRUSTED_AFTER_INTERVALS
from service.engine_client.gate import NARROW_AT_S, UNREPORTED_AFTER_S, WIDEN_AT_S, FairGate
from service.errors import QUEUE_WAIT, Overloaded


def gate_of(limit: int, clock: list[float] | None = None) -> FairGate:
    now = clock if clock is not None else [0.0]
    return FairGate(limit, lambda: now[0])


async def take_turn(gate: FairGate, client: Hashable, order: list[Hashable], leave: bool = True) -> None:
    """Wait for `client`'s turn and write it down in `order`; then leave at once, or with `leave` False stay in
    until the test frees the place."""
    await gate.wait_turn(client)
    order.append(client)
    if leave:
        gate.leave()


async def settle() -> None:
    """Let every task that can run, run (a few loop turns; no wall clock)."""
    for _ in range(5):
        await asyncio.sleep(0)


def test_calls_go_in_at_once_while_there_is_room_and_no_one_waits() -> None:
    gate = gate_of(2)
    assert [gate.try_enter(), gate.try_enter(), gate.try_enter()] == [True, True, False]
    assert gate.inside == 2
    gate.leave()
    assert gate.try_enter() and gate.inside == 2


def test_no_limit_lets_every_call_in() -> None:
    gate = gate_of(0)
    assert all(gate.try_enter() for _ in range(10_000))
    assert gate.inside == 10_000


def test_lines_are_served_round_robin_one_call_of_each_client_in_turn() -> None:
    """One call in at a time; client a queued three calls before b and c queued one each: a, b, c, then a's."""

    async def scenario() -> list[str]:
        gate = gate_of(1)
        assert gate.try_enter()
        order: list[str] = []

        async def call(client: str, name: str) -> None:
            await gate.wait_turn(client)
            order.append(name)
            gate.leave()  # done at once: the next one's turn

        calls = [("a", "a1"), ("a", "a2"), ("a", "a3"), ("b", "b1"), ("c", "c1")]
        tasks = [asyncio.create_task(call(client, name)) for client, name in calls]
        await settle()
        assert (gate.waiting, gate.clients_waiting, order) == (5, 3, [])
        gate.leave()  # the call that was in is done
        await asyncio.gather(*tasks)
        assert (gate.inside, gate.waiting, gate.clients_waiting) == (0, 0, 0)
        return order

    assert asyncio.run(scenario()) == ["a1", "b1", "c1", "a2", "a3"]


def test_a_client_calling_one_at_a_time_waits_behind_one_call_of_each_other_client() -> None:
    """A client with 50 calls waiting and one with 1 (arrived last): the second goes in second, not 51st."""

    async def scenario() -> list[Hashable]:
        gate = gate_of(1)
        assert gate.try_enter()
        order: list[Hashable] = []
        tasks = [asyncio.create_task(take_turn(gate, "greedy", order)) for _ in range(50)]
        await settle()
        tasks.append(asyncio.create_task(take_turn(gate, "polite", order)))
        await settle()
        gate.leave()
        await asyncio.gather(*tasks)
        return order

    order = asyncio.run(scenario())
    assert order.index("polite") == 1 and len(order) == 51


def test_a_new_line_goes_before_the_lines_that_have_had_a_turn() -> None:
    """Two busy clients, three calls each, have each had a turn; a client arriving then with one call goes in at the
    next place that frees, before either of them; then the busy ones take turns again."""

    async def scenario() -> list[Hashable]:
        gate = gate_of(1)
        assert gate.try_enter()
        order: list[Hashable] = []
        tasks = [
            asyncio.create_task(take_turn(gate, client, order, leave=False)) for client in ("x", "y") for _ in range(3)
        ]
        await settle()
        for _ in range(2):  # x's first call, then y's: both lines have had their turn
            gate.leave()
            await settle()
        tasks.append(asyncio.create_task(take_turn(gate, "polite", order, leave=False)))
        await settle()
        while len(order) < 7:
            gate.leave()
            await settle()
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(scenario()) == ["x", "y", "polite", "x", "y", "x", "y"]


def test_a_cancelled_wait_leaves_its_line_and_takes_no_place() -> None:
    async def scenario() -> None:
        gate = gate_of(1)
        assert gate.try_enter()
        first = asyncio.create_task(gate.wait_turn("a"))
        second = asyncio.create_task(gate.wait_turn("a"))
        await settle()
        first.cancel()
        await settle()
        assert first.cancelled() and (gate.waiting, gate.inside) == (1, 1)
        gate.leave()
        await second  # the cancelled call's place in the line went to the next
        assert (gate.inside, gate.waiting, gate.clients_waiting) == (1, 0, 0)

    asyncio.run(scenario())


def test_a_call_let_in_and_cancelled_before_it_runs_gives_its_place_to_the_next() -> None:
    async def scenario() -> None:
        gate = gate_of(1)
        assert gate.try_enter()
        let_in = asyncio.create_task(gate.wait_turn("a"))
        behind = asyncio.create_task(gate.wait_turn("b"))
        await settle()
        gate.leave()  # lets a's call in; its task has not run since
        let_in.cancel()
        await settle()
        assert let_in.cancelled() and behind.done()
        assert (gate.inside, gate.waiting) == (1, 0)  # b's call, in its place

    asyncio.run(scenario())


STEP_S = 0.25
"""Between one call going in and the next: calls go in at exactly 4 a second."""


def test_a_clients_first_call_is_refused_when_one_call_of_each_waiting_client_would_take_too_long() -> None:
    """Ten clients wait one call each; one call goes in every STEP_S and one new client arrives after it. Once the
    rate is known (4 calls/s), a new client with nine others ahead would wait 9 / 4 = 2.25 s: refused, with a hint of
    2.25 - 0.5 s. A client that already waits is not refused: its call waits behind its own."""

    async def scenario() -> None:
        clock = [0.0]
        gate = gate_of(1, clock)
        assert gate.try_enter()
        tasks = [asyncio.create_task(gate.wait_turn(f"client {n}", 0.5)) for n in range(10)]
        await settle()
        for step in range(1, TRUSTED_AFTER_INTERVALS + 1):
            clock[0] = STEP_S * step
            gate.leave()  # the call in is done; the next goes in (and stays in until the next step)
            await settle()
            assert gate.drain.rate is None  # known only from the arrival's sample on
            if step < TRUSTED_AFTER_INTERVALS:
                tasks.append(asyncio.create_task(gate.wait_turn(f"client {10 + step}", 0.5)))
                await settle()
        assert (gate.clients_waiting, gate.waiting) == (9, 9)
        with pytest.raises(Overloaded) as refused:
            await gate.wait_turn("newcomer", 0.5)
        assert gate.drain.rate == 4.0
        assert refused.value.reason == QUEUE_WAIT
        assert refused.value.retry_after_s == 2.25 - 0.5
        assert "9 other clients' first calls wait their turn" in str(refused.value)
        assert (gate.clients_waiting, gate.waiting) == (9, 9)  # the refused call left nothing behind
        tasks.append(asyncio.create_task(gate.wait_turn("client 9", 0.5)))  # a second call of a waiting client
        await settle()
        assert (gate.clients_waiting, gate.waiting) == (9, 10)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(scenario())


def test_without_a_bound_no_call_is_refused() -> None:
    async def scenario() -> None:
        clock = [0.0]
        gate = gate_of(1, clock)
        assert gate.try_enter()
        waiting = [asyncio.create_task(gate.wait_turn(n)) for n in range(100)]
        await settle()
        for step in range(1, 10):
            clock[0] = step * 10.0  # nothing goes in for seconds: the rate reads 0
            waiting.append(asyncio.create_task(gate.wait_turn(1000 + step)))
            await settle()
        assert gate.waiting == 109 and not any(task.done() for task in waiting)
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        assert gate.waiting == 0

    asyncio.run(scenario())


def test_the_gate_narrows_while_calls_wait_in_core_and_widens_once_the_overload_is_over() -> None:
    """Limit 8: calls that waited NARROW_AT_S in core narrow it to 2; calls that waited no longer than WIDEN_AT_S
    widen it back only once no call waits its turn; the places freed meanwhile go to waiting calls only up to 2."""

    async def scenario() -> None:
        gate = gate_of(8)
        for _ in range(4):
            assert gate.try_enter()
        gate.follow_backlog(NARROW_AT_S - 0.01)
        assert (gate.limit, gate.narrowed) == (8, False)
        gate.follow_backlog(NARROW_AT_S)
        assert (gate.limit, gate.narrowed) == (2, True)
        assert not gate.try_enter()  # 4 inside, room for 2
        order: list[str] = []
        waiting = [asyncio.ensure_future(take_turn(gate, client, order, leave=False)) for client in "abc"]
        await settle()
        gate.follow_backlog(WIDEN_AT_S)  # core is empty, but calls wait their turn: still narrow
        assert gate.limit == 2
        for _ in range(3):
            gate.leave()
        await settle()
        assert (order, gate.inside, gate.waiting) == (["a"], 2, 2)  # 1 + a: the narrowed limit
        gate.follow_backlog(WIDEN_AT_S + 0.01)  # neither narrowing nor widening: as it was
        assert gate.limit == 2
        for _ in range(2):
            gate.leave()
        await settle()
        for _ in range(2):
            gate.leave()
        await asyncio.gather(*waiting)
        assert (order, gate.inside, gate.waiting) == (["a", "b", "c"], 0, 0)
        gate.follow_backlog(WIDEN_AT_S)
        assert (gate.limit, gate.narrowed) == (8, False)

    asyncio.run(scenario())


def test_a_narrowed_gate_widens_once_no_transport_has_reported_a_wait_for_a_while() -> None:
    """Narrowed by a gRPC pickup at time 0, then only pickups that cannot report (HTTP): still narrowed just before
    UNREPORTED_AFTER_S, and while a call waits its turn; widened at the first such pickup after it with none waiting.
    A report in between starts the quiet time again."""

    async def scenario() -> None:
        clock = [0.0]
        gate = gate_of(8, clock)
        gate.follow_backlog(NARROW_AT_S)
        for _ in range(2):
            assert gate.try_enter()
        waiting = asyncio.ensure_future(take_turn(gate, "a", []))
        await settle()
        clock[0] = UNREPORTED_AFTER_S - 0.01
        gate.follow_unreported()
        assert gate.limit == 2
        clock[0] = UNREPORTED_AFTER_S
        gate.follow_unreported()
        assert gate.limit == 2  # a call waits its turn
        gate.follow_backlog(WIDEN_AT_S + 0.01)  # reported: neither narrowing nor widening, but heard
        gate.leave()
        await waiting
        assert gate.waiting == 0
        clock[0] = UNREPORTED_AFTER_S + (UNREPORTED_AFTER_S - 0.01)
        gate.follow_unreported()
        assert gate.limit == 2  # not yet quiet for long enough since that report
        clock[0] = 2 * UNREPORTED_AFTER_S
        gate.follow_unreported()
        assert (gate.limit, gate.narrowed) == (8, False)

    asyncio.run(scenario())


def test_a_gate_without_a_limit_is_never_narrowed() -> None:
    gate = gate_of(0)
    gate.follow_backlog(10.0)
    assert (gate.limit, gate.narrowed) == (0, False)
    assert all(gate.try_enter() for _ in range(100))


def test_a_limit_of_one_narrows_to_one() -> None:
    gate = gate_of(1)
    gate.follow_backlog(NARROW_AT_S)
    assert gate.limit == 1 and gate.try_enter()
