"""The engine on the fake model: admission, retirement, budgets, failures, policies, streaming, stop."""

from __future__ import annotations

import asyncio
import random
import threading
import time
import weakref

import numpy as np
import pytest

from service.engine import (
    AsyncEngine,
    BatchingPolicy,
    EngineCore,
    EngineResult,
    FinishReason,
    RequestHandle,
)
from service.errors import (
    AttnServeError,
    DeadlineExceeded,
    EngineFailure,
    InvalidRequest,
    Overloaded,
    RequestCancelled,
    Unavailable,
)

from .fakes import (
    EOS,
    NO_EOS,
    FakeStepModel,
    RecordingRecorder,
    StepGate,
    TickingClock,
    collector_off,
    engine_limits,
    make_request,
    outcome,
    running,
    same_hypotheses,
    source,
)

BOTH_DRIVERS = pytest.mark.parametrize("on_loop", [False, True], ids=["worker-thread", "on-the-loop"])
"""For tests without a step gate (a held step would hold the loop itself): run them with either driver."""


def rows_per_step(model: FakeStepModel) -> list[int]:
    return [call.rows for call in model.step_calls]


# ----- continuous batching -----


def test_a_request_joins_a_running_batch_and_a_short_one_retires_first():
    gate = StepGate()
    model = FakeStepModel(support=NO_EOS, gate=gate)
    recorder = RecordingRecorder()

    async def main():
        async with running(model, recorder=recorder) as engine:
            long = engine.submit(make_request(source(3, 4, 5), max_length=6))
            await gate.until_blocked()  # the long request's first step is in flight
            short = engine.submit(make_request(source(9), max_length=2))
            assert engine.waiting == 1 and engine.running == 1
            gate.open()
            return await long.result(), await short.result()

    long, short = asyncio.run(main())
    assert rows_per_step(model) == [1, 2, 2, 1, 1, 1]  # joined at step 2, left after its 2 tokens
    assert model.encode_batches == [1, 1]
    assert len(long.best.token_ids) == 6 and long.best.finish_reason is FinishReason.LENGTH
    assert len(short.best.token_ids) == 2 and short.generated_tokens == 2
    # Memory is rebuilt when the set of requests changes (step 2: the short one joined; step 4: it left), only then.
    assert [step.memory_generation for step in recorder.steps if step.rows] == [1, 2, 2, 3, 3, 3]


def test_with_an_encoder_thread_a_joining_request_is_encoded_beside_the_step_and_the_thread_ends_after_the_engine():
    gate = StepGate()
    model = FakeStepModel(support=NO_EOS, gate=gate)

    async def main():
        async with running(model, encoder_thread=True) as engine:
            long = engine.submit(make_request(source(3, 4, 5), max_length=6))
            await gate.until_blocked()  # the long request's first step is in flight
            short = engine.submit(make_request(source(9), max_length=2))
            gate.open()
            results = await long.result(), await short.result()
            worker = engine._thread
        return results, worker

    (long, short), worker = asyncio.run(main())
    # The short one is encoded beside step 2 and joins after it: steps 3 and 4 carry it.
    assert rows_per_step(model) == [1, 1, 2, 2, 1, 1]
    assert model.encode_threads[0].startswith("engine fake version 1")  # into an empty batch: at once
    assert model.encode_threads[1].startswith("encoder fake version 1")
    assert len(long.best.token_ids) == 6 and len(short.best.token_ids) == 2
    # The worker leaves its loop once the engine stopped and shuts the pool down on its way out: both threads end.
    assert worker is not None
    worker.join(timeout=30.0)  # a bound on a hang; nothing is asserted about how long it took
    for thread in threading.enumerate():
        if thread.name.startswith("encoder fake version 1"):
            thread.join(timeout=30.0)
    assert not worker.is_alive()
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("encoder fake version 1")]


