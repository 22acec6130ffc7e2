"""The engine's promises under faults, deadlines, cancellation and a full queue, on the fake step model.

The fake (tests/engine/fakes.py) is the one place a stand-in is allowed: it lets a test hold decoder
steps at a gate and make chosen calls raise, so "within one step" and "exactly once" are checked
step by step rather than by timing.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import numpy as np
import pytest

from service.engine import EngineResult, FinishReason
from service.errors import AttnServeError, EngineFailure, InvalidRequest, Overloaded, RequestCancelled
from tests.engine.fakes import (
    NO_EOS,
    FakeClock,
    FakeStepModel,
    InjectedFailure,
    RecordingRecorder,
    StepGate,
    engine_limits,
    make_request,
    outcome,
    running,
    same_hypotheses,
    source,
)


def source_lengths_per_step(model: FakeStepModel) -> list[tuple[int, ...]]:
    return [call.source_lengths for call in model.step_calls]


def test_a_cancelled_request_leaves_at_the_next_step_and_a_waiting_one_takes_its_slot() -> None:
    gate = StepGate()
    model = FakeStepModel(support=NO_EOS, gate=gate)

    async def main() -> tuple[object, object]:
        # Room for one row only: the second request can run only in the first one's slot.
        async with running(model, limits=engine_limits(max_active_hypotheses=1)) as engine:
            long = engine.submit(make_request(source(3, 3, 3), max_length=50))  # 4 source tokens
            await gate.until_blocked()  # step 0 holds the long request
            waiting = engine.submit(make_request(source(4), max_length=3))  # 2 source tokens
            assert (engine.running, engine.waiting) == (1, 1)
            long.cancel()
            gate.open()
            return await outcome(long), await outcome(waiting)

    cancelled, result = asyncio.run(main())
    assert isinstance(cancelled, RequestCancelled)
    assert isinstance(result, EngineResult) and len(result.best.token_ids) == 3
    # Step 0 was the long request's; from step 1 on the slot is the waiting request's.
    assert source_lengths_per_step(model) == [(4,), (2,), (2,), (2,)]


def test_an_expired_request_leaves_at_the_next_step_and_a_waiting_one_takes_its_slot() -> None:
    gate = StepGate()
    model = FakeStepModel(support=NO_EOS, gate=gate)
    recorder = RecordingRecorder()

    clock = FakeClock()

    async def main() -> tuple[object, object]:
        limits = engine_limits(max_active_hypotheses=2)
        async with running(model, limits=limits, recorder=recorder, clock=clock) as engine:
            deadline = clock.now + 0.2
            doomed = engine.submit(
                make_request(source(3, 3, 3), beam=2, max_length=50, deadline=deadline, arrival=clock.now)
            )
            await gate.until_blocked()
            waiting = engine.submit(make_request(source(4), beam=2, max_length=2, arrival=clock.now))
            clock.now = deadline  # the deadline passes while step 0 is held
            gate.open()
            return await outcome(doomed), await outcome(waiting)

    expired, result = asyncio.run(main())
    assert expired.code == "DEADLINE_EXCEEDED" and "deadline" in str(expired)
    assert isinstance(result, EngineResult)
    assert source_lengths_per_step(model) == [(4, 4), (2, 2), (2, 2)]
    assert recorder.failed == [FinishReason.DEADLINE] and len(recorder.done) == 1


def test_a_request_cancelled_while_queued_never_takes_a_slot() -> None:
    gate = StepGate()
    model = FakeStepModel(support=NO_EOS, gate=gate)

    async def main() -> list[object]:
        async with running(model, limits=engine_limits(max_active_hypotheses=1)) as engine:
            first = engine.submit(make_request(source(3), max_length=2))
            await gate.until_blocked()
            gone = engine.submit(make_request(source(5, 5, 5, 5), max_length=2))
            kept = engine.submit(make_request(source(6, 6), max_length=2))
            gone.cancel()
            gate.open()
            return [await outcome(handle) for handle in (first, gone, kept)]

    first, gone, kept = asyncio.run(main())
    assert isinstance(first, EngineResult) and isinstance(kept, EngineResult)
    assert isinstance(gone, RequestCancelled)
    assert 5 not in {length for lengths in source_lengths_per_step(model) for length in lengths}
    assert model.encode_batches == [1, 1]


@dataclass
class PoisonedStepModel(FakeStepModel):
    """The fake, except that a decoder step raises whenever one of its rows has a source of
    `poison_length` tokens: a fault tied to one request's input, like a real poisoned input."""

    poison_length: int = 9

    def step(self, tokens, source_lengths, memory, state, **options):  # type: ignore[no-untyped-def]
        output = super().step(tokens, source_lengths, memory, state, **options)
        if (np.asarray(source_lengths) == self.poison_length).any():
            raise InjectedFailure(f"poisoned source of {self.poison_length} tokens")
        return output


