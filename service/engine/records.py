"""The engine's records: what goes into a decode, what comes out, and the step model it drives.

The engine works on token ids only. Above it, the dataplane validates user values, tokenizes and
detokenizes; below it, the runtime implements `StepModel` on onnxruntime.

The records are msgspec Structs because they are also what crosses between a front-end process and the
engine process (service/ipc/messages.py sends them as they are): one type per concept on both sides, nothing
converted by hand. Their numpy arrays travel as msgpack extensions (see the codec there).
"""

from __future__ import annotations

import enum
from typing import Protocol

import msgspec
import numpy as np

# The step records belong to the runtime layer below; the engine only reads them.
from service.runtime.step import EncoderOutput, StepOutput

__all__ = [
    "DecodeOptions",
    "EncoderOutput",
    "EngineRequest",
    "EngineResult",
    "FinishReason",
    "Hypothesis",
    "StepModel",
    "StepOutput",
    "TokenEvent",
]


class StepModel(Protocol):
    """One model version's encoder and decoder step. Blocking calls, made by the thread that steps the engine;
    with an encoder pool (`EngineCore`'s `encoder_pool`), `encode` also runs on the pool's thread while `step`
    runs, so the two must be safe to call at the same time (onnxruntime's are: two sessions).

    Rows are independent: a row's outputs depend only on that row's inputs (never on other rows, nor on
    zero padding beyond its source length). The engine relies on it to gather, reorder and compact rows.
    """

    top_k: int
    """Candidates per row returned by `step()`; the widest beam the engine allows."""
    eos_id: int
    """Token id that ends a hypothesis (2 in the model format)."""
    bos_id: int
    """Token id fed to the first decoder step (1 in the model format)."""
    memory_names: tuple[str, ...]
    """Keys of the memory tensors: produced by `encode`, fed unchanged to every `step`."""
    state_names: tuple[str, ...]
    """Keys of the state tensors: initialised by `encode`, fed to `step` and replaced by its output."""

    def encode(self, source_ids: np.ndarray, source_lengths: np.ndarray) -> EncoderOutput:
        """Encode int64 `source_ids` [B, S] (padded with 0) of int64 `source_lengths` [B] (eos included)."""
        ...

    def step(
        self,
        tokens: np.ndarray,
        source_lengths: np.ndarray,
        memory: dict[str, np.ndarray],
        state: dict[str, np.ndarray],
        *,
        memory_version: int = -1,
    ) -> StepOutput:
        """One decoder step for N rows: int64 `tokens` [N] (previous token), int64 `source_lengths` [N],
        `memory` [N, S, ...] zero beyond each row's length, `state` [N, ...].

        `memory_version` identifies the memory's contents: two calls with the same version >= 0 get the
        same memory (the engine changes it in place and bumps the version), so a copy on a device can be
        reused; -1 means no promise. The engine owns the returned arrays (it reorders state in place), so
        they must not be buffers the model reuses."""
        ...


class DecodeOptions(msgspec.Struct, frozen=True, array_like=True):
    """How one text is decoded, with the field names of the API's DecodeOptions message, from the transport
    down to the core.

    As a client sends them, 0 / 0.0 mean "the default"; the dataplane checks them against the model and the
    settings and returns them resolved (`DecodeOptions.resolved`), and only resolved options reach the engine.

    `beam_size`: hypotheses kept per step; 1 = greedy (top-1 each step, no beam bookkeeping).
    `num_hypotheses`: how many finished hypotheses to return, best first (1..beam_size).
    `max_length`: most generated tokens per hypothesis, eos included.
    `length_penalty`: GNMT alpha >= 0; hypotheses are ranked by sum(log p) / ((5 + length) / 6) ** alpha,
        where length counts the generated tokens (eos included); alpha 0 ranks by the raw sum.
    `return_attention`: keep each hypothesis' attention rows (the argmax alignment is always kept).
    `replace_unknowns`: replace each unknown target token by the source token it attends to most (applied
        to the text by the dataplane, after decoding; the engine ignores it).
    """

    beam_size: int = 0
    num_hypotheses: int = 0
    max_length: int = 0
    length_penalty: float = 0.0
    return_attention: bool = False
    replace_unknowns: bool = False

    @property
    def greedy(self) -> bool:
        """True when the text decodes greedily (beam_size 0 or 1)."""
        return self.beam_size <= 1