def test_on_the_loop_with_an_encoder_thread_a_joining_request_is_encoded_on_that_thread():
    model = FakeStepModel(support=NO_EOS)

    async def main():
        async with running(model, on_loop=True, encoder_thread=True) as engine:
            long = engine.submit(make_request(source(3, 4, 5), max_length=6, stream=True))
            tokens = long.tokens()
            first = await anext(tokens)  # the long request decodes: the next request joins a running batch
            short = engine.submit(make_request(source(9), max_length=2))
            rest = [event async for event in tokens]
            return [first, *rest], await short.result()

    events, short = asyncio.run(main())
    assert len(events) == 6 and len(short.best.token_ids) == 2
    assert model.encode_threads[0] == "MainThread"  # the loop's thread, into an empty batch
    assert model.encode_threads[1].startswith("encoder fake version 1")
    assert sum(rows_per_step(model)) == 6 + 2 and 2 in rows_per_step(model)


@BOTH_DRIVERS
def test_retirement_of_the_longest_source_trims_the_padding(on_loop):
    model = FakeStepModel(support=NO_EOS)

    async def main():
        async with running(model, on_loop=on_loop) as engine:
            wide = engine.submit(make_request(source(*range(3, 12)), max_length=2))
            narrow = engine.submit(make_request(source(4, 5), max_length=4))
            await wide.result()
            await narrow.result()

    asyncio.run(main())
    assert model.encode_batches == [2]  # one encoder call for both
    assert rows_per_step(model) == [2, 2, 1, 1]
    assert [call.padded_len for call in model.step_calls] == [10, 10, 3, 3]


@BOTH_DRIVERS
def test_beam_reordering_never_rebuilds_memory(on_loop):
    model = FakeStepModel(support=NO_EOS)
    recorder = RecordingRecorder()

    async def main():
        async with running(model, on_loop=on_loop, recorder=recorder) as engine:
            await engine.submit(make_request(source(3, 4, 5), beam=4, hypotheses=2, max_length=6)).result()

    asyncio.run(main())
    assert rows_per_step(model) == [4] * 6
    assert [step.memory_generation for step in recorder.steps] == [1] * 6


@BOTH_DRIVERS
def test_budgets_bound_every_step_and_admission_is_first_come_first_served(on_loop):
    limits = engine_limits(max_active_hypotheses=4, max_padded_source_tokens=24, source_bucket=1)
    model = FakeStepModel(support=NO_EOS)
    lengths = [3, 8, 2, 6, 5, 1, 4]

    async def main():
        async with running(model, on_loop=on_loop, limits=limits) as engine:
            requests = [
                make_request(source(*([5] * (n - 1))), beam=1 + i % 3, max_length=3 + i) for i, n in enumerate(lengths)
            ]
            handles = [engine.submit(request) for request in requests]
            return [(request, await handle.result()) for request, handle in zip(requests, handles, strict=True)]

    finished = asyncio.run(main())
    assert all(isinstance(result, EngineResult) for _, result in finished)
    for call in model.step_calls:
        assert call.rows <= 4 and call.rows * call.padded_len <= 24
    assert max(rows_per_step(model)) == 4  # the budget was used, not just respected
    admitted_at = [request.arrival + result.queue_wait_s for request, result in finished]
    assert admitted_at == sorted(admitted_at)  # FIFO: nobody overtakes an earlier request
    assert len(set(admitted_at)) > 1  # and the budget made some wait


# ----- cancellation and deadlines -----


def test_cancel_frees_rows_at_the_next_step():
    gate = StepGate()
    model = FakeStepModel(support=NO_EOS, gate=gate)
    recorder = RecordingRecorder()

    async def main():
        async with running(model, recorder=recorder) as engine:
            beam = engine.submit(make_request(source(3, 4), beam=4, max_length=5))
            greedy = engine.submit(make_request(source(5), max_length=5))
            await gate.until_blocked()  # step 0 (5 rows) is in flight
            greedy.cancel()
            greedy.cancel()  # idempotent
            assert greedy.done  # answered at once, not after the step
            with pytest.raises(RequestCancelled):
                await greedy.result()
            gate.open()
            result = await beam.result()
            greedy.cancel()  # after resolution: no effect
            return result

    result = asyncio.run(main())
    assert rows_per_step(model) == [5, 4, 4, 4, 4]
    assert isinstance(result, EngineResult)
    assert recorder.failed == [FinishReason.CANCELLED] and len(recorder.done) == 1


