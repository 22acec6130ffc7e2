"""The scheduler: one per loaded model version; it queues requests, batches them and drives the model.

Concurrency model (one, on purpose):
- The server is asyncio. `submit()`, `RequestHandle` and `stop()` are called on the event-loop thread,
  and every future, token queue and recorder call is touched only there.
- The scheduler's loop is an asyncio task. Each iteration it plans on the loop thread (drop cancelled and
  expired requests, admit waiting ones within the budget), then runs the blocking part - the encoder call,
  the decoder step and all numpy bookkeeping - on ONE dedicated worker thread, then delivers results and
  tokens back on the loop thread. The worker thread is the only one that touches the row batch.
- When there is nothing to do the loop sleeps on an asyncio.Event that `submit()` sets; it never polls.

Every submitted request is resolved exactly once: with a result, or with an AttnServeError (cancelled,
deadline, model failure, engine stopped). A failing encoder call fails only the requests it encoded.
A failing decoder step with several requests in it is run again for each request's rows alone (rows
are independent, so that gives the same numbers), so only the requests whose own rows make the model
fail are failed: one poisoned input does not take down the requests that shared its step. A bug in
the loop fails the requests it was working on, and the loop goes on.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from service.engine.batch import BatchMember, RowBatch, StepInputs
from service.engine.beam import StepDecision, new_search
from service.engine.records import (
    FinishReason,
    Hypothesis,
    StepModel,
    StepOutput,
    TokenEvent,
    TranslationRequest,
    TranslationResult,
)
from service.engine.stats import NullRecorder, RequestStats, StatsRecorder, StepStats
from service.errors import (
    AttnServeError,
    DeadlineExceeded,
    EngineFailure,
    InvalidRequest,
    Overloaded,
    RequestCancelled,
    Unavailable,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineLimits:
    """Per-model-version budgets of the scheduler (validated by the settings; re-checked here).

    `max_active_hypotheses`: most decoder rows (beam width x requests) in one decoder step.
    `max_padded_source_tokens`: most rows x longest source (tokens) in one step.
    `max_waiting_requests`: most queued requests; beyond, `submit()` raises Overloaded at once.
    `batch_size`: most requests in one batch (REQUEST policy).
    `batch_delay_s`: seconds the REQUEST policy waits after the first arrival for the batch to fill.
    """

    max_active_hypotheses: int = 256
    max_padded_source_tokens: int = 65536
    max_waiting_requests: int = 1024
    batch_size: int = 32
    batch_delay_s: float = 0.005

    def __post_init__(self) -> None:
        for name in ("max_active_hypotheses", "max_padded_source_tokens", "max_waiting_requests", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.batch_delay_s >= 0.0:
            raise ValueError(f"batch_delay_s must be >= 0, got {self.batch_delay_s}")


class BatchingPolicy(enum.Enum):
    """How requests share decoder steps."""

    CONTINUOUS = "continuous"
    """Requests join the batch at any step and leave as soon as they finish (iteration-level batching)."""
    REQUEST = "request"
    """When idle, gather up to batch_size requests (or wait batch_delay_s), then run them to completion."""
    NONE = "none"
    """One request at a time, to completion."""


class _Lifecycle(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


_END_OF_STREAM = object()


class RequestHandle:
    """The caller's side of one submitted request. Use it on the event-loop thread only."""

    def __init__(
        self,
        key: int,
        request: TranslationRequest,
        loop: asyncio.AbstractEventLoop,
        on_cancel: Callable[[RequestHandle], None],
    ) -> None:
        self.key = key
        self.request = request
        self.submitted_at = time.monotonic()
        self._future: asyncio.Future[TranslationResult] = loop.create_future()
        self._events: asyncio.Queue[object] | None = asyncio.Queue() if request.stream else None
        self._stream_taken = False
        self._on_cancel = on_cancel

    @property
    def done(self) -> bool:
        """True once the request is resolved (result, error or cancellation)."""
        return self._future.done()

    async def result(self) -> TranslationResult:
        """Wait for the result; raises the AttnServeError that ended the request otherwise.

        If the awaiting task is cancelled (e.g. the RPC was), the request is cancelled too.
        """
        try:
            return await asyncio.shield(self._future)
        except asyncio.CancelledError:
            if not self._future.done():
                self.cancel()
            raise

    def tokens(self) -> AsyncIterator[TokenEvent]:
        """The tokens of a streaming request (stream=True) as they are decoded; iterate it once.

        Greedy requests yield every generated token (eos included) right after its step; beam requests
        yield nothing (await result() for the n-best). The iteration ends when the request finishes, or
        raises the AttnServeError that ended it. Cancelling the iterating task cancels the request; a
        caller that merely stops iterating should call cancel() itself.
        """
        if self._events is None:
            raise ValueError("tokens() needs a request submitted with stream=True")
        if self._stream_taken:
            raise RuntimeError("tokens() can be iterated only once per request")
        self._stream_taken = True
        return self._iterate_events(self._events)

    def cancel(self) -> None:
        """Cancel the request (idempotent): result() raises RequestCancelled at once; its rows leave the
        batch at the next step. No effect once the request is resolved."""
        if not self._future.done():
            self._on_cancel(self)

    async def _iterate_events(self, events: asyncio.Queue[object]) -> AsyncIterator[TokenEvent]:
        while True:
            try:
                item = await events.get()
            except asyncio.CancelledError:
                self.cancel()
                raise
            if item is _END_OF_STREAM:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, TokenEvent)
            yield item

    # The scheduler resolves handles through these, on the loop thread; each returns False when the
    # handle was already resolved, which is how "exactly once" is kept when a cancellation races a result.

    def _push(self, event: TokenEvent) -> None:
        if self._events is not None and not self._future.done():
            self._events.put_nowait(event)

    def _resolve(self, result: TranslationResult) -> bool:
        if self._future.done():
            return False
        self._future.set_result(result)
        if self._events is not None:
            self._events.put_nowait(_END_OF_STREAM)
        return True

    def _fail(self, error: AttnServeError) -> bool:
        if self._future.done():
            return False
        self._future.set_exception(error)
        self._future.exception()  # marks it retrieved: nobody need await a cancelled request's result
        if self._events is not None:
            self._events.put_nowait(error)
        return True