def test_a_step_that_raises_for_one_request_fails_only_that_request() -> None:
    gate = StepGate()
    model = PoisonedStepModel(support=NO_EOS, gate=gate)
    reference = FakeStepModel(support=NO_EOS)  # the same numbers, never poisoned
    good_sources = [source(3, 4), source(5, 6, 7)]
    poisoned = source(*([8] * 8))  # 9 tokens with </s>

    async def main() -> tuple[list[object], list[object], object]:
        async with running(model) as engine:
            first = engine.submit(make_request(good_sources[0], beam=2, max_length=4))
            await gate.until_blocked()  # step 0 is held; the next two join at step 1, with the poison
            bad = engine.submit(make_request(poisoned, max_length=4))
            second = engine.submit(make_request(good_sources[1], max_length=4, stream=True))
            gate.open()
            tokens = [event.token_id async for event in second.tokens()]
            ended = [await outcome(handle) for handle in (first, bad, second)]
        async with running(reference) as engine:
            alone = [
                await outcome(engine.submit(make_request(good_sources[0], beam=2, max_length=4))),
                await outcome(engine.submit(make_request(good_sources[1], max_length=4))),
            ]
        return ended, alone, tokens

    (first, bad, second), alone, tokens = asyncio.run(main())
    assert isinstance(bad, EngineFailure) and bad.code == "INTERNAL"
    assert "poisoned source of 9 tokens" in str(bad) and "decoder step" in str(bad)
    # The requests that shared the failing step finished as if they had been alone.
    assert isinstance(first, EngineResult) and isinstance(second, EngineResult)
    assert same_hypotheses(first.hypotheses, alone[0].hypotheses)
    assert same_hypotheses(second.hypotheses, alone[1].hypotheses)
    assert tokens == second.best.token_ids
    rows = [call.rows for call in model.step_calls]
    # step 0: 2 rows; step 1: 4 rows fail; then each request alone (2, 1, 1 rows); then the survivors.
    assert rows[:5] == [2, 4, 2, 1, 1] and set(rows[5:]) <= {3, 2, 1}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_poisoned_requests_fail_alone_and_every_request_is_answered_exactly_once(seed: int) -> None:
    """Random requests (greedy, beam, streaming), some with a poisoned source: exactly the poisoned
    ones fail (INTERNAL), every request ends exactly once, and afterwards the engine serves again."""
    rng = random.Random(seed)
    model = PoisonedStepModel(support=NO_EOS)
    recorder = RecordingRecorder()
    resolutions: dict[int, int] = {}
    poisoned: set[int] = set()

    async def consume(index: int, handle, stream: bool) -> object:  # type: ignore[no-untyped-def]
        ended: object
        if stream:
            try:
                async for _ in handle.tokens():
                    pass
            except AttnServeError as error:
                ended = error
            else:
                ended = await outcome(handle)
        else:
            ended = await outcome(handle)
        resolutions[index] = resolutions.get(index, 0) + 1
        return ended

    async def main() -> tuple[list[object], object]:
        async with running(model, limits=engine_limits(max_active_hypotheses=8), recorder=recorder) as engine:
            tasks = []
            for index in range(30):
                beam = rng.choice((1, 1, 2, 3))
                stream = beam == 1 and rng.random() < 0.5
                if rng.random() < 0.2:
                    poisoned.add(index)
                    tokens = [rng.randrange(3, 30) for _ in range(8)]  # 9 with </s>: poisoned
                else:
                    tokens = [rng.randrange(3, 30) for _ in range(rng.randint(1, 6))]
                request = make_request(source(*tokens), beam=beam, max_length=rng.randint(1, 6), stream=stream)
                tasks.append(asyncio.create_task(consume(index, engine.submit(request), stream)))
                if rng.random() < 0.3:
                    await asyncio.sleep(0)
            ended = await asyncio.gather(*tasks)
            after = await outcome(engine.submit(make_request(source(3), max_length=3)))
            return ended, after

    ended, after = asyncio.run(main())
    assert poisoned, "no poisoned request: the test proved nothing"
    assert resolutions == {index: 1 for index in range(30)}
    failed = {index for index, result in enumerate(ended) if not isinstance(result, EngineResult)}
    assert failed == poisoned
    assert all(isinstance(ended[index], EngineFailure) and "poisoned source" in str(ended[index]) for index in failed)
    assert len(recorder.done) + len(recorder.failed) == 31  # the recorder saw each request once too
    assert recorder.failed == [FinishReason.ERROR] * len(poisoned)
    assert isinstance(after, EngineResult)


