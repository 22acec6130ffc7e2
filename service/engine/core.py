"""The engine core: one model version's queue, batch and decoder loop, as plain synchronous calls.

`EngineCore.step()` is one iteration, in three stages:

1. **plan**: take in what arrived and what was cancelled (handed in by `add()` / `abort()`, never found by
   scanning), fail requests whose deadline passed (a heap), admit waiting requests first come first served
   within the budgets (counters kept on admission and retirement), and encode them in one call;
2. **step**: one decoder call over every row of the batch (with a failing step re-run per request, so only
   the requests whose own rows make the model fail are failed);
3. **update**: advance every request from the step's outputs (search.py, whole-batch array work), retire the
   finished ones, and return what happened as a `CoreOutput`.

With an `encoder_pool` (an executor of one thread), the encoder call of plan runs on the pool beside the step
whenever the batch has rows to decode, and the new requests join the batch after the step (their first step is
the next iteration's). For a model whose encoder call costs a good part of a step, this hides it behind the
decoder on a spare core; into an empty batch they are still encoded at once and join the step that follows.

The core knows nothing of asyncio or gRPC, starts no thread (the encoder pool is handed in), and reads time only
from the injected `clock`: a test drives it step by step with a fake model and a fake clock, and asserts exact
outcomes. `AsyncEngine` (async_engine.py) is the thin driver that runs it on a worker thread and resolves the
callers' handles.

Thread safety: `check()`, `add()` and `abort()` may be called from any thread (they only read the limits or
append to deques); `counts` may be read from any thread (the driving thread replaces it whole, so a reader gets
a consistent pair); every other method belongs to the one thread that drives the core. The pool's call reads
only the chosen entries and the model's encoder (a session of its own, safe beside the decoder's run).
"""

from __future__ import annotations

import enum
import heapq
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import NamedTuple

import msgspec
import numpy as np