def test_cancelling_the_awaiting_task_cancels_the_request():
    gate = StepGate()
    model = FakeStepModel(support=NO_EOS, gate=gate)

    async def main():
        async with running(model) as engine:
            handle = engine.submit(make_request(source(3), max_length=50))
            waiter = asyncio.create_task(handle.result())
            await gate.until_blocked()
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            assert handle.done
            with pytest.raises(RequestCancelled):
                await handle.result()
            gate.open()
            await engine.submit(make_request(source(4), max_length=2)).result()

    asyncio.run(main())
    assert rows_per_step(model) == [1, 1, 1]  # the cancelled request stepped once; the next took two


def test_a_cancelled_waiting_request_is_never_encoded():
    gate = StepGate()
    model = FakeStepModel(support=NO_EOS, gate=gate)

    async def main():
        async with running(model, limits=engine_limits(max_active_hypotheses=1)) as engine:
            first = engine.submit(make_request(source(3), max_length=3))
            await gate.until_blocked()
            queued = engine.submit(make_request(source(4), max_length=3))
            queued.cancel()
            gate.open()
            await first.result()
            return await outcome(queued)

    assert isinstance(asyncio.run(main()), RequestCancelled)
    assert model.encode_batches == [1]


@BOTH_DRIVERS
def test_a_request_already_past_its_deadline_is_not_encoded(on_loop):
    model = FakeStepModel(support=NO_EOS)

    async def main():
        async with running(model, on_loop=on_loop) as engine:
            late = engine.submit(make_request(source(4), deadline=time.monotonic() - 1.0))
            return await outcome(late)

    assert isinstance(asyncio.run(main()), DeadlineExceeded)
    assert model.encode_batches == [] and model.step_calls == []


# ----- admission errors -----


def test_a_full_queue_fails_fast_while_others_continue():
    gate = StepGate()
    model = FakeStepModel(support=NO_EOS, gate=gate)

    async def main():
        async with running(model, limits=engine_limits(max_waiting_requests=2)) as engine:
            running_one = engine.submit(make_request(source(3), max_length=3))
            await gate.until_blocked()
            queued = [engine.submit(make_request(source(4), max_length=2)) for _ in range(2)]
            with pytest.raises(Overloaded) as refused:
                engine.submit(make_request(source(5)))
            assert refused.value.code == "RESOURCE_EXHAUSTED"
            assert "2 requests waiting" in str(refused.value) and "limit is 2" in str(refused.value)
            gate.open()
            results = [await handle.result() for handle in [running_one, *queued]]
            later = await engine.submit(make_request(source(6), max_length=2)).result()  # room again
            return results, later

    results, later = asyncio.run(main())
    assert all(isinstance(result, EngineResult) for result in [*results, later])


@BOTH_DRIVERS
def test_requests_that_can_never_fit_are_invalid(on_loop):
    model = FakeStepModel(top_k=8)
    limits = engine_limits(max_active_hypotheses=6, max_padded_source_tokens=30, source_bucket=1)

    async def main():
        engine = AsyncEngine(model, on_loop=on_loop, limits=limits, label="dates version 3")
        with pytest.raises(Unavailable):
            engine.submit(make_request(source(3)))  # not started
        await engine.start()
        with pytest.raises(InvalidRequest) as wide:
            engine.submit(make_request(source(3), beam=9, max_length=4))
        assert str(wide.value) == "beam_size 9 exceeds the maximum 8 for model dates version 3"
        with pytest.raises(InvalidRequest) as rows:
            engine.submit(make_request(source(3), beam=7, max_length=4))
        assert "6 hypotheses" in str(rows.value)
        with pytest.raises(InvalidRequest) as padded:
            engine.submit(make_request(source(*([4] * 19)), beam=2))
        assert "40 padded source tokens" in str(padded.value) and "limit 30" in str(padded.value)
        assert padded.value.code == "INVALID_ARGUMENT"
        await engine.stop(grace_s=1.0)
        with pytest.raises(Unavailable):
            engine.submit(make_request(source(3)))

    asyncio.run(main())
    assert model.encode_batches == []


# ----- model failures -----


