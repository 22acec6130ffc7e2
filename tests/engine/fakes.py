"""A deterministic fake StepModel for the engine tests, and reference searches built on it.

The fake is a tiny numpy "model": the encoder embeds the source tokens; each decoder step mixes the
previous token into a hidden state, attends over the row's own source positions, and turns the result
into log probabilities over a small vocabulary. Every row is computed on its own (a Python loop over
rows), so outputs are bit-for-bit independent of the rest of the batch, as the real contract requires.
The step also checks the contract's input side: memory must be zero beyond each row's length.

Test hooks: every call is logged (rows, padded length, source lengths, memory version), `fail_steps` / `fail_encodes`
make chosen calls raise, and a `StepGate` can hold decoder steps on the worker thread until the test
lets them through.
"""

from __future__ import annotations

import asyncio
import gc
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from service.engine import (
    AsyncEngine,
    BatchingPolicy,
    DecodeOptions,
    EncoderOutput,
    EngineLimits,
    EngineRequest,
    EngineResult,
    FinishReason,
    Hypothesis,
    RequestHandle,
    RequestStats,
    StepOutput,
    StepStats,
    normalised_score,
)
from service.errors import AttnServeError
from service.runtime.model import ONE_THREAD, RuntimeThreads
from service.runtime.tokenizers import BOS, EOS
from service.settings import Settings

SOURCE_VOCAB = 32
STEP_PATTERN = 5  # the per-position bias repeats with this period
NO_EOS = (3, 4, 5, 6, 7)  # a `support` without eos: the fake stops only at max_length, so request lengths are exact


class InjectedFailure(RuntimeError):
    """Raised by the fake on the calls a test asked to fail."""


class StepGate:
    """Holds decoder steps until the test lets them pass; used from the worker thread and the test.

    Closed gates block every step; `allow(n)` lets n more through; `open()` lets all through for good.
    A blocked step gives up (raises) after `timeout_s` so a failing test never hangs the process.
    """

    def __init__(self, timeout_s: float = 20.0) -> None:
        self._condition = threading.Condition()
        self._permits = 0
        self._open = False
        self._blocked = 0
        self._timeout_s = timeout_s

    def allow(self, steps: int = 1) -> None:
        with self._condition:
            self._permits += steps
            self._condition.notify_all()

    def open(self) -> None:
        with self._condition:
            self._open = True
            self._condition.notify_all()

    def pass_through(self) -> None:
        """Called by the fake at the start of each step."""
        with self._condition:
            self._blocked += 1
            self._condition.notify_all()
            try:
                if not self._condition.wait_for(lambda: self._open or self._permits > 0, self._timeout_s):
                    raise TimeoutError("step gate was never opened")
                if not self._open:
                    self._permits -= 1
            finally:
                self._blocked -= 1

    def wait_blocked(self, timeout_s: float = 10.0) -> bool:
        """Block until a step is held at the gate (True) or the timeout passes (False)."""
        with self._condition:
            return self._condition.wait_for(lambda: self._blocked > 0, timeout_s)

    async def until_blocked(self) -> None:
        """Await (without blocking the event loop) until a step is held at the gate."""
        assert await asyncio.to_thread(self.wait_blocked), "no decoder step reached the gate"


@dataclass(frozen=True)
class StepCall:
    """What one decoder step was given."""

    rows: int
    padded_len: int
    source_lengths: tuple[int, ...]
    memory_version: int


