"""The scheduler: the thin driver that runs one model version's EngineCore and resolves its callers' futures.

Concurrency model (one, on purpose):
- The server is asyncio. `submit()`, `RequestHandle` and `stop()` run on the event-loop thread, and every
  future, token queue and recorder call is touched only there.
- One dedicated worker thread per model version owns the core and steps it back to back while it has work
  (vLLM's engine-core busy loop, in a thread): it never waits for the event loop between steps, so a
  request's latency is its model time plus RPC, not plus a thread round trip per token. Arrivals and
  cancellations reach it through the core's inbox (`add()` / `abort()`), and a threading.Event wakes it when
  it sleeps; it never polls.
- What a step produced (results, failures, streamed tokens, stats) goes back to the event loop through one
  coalescing outbox: at most one loop callback is pending at a time, however many steps ran meanwhile.

Every submitted request is resolved exactly once: with a result, or with an AttnServeError (cancelled,
deadline, model failure, engine stopped). A resolved handle ignores whatever the core reports later, which
is how a cancellation racing a result stays exactly once.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TypeVar

from service.engine.batch import bucketed
from service.engine.core import BatchingPolicy, CoreOutput, EngineCore, EngineLimits, FinishedRequest
from service.engine.records import FinishReason, StepModel, TokenEvent, TranslationRequest, TranslationResult
from service.engine.stats import NullRecorder, RequestStats, StatsRecorder
from service.errors import AttnServeError, EngineFailure, InvalidRequest, Overloaded, RequestCancelled, Unavailable

log = logging.getLogger(__name__)

Stat = TypeVar("Stat")


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
        submitted_at: float,
    ) -> None:
        self.key = key
        self.request = request
        self.submitted_at = submitted_at
        self.queued = True  # until the core admits it into the batch
        self._future: asyncio.Future[TranslationResult] = loop.create_future()
        self._events: asyncio.Queue[object] | None = asyncio.Queue() if request.stream else None
        self._stream_taken = False
        self._on_cancel = on_cancel
        self._when_resolved: Callable[[RequestHandle], None] | None = None

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

    def when_resolved(self, callback: Callable[[RequestHandle], None]) -> None:
        """Call `callback(self)` right when the request is resolved, in the same turn of the event loop (one
        callback per handle; it must not raise or block); `outcome()` then says how it ended."""
        self._when_resolved = callback

    def outcome(self) -> TranslationResult | AttnServeError:
        """A resolved request's result, or the AttnServeError that ended it (InvalidStateError before then)."""
        error = self._future.exception()
        if error is None:
            return self._future.result()
        assert isinstance(error, AttnServeError)  # _fail() is the only way an error gets in
        return error

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
        if self._when_resolved is not None:
            self._when_resolved(self)
        return True

    def _fail(self, error: AttnServeError) -> bool:
        if self._future.done():
            return False
        self._future.set_exception(error)
        self._future.exception()  # marks it retrieved: nobody need await a cancelled request's result
        if self._events is not None:
            self._events.put_nowait(error)
        if self._when_resolved is not None:
            self._when_resolved(self)
        return True