@BOTH_DRIVERS
def test_a_failing_step_fails_only_its_requests(on_loop):
    model = FakeStepModel(support=NO_EOS, fail_steps={1})
    recorder = RecordingRecorder()

    async def main():
        async with running(
            model, on_loop=on_loop, limits=engine_limits(max_active_hypotheses=2), recorder=recorder
        ) as engine:
            stepping = engine.submit(make_request(source(3), max_length=5))
            waiting = engine.submit(make_request(source(4), beam=2, max_length=3))  # no room: waits
            failed, survivor = await outcome(stepping), await outcome(waiting)
            later = await outcome(engine.submit(make_request(source(5), max_length=2)))
            return failed, survivor, later

    failed, survivor, later = asyncio.run(main())
    assert isinstance(failed, EngineFailure) and failed.code == "INTERNAL"
    assert "injected step failure on call 1" in str(failed)
    assert isinstance(survivor, EngineResult) and isinstance(later, EngineResult)
    assert rows_per_step(model) == [1, 1, 2, 2, 2, 1, 1]
    assert recorder.failed == [FinishReason.ERROR] and len(recorder.done) == 2


def test_a_failing_encoder_fails_only_the_admitted_requests():
    gate = StepGate()
    model = FakeStepModel(support=NO_EOS, fail_encodes={1}, gate=gate)

    async def main():
        async with running(model) as engine:
            active = engine.submit(make_request(source(3), max_length=4))
            await gate.until_blocked()
            newcomers = [engine.submit(make_request(source(4, 4), max_length=2)) for _ in range(2)]
            gate.open()
            results = [await outcome(handle) for handle in [active, *newcomers]]
            results.append(await outcome(engine.submit(make_request(source(5), max_length=2))))
            return results

    active, first, second, later = asyncio.run(main())
    assert isinstance(active, EngineResult) and isinstance(later, EngineResult)
    assert isinstance(first, EngineFailure) and isinstance(second, EngineFailure)
    assert "injected encoder failure" in str(first)
    assert model.encode_batches == [1, 2, 1]
    assert rows_per_step(model) == [1, 1, 1, 1, 1, 1]  # the failed pair never took rows


class MalformedStepModel(FakeStepModel):
    """Returns one row too few on its second step."""

    def step(self, tokens, source_lengths, memory, state, **options):
        output = super().step(tokens, source_lengths, memory, state, **options)
        if len(self.step_calls) == 2:
            return type(output)(output.topk_log_probs[:-1], output.topk_ids[:-1], output.attention, output.state)
        return output


@BOTH_DRIVERS
def test_a_malformed_step_output_is_an_engine_failure(on_loop):
    model = MalformedStepModel(support=NO_EOS)

    async def main():
        async with running(model, on_loop=on_loop) as engine:
            broken = engine.submit(make_request(source(3), beam=2, max_length=4))
            failed = await outcome(broken)
            later = await outcome(engine.submit(make_request(source(4), max_length=2)))
            return failed, later

    failed, later = asyncio.run(main())
    assert isinstance(failed, EngineFailure) and "topk_log_probs" in str(failed)
    assert isinstance(later, EngineResult)


@BOTH_DRIVERS
def test_a_bug_in_delivery_fails_the_requests_it_left_half_done_and_the_engine_goes_on(on_loop):
    model = FakeStepModel(support=NO_EOS)

    def broken_callback(handle):
        raise KeyError("simulated bookkeeping bug")

    async def main():
        async with running(model, on_loop=on_loop) as engine:
            # One call: both are admitted by the same step, finish by the same step, and are delivered in row order.
            first, second = engine.submit_all(
                [make_request(source(3), max_length=2), make_request(source(4), max_length=2)]
            )
            first.when_resolved(broken_callback)
            results = await outcome(first), await outcome(second)
            later = await outcome(engine.submit(make_request(source(5), max_length=2)))
            return results, later, engine.running, engine.outstanding

    (first, second), later, still_running, outstanding = asyncio.run(main())
    assert isinstance(first, EngineResult)  # resolved before its callback broke
    assert isinstance(second, EngineFailure) and "simulated bookkeeping bug" in str(second)
    assert isinstance(later, EngineResult) and (still_running, outstanding) == (0, 0)