def test_a_step_that_fails_for_everyone_fails_everyone_once_and_the_engine_goes_on() -> None:
    """A fault not tied to one request (here: two failing calls in a row) fails the step's requests."""
    model = FakeStepModel(support=NO_EOS, fail_steps={2, 3, 4})
    gate_free_limits = engine_limits(max_active_hypotheses=4)

    async def main() -> tuple[list[object], object]:
        async with running(model, limits=gate_free_limits) as engine:
            handles = [engine.submit(make_request(source(3 + index), max_length=5)) for index in range(2)]
            ended = [await outcome(handle) for handle in handles]
            after = await outcome(engine.submit(make_request(source(9), max_length=2)))
            return ended, after

    ended, after = asyncio.run(main())
    # Steps 0-1 ran both; step 2 failed; each alone (calls 3 and 4) failed too.
    assert all(isinstance(result, EngineFailure) for result in ended)
    assert [call.rows for call in model.step_calls][:5] == [2, 2, 2, 1, 1]
    assert isinstance(after, EngineResult)


def test_a_call_of_several_texts_is_queued_whole_or_refused_whole() -> None:
    gate = StepGate()
    model = FakeStepModel(support=NO_EOS, gate=gate)

    async def main() -> None:
        async with running(model, limits=engine_limits(max_waiting_requests=4, max_active_hypotheses=1)) as engine:
            first = engine.submit(make_request(source(3), max_length=2))
            await gate.until_blocked()
            queued = engine.submit_all([make_request(source(4), max_length=2) for _ in range(2)])
            assert engine.waiting == 2
            with pytest.raises(Overloaded) as refused:
                engine.submit_all([make_request(source(5), max_length=2) for _ in range(3)])
            assert "2 requests waiting and this call brings 3; the limit is 4" in str(refused.value)
            assert engine.waiting == 2  # nothing of the refused call was left in the queue
            with pytest.raises(InvalidRequest) as never:
                engine.submit_all([make_request(source(5), max_length=2) for _ in range(5)])
            assert "brings 5 texts" in str(never.value) and "at most 4" in str(never.value)
            queued += engine.submit_all([make_request(source(6), max_length=2) for _ in range(2)])
            assert engine.waiting == 4
            gate.open()
            results = [await outcome(handle) for handle in [first, *queued]]
            assert all(isinstance(result, EngineResult) for result in results)

    asyncio.run(main())