class Scheduler:
    """Continuous-batching decoder for one model version; owns that version's StepModel and its worker."""

    def __init__(
        self,
        model: StepModel,
        *,
        limits: EngineLimits,
        policy: BatchingPolicy = BatchingPolicy.CONTINUOUS,
        recorder: StatsRecorder | None = None,
        name: str = "",
        version: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        self.limits = limits
        self.policy = policy
        self.name = name
        self.version = version
        self._label = f"{name or 'unnamed'} version {version}" if version else (name or "unnamed")
        self._recorder: StatsRecorder = recorder if recorder is not None else NullRecorder()
        self._clock = clock
        self._core = EngineCore(model, limits, policy, clock=clock, label=self._label)
        # Keys the worker admitted; the loop thread reads them when it next needs the counts (no wake-up).
        self._admitted: deque[int] = deque()
        self._core.on_admitted = self._admitted.extend
        self._keys = itertools.count(1)
        self._outstanding: dict[int, RequestHandle] = {}  # every unresolved handle, by key
        self._queued = 0  # outstanding handles not yet admitted into the batch
        self._lifecycle = _Lifecycle.NEW
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = threading.Event()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._outbox: deque[CoreOutput | BaseException] = deque()
        self._delivery_pending = False
        self._all_resolved = asyncio.Event()

    # ----- public surface -------------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Requests queued, not yet in the batch."""
        self._take_admissions()
        return self._queued

    @property
    def running(self) -> int:
        """Requests in the batch."""
        self._take_admissions()
        return len(self._outstanding) - self._queued

    def _take_admissions(self) -> None:
        """Count the requests the worker has admitted since the last look as running."""
        while self._admitted:
            handle = self._outstanding.get(self._admitted.popleft())
            if handle is not None and handle.queued:
                handle.queued = False
                self._queued -= 1

    async def start(self) -> None:
        """Start the worker thread (called once, on the running event loop)."""
        if self._lifecycle is not _Lifecycle.NEW:
            raise RuntimeError(f"the scheduler of model {self._label} was already started")
        self._loop = asyncio.get_running_loop()
        self._lifecycle = _Lifecycle.RUNNING
        self._thread = threading.Thread(target=self._work, name=f"engine-{self.name or 'model'}", daemon=True)
        self._thread.start()

    def submit(self, request: TranslationRequest) -> RequestHandle:
        """Queue a request; never blocks. Raises Unavailable when not running (stopping, stopped, not
        started), InvalidRequest when it can never fit the model or the budgets, Overloaded when the queue
        is full."""
        if self._lifecycle is not _Lifecycle.RUNNING or self._loop is None:
            state = "not started" if self._lifecycle is _Lifecycle.NEW else self._lifecycle.value
            raise Unavailable(f"model {self._label} is {state} and accepts no requests")
        self._check_fits(request)
        self._take_admissions()
        if self._queued >= self.limits.max_waiting_requests:
            raise Overloaded(
                f"model {self._label} has {self._queued} requests waiting, the limit is "
                f"{self.limits.max_waiting_requests}; retry later"
            )
        submitted_at = self._clock()
        handle = RequestHandle(next(self._keys), request, self._loop, self._cancel, submitted_at)
        self._outstanding[handle.key] = handle
        self._queued += 1
        self._all_resolved.clear()
        self._core.add(handle.key, request, submitted_at)
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
        self._take_admissions()
        if count > self.limits.max_waiting_requests - self._queued:
            raise Overloaded(
                f"model {self._label} has {self._queued} requests waiting and this call brings "
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
            self._core.draining = True
            self._wake.set()
            if self._outstanding:
                try:
                    await asyncio.wait_for(self._all_resolved.wait(), max(grace_s, 0.0))
                except TimeoutError:
                    pass
        self._lifecycle = _Lifecycle.STOPPED
        # A step still in flight (after the grace period) finishes on its own; its outputs are dropped,
        # since every handle is resolved here and the worker exits at its next turn.
        self._closing = True
        self._wake.set()
        for handle in list(self._outstanding.values()):
            self._fail(
                handle, Unavailable(f"model {self._label} stopped before the request finished"), FinishReason.ERROR
            )

    # ----- the worker thread -----------------------------------------------------------------------

    def _work(self) -> None:
        """Step the core back to back while it has work; sleep on the wake event otherwise."""
        core = self._core
        try:
            while not self._closing:
                self._wake.clear()
                if core.has_work:
                    try:
                        output = core.step()
                    except Exception as exc:  # a bug in the engine itself: fail what it touched, keep serving
                        log.exception("engine iteration failed (model %s)", self._label)
                        output = core.recover(exc)
                    if output:
                        self._post(output)
                    continue
                wakeup = core.next_wakeup()
                self._wake.wait(None if wakeup is None else max(wakeup - self._clock(), 0.0))
        except BaseException as exc:  # the worker itself died: every caller must still get an answer
            log.error("the engine worker of model %s stopped on an error", self._label, exc_info=exc)
            self._post(exc)

    def _post(self, item: CoreOutput | BaseException) -> None:
        """Hand a step's output to the event loop; schedules a delivery only if none is pending, and only for
        what a caller waits for (results, failures, streamed tokens). A step that only produced stats rides
        along with the next delivery: waking the loop costs both threads a turn of the GIL, at every step."""
        self._outbox.append(item)
        if isinstance(item, CoreOutput) and not (item.finished or item.failed or item.events):
            return
        if not self._delivery_pending and self._loop is not None:
            self._delivery_pending = True
            try:
                self._loop.call_soon_threadsafe(self._deliver_outbox)
            except RuntimeError:  # the loop is closed: nobody is left to answer
                pass

    # ----- delivery (loop thread) ------------------------------------------------------------------

    def _deliver_outbox(self) -> None:
        # Cleared before draining: an item posted after this point schedules a new delivery.
        self._delivery_pending = False
        while self._outbox:
            item = self._outbox.popleft()
            if isinstance(item, BaseException):
                self._worker_died(item)
                continue
            try:
                self._deliver(item)
            except Exception as exc:  # a bug in delivery: fail what it may have left half done, keep serving
                log.exception("delivering an engine step failed (model %s)", self._label)
                self._fail_running(exc)

    def _fail_running(self, exc: Exception) -> None:
        """Fail every request in the batch (the core drops them at its next step)."""
        for handle in [handle for handle in self._outstanding.values() if not handle.queued]:
            if self._fail(
                handle,
                EngineFailure(f"engine error in model {self._label}: {type(exc).__name__}: {exc}"),
                FinishReason.ERROR,
            ):
                self._core.abort(handle.key)
        self._wake.set()

    def _deliver(self, output: CoreOutput) -> None:
        self._take_admissions()  # output.admitted is in there too, handed over as soon as admitted
        for key, event in output.events:
            handle = self._outstanding.get(key)
            if handle is not None:
                handle._push(event)
        if output.finished:
            now = self._clock()
            for done in output.finished:
                handle = self._outstanding.get(done.key)
                if handle is not None:
                    self._resolve(handle, done, now)
        for key, error, reason in output.failed:
            handle = self._outstanding.get(key)
            if handle is not None:
                self._fail(handle, error, reason)
        if output.stats is not None:
            self._record(self._recorder.on_step, output.stats)

    def _worker_died(self, exc: BaseException) -> None:
        self._lifecycle = _Lifecycle.STOPPED
        for handle in list(self._outstanding.values()):
            self._fail(handle, EngineFailure(f"the engine of model {self._label} stopped: {exc!r}"), FinishReason.ERROR)

    def _resolve(self, handle: RequestHandle, done: FinishedRequest, now: float) -> None:
        request = handle.request
        result = TranslationResult(
            hypotheses=done.hypotheses,
            queue_wait_s=done.admitted_at - request.arrival,
            first_token_s=done.first_step_at - request.arrival,
            total_s=now - request.arrival,
            generated_tokens=done.steps,
        )
        if not handle._resolve(result):
            return
        self._forget(handle)
        self._record(
            self._recorder.on_request_done,
            RequestStats(
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
            ),
        )

    def _fail(self, handle: RequestHandle, error: AttnServeError, reason: FinishReason) -> bool:
        if not handle._fail(error):
            return False
        self._forget(handle)
        self._record(self._recorder.on_request_failed, reason)
        return True

    def _forget(self, handle: RequestHandle) -> None:
        del self._outstanding[handle.key]
        if handle.queued:
            handle.queued = False
            self._queued -= 1
        if not self._outstanding:
            self._all_resolved.set()

    def _cancel(self, handle: RequestHandle) -> None:
        if self._fail(handle, RequestCancelled(f"request cancelled (model {self._label})"), FinishReason.CANCELLED):
            self._core.abort(handle.key)
            self._wake.set()

    def _record(self, method: Callable[[Stat], None], value: Stat) -> None:
        try:
            method(value)
        except Exception:  # a broken recorder must not break decoding
            log.exception("stats recorder failed (model %s)", self._label)

    def _check_fits(self, request: TranslationRequest) -> None:
        beam = request.options.beam_size
        if beam > self.model.top_k:
            raise InvalidRequest(f"beam_size {beam} exceeds the maximum {self.model.top_k} for model {self._label}")
        if beam > self.limits.max_active_hypotheses:
            raise InvalidRequest(
                f"beam_size {beam} exceeds the {self.limits.max_active_hypotheses} hypotheses model "
                f"{self._label} decodes at once"
            )
        padded = beam * bucketed(request.source_length, self.limits.source_bucket)
        if padded > self.limits.max_padded_source_tokens:
            raise InvalidRequest(
                f"a source of {request.source_length} tokens with beam_size {beam} needs {padded} padded source "
                f"tokens, above the limit {self.limits.max_padded_source_tokens} for model {self._label}"
            )