def test_if_the_loop_itself_dies_every_handle_is_still_answered(monkeypatch):
    gate = StepGate()
    model = FakeStepModel(support=NO_EOS, gate=gate)

    async def main():
        engine = AsyncEngine(model, limits=engine_limits(max_active_hypotheses=1), label="fragile")
        await engine.start()
        active = engine.submit(make_request(source(3), max_length=3))
        queued = engine.submit(make_request(source(4), max_length=3))
        await gate.until_blocked()

        def broken(core):
            raise RuntimeError("queue bookkeeping broke")

        # Read by the worker outside the per-iteration guard, between steps.
        monkeypatch.setattr(EngineCore, "has_work", property(broken))
        gate.open()
        results = await outcome(active), await outcome(queued)
        with pytest.raises(Unavailable):
            engine.submit(make_request(source(5)))
        await engine.stop(grace_s=1.0)
        return results

    active, queued = asyncio.run(main())
    assert isinstance(active, EngineFailure) and isinstance(queued, EngineFailure)
    assert "queue bookkeeping broke" in str(queued)


# ----- every request answered exactly once -----


@pytest.mark.parametrize("seed", range(6))
@BOTH_DRIVERS
def test_every_request_is_resolved_exactly_once_under_a_random_mix(seed, on_loop):
    """The driver under real concurrency: the operations (requests, cancellations, pauses, injected failures)
    come from the seed, so a failing seed replays them; how they interleave with the worker thread varies
    from run to run, which is the point here. Exact outcomes are checked on the core, stepped by hand
    (test_core_properties.py)."""
    rng = random.Random(seed)
    model = FakeStepModel(
        seed=seed, eos_bias=-0.5, fail_steps={rng.randrange(3, 30)}, fail_encodes={rng.randrange(1, 8)}
    )
    limits = engine_limits(
        max_active_hypotheses=10, max_padded_source_tokens=90, max_waiting_requests=12, source_bucket=1
    )
    recorder = RecordingRecorder()
    policy = rng.choice(list(BatchingPolicy))

    async def main():
        engine = AsyncEngine(model, on_loop=on_loop, limits=limits, policy=policy, recorder=recorder, label="mix")
        await engine.start()
        handles, requests, refused = [], [], 0
        for _ in range(70):
            roll = rng.random()
            if roll < 0.55:
                request = make_request(
                    source(*[rng.randrange(3, 30) for _ in range(rng.randrange(0, 12))]),
                    beam=rng.choice([1, 1, 2, 3, 4]),
                    max_length=rng.randrange(1, 10),
                    alpha=rng.choice([0.0, 0.7]),
                    attention=rng.random() < 0.3,
                    stream=rng.random() < 0.3,
                    deadline=time.monotonic() + rng.uniform(0.0, 0.05) if rng.random() < 0.2 else None,
                )
                try:
                    handles.append(engine.submit(request))
                    requests.append(request)
                except Overloaded:
                    refused += 1
            elif roll < 0.7 and handles:
                rng.choice(handles).cancel()
            else:
                # A pause, not a wait for anything: it lets the worker thread step between operations.
                await asyncio.sleep(rng.choice([0.0, 0.0, 0.001]))
        await engine.stop(grace_s=rng.choice([0.0, 0.005, 5.0]))
        assert all(handle.done for handle in handles)
        with pytest.raises(Unavailable):
            engine.submit(make_request(source(3)))
        outcomes = [await outcome(handle) for handle in handles]
        for handle, request, ended in zip(handles, requests, outcomes, strict=True):
            if not request.stream:
                continue
            events = []
            try:
                async for event in handle.tokens():
                    events.append(event)
            except AttnServeError:
                pass
            # Greedy streams: each token once, in order, and a finished one carried exactly its hypothesis' tokens.
            # Beam streams yield nothing per step.
            assert [event.position for event in events] == list(range(len(events)))
            if request.options.beam_size > 1:
                assert events == []
            elif isinstance(ended, EngineResult):
                assert [event.token_id for event in events] == ended.best.token_ids
        return outcomes

    outcomes = asyncio.run(main())
    results = [o for o in outcomes if isinstance(o, EngineResult)]
    errors = [o for o in outcomes if not isinstance(o, EngineResult)]
    assert all(isinstance(error, AttnServeError) for error in errors)
    assert len(recorder.done) == len(results)  # one report per request: resolved once, never twice
    assert len(recorder.failed) == len(errors)
    for result in results:
        assert result.hypotheses
        assert result.queue_wait_s <= result.first_token_s <= result.total_s
    for call in model.step_calls:
        assert call.rows <= limits.max_active_hypotheses
        assert call.rows * call.padded_len <= limits.max_padded_source_tokens


