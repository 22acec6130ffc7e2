"""The engine core as a state machine: random admit / cancel / expire / finish / failing-step / failing-encoder
sequences, with and without an encoder pool.

Driven synchronously with a fake clock (no sleeps; the pool's thread is waited for within each step, so every
sequence replays the same), Hypothesis explores interleavings and shrinks a failure to a short replayable
sequence. What must hold, whatever the sequence:
- every request is resolved exactly once (finished, failed, or cancelled by its caller);
- a finished request's hypotheses are exactly those it gets when decoded alone;
- a streamed request's token events are its hypothesis' tokens, in order, once each;
- every decoder step fits the budgets.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from service.engine import EngineCore, FinishReason
from service.errors import DeadlineExceeded, EngineFailure

from .fakes import EOS, FakeStepModel, engine_limits, make_request, source

LIMITS = engine_limits(max_active_hypotheses=10, max_padded_source_tokens=64, source_bucket=4)


class FakeClock:
    """A clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def decode_alone(request) -> list:  # type: ignore[no-untyped-def]
    """The hypotheses of one request decoded by a fresh core on its own (no deadline, nothing else)."""
    core = EngineCore(FakeStepModel(seed=5, eos_bias=-0.5), LIMITS, clock=FakeClock())
    core.add(
        1,
        make_request(
            request.source_ids,
            beam=request.options.beam_size,
            hypotheses=request.options.num_hypotheses,
            max_length=request.options.max_length,
            alpha=request.options.length_penalty,
            attention=request.options.return_attention,
        ),
        0.0,
    )
    while True:
        output = core.step()
        assert not output.failed
        if output.finished:
            return output.finished[0].result.hypotheses


class CoreMachine(RuleBasedStateMachine):
    with_encoder_pool = False

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.model = FakeStepModel(seed=5, eos_bias=-0.5)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder") if self.with_encoder_pool else None
        self.core = EngineCore(self.model, LIMITS, clock=self.clock, encoder_pool=self.pool)
        self.keys = iter(range(1, 10_000))
        self.requests: dict[int, object] = {}
        self.outcomes: dict[int, list[object]] = {}
        self.events: dict[int, list] = {}

    def unresolved(self) -> list[int]:
        return sorted(key for key in self.requests if not self.outcomes[key])

    @rule(
        words=st.lists(st.integers(3, 31), max_size=7),
        beam=st.sampled_from([1, 1, 2, 3]),
        max_length=st.integers(1, 6),
        alpha=st.sampled_from([0.0, 0.7]),
        attention=st.booleans(),
        stream=st.booleans(),
        deadline=st.one_of(st.none(), st.floats(0.0, 3.0)),
    )
    def add(self, words, beam, max_length, alpha, attention, stream, deadline) -> None:  # type: ignore[no-untyped-def]
        request = make_request(
            source(*words),
            beam=beam,
            hypotheses=min(beam, 2),
            max_length=max_length,
            alpha=alpha,
            attention=attention,
            stream=stream and beam == 1,
            deadline=None if deadline is None else self.clock.now + deadline,
        )
        key = next(self.keys)
        self.requests[key] = request
        self.outcomes[key] = []
        self.events[key] = []
        self.core.add(key, request, self.clock.now)

    @precondition(lambda self: self.unresolved())
    @rule(data=st.data())
    def cancel(self, data) -> None:  # type: ignore[no-untyped-def]
        key = data.draw(st.sampled_from(self.unresolved()))
        self.outcomes[key].append("cancelled")  # the caller's side resolves at once, as the scheduler does
        self.core.abort(key)

    @rule(seconds=st.floats(0.0, 2.0))
    def wait(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule(fail=st.booleans(), fail_encoder=st.booleans())
    def step(self, fail: bool, fail_encoder: bool = False) -> None:
        if fail:
            self.model.fail_steps.add(len(self.model.step_calls))  # the next decoder call raises
        if fail_encoder:
            self.model.fail_encodes.add(len(self.model.encode_batches))  # the next encoder call raises
        calls_before = len(self.model.step_calls)
        output = self.core.step()
        for call in self.model.step_calls[calls_before:]:
            assert call.rows <= LIMITS.max_active_hypotheses
            assert call.rows * call.padded_len <= LIMITS.max_padded_source_tokens
        self.record(output)

    @rule()
    def engine_error(self) -> None:
        """A step whose update breaks (an engine bug, not a model failure); the driver hands it to recover()."""
        self.model.misshapen_state_steps.add(len(self.model.step_calls))  # the next decoder call's state
        try:
            output = self.core.step()
        except ValueError as exc:
            output = self.core.recover(exc)
        self.model.misshapen_state_steps.clear()  # no decoder call ran when the batch was empty
        self.record(output)

    def record(self, output) -> None:  # type: ignore[no-untyped-def]
        for key, event in output.events:
            self.events[key].append(event)
        for done in output.finished:
            self.outcomes[done.key].append(done)
        for key, error, reason in output.failed:
            assert isinstance(error, DeadlineExceeded if reason is FinishReason.DEADLINE else EngineFailure)
            self.outcomes[key].append(error)

    @invariant()
    def resolved_at_most_once(self) -> None:
        for key, outcomes in self.outcomes.items():
            assert len(outcomes) <= 1, (key, outcomes)

    def teardown(self) -> None:
        self.model.fail_steps.clear()
        self.model.fail_encodes.clear()
        try:
            self._drain_and_check()
        finally:
            if self.pool is not None:
                self.pool.shutdown()

    def _drain_and_check(self) -> None:
        for _ in range(200):  # drain: everything left finishes within max_length steps of its admission
            if not self.core.has_work:
                break
            self.step(fail=False)
        assert not self.core.has_work
        for key, request in self.requests.items():
            [outcome] = self.outcomes[key]  # exactly once
            if isinstance(outcome, str) or isinstance(outcome, Exception):
                continue
            expected = decode_alone(request)
            got = outcome.result.hypotheses
            assert [h.token_ids for h in got] == [h.token_ids for h in expected]
            assert [h.log_prob for h in got] == [h.log_prob for h in expected]
            assert [h.score for h in got] == [h.score for h in expected]
            assert [h.alignment for h in got] == [h.alignment for h in expected]
            for mine, alone in zip(got, expected, strict=False):
                assert (mine.attention is None) == (alone.attention is None)
                if mine.attention is not None:
                    np.testing.assert_array_equal(mine.attention, alone.attention)
            if request.stream:
                events = self.events[key]
                assert [e.token_id for e in events] == got[0].token_ids
                assert [e.position for e in events] == list(range(len(events)))
                assert events[-1].token_id == EOS or len(events) == request.options.max_length
            else:
                assert not self.events[key]


CoreMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_the_core_answers_every_request_once_and_as_if_alone = CoreMachine.TestCase


class CoreMachineWithEncoderPool(CoreMachine):
    """The same sequences with the encoder beside the decoder step: requests joining a running batch are encoded on
    the pool's thread and join after the step, and every property above still holds."""

    with_encoder_pool = True


CoreMachineWithEncoderPool.TestCase.settings = CoreMachine.TestCase.settings
test_with_an_encoder_pool_the_core_answers_every_request_once_and_as_if_alone = CoreMachineWithEncoderPool.TestCase