@dataclass
class FakeStepModel:
    """A row-independent numpy model implementing the engine's StepModel protocol."""

    vocab_size: int = 8
    top_k: int = 8
    dim: int = 6
    seed: int = 0
    support: tuple[int, ...] | None = None  # tokens with a finite probability; default: all but pad and bos
    eos_bias: float = 0.0  # added to the eos logit: negative makes hypotheses longer
    gate: StepGate | None = None
    on_step: Callable[[], None] | None = None  # called at the start of each step, on the stepping thread
    fail_steps: set[int] = field(default_factory=set)  # 0-based step call indices that raise
    fail_encodes: set[int] = field(default_factory=set)  # 0-based encode call indices that raise
    # 0-based step call indices whose new state has one column too many: it passes the step's checks (rows only)
    # and breaks the engine's update, an engine error rather than a model failure.
    misshapen_state_steps: set[int] = field(default_factory=set)
    # 0-based encode call indices whose memory has one feature too many: it passes the encoder's checks (rows and
    # source length) and breaks the batch's admission, an engine error.
    misshapen_memory_encodes: set[int] = field(default_factory=set)
    eos_id: int = EOS
    bos_id: int = BOS
    memory_names: tuple[str, ...] = ("memory", "keys")
    state_names: tuple[str, ...] = ("hidden", "position")
    provider: str = "fake"  # what a served version reports as its execution provider
    threads: RuntimeThreads = ONE_THREAD  # and its runtime's threads
    step_calls: list[StepCall] = field(default_factory=list)
    encode_batches: list[int] = field(default_factory=list)
    encode_threads: list[str] = field(default_factory=list)  # the thread each encoder call ran on

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        self._source_embedding = rng.normal(size=(SOURCE_VOCAB, self.dim)).astype(np.float32)
        self._target_embedding = rng.normal(size=(self.vocab_size, self.dim)).astype(np.float32)
        self._output = (rng.normal(size=(self.dim, self.vocab_size)) * 1.5).astype(np.float32)
        self._position_bias = rng.normal(size=(STEP_PATTERN, self.vocab_size)).astype(np.float32)
        allowed = self.support if self.support is not None else tuple(range(2, self.vocab_size))
        self._mask = np.full(self.vocab_size, -np.inf, dtype=np.float32)
        self._mask[list(allowed)] = 0.0
        self._lock = threading.Lock()

    # ----- the StepModel protocol -----

    def encode(self, source_ids: np.ndarray, source_lengths: np.ndarray) -> EncoderOutput:
        with self._lock:
            call = len(self.encode_batches)
            self.encode_batches.append(int(source_ids.shape[0]))
            self.encode_threads.append(threading.current_thread().name)
        if call in self.fail_encodes:
            raise InjectedFailure(f"injected encoder failure on call {call}")
        assert source_ids.dtype == np.int64 and source_lengths.dtype == np.int64
        batch, padded = source_ids.shape
        valid = np.arange(padded)[None, :] < source_lengths[:, None]
        memory = self._source_embedding[source_ids % SOURCE_VOCAB] * valid[:, :, None]
        keys = memory.sum(axis=2) * valid  # a second memory tensor, without trailing dimensions
        hidden = np.zeros((batch, self.dim), dtype=np.float32)
        for row in range(batch):
            hidden[row] = np.tanh(memory[row, : source_lengths[row]].mean(axis=0))
        position = np.zeros((batch, 1), dtype=np.float32)
        if call in self.misshapen_memory_encodes:
            memory = np.zeros((batch, padded, self.dim + 1), dtype=np.float32)
        return EncoderOutput(
            memory={"memory": memory.astype(np.float32), "keys": keys.astype(np.float32)},
            state={"hidden": hidden, "position": position},
        )

    def step(
        self,
        tokens: np.ndarray,
        source_lengths: np.ndarray,
        memory: dict[str, np.ndarray],
        state: dict[str, np.ndarray],
        *,
        memory_version: int = -1,
    ) -> StepOutput:
        with self._lock:
            call = len(self.step_calls)
            self.step_calls.append(
                StepCall(
                    int(tokens.shape[0]),
                    int(memory["memory"].shape[1]),
                    tuple(int(n) for n in source_lengths),
                    memory_version,
                )
            )
        if self.gate is not None:
            self.gate.pass_through()
        if self.on_step is not None:
            self.on_step()
        if call in self.fail_steps:
            raise InjectedFailure(f"injected step failure on call {call}")
        assert tokens.dtype == np.int64 and source_lengths.dtype == np.int64
        rows, padded = memory["memory"].shape[:2]
        assert tokens.shape == (rows,) and source_lengths.shape == (rows,)
        log_probs = np.zeros((rows, self.vocab_size), dtype=np.float32)
        attention = np.zeros((rows, padded), dtype=np.float32)
        hidden = np.zeros_like(state["hidden"])
        for row in range(rows):
            length = int(source_lengths[row])
            assert not memory["memory"][row, length:].any(), "memory must be zero beyond the row's length"
            assert not memory["keys"][row, length:].any(), "memory must be zero beyond the row's length"
            lp, att, new_hidden = self._one_row(
                int(tokens[row]),
                float(state["position"][row, 0]),
                state["hidden"][row],
                memory["memory"][row, :length],
                memory["keys"][row, :length],
            )
            log_probs[row], attention[row, :length], hidden[row] = lp, att, new_hidden
        order = np.argsort(-log_probs, axis=1, kind="stable")[:, : self.top_k]
        if call in self.misshapen_state_steps:
            hidden = np.zeros((rows, self.dim + 1), dtype=np.float32)
        return StepOutput(
            topk_log_probs=np.take_along_axis(log_probs, order, axis=1),
            topk_ids=order.astype(np.int64),
            attention=attention,
            state={"hidden": hidden, "position": state["position"] + 1.0},
        )

    def _one_row(
        self, token: int, position: float, hidden: np.ndarray, memory: np.ndarray, keys: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        mixed = np.tanh(0.5 * hidden + self._target_embedding[token])
        scores = (memory * mixed).sum(axis=1) + 0.1 * keys
        weights = np.exp(scores - scores.max())
        weights /= weights.sum()
        context = (memory * weights[:, None]).sum(axis=0)
        logits = ((mixed + context)[:, None] * self._output).sum(axis=0) + self._position_bias[
            int(position) % STEP_PATTERN
        ]
        logits = logits + self._mask
        logits[self.eos_id] += self.eos_bias
        shifted = logits - logits.max()
        log_probs = shifted - np.log(np.exp(shifted).sum())
        return (
            log_probs.astype(np.float32),
            weights.astype(np.float32),
            np.tanh(mixed + 0.5 * context).astype(np.float32),
        )

    # ----- references for the tests (run outside the engine, one sequence at a time) -----

    def start(self, source: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Encode one source alone; returns its memory and initial state (batch of 1)."""
        encoded = self.encode(np.asarray(source, dtype=np.int64)[None, :], np.array([len(source)], dtype=np.int64))
        return encoded.memory, encoded.state

    def full_step(
        self, source: np.ndarray, memory: dict[str, np.ndarray], state: dict[str, np.ndarray], token: int
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """One step of a single row: (log probs over the whole vocabulary, attention [S], next state)."""
        length = len(source)
        lp, att, hidden = self._one_row(
            token,
            float(state["position"][0, 0]),
            state["hidden"][0],
            memory["memory"][0, :length],
            memory["keys"][0, :length],
        )
        return lp, att, {"hidden": hidden[None, :], "position": state["position"] + 1.0}


class ScriptedStepModel:
    """A StepModel whose decoder steps return hand-made candidates: the engine's search without a model.

    `script` holds, per coming step, (rows, focus): each row's (token, log prob) candidates in descending
    order (padded with -inf up to the longest row), and the source position every row attends to.
    """

    top_k = 8
    eos_id = EOS
    bos_id = BOS
    memory_names = ("memory",)
    state_names = ("hidden",)

    def __init__(self) -> None:
        self.script: list[tuple[list[list[tuple[int, float]]], int]] = []

    def encode(self, source_ids: np.ndarray, source_lengths: np.ndarray) -> EncoderOutput:
        batch, length = source_ids.shape
        valid = (np.arange(length)[None, :] < source_lengths[:, None]).astype(np.float32)
        return EncoderOutput(memory={"memory": valid[:, :, None]}, state={"hidden": np.zeros((batch, 1), np.float32)})

    def step(
        self,
        tokens: np.ndarray,
        source_lengths: np.ndarray,
        memory: dict[str, np.ndarray],
        state: dict[str, np.ndarray],
        *,
        memory_version: int = -1,
    ) -> StepOutput:
        rows, focus = self.script.pop(0)
        assert len(rows) == tokens.shape[0], f"scripted {len(rows)} rows for a step of {tokens.shape[0]}"
        width = max(self.top_k, max(len(row) for row in rows))
        ids = np.zeros((len(rows), width), dtype=np.int64)
        log_probs = np.full((len(rows), width), -math.inf, dtype=np.float32)
        for index, row in enumerate(rows):
            ids[index, : len(row)] = [token for token, _ in row]
            ids[index, len(row) :] = 100 + np.arange(width - len(row))  # filler ids, never chosen at -inf
            log_probs[index, : len(row)] = [log_prob for _, log_prob in row]
        attention = np.zeros((len(rows), memory["memory"].shape[1]), dtype=np.float32)
        attention[:, focus] = 1.0
        return StepOutput(topk_log_probs=log_probs, topk_ids=ids, attention=attention, state=dict(state))


@dataclass(frozen=True)
class Sequence:
    """A complete sequence found by a reference search."""

    tokens: tuple[int, ...]
    log_prob: float
    score: float
    reason: str  # 'eos' or 'length'
    alignment: tuple[int, ...]
    attention: np.ndarray


def teacher_forced(
    model: FakeStepModel, source: Iterable[int], tokens: Iterable[int]
) -> tuple[list[float], list[int], np.ndarray]:
    """Per-token log probs, argmax alignments and attention rows of `tokens` under the fake, fed one by one."""
    source = np.asarray(list(source), dtype=np.int64)
    memory, state = model.start(source)
    previous = model.bos_id
    log_probs, alignment, rows = [], [], []
    for token in tokens:
        lp, att, state = model.full_step(source, memory, state, previous)
        log_probs.append(float(lp[token]))
        alignment.append(int(np.argmax(att)))
        rows.append(att)
        previous = token
    return log_probs, alignment, np.stack(rows) if rows else np.zeros((0, len(source)), dtype=np.float32)


def greedy_reference(model: FakeStepModel, source: Iterable[int], max_length: int, alpha: float = 0.0) -> Sequence:
    """Top-1 decoding of one source by direct calls to the fake."""
    source = np.asarray(list(source), dtype=np.int64)
    memory, state = model.start(source)
    previous, tokens, total, alignment, rows = model.bos_id, [], 0.0, [], []
    while True:
        lp, att, state = model.full_step(source, memory, state, previous)
        token = int(np.argsort(-lp, kind="stable")[0])
        tokens.append(token)
        total += float(lp[token])
        alignment.append(int(np.argmax(att)))
        rows.append(att)
        previous = token
        if token == model.eos_id or len(tokens) >= max_length:
            reason = "eos" if token == model.eos_id else "length"
            return Sequence(
                tuple(tokens),
                total,
                normalised_score(total, len(tokens), alpha),
                reason,
                tuple(alignment),
                np.stack(rows),
            )


def exhaustive_search(
    model: FakeStepModel, source: Iterable[int], max_length: int, alpha: float = 0.0
) -> list[Sequence]:
    """Every complete sequence with a finite probability (ending in eos, or reaching max_length), best first."""
    source = np.asarray(list(source), dtype=np.int64)
    memory, initial = model.start(source)
    found: list[Sequence] = []

    def expand(
        prefix: tuple[int, ...],
        total: float,
        alignment: tuple[int, ...],
        rows: tuple[np.ndarray, ...],
        state: dict[str, np.ndarray],
    ) -> None:
        previous = prefix[-1] if prefix else model.bos_id
        lp, att, next_state = model.full_step(source, memory, state, previous)
        for token in range(model.vocab_size):
            if not math.isfinite(float(lp[token])):
                continue
            tokens = prefix + (token,)
            score_sum = total + float(np.float64(lp[token]))
            aligned = alignment + (int(np.argmax(att)),)
            attended = rows + (att,)
            if token == model.eos_id or len(tokens) >= max_length:
                reason = "eos" if token == model.eos_id else "length"
                found.append(
                    Sequence(
                        tokens,
                        score_sum,
                        normalised_score(score_sum, len(tokens), alpha),
                        reason,
                        aligned,
                        np.stack(attended),
                    )
                )
            else:
                expand(tokens, score_sum, aligned, attended, next_state)

    expand((), 0.0, (), (), initial)
    return sorted(found, key=lambda sequence: -sequence.score)


# ----- helpers shared by the engine tests -----


def source(*tokens: int) -> np.ndarray:
    """Source ids with the eos the dataplane appends."""
    return np.array(list(tokens) + [EOS], dtype=np.int64)


def make_request(
    source_ids: np.ndarray,
    *,
    beam: int = 1,
    hypotheses: int = 1,
    max_length: int = 8,
    alpha: float = 0.0,
    attention: bool = False,
    stream: bool = False,
    deadline: float | None = None,
    arrival: float | None = None,
) -> EngineRequest:
    """An engine request with resolved options; `arrival` a fake clock's reading (default: now, as for a real
    call)."""
    options = DecodeOptions(
        beam_size=beam,
        num_hypotheses=hypotheses,
        max_length=max_length,
        length_penalty=alpha,
        return_attention=attention,
    )
    return EngineRequest(
        source_ids, options, deadline=deadline, stream=stream, arrival=time.monotonic() if arrival is None else arrival
    )


def engine_limits(**changes: Any) -> EngineLimits:
    """The engine limits the default settings give, with `changes`."""
    return replace(Settings().engine_limits(), **changes)


class FakeClock:
    """A clock that moves only when a test moves it (`now`, seconds)."""

    def __init__(self, now: float = 50.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class TickingClock(FakeClock):
    """A clock that moves `tick` seconds at every reading: every interval the engine measures is > 0."""

    def __init__(self, now: float = 50.0, tick: float = 0.001) -> None:
        super().__init__(now)
        self.tick = tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


@dataclass
class RecordingRecorder:
    """A StatsRecorder that keeps everything it is given."""

    steps: list[StepStats] = field(default_factory=list)
    done: list[RequestStats] = field(default_factory=list)
    failed: list[FinishReason] = field(default_factory=list)

    def on_step(self, stats: StepStats) -> None:
        self.steps.append(stats)

    def on_request_done(self, stats: RequestStats) -> None:
        self.done.append(stats)

    def on_request_failed(self, reason: FinishReason) -> None:
        self.failed.append(reason)


@asynccontextmanager
async def running(
    model: FakeStepModel,
    *,
    limits: EngineLimits | None = None,
    policy: BatchingPolicy = BatchingPolicy.CONTINUOUS,
    recorder: RecordingRecorder | None = None,
    clock: Callable[[], float] = time.monotonic,
    on_loop: bool = False,
    encoder_thread: bool = False,
) -> AsyncIterator[AsyncEngine]:
    """A started engine on the fake (source bucket 1 unless `limits` says otherwise); on exit the gate (if any)
    is opened and the engine stopped."""
    engine = AsyncEngine(
        model,
        limits=limits or engine_limits(source_bucket=1),
        policy=policy,
        recorder=recorder,
        label="fake version 1",
        clock=clock,
        on_loop=on_loop,
        encoder_thread=encoder_thread,
    )
    await engine.start()
    try:
        yield engine
    finally:
        if model.gate is not None:
            model.gate.open()
        await engine.stop(grace_s=5.0)


async def outcome(handle: RequestHandle) -> EngineResult | AttnServeError:
    """The handle's result, or the AttnServeError it raised."""
    try:
        return await handle.result()
    except AttnServeError as error:
        return error


def same_hypotheses(left: list[Hypothesis], right: list[Hypothesis]) -> bool:
    """Bit-for-bit equality of two n-best lists (tokens, scores, alignment, attention)."""
    if len(left) != len(right):
        return False
    for a, b in zip(left, right, strict=False):
        if (a.token_ids, a.score, a.log_prob, a.finish_reason, a.alignment) != (
            b.token_ids,
            b.score,
            b.log_prob,
            b.finish_reason,
            b.alignment,
        ):
            return False
        if (a.attention is None) != (b.attention is None):
            return False
        if a.attention is not None and not np.array_equal(a.attention, b.attention):
            return False
    return True


@contextmanager
def collector_off() -> Iterator[None]:
    """Python's garbage collector off for the block (as it was after), so only reference counting frees anything:
    for tests that an object is freed at once, not at the collector's next pass."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()