@BOTH_DRIVERS
def test_stop_lets_queued_and_active_requests_finish_within_the_grace_period(on_loop):
    model = FakeStepModel(support=NO_EOS)

    async def main():
        engine = AsyncEngine(model, on_loop=on_loop, limits=engine_limits(max_active_hypotheses=1))
        await engine.start()
        handles = [engine.submit(make_request(source(3 + i), max_length=3)) for i in range(3)]
        stopping = asyncio.create_task(engine.stop(grace_s=30.0))
        await asyncio.sleep(0)
        with pytest.raises(Unavailable):
            engine.submit(make_request(source(3)))
        await stopping
        return [await outcome(handle) for handle in handles]

    assert all(isinstance(o, EngineResult) for o in asyncio.run(main()))


def test_stop_fails_what_is_left_after_the_grace_period():
    gate = StepGate()
    model = FakeStepModel(support=NO_EOS, gate=gate)
    recorder = RecordingRecorder()

    async def main():
        engine = AsyncEngine(model, limits=engine_limits(max_active_hypotheses=1), recorder=recorder)
        await engine.start()
        stuck = engine.submit(make_request(source(3), max_length=3, stream=True))
        queued = engine.submit(make_request(source(4), max_length=3))
        await gate.until_blocked()
        try:
            await engine.stop(grace_s=0.05)
        finally:
            gate.open()  # let the held step finish on the worker thread
        with pytest.raises(Unavailable):
            async for _ in stuck.tokens():
                pass
        return await outcome(stuck), await outcome(queued)

    stuck, queued = asyncio.run(main())
    assert isinstance(stuck, Unavailable) and isinstance(queued, Unavailable)
    assert stuck.code == "UNAVAILABLE" and "stopped" in str(stuck)
    assert recorder.failed == [FinishReason.ERROR, FinishReason.ERROR]


@BOTH_DRIVERS
def test_a_stopped_engine_is_freed_at_once_though_handles_it_resolved_live_on(on_loop):
    """Handles outlive their engine: a failure raised from `result()` or `tokens()` keeps its handle in a reference
    cycle (the error's traceback holds the frame that holds the handle) until the garbage collector's next full
    pass, minutes apart under load. A resolved handle holds nothing of its engine, so a retired version's engine,
    its model's sessions and its batch go the moment it stops (before, each retired version stayed until then: in a
    soak with stalls, the engine process held 5 of them and grew 10-19 MB/min). The collector is off here, so only
    reference counting frees anything."""
    model = FakeStepModel(support=NO_EOS)

    async def main() -> tuple[weakref.ref[AsyncEngine], list[RequestHandle]]:
        engine = AsyncEngine(model, on_loop=on_loop, limits=engine_limits(source_bucket=1))
        await engine.start()
        finished = engine.submit(make_request(source(3), max_length=2))
        cancelled = engine.submit(make_request(source(4), max_length=50))
        streamed = engine.submit(make_request(source(5), max_length=50, stream=True))
        cancelled.cancel()
        streamed.cancel()
        with pytest.raises(RequestCancelled):
            await cancelled.result()
        with pytest.raises(RequestCancelled):
            async for _ in streamed.tokens():
                pass
        await finished.result()
        await engine.stop(grace_s=5.0)
        return weakref.ref(engine), [finished, cancelled, streamed]

    with collector_off():
        engine, handles = asyncio.run(main())
        assert engine() is None
    assert [handle.done for handle in handles] == [True, True, True]
    assert isinstance(handles[0].outcome(), EngineResult)
    assert [type(handle.outcome()) for handle in handles[1:]] == [RequestCancelled, RequestCancelled]


