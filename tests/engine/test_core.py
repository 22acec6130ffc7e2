"""The engine core stepped by hand with a fake clock: deadlines and batching windows, exactly, with no sleeps."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.engine import BatchingPolicy, EngineCore, FinishReason
from service.engine.core import STALE_DEADLINES_KEPT
from service.errors import DeadlineExceeded, EngineFailure

from .fakes import NO_EOS, FakeClock, FakeStepModel, engine_limits, make_request, source


def test_an_expired_request_leaves_at_the_next_step_and_the_others_continue():
    clock, model = FakeClock(), FakeStepModel(support=NO_EOS)
    core = EngineCore(model, engine_limits(source_bucket=1), clock=clock)
    core.add(1, make_request(source(4), max_length=4), clock.now)
    core.add(2, make_request(source(5, 6), max_length=50, deadline=clock.now + 0.3, arrival=clock.now), clock.now)
    assert core.step().admitted == [1, 2]
    clock.now += 0.2999  # not yet
    assert not core.step().failed
    clock.now += 0.0001  # the deadline, to the tick
    output = core.step()
    [(key, error, reason)] = output.failed
    assert key == 2 and reason is FinishReason.DEADLINE and isinstance(error, DeadlineExceeded)
    assert str(error) == "the deadline passed after 0.300 s while decoding (model unnamed)"
    assert [done.key for done in core.step().finished] == [1]  # its 4th token
    assert [call.rows for call in model.step_calls] == [2, 2, 1, 1]
    assert not core.has_work


def test_a_queued_request_expires_where_it_waits_and_is_never_encoded():
    clock, model = FakeClock(), FakeStepModel(support=NO_EOS)
    core = EngineCore(model, engine_limits(max_active_hypotheses=1, source_bucket=1), clock=clock)
    core.add(1, make_request(source(4), max_length=3), clock.now)
    core.add(2, make_request(source(5), max_length=3, deadline=clock.now + 1.0), clock.now)
    core.step()  # only the first fits
    clock.now += 1.0
    [(key, error, _)] = core.step().failed
    assert key == 2 and "while waiting" in str(error)
    assert model.encode_batches == [1]


def test_request_policy_takes_a_full_batch_at_once_and_a_lone_request_after_its_delay():
    clock, model = FakeClock(), FakeStepModel(support=NO_EOS)
    limits = engine_limits(batch_size=2, batch_delay_s=0.2, source_bucket=1)
    core = EngineCore(model, limits, BatchingPolicy.REQUEST, clock=clock)
    core.add(1, make_request(source(3), max_length=3, arrival=clock.now), clock.now)
    core.add(2, make_request(source(4), max_length=3, arrival=clock.now), clock.now)
    assert core.step().admitted == [1, 2]  # a full batch does not wait for the delay
    clock.now += 0.01
    core.add(3, make_request(source(5), max_length=2), clock.now)
    finished = [done for _ in range(2) for done in core.step().finished]
    assert [done.key for done in finished] == [1, 2] and finished[0].result.queue_wait_s == 0.0
    # The batch is done; the lone request waits for company until 0.2 s after it arrived.
    assert not core.has_work and core.next_wakeup() == 50.01 + 0.2
    clock.now = 50.01 + 0.2
    assert core.has_work and core.step().admitted == [3]
    assert [call.rows for call in model.step_calls] == [2, 2, 2, 1]
    assert model.encode_batches == [2, 1]


def test_request_policy_gathers_arrivals_within_the_delay():
    clock, model = FakeClock(), FakeStepModel(support=NO_EOS)
    core = EngineCore(model, engine_limits(batch_size=8, batch_delay_s=0.3), BatchingPolicy.REQUEST, clock=clock)
    core.add(1, make_request(source(3), max_length=2), clock.now)
    assert not core.step().admitted and not core.has_work  # taken in; the window is open
    clock.now += 0.29
    core.add(2, make_request(source(4), max_length=2), clock.now)
    assert not core.step().admitted and not core.has_work
    clock.now += 0.01
    assert core.step().admitted == [1, 2] and model.encode_batches == [2]


# ----- the encoder beside the decoder step (an encoder pool) ---------------------------------------------


def test_a_request_joining_a_running_batch_is_encoded_on_the_pool_during_the_step_and_joins_after_it():
    clock, model = FakeClock(), FakeStepModel(support=NO_EOS)
    seen = []  # what the core published while each step ran
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder") as pool:
        core = EngineCore(model, engine_limits(source_bucket=1), clock=clock, encoder_pool=pool)

        def during_step() -> None:
            seen.append(core.counts)
            clock.now += 0.1  # the step takes a while: the joining request's wait ends before it, not after

        model.on_step = during_step
        core.add(1, make_request(source(4), max_length=3, arrival=clock.now), clock.now)
        assert core.step().admitted == [1]  # an empty batch: encoded at once, in this step
        clock.now += 0.4
        core.add(2, make_request(source(5, 6), max_length=2, arrival=clock.now), clock.now)
        output = core.step()
        # Being encoded, request 2 has left the queue and counts as running (the batch's and the queue's sum).
        assert seen[-1] == (2, 2) and core.counts == (2, 2)
        assert output.admitted == [2]
        assert output.stats is not None
        assert (output.stats.rows, output.stats.encoder_batch, output.stats.admitted) == (1, 1, 1)
        clock.now += 0.4
        assert [done.key for done in core.step().finished] == [1]  # its 3rd token, beside 2's first
        clock.now += 0.4
        [done] = core.step().finished
    assert [call.rows for call in model.step_calls] == [1, 1, 2, 1]
    assert model.encode_batches == [1, 1]
    assert model.encode_threads[0] == threading.current_thread().name
    assert model.encode_threads[1].startswith("encoder")
    # Request 2 left the queue at once (the step it was encoded beside does not count as waiting), and its first
    # token came from the step after that one.
    assert done.key == 2 and done.result.queue_wait_s == 0.0
    assert done.result.first_token_s == pytest.approx(0.1 + 0.4 + 0.1)
    assert done.result.total_s == pytest.approx(0.1 + 0.4 + 0.1 + 0.4 + 0.1)


def decoding_one_request(
    model: FakeStepModel, clock: FakeClock, pool: ThreadPoolExecutor, max_length: int
) -> EngineCore:
    """A core with an encoder pool whose batch is decoding request 1 (of `max_length` tokens), one step in."""
    core = EngineCore(model, engine_limits(source_bucket=1), clock=clock, encoder_pool=pool)
    core.add(1, make_request(source(4), max_length=max_length), clock.now)
    core.step()
    return core


def test_with_an_encoder_pool_a_failing_encoder_fails_only_the_requests_it_encoded():
    clock, model = FakeClock(), FakeStepModel(support=NO_EOS, fail_encodes={1})
    with ThreadPoolExecutor(max_workers=1) as pool:
        core = decoding_one_request(model, clock, pool, max_length=2)
        core.add(2, make_request(source(5), max_length=2), clock.now)
        core.add(3, make_request(source(6), max_length=2), clock.now)
        output = core.step()
        assert sorted(key for key, _, _ in output.failed) == [2, 3]
        assert all(
            isinstance(error, EngineFailure) and reason is FinishReason.ERROR for _, error, reason in output.failed
        )
        assert "the encoder of model unnamed failed" in str(output.failed[0][1])
        assert [done.key for done in output.finished] == [1]
    assert model.encode_batches == [1, 2] and not core.has_work


def test_an_engine_error_during_an_overlapped_encoder_call_fails_the_requests_being_encoded():
    clock, model = FakeClock(), FakeStepModel(support=NO_EOS)
    with ThreadPoolExecutor(max_workers=1) as pool:
        core = decoding_one_request(model, clock, pool, max_length=5)
        core.add(2, make_request(source(5), max_length=5), clock.now)
        model.misshapen_state_steps.add(1)  # the next step breaks the update: an engine error, out of step()
        with pytest.raises(ValueError):
            core.step()
        output = core.recover(ValueError("broken"))  # what AsyncEngine does with it
        assert sorted(key for key, _, _ in output.failed) == [1, 2]
        assert all(isinstance(error, EngineFailure) for _, error, _ in output.failed)
        core.add(3, make_request(source(6), max_length=1), clock.now)
        assert [done.key for done in core.step().finished] == [3]  # a fresh batch serves on
    assert not core.has_work


def test_an_engine_error_after_requests_finished_in_the_step_still_answers_them():
    clock, model = FakeClock(), FakeStepModel(support=NO_EOS, misshapen_memory_encodes={1})
    with ThreadPoolExecutor(max_workers=1) as pool:
        core = decoding_one_request(model, clock, pool, max_length=2)
        core.add(2, make_request(source(5), max_length=2), clock.now)
        # Request 1 finishes in this step; then request 2's admission breaks on its encoder output: an engine error.
        with pytest.raises(ValueError):
            core.step()
        versions_before = [call.memory_version for call in model.step_calls]
        output = core.recover(ValueError("broken"))
        assert [done.key for done in output.finished] == [1]  # answered, though its step raised afterwards
        assert [key for key, _, _ in output.failed] == [2]
        core.add(3, make_request(source(6), max_length=1), clock.now)
        assert [done.key for done in core.step().finished] == [3]
    # The fresh batch's memory gets a version never used before (a device copy kept by version stays correct).
    assert model.step_calls[-1].memory_version > max(versions_before)
    assert not core.has_work


def test_a_batch_released_after_a_burst_is_replaced_by_a_small_one_once_empty_and_decodes_the_same():
    def decode_alone(core: EngineCore, key: int) -> list[int]:
        core.add(key, make_request(source(4, 5, 6), max_length=6), 0.0)
        while True:
            finished = core.step().finished
            if finished:
                return finished[0].result.hypotheses[0].token_ids

    core = EngineCore(FakeStepModel(support=NO_EOS), engine_limits(source_bucket=1))
    before = decode_alone(core, 1)
    for key in range(100, 164):  # a burst of 64 rows: the batch's tables grow to hold them
        core.add(key, make_request(source(4, 5, 6, 7, 8, 9, 10), max_length=6), 0.0)
    core.step()
    assert len(core.batch.row_token) == 64 and core.batch.requests == 64
    burst_batch = core.batch
    core.release_unused_memory()
    core.step()  # the burst still decodes: the batch stays
    assert core.batch is burst_batch
    while core.batch.requests:
        core.step()
    generation = burst_batch.memory_generation
    assert decode_alone(core, 2) == before  # the first step found the batch empty and started a fresh one
    assert core.batch is not burst_batch and len(core.batch.row_token) == 16
    assert core.batch.memory_generation > generation  # a memory version is never reused
    core.step()
    assert decode_alone(core, 3) == before and len(core.batch.row_token) == 16


def test_requests_that_end_before_their_deadlines_neither_pile_up_nor_wake_the_idle_core():
    clock = FakeClock()
    core = EngineCore(FakeStepModel(support=NO_EOS), engine_limits(source_bucket=1), clock=clock)
    most_held = 0
    for wave in range(50):  # 1,000 calls with an hour's deadline each, 20 at a time, each ending in 2 steps
        for key in range(wave * 20, wave * 20 + 20):
            core.add(key, make_request(source(4), max_length=2, deadline=clock.now + 3600.0), clock.now)
        finished = 0
        while finished < 20:
            finished += len(core.step().finished)
            most_held = max(most_held, core.deadlines_held)
        clock.now += 0.01
    assert most_held <= 2 * 20 + STALE_DEADLINES_KEPT + 20
    assert not core.has_work and core.next_wakeup() is None  # no ended request's deadline wakes it
    # A request still held keeps its deadline, and it still fires.
    core.add(5000, make_request(source(4), max_length=50, deadline=clock.now + 1.0), clock.now)
    core.step()
    assert core.next_wakeup() == clock.now + 1.0
    clock.now += 1.0
    [(key, _, reason)] = core.step().failed
    assert key == 5000 and reason is FinishReason.DEADLINE


def test_a_busy_batch_asked_for_memory_after_a_burst_shrinks_its_tensors_and_decodes_the_same():
    def tensor_rows(core: EngineCore) -> int:
        return len(core.batch.state[core.model.state_names[0]])

    def step_until_done(core: EngineCore, keys: set[int]) -> dict[int, list[int]]:
        results: dict[int, list[int]] = {}
        while not keys <= results.keys():
            for done in core.step().finished:
                results[done.key] = done.result.hypotheses[0].token_ids
        return results

    alone = EngineCore(FakeStepModel(support=NO_EOS), engine_limits(source_bucket=1))
    alone.add(1, make_request(source(4, 5, 6), max_length=40), 0.0)
    expected = step_until_done(alone, {1})[1]

    core = EngineCore(FakeStepModel(support=NO_EOS), engine_limits(source_bucket=1))
    core.add(1, make_request(source(4, 5, 6), max_length=40), 0.0)
    for key in range(100, 164):  # a burst of 64 short requests beside the long one
        core.add(key, make_request(source(4, 5, 6, 7, 8, 9, 10), max_length=3), 0.0)
    step_until_done(core, set(range(100, 164)))
    assert core.batch.requests == 1 and tensor_rows(core) >= 65
    core.release_unused_memory()
    batch, generation = core.batch, core.batch.memory_generation
    core.step()  # the batch is busy: it stays, with tensors for 16 rows
    assert core.batch is batch and tensor_rows(core) == 16
    assert core.batch.memory_generation > generation  # new arrays: views and device copies of the old are stale
    # Admission grows them again as needed, and every request decodes as it does alone.
    for key in range(200, 240):
        core.add(key, make_request(source(4, 5, 6), max_length=40), 0.0)
    results = step_until_done(core, {1, *range(200, 240)})
    assert tensor_rows(core) >= 41
    assert all(tokens == expected for tokens in results.values())