from service.engine.batch import DecodeBatch, bucketed
from service.engine.records import EngineRequest, EngineResult, FinishReason, StepModel, TokenEvent
from service.engine.search import advance_beam_group, advance_greedy, beam_hypotheses, greedy_hypotheses
from service.engine.stats import RequestStats, StepStats
from service.errors import AttnServeError, DeadlineExceeded, EngineFailure, InvalidRequest
from service.runtime.step import EncoderOutput, StepOutput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineLimits:
    """Per-model-version budgets of the engine. They have no defaults here: the settings are their one
    source (`Settings.engine_limits()`), and they are re-checked here.

    `max_active_hypotheses`: most decoder rows (beam width x requests) in one decoder step.
    `max_padded_source_tokens`: most rows x padded source length (tokens: the longest source in the step,
        rounded up to `source_bucket`) in one step.
    `max_waiting_requests`: most queued requests; beyond, `submit()` raises Overloaded at once.
    `batch_size`: most requests in one batch (REQUEST policy).
    `batch_delay_s`: seconds the REQUEST policy waits after the first arrival for the batch to fill.
    `source_bucket`: the memory's source axis is padded to a multiple of this many tokens, so it is re-laid
        only when the longest active source crosses a bucket, not whenever it changes.
    """

    max_active_hypotheses: int
    max_padded_source_tokens: int
    max_waiting_requests: int
    batch_size: int
    batch_delay_s: float
    source_bucket: int

    def __post_init__(self) -> None:
        for name in (
            "max_active_hypotheses",
            "max_padded_source_tokens",
            "max_waiting_requests",
            "batch_size",
            "source_bucket",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.batch_delay_s >= 0.0:
            raise ValueError(f"batch_delay_s must be >= 0, got {self.batch_delay_s}")


class BatchingPolicy(enum.StrEnum):
    """How requests share decoder steps (the values are the `batching` setting's)."""

    CONTINUOUS = "continuous"
    """Requests join the batch at any step and leave as soon as they finish (iteration-level batching)."""
    REQUEST = "request"
    """When idle, gather up to batch_size requests (or wait batch_delay_s), then run them to completion."""
    NONE = "none"
    """One request at a time, to completion."""


class FinishedRequest(msgspec.Struct, gc=False):
    """A request that finished with hypotheses: its result for the caller, and what its numbers for the metrics
    need beyond the result (`stats()` makes them when the driver records them, not in the hot loop)."""

    key: int
    result: EngineResult
    source_tokens: int
    beam_size: int

    def stats(self) -> RequestStats:
        result = self.result
        steps = result.generated_tokens
        # No hypothesis at all only when the model gave no candidate with a finite score until max_length.
        reason = result.hypotheses[0].finish_reason if result.hypotheses else FinishReason.LENGTH
        mean_gap = (result.total_s - result.first_token_s) / (steps - 1) if steps > 1 else None
        return RequestStats(
            result.queue_wait_s,
            result.first_token_s,
            mean_gap,
            result.total_s,
            steps,
            self.source_tokens,
            reason,
            self.beam_size,
        )


@dataclass
class CoreOutput:
    """What one `step()` did, for the driver to deliver: the keys it admitted into the batch, streamed tokens,
    results, failures, and the step's numbers."""

    admitted: list[int] = field(default_factory=list)
    events: list[tuple[int, TokenEvent]] = field(default_factory=list)
    finished: list[FinishedRequest] = field(default_factory=list)
    failed: list[tuple[int, AttnServeError, FinishReason]] = field(default_factory=list)
    stats: StepStats | None = None

    @property
    def answers(self) -> bool:
        """True when a caller waits for something in it (a result, a failure, a streamed token)."""
        return bool(self.events or self.finished or self.failed)


class QueueCounts(NamedTuple):
    """What the core held at one instant: `dequeued`, the requests that have left the queue since the core was
    made (admitted, the encoder failing them included; cancelled or expired while waiting); `running`, the
    requests in the batch, and those being encoded beside a step to join it after. A driver that counts what it
    added has the queue's length as added - dequeued."""

    dequeued: int
    running: int


_QUEUED = -1  # the slot of a request that waits
_ENDED = -2  # the slot of a request dropped or failed (its queue entry, if any, is skipped at the head)


class _Held(msgspec.Struct, gc=False):
    """A request the core holds, from `add()` until it ends: in the queue (slot _QUEUED), then in the batch."""

    key: int
    request: EngineRequest
    submitted_at: float
    source_length: int  # the request's, read once (admission looks at it for every candidate)
    padded_length: int  # source_length rounded up to the source bucket
    beam: int
    slot: int = _QUEUED  # its slot once in the batch; _ENDED once dropped or failed (a queue entry is skipped)


STALE_DEADLINES_KEPT = 64
"""Deadline entries of ended requests the heap may hold beyond twice the requests held before it is rebuilt."""


class EngineCore:
    """Continuous batching for one model version over a StepModel; see the module docstring."""

    def __init__(
        self,
        model: StepModel,
        limits: EngineLimits,
        policy: BatchingPolicy = BatchingPolicy.CONTINUOUS,
        *,
        clock: Callable[[], float] = time.monotonic,
        label: str = "unnamed",
        encoder_pool: Executor | None = None,
    ) -> None:
        self.model = model
        self.limits = limits
        self.policy = policy
        self.clock = clock
        self.label = label
        self.draining = False  # set by the driver when stopping: the REQUEST policy then waits for nobody
        self._inbox: deque[_Held] = deque()
        self._aborts: deque[int] = deque()
        self._waiting: deque[_Held] = deque()  # the queue, with the entries of requests that ended meanwhile
        # Every request the core holds, by key: one map for the queue and the batch, so that a request is
        # entered and removed once, and the queue is read without a lookup (an entry's own slot says if it waits).
        self._held: dict[int, _Held] = {}
        self._queued = 0  # requests waiting (entries of _waiting whose slot is _QUEUED)
        self._deadlines: list[tuple[float, int]] = []  # heap of (deadline, key)
        self._dequeued = 0  # see QueueCounts
        self.batch = self._new_batch()
        self._encoder_pool = encoder_pool
        self._output: CoreOutput | None = None  # the output of the iteration in progress (see recover)
        self._admitting: list[_Held] = []  # this iteration's admissions, from the queue until the batch
        # Their encoder call, when it runs on the pool during the decoder step.
        self._encoding: Future[tuple[EncoderOutput | Exception, float]] | None = None
        self._joined: list[int] = []  # slots admitted since the last step: their first step is the next one
        self._inputs_key: tuple[DecodeBatch, int, int] | None = None  # see _step_inputs
        self._inputs: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] = ({}, {})
        # Published by the driving thread (replaced whole) after admission and after each step.
        self.counts = QueueCounts(0, 0)
        # Asked by release_unused_memory: a fresh batch once this one is empty, and meanwhile smaller tensors.
        self._renew_when_empty = self._shrink_tensors = False

    def release_unused_memory(self) -> None:
        """Give back, at the next step, what the batch holds beyond what it needs. A batch's tables keep the most
        rows, the longest source and the widest beam they ever held (they grow, never shrink): a busy batch gets
        memory and state tensors for the next power of two above its rows (DecodeBatch.shrink_tensors), its
        largest arrays, and the batch is replaced by a fresh one at the first step that finds it empty. Any thread."""
        self._shrink_tensors = self._renew_when_empty = True

    def _renew_batch(self) -> None:
        """Replace the batch with a fresh, small one."""
        generation = self.batch.memory_generation
        self.batch = self._new_batch()
        # Memory versions are never reused: a runtime that keeps the memory on the device by version (IO binding)
        # must not take the fresh batch's first memory for the old batch's.
        self.batch.memory_generation = generation + 1

    def _new_batch(self) -> DecodeBatch:
        return DecodeBatch(
            max_rows=self.limits.max_active_hypotheses,
            memory_names=self.model.memory_names,
            state_names=self.model.state_names,
            bos_id=self.model.bos_id,
            source_bucket=self.limits.source_bucket,
        )

    # ----- the inbox (any thread) --------------------------------------------------------------------

    def check(self, request: EngineRequest) -> None:
        """Raise InvalidRequest when the request can never fit the model or the budgets, even alone in the
        batch (ValueError for options the dataplane should have resolved). Any thread."""
        options = request.options
        beam = options.beam_size
        if (
            beam < 1
            or not 1 <= options.num_hypotheses <= beam
            or options.max_length < 1
            or not (math.isfinite(options.length_penalty) and options.length_penalty >= 0.0)
        ):
            raise ValueError(f"unresolved decoding options reached the engine: {options}")
        if beam > self.model.top_k:
            raise InvalidRequest(f"beam_size {beam} exceeds the maximum {self.model.top_k} for model {self.label}")
        if beam > self.limits.max_active_hypotheses:
            raise InvalidRequest(
                f"beam_size {beam} exceeds the {self.limits.max_active_hypotheses} hypotheses model "
                f"{self.label} decodes at once"
            )
        padded = beam * bucketed(request.source_length, self.limits.source_bucket)
        if padded > self.limits.max_padded_source_tokens:
            raise InvalidRequest(
                f"a source of {request.source_length} tokens with beam_size {beam} needs {padded} padded source "
                f"tokens, above the limit {self.limits.max_padded_source_tokens} for model {self.label}"
            )

    def add(self, key: int, request: EngineRequest, submitted_at: float) -> None:
        """Queue a request (passed `check()` first). Any thread."""
        length = len(request.source_ids)
        self._inbox.append(
            _Held(
                key,
                request,
                submitted_at,
                length,
                bucketed(length, self.limits.source_bucket),
                request.options.beam_size,
            )
        )

    def abort(self, key: int) -> None:
        """Drop a request (cancelled by its caller): from the queue, or from the batch at the next step."""
        self._aborts.append(key)

    # ----- state (driver thread) ---------------------------------------------------------------------

    @property
    def has_work(self) -> bool:
        """True while a step would do something now: rows to decode, or requests that may be admitted."""
        if self._inbox or self._aborts or self.batch.requests:
            return True
        now = self.clock()
        if self._deadlines and self._deadlines[0][0] <= now:
            return True
        if not self._queued:
            return False
        return self.policy is not BatchingPolicy.REQUEST or self._request_batch_ready(now)

    @property
    def deadlines_held(self) -> int:
        """Entries of the deadline heap, those of requests that have ended included (at most twice the requests
        held, plus STALE_DEADLINES_KEPT, after each step)."""
        return len(self._deadlines)

    def next_wakeup(self) -> float | None:
        """When an idle core has something to do next (a deadline, the end of a REQUEST batching window)."""
        times = []
        deadlines, held = self._deadlines, self._held
        while deadlines and deadlines[0][1] not in held:  # the deadline of a request that has ended
            heapq.heappop(deadlines)
        if deadlines:
            times.append(deadlines[0][0])
        head = self._head()
        if head is not None and self.policy is BatchingPolicy.REQUEST:
            times.append(head.submitted_at + self.limits.batch_delay_s)
        return min(times) if times else None

    # ----- one iteration -----------------------------------------------------------------------------

    def step(self) -> CoreOutput:
        """Plan, run and update one iteration; see the module docstring. Never raises for a model failure
        (those fail the requests concerned); any other exception is an engine bug (see `recover`)."""
        # Kept until step() returns, so that recover() answers what an iteration that raised had already done.
        output = self._output = CoreOutput()
        now = self.clock()
        self._take_in(now, output)
        if self._renew_when_empty and not self.batch.requests:
            self._renew_when_empty = self._shrink_tensors = False
            self._renew_batch()
        chosen = self._choose_admissions(now)
        self._admitting = chosen  # until they are in the batch (see recover)
        batch = self.batch
        encode_seconds, admitted = 0.0, len(chosen)
        if chosen and self._encoder_pool is not None and batch.live_rows:
            # The encoder runs beside this iteration's decoder step; the new requests join after it, and their
            # first step is the next one.
            try:
                self._encoding = self._encoder_pool.submit(self._encode, chosen)
            except RuntimeError:  # the pool was shut down (the engine is stopping): encode here, as without one
                self._encoding = None
        if chosen and self._encoding is None:  # nothing to decode meanwhile, or no pool: encode now, join this step
            encoded, encode_seconds = self._encode(chosen)
            self._join(chosen, encoded, now, output)
        batch.compact()  # holes that admissions did not fill take the last rows
        if self._shrink_tensors:  # and the batch is busy (see above): its tensors follow the load down
            self._shrink_tensors = False
            batch.shrink_tensors()
        # Published before the decoder call, which may be long: who waits and who decodes is known now (those
        # being encoded count as running: they have left the queue and join the batch after this step).
        encoding = len(chosen) if self._encoding is not None else 0
        self.counts = QueueCounts(self._dequeued, batch.requests + encoding)
        rows, requests, generation = batch.rows, batch.requests, batch.memory_generation
        padded_source_len = batch.padded_source_len if rows else 0
        step_seconds, stepped_rows, finished = 0.0, 0, 0
        if rows:
            started = self.clock()
            step_output = self._run_step(output)
            step_seconds = self.clock() - started
            if step_output is not None:  # None: every request of the step failed
                stepped_rows = batch.rows  # fewer than `rows` when requests failed on their own and left
                finished = self._update_from_output(step_output, self.clock(), output)
            else:
                self._joined = []  # they failed with the step
        if self._encoding is not None:
            encoded, encode_seconds = self._encoding.result()  # _encode returns the encoder's exception, never raises
            self._join(chosen, encoded, now, output)  # they left the queue at `now`, as on the other path
            self._encoding = None
        if rows or admitted:
            self.counts = QueueCounts(self._dequeued, batch.requests)
            output.stats = StepStats(
                rows=rows,
                requests=requests,
                step_seconds=step_seconds,
                encode_seconds=encode_seconds,
                encoder_batch=admitted,
                admitted=admitted,
                padded_source_len=padded_source_len,
                tokens_generated=stepped_rows,
                retired=finished + len(output.failed),
                memory_generation=generation,
            )
        self._output, self._admitting = None, []
        return output

    def recover(self, exc: Exception) -> CoreOutput:
        """After an unexpected error in `step()` (an engine bug): fail the requests in the batch, which the
        error may have left half updated, start a fresh batch, and keep the queue. What the iteration had already
        done before the error (requests finished, failed or streamed, which have left the batch) is answered too."""
        output = self._output if self._output is not None else CoreOutput()
        self._output = None
        output.stats = None
        if self._encoding is not None:  # let the encoder call in flight end before its requests are failed
            self._encoding.result()
            self._encoding = None
        # Those taken from the queue but not yet in the batch (the error came first), then the batch's own.
        self.batch.compact()
        stranded = [entry.key for entry in self._admitting if entry.slot == _QUEUED]
        stranded += [self.batch.slot_key[slot] for slot in self.batch.active_slots()]
        message = f"engine error in model {self.label}: {type(exc).__name__}: {exc}"
        for key in stranded:
            if self._let_go(key) is not None:
                output.failed.append((key, EngineFailure(message), FinishReason.ERROR))
        self._admitting = []
        self._joined = []
        self._renew_batch()
        self.counts = QueueCounts(self._dequeued, 0)
        return output

    # ----- plan --------------------------------------------------------------------------------------

    def _take_in(self, now: float, output: CoreOutput) -> None:
        """Queue arrivals, apply cancellations, fail expired requests."""
        inbox, waiting, held = self._inbox, self._waiting, self._held
        while inbox:
            entry = inbox.popleft()
            waiting.append(entry)
            held[entry.key] = entry
            self._queued += 1
            if entry.request.deadline is not None:
                heapq.heappush(self._deadlines, (entry.request.deadline, entry.key))
        if len(self._deadlines) > 2 * len(held) + STALE_DEADLINES_KEPT:
            # A request that ends before its deadline leaves its entry in the heap (deleted lazily, when the deadline
            # comes). Clients set deadlines of minutes, so the entries would pile up at the call rate times the
            # deadline: rebuild the heap once they are most of it (amortised, one pass per as many calls).
            self._deadlines = [deadline for deadline in self._deadlines if deadline[1] in held]
            heapq.heapify(self._deadlines)
        retire: list[int] = []
        while self._aborts:
            self._drop(self._aborts.popleft(), retire)
        while self._deadlines and self._deadlines[0][0] <= now:
            _, key = heapq.heappop(self._deadlines)
            expired = held.get(key)
            if expired is None:
                continue  # already finished or cancelled
            where = "waiting" if expired.slot == _QUEUED else "decoding"
            waited = now - expired.request.arrival
            output.failed.append(
                (
                    key,
                    DeadlineExceeded(f"the deadline passed after {waited:.3f} s while {where} (model {self.label})"),
                    FinishReason.DEADLINE,
                )
            )
            self._drop(key, retire)
        if retire:
            self.batch.retire(retire)

    def _let_go(self, key: int) -> int | None:
        """Stop holding a request that is dropped or failed: returns the slot it had (_QUEUED while it waited), or
        None when the core did not hold it. Its queue entry, if any, is then skipped when it reaches the head."""
        entry = self._held.pop(key, None)
        if entry is None:
            return None
        slot, entry.slot = entry.slot, _ENDED
        return slot

    def _drop(self, key: int, retire: list[int]) -> None:
        slot = self._let_go(key)
        if slot is None:
            return
        if slot == _QUEUED:
            self._queued -= 1  # its queue entry is skipped when it reaches the head
            self._dequeued += 1
        else:
            retire.append(slot)

    def _head(self) -> _Held | None:
        """The first queued request still held (cancelled ones are dropped from the front lazily)."""
        while self._waiting and self._waiting[0].slot != _QUEUED:
            self._waiting.popleft()
        return self._waiting[0] if self._waiting else None

    def _request_batch_ready(self, now: float) -> bool:
        head = self._head()
        if head is None or self.batch.requests:
            return False
        return (
            self._queued >= self.limits.batch_size
            or self.draining
            or now >= head.submitted_at + self.limits.batch_delay_s
        )

    def _choose_admissions(self, now: float) -> list[_Held]:
        """Take waiting requests from the queue, first come first served, while the budgets allow (counting the
        rows of the batch as it is before this iteration's step)."""
        if not self._queued:  # most iterations of a loaded server: nothing has arrived since the last one
            return []
        batch, limits = self.batch, self.limits
        if self.policy is BatchingPolicy.CONTINUOUS:
            most = limits.max_active_hypotheses  # rows bound it anyway: every request takes >= 1 row
        elif batch.requests:
            return []  # REQUEST and NONE: no one joins a running batch
        elif self.policy is BatchingPolicy.REQUEST:
            if not self._request_batch_ready(now):
                return []
            most = limits.batch_size
        else:
            most = 1
        chosen: list[_Held] = []
        rows, padded = batch.live_rows, bucketed(batch.longest_source, limits.source_bucket)
        max_rows, max_padded = limits.max_active_hypotheses, limits.max_padded_source_tokens
        waiting = self._waiting
        while len(chosen) < most and waiting:
            head = waiting[0]
            if head.slot != _QUEUED:  # cancelled or expired while it waited
                waiting.popleft()
                continue
            new_rows = rows + head.beam
            new_padded = head.padded_length if head.padded_length > padded else padded  # bucketing keeps order
            # An empty batch always takes the head (it was checked to fit alone), so the loop always
            # progresses; otherwise strict FIFO: a big request at the head is not overtaken, so it cannot starve.
            if rows > 0 and (new_rows > max_rows or new_rows * new_padded > max_padded):
                break
            waiting.popleft()
            chosen.append(head)
            rows, padded = new_rows, new_padded
        self._queued -= len(chosen)
        self._dequeued += len(chosen)
        return chosen

    def _encode(self, chosen: list[_Held]) -> tuple[EncoderOutput | Exception, float]:
        """Encode the chosen requests' sources in one call. Returns the encoder's output, or the exception it
        raised, and the call's seconds. It reads only the entries and the model, so it may run on the encoder
        pool's thread while the driving thread steps the decoder."""
        started = self.clock()
        try:
            source_lengths = [w.source_length for w in chosen]
            lengths = np.array(source_lengths, dtype=np.int64)
            sources = np.concatenate([w.request.source_ids for w in chosen])
            longest = max(source_lengths)
            if longest == min(source_lengths):  # one request, or sources of one length: no padding
                source_ids = sources.reshape(len(chosen), longest)
            else:  # every source into its row in one write: the positions below each row's length, in row order
                source_ids = np.zeros((len(chosen), longest), dtype=np.int64)
                source_ids[np.arange(longest) < lengths[:, None]] = sources
            encoded = self.model.encode(source_ids, lengths)
            _check_tensors("encoder memory", encoded.memory, self.model.memory_names, len(chosen), source_ids.shape[1])
            _check_tensors("encoder state", encoded.state, self.model.state_names, len(chosen), None)
        except Exception as exc:
            return exc, self.clock() - started
        return encoded, self.clock() - started

    def _join(self, chosen: list[_Held], encoded: EncoderOutput | Exception, now: float, output: CoreOutput) -> None:
        """Put the encoded requests into the batch (their first step is the next one to run), or fail them all
        when the encoder failed."""
        if isinstance(encoded, Exception):
            log.error("the encoder of model %s failed for %d requests", self.label, len(chosen), exc_info=encoded)
            for entry in chosen:
                self._let_go(entry.key)
                output.failed.append((entry.key, self._model_failure("encoder", encoded), FinishReason.ERROR))
            return
        keys = [entry.key for entry in chosen]
        slots = self.batch.admit(keys, [entry.request for entry in chosen], now, encoded.memory, encoded.state)
        for entry, slot in zip(chosen, slots, strict=True):
            entry.slot = slot
        self._joined += slots
        output.admitted.extend(keys)

    # ----- step --------------------------------------------------------------------------------------

    def _step_inputs(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The step's memory and state: leading slices of the batch's arrays, made again only when the batch's
        memory generation changes (a request joined or left, or the arrays were re-laid); the views see the state
        the last step wrote in place."""
        batch = self.batch
        key = (batch, batch.memory_generation, batch.rows)
        if self._inputs_key != key:
            count = batch.rows
            self._inputs = (
                {name: array[:count] for name, array in batch.memory.items()},
                {name: array[:count] for name, array in batch.state.items()},
            )
            self._inputs_key = key
        return self._inputs

    def _run_step(self, output: CoreOutput) -> StepOutput | None:
        batch = self.batch
        count = batch.rows
        memory, state = self._step_inputs()
        try:
            step_output = self.model.step(
                batch.row_token[:count],
                batch.row_source_length[:count],
                memory,
                state,
                memory_version=batch.memory_generation,
            )
            self._check_step_output(step_output, count, max(batch.widths, default=1), batch.padded_source_len)
            return step_output
        except Exception as exc:
            if batch.requests == 1:
                log.error("the decoder step of model %s failed for 1 request", self.label, exc_info=exc)
                self._fail_slots(batch.active_slots(), self._model_failure("decoder step", exc), output)
                return None
            log.warning(
                "the decoder step of model %s failed for %d requests (%s: %s); stepping each request "
                "alone so that only the failing ones fail",
                self.label,
                batch.requests,
                type(exc).__name__,
                exc,
            )
            return self._step_each_alone(memory, state, output)

    def _step_each_alone(
        self, memory: dict[str, np.ndarray], state: dict[str, np.ndarray], output: CoreOutput
    ) -> StepOutput | None:
        """After a decoder step of several requests failed: run it again on each request's rows alone (rows
        are independent, so the numbers are the same), fail the requests whose own step fails, and return the
        others' outputs laid out in their rows after the failed ones left, or None when none survived."""
        batch = self.batch
        parts: dict[int, StepOutput] = {}
        failed: dict[int, Exception] = {}
        for slot in batch.active_slots():
            rows = batch.rows_of(slot)
            try:
                part = self.model.step(
                    batch.row_token[rows],
                    batch.row_source_length[rows],
                    {name: array[rows] for name, array in memory.items()},
                    {name: array[rows] for name, array in state.items()},
                )
                self._check_step_output(part, len(rows), len(rows), batch.padded_source_len)
            except Exception as exc:
                failed[slot] = exc
            else:
                parts[slot] = part
        for slot, error in failed.items():
            log.error(
                "the decoder step of model %s failed for request %d on its own",
                self.label,
                batch.slot_key[slot],
                exc_info=error,
            )
            self._fail_slots([slot], self._model_failure("decoder step", error), output)
        batch.compact()  # the survivors' rows, which their outputs are laid out in
        if not parts:
            return None
        count = batch.rows
        sample = next(iter(parts.values()))
        joined = StepOutput(
            topk_log_probs=np.empty((count, *sample.topk_log_probs.shape[1:]), sample.topk_log_probs.dtype),
            topk_ids=np.empty((count, *sample.topk_ids.shape[1:]), sample.topk_ids.dtype),
            attention=np.empty((count, *sample.attention.shape[1:]), sample.attention.dtype),
            state={name: np.empty((count, *value.shape[1:]), value.dtype) for name, value in sample.state.items()},
        )
        for slot, part in parts.items():
            rows = batch.rows_of(slot)  # after the failed requests left
            joined.topk_log_probs[rows] = part.topk_log_probs
            joined.topk_ids[rows] = part.topk_ids
            joined.attention[rows] = part.attention
            for name, value in part.state.items():
                joined.state[name][rows] = value
        return joined

    def _fail_slots(self, slots: Sequence[int], error: AttnServeError, output: CoreOutput) -> None:
        keys = [self.batch.slot_key[slot] for slot in slots]
        for key in keys:
            self._let_go(key)
            output.failed.append((key, error, FinishReason.ERROR))
        self.batch.retire(list(slots))

    def _check_step_output(self, output: StepOutput, rows: int, widest: int, padded_source_len: int) -> None:
        """Raise ValueError unless the step's outputs have `rows` rows, >= `widest` candidates per row
        and attention over >= `padded_source_len` positions."""
        shape = output.topk_log_probs.shape
        if len(shape) != 2 or shape[0] != rows or output.topk_ids.shape != shape or shape[1] < widest:
            raise ValueError(
                f"step returned topk_log_probs {shape} and topk_ids {output.topk_ids.shape} for {rows} "
                f"rows (need [{rows}, >= {widest}])"
            )
        if (
            output.attention.ndim != 2
            or output.attention.shape[0] != rows
            or output.attention.shape[1] < padded_source_len
        ):
            raise ValueError(
                f"step returned attention {output.attention.shape} for {rows} rows of {padded_source_len} source tokens"
            )
        _check_tensors("step state", output.state, self.model.state_names, rows, None)

    def _model_failure(self, what: str, exc: Exception) -> EngineFailure:
        return EngineFailure(f"the {what} of model {self.label} failed: {type(exc).__name__}: {exc}")

    # ----- update: the hot loop ----------------------------------------------------------------------

    def _update_from_output(self, step_output: StepOutput, now: float, output: CoreOutput) -> int:
        """Advance every request by one token from the step's outputs; retire and report the finished ones.

        This runs once per decoder step for the whole batch and is the engine's hot loop: its cost per row
        is numpy work, and Python runs per request only for what is rare (finishing, eos candidates, streamed
        tokens, attention rows). Returns how many requests finished.
        """
        batch = self.batch
        count = batch.rows
        eos_id = self.model.eos_id
        # Rows of beam requests are reordered (state gathered from their parents); greedy rows keep theirs.
        reorder = None
        done: list[list[int]] = []
        if batch.beam_rows == 0:
            done.append(advance_greedy(batch, None, step_output, eos_id, output.events))
        else:
            reorder = np.arange(count)
            widths = batch.row_width[:count]
            greedy_rows = np.flatnonzero(widths == 1)
            if greedy_rows.size:
                done.append(advance_greedy(batch, greedy_rows, step_output, eos_id, output.events))
            first_rows = batch.row_beam_index[:count] == 0
            for width in sorted(batch.widths):
                slots = batch.row_slot[:count][first_rows & (widths == width)]
                done.append(advance_beam_group(batch, width, slots, step_output, eos_id, reorder))
        for name, value in step_output.state.items():
            batch.state[name][:count] = value if reorder is None else value[reorder]
        if self._joined:
            for slot in self._joined:
                batch.slot_first_step_at[slot] = now  # their first step is this one
            self._joined = []

        finished = done[0] if len(done) == 1 else [slot for slots in done for slot in slots]
        if finished:
            self._finish(finished, now, output)
        return len(finished)

    def _finish(self, slots: list[int], now: float, output: CoreOutput) -> None:
        """Report the requests in `slots` finished at `now` (their results and numbers) and retire them."""
        batch = self.batch
        slot_beam, slot_key, held = batch.slot_beam, batch.slot_key, self._held
        slot_admitted_at, slot_first_step_at, slot_source_length = (
            batch.slot_admitted_at,
            batch.slot_first_step_at,
            batch.slot_source_length,
        )
        finished = output.finished
        if not batch.beam_rows:
            # Every request greedy: their hypotheses in one pass, then the general loop below without its per-request
            # beam lookups. Kept apart for the hot loop's sake: folded back into the general loop, the 256-row step
            # of `python -m loadtests.engine_overhead` took 1-2 us more (of about 70).
            for slot, hypothesis in zip(slots, greedy_hypotheses(batch, slots, self.model.eos_id), strict=True):
                key = slot_key[slot]
                arrival = held.pop(key).request.arrival
                result = EngineResult(
                    [hypothesis],
                    slot_admitted_at[slot] - arrival,
                    slot_first_step_at[slot] - arrival,
                    now - arrival,
                    len(hypothesis.token_ids),
                )
                finished.append(FinishedRequest(key, result, slot_source_length[slot], 1))
            batch.retire(slots)
            return
        greedy = [slot for slot in slots if slot_beam[slot] == 1]
        greedy_of = dict(zip(greedy, greedy_hypotheses(batch, greedy, self.model.eos_id), strict=True))
        best_of = [[greedy_of[slot]] if slot in greedy_of else beam_hypotheses(batch, slot) for slot in slots]
        for slot, hypotheses in zip(slots, best_of, strict=True):
            key = slot_key[slot]
            arrival = held.pop(key).request.arrival
            beam = slot_beam[slot]
            steps = len(hypotheses[0].token_ids) if beam == 1 else int(batch.row_steps[batch.slot_rows[slot, 0]])
            result = EngineResult(
                hypotheses, slot_admitted_at[slot] - arrival, slot_first_step_at[slot] - arrival, now - arrival, steps
            )
            finished.append(FinishedRequest(key, result, slot_source_length[slot], beam))
        batch.retire(slots)


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