# ----- batch invariance -----


MIXED = [
    dict(source_ids=source(3, 8, 21), max_length=9, alpha=0.5, attention=True),
    dict(source_ids=source(11), beam=3, hypotheses=3, max_length=6),
    dict(source_ids=source(6, 6, 6, 6, 1, 30, 4), beam=2, hypotheses=2, max_length=7, alpha=1.0, attention=True),
    dict(source_ids=source(9, 2), max_length=4, stream=True),
    dict(source_ids=source(17, 5, 5, 5), beam=4, hypotheses=1, max_length=8, alpha=0.2),
]


def decode(requests: list[dict], *, policy=BatchingPolicy.CONTINUOUS, stagger: bool = False) -> list[EngineResult]:
    gate = StepGate() if stagger else None
    model = FakeStepModel(seed=7, eos_bias=-0.5, gate=gate)

    async def main():
        async with running(model, policy=policy) as engine:
            handles = []
            for index, spec in enumerate(requests):
                handles.append(engine.submit(make_request(**spec)))
                if stagger and index == 1:  # the rest join while the first two are mid-decode
                    await gate.until_blocked()
                    gate.allow(2)
                    await gate.until_blocked()
            if gate is not None:
                gate.open()
            return [await handle.result() for handle in handles]

    return asyncio.run(main())


@pytest.mark.parametrize(
    ("policy", "stagger"),
    [
        (BatchingPolicy.CONTINUOUS, False),
        (BatchingPolicy.CONTINUOUS, True),
        (BatchingPolicy.REQUEST, False),
        (BatchingPolicy.NONE, False),
    ],
)
def test_results_do_not_depend_on_the_rest_of_the_batch(policy, stagger):
    alone = [decode([spec])[0] for spec in MIXED]
    together = decode(MIXED, policy=policy, stagger=stagger)
    for single, batched in zip(alone, together, strict=False):
        assert same_hypotheses(single.hypotheses, batched.hypotheses)


# ----- the request and none policies -----


@BOTH_DRIVERS
def test_request_policy_gathers_arrivals_within_the_delay(on_loop):
    model = FakeStepModel(support=NO_EOS)
    limits = engine_limits(batch_size=8, batch_delay_s=0.3)

    async def main():
        async with running(model, on_loop=on_loop, limits=limits, policy=BatchingPolicy.REQUEST) as engine:
            early = engine.submit(make_request(source(3), max_length=2))
            later = engine.submit(make_request(source(4), max_length=2))
            return await early.result(), await later.result()

    asyncio.run(main())
    assert model.encode_batches == [2]  # the worker waited for the window, then took both


@BOTH_DRIVERS
def test_none_policy_decodes_one_request_at_a_time(on_loop):
    model = FakeStepModel(support=NO_EOS)

    async def main():
        async with running(model, on_loop=on_loop, policy=BatchingPolicy.NONE) as engine:
            handles = [engine.submit(make_request(source(3 + i), beam=2, max_length=2 + i)) for i in range(3)]
            return [await handle.result() for handle in handles]

    asyncio.run(main())
    assert max(rows_per_step(model)) == 2
    assert rows_per_step(model) == [2] * (2 + 3 + 4)
    assert model.encode_batches == [1, 1, 1]


# ----- streaming -----


def test_greedy_streaming_delivers_each_token_as_it_is_decoded():
    gate = StepGate()
    model = FakeStepModel(seed=2, support=NO_EOS, gate=gate)

    async def main():
        async with running(model) as engine:
            handle = engine.submit(make_request(source(3, 9), max_length=4, stream=True, attention=True))
            tokens = handle.tokens()
            gate.allow(1)
            first = await anext(tokens)
            assert first.position == 0 and not handle.done  # delivered before the request finished
            gate.open()
            rest = [event async for event in tokens]
            return [first, *rest], await handle.result()

    events, result = asyncio.run(main())
    best = result.best
    assert [event.token_id for event in events] == best.token_ids
    assert [event.position for event in events] == [0, 1, 2, 3]
    assert [event.alignment for event in events] == best.alignment
    assert sum(event.log_prob for event in events) == pytest.approx(best.log_prob)
    np.testing.assert_array_equal(np.stack([event.attention for event in events]), best.attention)