class EngineRequest(msgspec.Struct, array_like=True):
    """One source to decode, as token ids.

    `source_ids`: int64 [S], S >= 1, already ending with eos.
    `options`: resolved decoding options (every value concrete, beam_size >= 1).
    `deadline`: time.monotonic() seconds after which the request fails with DeadlineExceeded; None = none.
    `stream`: deliver tokens as they are decoded (greedy only; a beam request streams nothing per step).
    `arrival`: time.monotonic() seconds when the call reached the server; every timing reported for the
        request (queue wait, first token, total) is measured from it. CLOCK_MONOTONIC is one clock for every
        process of a host, so it crosses to the engine process unchanged.
    """

    source_ids: np.ndarray
    options: DecodeOptions
    deadline: float | None
    stream: bool
    arrival: float

    def __post_init__(self) -> None:
        ids = self.source_ids
        if not isinstance(ids, np.ndarray) or ids.ndim != 1 or ids.size < 1:
            raise ValueError(f"source_ids must be a non-empty 1-D array, got {np.shape(ids)}")
        if ids.dtype != np.int64:
            self.source_ids = ids.astype(np.int64)

    @property
    def source_length(self) -> int:
        """Source tokens, eos included."""
        return int(self.source_ids.shape[0])


class FinishReason(enum.Enum):
    """Why a hypothesis (or a request) ended."""

    EOS = "eos"
    """The hypothesis emitted eos."""
    LENGTH = "length"
    """The hypothesis reached max_length without eos."""
    CANCELLED = "cancelled"
    """The request was cancelled."""
    DEADLINE = "deadline"
    """The request's deadline passed."""
    ERROR = "error"
    """The model failed, or the engine stopped before the request finished."""


class Hypothesis(msgspec.Struct, array_like=True):
    """One finished hypothesis.

    `token_ids`: generated tokens (eos included when it ended by eos; bos never included).
    `score`: `log_prob` / ((5 + len(token_ids)) / 6) ** length_penalty, the value used for ranking.
    `log_prob`: sum of the natural-log probabilities of `token_ids`.
    `alignment`: per generated token, the source position with the highest attention.
    `attention`: float32 [len(token_ids), source_len] when return_attention was asked for, else None.
    """

    token_ids: list[int]
    score: float
    log_prob: float
    finish_reason: FinishReason
    alignment: list[int]
    attention: np.ndarray | None = None


class EngineResult(msgspec.Struct, array_like=True):
    """A finished request.

    `hypotheses`: up to num_hypotheses, best (highest score) first; fewer only when the model gave fewer
        candidates with a finite log probability.
    `queue_wait_s`: seconds from `arrival` until the request entered the batch.
    `first_token_s`: seconds from `arrival` until its first decoder step finished.
    `total_s`: seconds from `arrival` until its last decoder step finished.
    `generated_tokens`: decoder steps the request ran (= tokens of its longest hypothesis).
    """

    hypotheses: list[Hypothesis]
    queue_wait_s: float
    first_token_s: float
    total_s: float
    generated_tokens: int

    @property
    def best(self) -> Hypothesis:
        """The highest-scoring hypothesis."""
        return self.hypotheses[0]


class TokenEvent(msgspec.Struct, array_like=True):
    """One token of a streaming greedy request, delivered as soon as its decoder step finishes.

    `position`: 0-based index in the hypothesis; `log_prob`: the token's own log probability;
    `alignment`: its argmax source position; `attention`: float32 [source_len] when return_attention.
    The eos token, when emitted, is delivered too (as the last event).
    """

    token_id: int
    position: int
    log_prob: float
    alignment: int
    attention: np.ndarray | None = None