@dataclass(frozen=True)
class _Admission:
    key: int
    request: TranslationRequest
    admitted_at: float  # time.monotonic()


@dataclass(frozen=True)
class _IterationPlan:
    """What the loop thread decided for one iteration: rows to drop, requests to admit."""

    dropped: list[int]
    admitted: list[_Admission]


@dataclass(frozen=True)
class _FinishedRequest:
    key: int
    hypotheses: list[Hypothesis]
    admitted_at: float
    first_step_at: float
    last_step_at: float
    steps: int


@dataclass
class _IterationOutcome:
    """What the worker thread hands back to the loop thread after one iteration."""

    events: list[tuple[int, TokenEvent]] = field(default_factory=list)
    finished: list[_FinishedRequest] = field(default_factory=list)
    failed: list[tuple[int, AttnServeError]] = field(default_factory=list)
    stats: StepStats | None = None


class Scheduler:
    """Continuous-batching decoder for one model version; owns that version's StepModel."""

    def __init__(
        self,
        model: StepModel,
        *,
        limits: EngineLimits,
        policy: BatchingPolicy = BatchingPolicy.CONTINUOUS,
        recorder: StatsRecorder | None = None,
        name: str = "",
        version: str = "",
    ) -> None:
        self.model = model
        self.limits = limits
        self.policy = policy
        self.name = name
        self.version = version
        self._label = f"{name or 'unnamed'} version {version}" if version else (name or "unnamed")
        self._recorder: StatsRecorder = recorder if recorder is not None else NullRecorder()
        self._keys = itertools.count(1)
        self._waiting: deque[RequestHandle] = deque()
        self._active: dict[int, RequestHandle] = {}  # in the batch (or being admitted), by key
        self._outstanding: dict[int, RequestHandle] = {}  # every unresolved handle, by key
        self._batch = RowBatch(tuple(model.memory_names), tuple(model.state_names))
        self._lifecycle = _Lifecycle.NEW
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None

    # ----- public surface -------------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Requests queued, not yet in the batch."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Requests in the batch."""
        return len(self._active)

    @property
    def active_rows(self) -> int:
        """Decoder rows of the requests in the batch."""
        return sum(handle.request.options.beam_size for handle in self._active.values())

    async def start(self) -> None:
        """Start the loop task on the running event loop and the worker thread (called once)."""
        if self._lifecycle is not _Lifecycle.NEW:
            raise RuntimeError(f"the scheduler of model {self._label} was already started")
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{self.name or 'model'}")
        self._lifecycle = _Lifecycle.RUNNING
        self._task = self._loop.create_task(self._run(), name=f"engine loop {self._label}")
        self._task.add_done_callback(self._on_loop_exit)

    def submit(self, request: TranslationRequest) -> RequestHandle:
        """Queue a request; never blocks. Raises Unavailable when not running (stopping, stopped, not
        started), InvalidRequest when it can never fit the model or the budgets, Overloaded when the queue
        is full."""
        if self._lifecycle is not _Lifecycle.RUNNING or self._loop is None:
            state = "not started" if self._lifecycle is _Lifecycle.NEW else self._lifecycle.value
            raise Unavailable(f"model {self._label} is {state} and accepts no requests")
        self._check_fits(request)
        if len(self._waiting) >= self.limits.max_waiting_requests:
            raise Overloaded(
                f"model {self._label} has {len(self._waiting)} requests waiting, the limit is "
                f"{self.limits.max_waiting_requests}; retry later"
            )
        handle = RequestHandle(next(self._keys), request, self._loop, self._cancel)
        self._waiting.append(handle)
        self._outstanding[handle.key] = handle
        self._wake.set()
        return handle

    def check_room(self, count: int) -> None:
        """Raise Overloaded now unless the queue has room for `count` more requests (InvalidRequest when
        it never will). Cheap: callers check before tokenizing, so refusing under overload costs little."""
        if count > self.limits.max_waiting_requests:
            raise InvalidRequest(
                f"this call brings {count} texts but model {self._label} queues at most "
                f"{self.limits.max_waiting_requests}; send fewer texts per call"
            )
        if count > self.limits.max_waiting_requests - len(self._waiting):
            raise Overloaded(
                f"model {self._label} has {len(self._waiting)} requests waiting and this call brings "
                f"{count}; the limit is {self.limits.max_waiting_requests}; retry later"
            )

    def submit_all(self, requests: Sequence[TranslationRequest]) -> list[RequestHandle]:
        """Queue several requests (one call's texts) all or none: raises Overloaded, without queueing
        any, when the queue has no room for all of them; otherwise as `submit()` for each."""
        if self._lifecycle is _Lifecycle.RUNNING:
            for request in requests:
                self._check_fits(request)
            self.check_room(len(requests))
        return [self.submit(request) for request in requests]

    async def stop(self, grace_s: float) -> None:
        """Stop admitting (submit raises Unavailable), let queued and active requests finish for up to
        `grace_s` seconds, then fail the rest with Unavailable. Every handle is resolved on return."""
        if self._lifecycle is _Lifecycle.RUNNING:
            self._lifecycle = _Lifecycle.STOPPING
            self._wake.set()
        elif self._lifecycle is _Lifecycle.NEW:
            self._lifecycle = _Lifecycle.STOPPED
        task = self._task
        if task is not None and not task.done():
            finished, _ = await asyncio.wait([task], timeout=max(grace_s, 0.0))
            if not finished:
                task.cancel()
                await asyncio.wait([task])
        self._lifecycle = _Lifecycle.STOPPED
        for handle in list(self._outstanding.values()):
            self._fail(
                handle, Unavailable(f"model {self._label} stopped before the request finished"), FinishReason.ERROR
            )
        self._waiting.clear()
        self._active.clear()
        if self._executor is not None:
            # A step still in flight (after the grace period) finishes on its own; its outputs are dropped.
            self._executor.shutdown(wait=False, cancel_futures=True)

    # ----- admission checks and resolution (loop thread) --------------------------------------------

    def _check_fits(self, request: TranslationRequest) -> None:
        beam = request.options.beam_size
        if beam > self.model.top_k:
            raise InvalidRequest(f"beam_size {beam} exceeds the maximum {self.model.top_k} for model {self._label}")
        if beam > self.limits.max_active_hypotheses:
            raise InvalidRequest(
                f"beam_size {beam} exceeds the {self.limits.max_active_hypotheses} hypotheses model "
                f"{self._label} decodes at once"
            )
        padded = beam * request.source_length
        if padded > self.limits.max_padded_source_tokens:
            raise InvalidRequest(
                f"a source of {request.source_length} tokens with beam_size {beam} needs {padded} padded source "
                f"tokens, above the limit {self.limits.max_padded_source_tokens} for model {self._label}"
            )

    def _cancel(self, handle: RequestHandle) -> None:
        if self._fail(handle, RequestCancelled(f"request cancelled (model {self._label})"), FinishReason.CANCELLED):
            self._wake.set()  # so a loop waiting for a batch to fill re-checks its queue

    def _fail(self, handle: RequestHandle, error: AttnServeError, reason: FinishReason) -> bool:
        if not handle._fail(error):
            return False
        self._outstanding.pop(handle.key, None)
        self._record(self._recorder.on_request_failed, reason)
        return True

    def _resolve(self, handle: RequestHandle, result: TranslationResult, stats: RequestStats) -> None:
        if handle._resolve(result):
            self._outstanding.pop(handle.key, None)
            self._record(self._recorder.on_request_done, stats)

    def _record(self, method: Callable[[object], None], value: object) -> None:
        try:
            method(value)
        except Exception:  # a broken recorder must not break decoding
            log.exception("stats recorder failed (model %s)", self._label)

    def _expired(self, handle: RequestHandle, now: float, where: str) -> bool:
        deadline = handle.request.deadline
        if deadline is None or now < deadline:
            return False
        waited = now - handle.request.arrival
        self._fail(
            handle,
            DeadlineExceeded(f"the deadline passed after {waited:.3f} s while {where} (model {self._label})"),
            FinishReason.DEADLINE,
        )
        return True

    # ----- the loop ----------------------------------------------------------------------------------

    def _on_loop_exit(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        log.error("the engine loop of model %s stopped on an error", self._label, exc_info=task.exception())
        self._lifecycle = _Lifecycle.STOPPED
        for handle in list(self._outstanding.values()):
            self._fail(
                handle,
                EngineFailure(f"the engine of model {self._label} stopped: {task.exception()}"),
                FinishReason.ERROR,
            )
        self._waiting.clear()
        self._active.clear()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            self._purge_waiting(time.monotonic())
            if not self._waiting and not self._active:
                if self._lifecycle is not _Lifecycle.RUNNING:
                    return
                await self._wake.wait()
                continue
            if self.policy is BatchingPolicy.REQUEST and not self._active and self._lifecycle is _Lifecycle.RUNNING:
                await self._fill_request_batch()
            plan: _IterationPlan | None = None
            try:
                plan = self._plan(time.monotonic())
                if not plan.dropped and not plan.admitted and not self._active:
                    continue
                outcome = await loop.run_in_executor(self._executor, self._iterate, plan)
                self._deliver(outcome)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug in the engine itself: fail what it touched, keep serving
                log.exception("engine iteration failed (model %s)", self._label)
                self._fail_active(exc)

    async def _fill_request_batch(self) -> None:
        """REQUEST policy: wait until batch_size requests wait, or batch_delay_s after the first arrived."""
        window_ends = self._waiting[0].submitted_at + self.limits.batch_delay_s
        while len(self._waiting) < self.limits.batch_size and self._lifecycle is _Lifecycle.RUNNING:
            remaining = window_ends - time.monotonic()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                return
            self._purge_waiting(time.monotonic())
            if not self._waiting:
                return

    def _purge_waiting(self, now: float) -> None:
        """Remove resolved (cancelled) and expired requests from the queue."""
        if not any(
            handle.done or (handle.request.deadline is not None and handle.request.deadline <= now)
            for handle in self._waiting
        ):
            return
        kept: deque[RequestHandle] = deque()
        for handle in self._waiting:
            if handle.done or self._expired(handle, now, "waiting"):
                continue
            kept.append(handle)
        self._waiting = kept

    def _plan(self, now: float) -> _IterationPlan:
        dropped: list[int] = []
        for key, handle in list(self._active.items()):
            if handle.done or self._expired(handle, now, "decoding"):
                dropped.append(key)
                del self._active[key]
        self._purge_waiting(now)
        return _IterationPlan(dropped=dropped, admitted=self._admit(now))

    def _admit(self, now: float) -> list[_Admission]:
        """Move waiting requests into the batch, first come first served, while the budgets allow."""
        if self.policy is BatchingPolicy.CONTINUOUS:
            most = self.limits.max_active_hypotheses  # rows bound it anyway: every request takes >= 1 row
        elif self._active:
            return []  # REQUEST and NONE: no one joins a running batch
        elif self.policy is BatchingPolicy.REQUEST:
            most = self.limits.batch_size
        else:
            most = 1
        rows = sum(handle.request.options.beam_size for handle in self._active.values())
        longest = max((handle.request.source_length for handle in self._active.values()), default=0)
        admitted: list[_Admission] = []
        while self._waiting and len(admitted) < most:
            request = self._waiting[0].request
            new_rows = rows + request.options.beam_size
            new_longest = max(longest, request.source_length)
            over_budget = (
                new_rows > self.limits.max_active_hypotheses
                or new_rows * new_longest > self.limits.max_padded_source_tokens
            )
            # An empty batch always takes the head (submit() checked it fits alone), so the loop always
            # progresses; otherwise strict FIFO: a big request at the head is not overtaken, so it cannot starve.
            if over_budget and rows > 0:
                break
            handle = self._waiting.popleft()
            self._active[handle.key] = handle
            admitted.append(_Admission(handle.key, request, now))
            rows, longest = new_rows, new_longest
        return admitted

    def _deliver(self, outcome: _IterationOutcome) -> None:
        now = time.monotonic()
        for key, event in outcome.events:
            handle = self._active.get(key)
            if handle is not None:
                handle._push(event)
        for done in outcome.finished:
            handle = self._active.pop(done.key, None)
            if handle is None:
                continue
            request = handle.request
            result = TranslationResult(
                hypotheses=done.hypotheses,
                queue_wait_s=done.admitted_at - request.arrival,
                first_token_s=done.first_step_at - request.arrival,
                total_s=now - request.arrival,
                generated_tokens=done.steps,
            )
            stats = RequestStats(
                queue_wait_s=result.queue_wait_s,
                first_token_s=result.first_token_s,
                mean_inter_token_s=(done.last_step_at - done.first_step_at) / (done.steps - 1)
                if done.steps > 1
                else None,
                total_s=result.total_s,
                generated_tokens=done.steps,
                source_tokens=request.source_length,
                finish_reason=done.hypotheses[0].finish_reason,
                beam_size=request.options.beam_size,
            )
            self._resolve(handle, result, stats)
        for key, error in outcome.failed:
            handle = self._active.pop(key, None)
            if handle is not None:
                self._fail(handle, error, FinishReason.ERROR)
        if outcome.stats is not None:
            self._record(self._recorder.on_step, outcome.stats)

    def _fail_active(self, exc: Exception) -> None:
        """After an unexpected engine error: fail every request in (or entering) the batch, start afresh."""
        for handle in list(self._active.values()):
            self._fail(
                handle,
                EngineFailure(f"engine error in model {self._label}: {type(exc).__name__}: {exc}"),
                FinishReason.ERROR,
            )
        self._active.clear()
        self._batch = RowBatch(tuple(self.model.memory_names), tuple(self.model.state_names))

    # ----- one iteration's blocking part (worker thread) ---------------------------------------------

    def _iterate(self, plan: _IterationPlan) -> _IterationOutcome:
        outcome = _IterationOutcome()
        batch = self._batch
        batch.remove(plan.dropped)
        encode_seconds = 0.0
        if plan.admitted:
            started = time.perf_counter()
            try:
                members, states = self._encode(plan.admitted)
            except Exception as exc:
                log.error(
                    "the encoder of model %s failed for %d requests", self._label, len(plan.admitted), exc_info=exc
                )
                outcome.failed.extend((a.key, self._model_failure("encoder", exc)) for a in plan.admitted)
            else:
                batch.add(members, states, self.model.bos_id)
            encode_seconds = time.perf_counter() - started
        rows, requests, padded = batch.rows, len(batch.members), batch.padded_source_len
        if rows == 0:
            if plan.admitted:
                outcome.stats = StepStats(
                    0, 0, 0.0, encode_seconds, len(plan.admitted), len(plan.admitted), 0, 0, len(outcome.failed)
                )
            return outcome

        inputs = batch.step_inputs()
        started = time.perf_counter()
        output: StepOutput | None
        try:
            output = self.model.step(inputs.tokens, inputs.source_lengths, inputs.memory, inputs.state)
            self._check_step_output(output, batch)
        except Exception as exc:
            if requests > 1:
                log.warning(
                    "the decoder step of model %s failed for %d requests (%s: %s); stepping each request "
                    "alone so that only the failing ones fail", self._label, requests, type(exc).__name__, exc,
                )
                output = self._step_each_alone(batch, inputs, outcome)
            else:
                log.error("the decoder step of model %s failed for %d requests", self._label, requests, exc_info=exc)
                outcome.failed.extend((member.key, self._model_failure("decoder step", exc)) for member in batch.clear())
                output = None
        if output is None:  # every request of the step failed
            step_seconds = time.perf_counter() - started
            outcome.stats = StepStats(
                rows,
                requests,
                step_seconds,
                encode_seconds,
                len(plan.admitted),
                len(plan.admitted),
                padded,
                0,
                len(outcome.failed),
            )
            return outcome
        step_seconds = time.perf_counter() - started
        stepped_rows = batch.rows  # fewer than `rows` when requests failed on their own and left

        now = time.monotonic()
        decisions: list[StepDecision] = []
        for member, offset in batch.with_offsets():
            own = slice(offset, offset + member.rows)
            decision = member.search.advance(
                output.topk_log_probs[own], output.topk_ids[own], output.attention[own, : member.source_length]
            )
            if member.first_step_at is None:
                member.first_step_at = now
            member.last_step_at = now
            decisions.append(decision)
            outcome.events.extend((member.key, event) for event in decision.events)
        for member in batch.apply(decisions, output.state):
            outcome.finished.append(
                _FinishedRequest(
                    key=member.key,
                    hypotheses=member.search.hypotheses(),
                    admitted_at=member.admitted_at,
                    first_step_at=member.first_step_at if member.first_step_at is not None else now,
                    last_step_at=now,
                    steps=member.search.steps,
                )
            )
        outcome.stats = StepStats(
            rows=rows,
            requests=requests,
            step_seconds=step_seconds,
            encode_seconds=encode_seconds,
            encoder_batch=len(plan.admitted),
            admitted=len(plan.admitted),
            padded_source_len=padded,
            tokens_generated=stepped_rows,
            retired=len(outcome.finished) + len(outcome.failed),
        )
        return outcome

    def _encode(self, admitted: Sequence[_Admission]) -> tuple[list[BatchMember], list[dict[str, np.ndarray]]]:
        """One encoder call for every admitted request; returns their batch members and initial states."""
        lengths = np.array([a.request.source_length for a in admitted], dtype=np.int64)
        source_ids = np.zeros((len(admitted), int(lengths.max())), dtype=np.int64)
        for row, admission in enumerate(admitted):
            source_ids[row, : lengths[row]] = admission.request.source_ids
        encoded = self.model.encode(source_ids, lengths)
        _check_tensors("encoder memory", encoded.memory, self.model.memory_names, len(admitted), source_ids.shape[1])
        _check_tensors("encoder state", encoded.state, self.model.state_names, len(admitted), None)
        members: list[BatchMember] = []
        states: list[dict[str, np.ndarray]] = []
        for row, admission in enumerate(admitted):
            length = int(lengths[row])
            # Copies, so the batch keeps only each request's own slice, not the whole encoder output.
            memory = {name: encoded.memory[name][row : row + 1, :length].copy() for name in self.model.memory_names}
            states.append({name: encoded.state[name][row : row + 1].copy() for name in self.model.state_names})
            search = new_search(admission.request.options, eos_id=self.model.eos_id, stream=admission.request.stream)
            members.append(BatchMember(admission.key, search, length, memory, admission.admitted_at))
        return members, states

    def _check_step_output(self, output: StepOutput, batch: RowBatch) -> None:
        widest = max(member.rows for member in batch.members)
        self._check_output_shapes(output, batch.rows, widest, batch.padded_source_len)

    def _check_output_shapes(self, output: StepOutput, rows: int, widest: int, padded_source_len: int) -> None:
        """Raise ValueError unless the step's outputs have `rows` rows, >= `widest` candidates per row
        and attention over >= `padded_source_len` positions."""
        shape = output.topk_log_probs.shape
        if len(shape) != 2 or shape[0] != rows or output.topk_ids.shape != shape or shape[1] < widest:
            raise ValueError(
                f"step returned topk_log_probs {shape} and topk_ids {output.topk_ids.shape} for {rows} rows "
                f"(need [{rows}, >= {widest}])"
            )
        if (
            output.attention.ndim != 2
            or output.attention.shape[0] != rows
            or output.attention.shape[1] < padded_source_len
        ):
            raise ValueError(
                f"step returned attention {output.attention.shape} for {rows} rows of "
                f"{padded_source_len} source tokens"
            )
        _check_tensors("step state", output.state, self.model.state_names, rows, None)

    def _step_each_alone(self, batch: RowBatch, inputs: StepInputs, outcome: _IterationOutcome) -> StepOutput | None:
        """After a decoder step of several requests failed: run it again on each request's rows alone,
        fail (and remove from the batch) the requests whose own step fails, and return the others'
        outputs joined in their row order, or None when none of them survived."""
        parts: list[StepOutput] = []
        failed: dict[int, Exception] = {}
        for member, offset in list(batch.with_offsets()):
            own = slice(offset, offset + member.rows)
            try:
                part = self.model.step(
                    inputs.tokens[own],
                    inputs.source_lengths[own],
                    {name: array[own] for name, array in inputs.memory.items()},
                    {name: array[own] for name, array in inputs.state.items()},
                )
                self._check_output_shapes(part, member.rows, member.rows, batch.padded_source_len)
            except Exception as exc:
                failed[member.key] = exc
            else:
                parts.append(part)
        for key, exc in failed.items():
            log.error("the decoder step of model %s failed for request %d on its own", self._label, key, exc_info=exc)
        batch.remove(failed)
        outcome.failed.extend((key, self._model_failure("decoder step", exc)) for key, exc in failed.items())
        if not parts:
            return None
        return StepOutput(
            topk_log_probs=np.concatenate([part.topk_log_probs for part in parts]),
            topk_ids=np.concatenate([part.topk_ids for part in parts]),
            attention=np.concatenate([part.attention for part in parts]),
            state={name: np.concatenate([part.state[name] for part in parts]) for name in self.model.state_names},
        )

    def _model_failure(self, what: str, exc: Exception) -> EngineFailure:
        return EngineFailure(f"the {what} of model {self._label} failed: {type(exc).__name__}: {exc}")


def _check_tensors(
    what: str, tensors: dict[str, np.ndarray], names: Sequence[str], rows: int, length: int | None
) -> None:
    """Raise ValueError unless every name is present with `rows` rows (and `length` on axis 1 if given)."""
    for name in names:
        tensor = tensors.get(name)
        if tensor is None:
            raise ValueError(f"{what} lacks {name!r} (has {sorted(tensors)})")
        if (
            tensor.ndim < 1
            or tensor.shape[0] != rows
            or (length is not None and (tensor.ndim < 2 or tensor.shape[1] != length))
        ):
            expected = f"[{rows}, {length}, ...]" if length is not None else f"[{rows}, ...]"
            raise ValueError(f"{what} {name!r} has shape {tensor.shape}, expected {expected}")