@BOTH_DRIVERS
def test_streaming_includes_the_eos_token(on_loop):
    model = FakeStepModel(seed=4, eos_bias=3.0)

    async def main():
        async with running(model, on_loop=on_loop) as engine:
            handle = engine.submit(make_request(source(3), max_length=6, stream=True))
            return [event async for event in handle.tokens()], await handle.result()

    events, result = asyncio.run(main())
    assert events[-1].token_id == EOS and result.best.finish_reason is FinishReason.EOS
    assert [event.token_id for event in events] == result.best.token_ids


@BOTH_DRIVERS
def test_beam_streaming_yields_nothing_then_ends(on_loop):
    model = FakeStepModel(seed=2)

    async def main():
        async with running(model, on_loop=on_loop) as engine:
            handle = engine.submit(make_request(source(3, 9), beam=3, hypotheses=2, max_length=4, stream=True))
            events = [event async for event in handle.tokens()]
            return events, await handle.result()

    events, result = asyncio.run(main())
    assert events == [] and len(result.hypotheses) == 2


@BOTH_DRIVERS
def test_streaming_raises_the_failure_and_tokens_needs_stream(on_loop):
    model = FakeStepModel(support=NO_EOS, fail_steps={2})

    async def main():
        async with running(model, on_loop=on_loop) as engine:
            plain = engine.submit(make_request(source(4), max_length=2))
            with pytest.raises(ValueError):
                plain.tokens()
            streamed = engine.submit(make_request(source(3), max_length=6, stream=True))
            tokens = streamed.tokens()
            with pytest.raises(RuntimeError):
                streamed.tokens()  # one consumer only
            received = []
            with pytest.raises(EngineFailure):
                async for event in tokens:
                    received.append(event.token_id)
            return received

    assert len(asyncio.run(main())) == 2  # tokens of the two good steps arrived before the failure


# ----- stats -----


@BOTH_DRIVERS
def test_stats_records_are_filled_per_step_and_per_request(on_loop):
    model = FakeStepModel(support=NO_EOS)
    recorder = RecordingRecorder()

    clock = TickingClock()

    async def main():
        async with running(model, on_loop=on_loop, recorder=recorder, clock=clock) as engine:
            beam, greedy = engine.submit_all(
                [
                    make_request(source(3, 4, 5), beam=3, max_length=3, arrival=clock.now),
                    make_request(source(6), max_length=2, arrival=clock.now),
                ]
            )
            return await beam.result(), await greedy.result()

    beam, greedy = asyncio.run(main())
    steps = recorder.steps
    assert [s.rows for s in steps] == [4, 4, 3]
    assert [s.tokens_generated for s in steps] == [4, 4, 3]
    assert [s.requests for s in steps] == [2, 2, 1]
    assert [s.admitted for s in steps] == [2, 0, 0] and steps[0].encoder_batch == 2
    assert [s.padded_source_len for s in steps] == [4, 4, 4]
    assert [s.retired for s in steps] == [0, 1, 1]
    by_beam = {stats.beam_size: stats for stats in recorder.done}
    assert by_beam[3].generated_tokens == 3 and by_beam[3].source_tokens == 4
    assert by_beam[1].generated_tokens == 2 and by_beam[1].finish_reason is FinishReason.LENGTH
    # Every reading of the ticking clock is later than the one before: each interval is > 0, and a request's
    # total is its first token plus its mean gap times the gaps.
    assert all(s.encode_seconds > 0 for s in steps[:1]) and all(s.step_seconds > 0 for s in steps)
    for result, stats in ((beam, by_beam[3]), (greedy, by_beam[1])):
        assert 0 < result.queue_wait_s < result.first_token_s < result.total_s
        assert stats.mean_inter_token_s is not None and stats.mean_inter_token_s > 0
        gaps = stats.generated_tokens - 1
        assert result.total_s - result.first_token_s == pytest.approx(stats.mean_inter_token_s * gaps)
