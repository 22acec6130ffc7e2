"""`AsyncEngine`: one model version's EngineCore, run for asyncio callers on a worker thread or on the loop.

Concurrency model:
- The server is asyncio. `submit_all()`, `check_room()`, every RequestHandle and `stop()` run on the
  event-loop thread, and every handle is resolved there.
- Where the core steps is the driver's one choice (`on_loop`):
  - On a worker thread (the default): one thread per model version owns the core and steps it back to back
    while it has work (vLLM's engine-core busy loop, in a thread), so the runtime's calls, which release the
    GIL, overlap with the RPC work on the loop. Arrivals and cancellations reach it through the core's inbox
    (`add()` / `abort()`), and a threading.Event wakes it when it sleeps; it never polls. What a step produced
    for callers (results, failures, streamed tokens) goes back to the event loop through one coalescing
    outbox: at most one loop callback is pending at a time, however many steps ran meanwhile.
  - On the loop (`on_loop=True`): the loop itself runs one step per turn while there is work, and polls its
    sockets between steps, so nothing crosses a thread: no wake-up either way, and outputs are delivered in
    the turn that produced them. For a process whose loop has little else to do (the engine process of
    `--frontends N`), and for models whose steps cost less than a thread hop.
- A step's own numbers are recorded where it ran and never wake the loop.
- Each counter has one writer: the loop thread counts what it added (`_added`), the core what left the queue and
  what is in the batch (`EngineCore.counts`, replaced whole). The queue length is the difference, so a reader on
  any thread (the metrics scrape) only reads.

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
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from service.engine.core import BatchingPolicy, CoreOutput, EngineCore, EngineLimits, FinishedRequest
from service.engine.handle import RequestHandle
from service.engine.records import EngineRequest, FinishReason, StepModel
from service.engine.stats import NullRecorder, StatsRecorder
from service.errors import AttnServeError, EngineFailure, InvalidRequest, Overloaded, RequestCancelled, Unavailable

log = logging.getLogger(__name__)

WORKER_EXIT_WAIT_S = 1.0
"""How long stop() waits for the worker thread to exit once the grace period is over (see stop())."""

_Stat = TypeVar("_Stat")


class _Lifecycle(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class AsyncEngine:
    """Continuous-batching decoder for one model version; owns that version's StepModel and what steps it (a worker
    thread, or with `on_loop` the event loop itself: see docs/engine.md)."""

    def __init__(
        self,
        model: StepModel,
        *,
        limits: EngineLimits,
        policy: BatchingPolicy = BatchingPolicy.CONTINUOUS,
        recorder: StatsRecorder | None = None,
        label: str = "unnamed",
        clock: Callable[[], float] = time.monotonic,
        on_loop: bool = False,
        encoder_thread: bool = False,
    ) -> None:
        self.model = model
        self.on_loop = on_loop
        self.limits = limits
        self.label = label
        self._recorder: StatsRecorder = recorder if recorder is not None else NullRecorder()
        self._clock = clock
        # With `encoder_thread`, the encoder for requests joining a running batch runs on a thread of its own,
        # beside the decoder step (EngineCore's encoder pool); the thread starts with the first such call.
        self._encoder_pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"encoder {label}") if encoder_thread else None
        )
        self._core = EngineCore(model, limits, policy, clock=clock, label=label, encoder_pool=self._encoder_pool)
        self._keys = itertools.count(1)
        self._outstanding: dict[int, RequestHandle] = {}  # every unresolved handle, by key
        self._added = 0  # requests handed to the core (loop thread only)
        self._lifecycle = _Lifecycle.NEW
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = threading.Event()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._outbox: deque[CoreOutput | BaseException] = deque()
        self._delivery_pending = False
        # On the loop: a turn is pending (call_soon) or running; there is only ever one chain of turns.
        self._turn_scheduled = False
        self._timer: asyncio.TimerHandle | None = None  # on the loop, while idle: the turn at the next wakeup
        self._all_resolved = asyncio.Event()

    # ----- public surface -------------------------------------------------------------------------

    def queue_counts(self) -> tuple[int, int]:
        """(waiting, running): requests queued and not yet taken for the batch, and requests in the batch (with
        those being encoded beside a step to join it), from one snapshot of the core (any thread). `waiting` may
        count for a moment a request the engine has just taken in, never one twice; a cancellation counts once the
        engine has taken it in (its next step)."""
        dequeued, running = self._core.counts  # read before `_added`, so waiting is never below zero
        return self._added - dequeued, running

    def queue_progress(self) -> tuple[int, int]:
        """(waiting, dequeued): requests queued now, and requests that have left the queue since the engine
        started (into the batch, or cancelled or expired while waiting; a count that only grows), from one
        snapshot of the core (any thread). Admission measures the queue's drain rate from the second."""
        dequeued = self._core.counts.dequeued  # read before `_added`, so waiting is never below zero
        return self._added - dequeued, dequeued

    @property
    def waiting(self) -> int:
        """Requests queued, not yet in the batch (any thread; see queue_counts)."""
        return self.queue_counts()[0]

    @property
    def running(self) -> int:
        """Requests in the batch, or being encoded to join it (any thread)."""
        return self._core.counts.running

    @property
    def outstanding(self) -> int:
        """Requests submitted and not yet resolved (event-loop thread)."""
        return len(self._outstanding)

    async def start(self) -> None:
        """Start stepping: the worker thread, or (on_loop) turns on this loop (called once, on the running loop)."""
        if self._lifecycle is not _Lifecycle.NEW:
            raise RuntimeError(f"the engine of model {self.label} was already started")
        self._loop = asyncio.get_running_loop()
        self._lifecycle = _Lifecycle.RUNNING
        if not self.on_loop:
            self._thread = threading.Thread(target=self._work, name=f"engine {self.label}", daemon=True)
            self._thread.start()

    def release_unused_memory(self) -> None:
        """Give back, at the next step, what the batch holds beyond what it needs (EngineCore.release_unused_memory);
        the model's own memory is its runtime's business. Any thread."""
        self._core.release_unused_memory()

    def check_room(self, count: int) -> None:
        """Raise Overloaded now unless the queue has room for `count` more requests (InvalidRequest when
        it never will). Cheap: callers check before tokenizing, so refusing under overload costs little."""
        limit = self.limits.max_waiting_requests
        if count > limit:
            raise InvalidRequest(
                f"this call brings {count} texts but model {self.label} queues at most {limit}; "
                "send fewer texts per call"
            )
        waiting = self.waiting
        if count > limit - waiting:
            raise Overloaded(
                f"model {self.label} has {waiting} requests waiting and this call brings {count}; the limit is "
                f"{limit}; retry later"
            )

    def submit(self, request: EngineRequest) -> RequestHandle:
        """Queue one request (as submit_all with one)."""
        return self.submit_all((request,))[0]

    def submit_all(self, requests: Sequence[EngineRequest]) -> list[RequestHandle]:
        """Queue one call's requests, all or none; never blocks. Raises Unavailable when not running
        (stopping, stopped, not started), InvalidRequest when one can never fit the model or the budgets,
        Overloaded when the queue has no room for all of them."""
        loop = self._loop
        if self._lifecycle is not _Lifecycle.RUNNING or loop is None:
            state = "not started" if self._lifecycle is _Lifecycle.NEW else self._lifecycle.value
            raise Unavailable(f"model {self.label} is {state} and accepts no requests")
        core = self._core
        for request in requests:
            core.check(request)
        self.check_room(len(requests))
        submitted_at = self._clock()
        handles = []
        for request in requests:
            handle = RequestHandle(next(self._keys), request.stream, loop, self._cancel)
            self._outstanding[handle.key] = handle
            core.add(handle.key, request, submitted_at)
            handles.append(handle)
        self._added += len(requests)
        self._all_resolved.clear()
        self._kick()
        return handles

    async def stop(self, grace_s: float) -> None:
        """Stop admitting (submit_all raises Unavailable), let queued and active requests finish for up to
        `grace_s` seconds, then fail the rest with Unavailable. Every handle is resolved on return."""
        if self._lifecycle is _Lifecycle.RUNNING:
            self._lifecycle = _Lifecycle.STOPPING
            self._core.draining = True
            self._kick()
        grace_ends = time.monotonic() + max(grace_s, 0.0)
        if self._lifecycle is _Lifecycle.STOPPING and self._outstanding:  # a second stop() waits as well
            try:
                await asyncio.wait_for(self._all_resolved.wait(), max(grace_s, 0.0))
            except TimeoutError:
                pass
        self._lifecycle = _Lifecycle.STOPPED
        # A step still in flight (after the grace period) finishes on its own; its outputs are dropped,
        # since every handle is resolved here and the worker exits at its next turn.
        self._closing = True
        self._wake.set()
        if self._timer is not None:
            self._timer.cancel()
        for handle in list(self._outstanding.values()):
            self._fail(
                handle, Unavailable(f"model {self.label} stopped before the request finished"), FinishReason.ERROR
            )
        if self.on_loop and self._encoder_pool is not None:  # no step runs now (steps run on this thread)
            self._encoder_pool.shutdown(wait=False)
        if self._thread is not None and self._thread.is_alive():
            # The worker thread holds the engine until it exits, so a retired version's engine, sessions and batch
            # would outlive stop() by a moment no one can see: wait for it. It exits at once, or after the step in
            # flight; one stuck past the grace period is not waited for longer than WORKER_EXIT_WAIT_S.
            await asyncio.to_thread(self._thread.join, max(grace_ends - time.monotonic(), WORKER_EXIT_WAIT_S))

    def _kick(self) -> None:
        """There is something new for the core (arrivals, cancellations, a stop): make it look."""
        if not self.on_loop:
            self._wake.set()
        elif not self._turn_scheduled and self._loop is not None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._turn_scheduled = True
            self._loop.call_soon(self._turn)

    def _step(self) -> CoreOutput:
        """One iteration of the core, by whichever driver steps it, with its numbers recorded."""
        try:
            output = self._core.step()
        except Exception as exc:  # a bug in the engine itself: fail what it touched, keep serving
            log.exception("engine iteration failed (model %s)", self.label)
            output = self._core.recover(exc)
        if output.stats is not None:
            self._record(self._recorder.on_step, output.stats)
        return output

    # ----- on the loop ---------------------------------------------------------------------------------

    def _turn(self) -> None:
        """One step of the core, then the loop's other work (its sockets, its callbacks), then the next step."""
        # The flag stays set for the whole turn: a kick from inside it (a resolved caller's callback that submits
        # or cancels) must not start a second chain; the has_work check at the end sees what it added.
        self._turn_scheduled = True
        self._timer = None  # this turn is the timer's, or there was none
        core, loop = self._core, self._loop
        if self._closing or loop is None:
            self._turn_scheduled = False
            return
        try:
            if core.has_work:
                output = self._step()
                if output.answers:
                    self._deliver_safely(output)
                if core.has_work:
                    loop.call_soon(self._turn)
                    return
            self._turn_scheduled = False
            wakeup = core.next_wakeup()
            if wakeup is not None:
                self._timer = loop.call_later(max(wakeup - self._clock(), 0.0), self._turn)
        except Exception as exc:  # the driver itself broke: every caller must still get an answer
            log.error("the engine of model %s stopped on an error", self.label, exc_info=exc)
            self._closing = True
            self._worker_died(exc)

    # ----- the worker thread -----------------------------------------------------------------------

    def _work(self) -> None:
        """Step the core back to back while it has work; sleep on the wake event otherwise."""
        core = self._core
        try:
            while not self._closing:
                if core.has_work:
                    output = self._step()
                    if output.answers:
                        self._post(output)
                    continue
                # Cleared only before sleeping (not at every step), then checked again: a kick that came between
                # the check above and the clear is seen here, and one after the clear sets the event again.
                self._wake.clear()
                if core.has_work or self._closing:
                    continue
                wakeup = core.next_wakeup()
                self._wake.wait(None if wakeup is None else max(wakeup - self._clock(), 0.0))
        except BaseException as exc:  # the worker itself died: every caller must still get an answer
            log.error("the engine worker of model %s stopped on an error", self.label, exc_info=exc)
            self._post(exc)
        finally:
            if self._encoder_pool is not None:  # the only thread that submits to it is done
                self._encoder_pool.shutdown(wait=False)

    def _post(self, item: CoreOutput | BaseException) -> None:
        """Hand an output to the event loop, scheduling a delivery only when none is pending: waking the loop
        costs both threads a turn of the GIL, and a busy loop takes several steps' outputs in one turn."""
        self._outbox.append(item)
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
            else:
                self._deliver_safely(item)

    def _deliver_safely(self, output: CoreOutput) -> None:
        try:
            self._deliver(output)
        except Exception as exc:  # a bug in delivery: fail what it touched, keep serving
            log.exception("delivering an engine step failed (model %s)", self.label)
            self._fail_touched(output, exc)

    def _deliver(self, output: CoreOutput) -> None:
        outstanding = self._outstanding
        for key, event in output.events:
            handle = outstanding.get(key)
            if handle is not None:
                handle.push(event)
        for done in output.finished:
            handle = outstanding.get(done.key)
            if handle is not None:
                self._resolve(handle, done)
        for key, error, reason in output.failed:
            handle = outstanding.get(key)
            if handle is not None:
                self._fail(handle, error, reason)

    def _fail_touched(self, output: CoreOutput, exc: Exception) -> None:
        """Fail the requests an output named (its delivery may have left them half done) and drop them."""
        keys = {key for key, _ in output.events}
        keys.update(done.key for done in output.finished)
        keys.update(key for key, _, _ in output.failed)
        error = EngineFailure(f"engine error in model {self.label}: {type(exc).__name__}: {exc}")
        for key in keys:
            handle = self._outstanding.get(key)
            if handle is not None and self._fail(handle, error, FinishReason.ERROR):
                self._core.abort(key)
        self._kick()

    def _worker_died(self, exc: BaseException) -> None:
        self._lifecycle = _Lifecycle.STOPPED
        for handle in list(self._outstanding.values()):
            self._fail(handle, EngineFailure(f"the engine of model {self.label} stopped: {exc!r}"), FinishReason.ERROR)

    # A handle leaves `_outstanding` before it is resolved: resolving runs the caller's callback, and whatever
    # that does, the handle is resolved and counted once and never waited for again.

    def _resolve(self, handle: RequestHandle, done: FinishedRequest) -> None:
        self._forget(handle)
        self._record(self._recorder.on_request_done, done.stats())
        handle.resolve(done.result)

    def _fail(self, handle: RequestHandle, error: AttnServeError, reason: FinishReason) -> bool:
        if handle.done:
            return False
        self._forget(handle)
        self._record(self._recorder.on_request_failed, reason)
        handle.fail(error)
        return True

    def _forget(self, handle: RequestHandle) -> None:
        self._outstanding.pop(handle.key, None)
        if not self._outstanding:
            self._all_resolved.set()

    def _cancel(self, handle: RequestHandle) -> None:
        if self._fail(handle, RequestCancelled(f"request cancelled (model {self.label})"), FinishReason.CANCELLED):
            self._core.abort(handle.key)
            self._kick()

    def _record(self, method: Callable[[_Stat], None], value: _Stat) -> None:
        try:
            method(value)
        except Exception:  # a broken recorder must not break decoding
            log.exception("stats recorder failed (model %s)", self.label)
