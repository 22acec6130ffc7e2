"""The engine's records: what goes into a decode, what comes out, and the step model it drives.

The engine works on token ids only. Above it, the dataplane validates user values, tokenizes and
detokenizes; below it, the runtime implements `StepModel` on onnxruntime. Constructors here check
invariants (a violated one is a programming error, hence ValueError, never a client-facing status).
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

# The step records belong to the runtime layer below; the engine only reads them.
from service.runtime.step import EncoderOutput, StepOutput


class StepModel(Protocol):
    """One model version's encoder and decoder step. Blocking calls; they run on the engine's worker thread.

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


@dataclass(frozen=True)
class DecodeOptions:
    """How one source is decoded. User values are validated (with client-facing messages) by the dataplane.

    `beam_size`: hypotheses kept per step; 1 = greedy (top-1 each step, no beam bookkeeping).
    `num_hypotheses`: how many finished hypotheses to return, best first (1..beam_size).
    `max_length`: most generated tokens per hypothesis, eos included.
    `length_penalty`: GNMT alpha >= 0; hypotheses are ranked by sum(log p) / ((5 + length) / 6) ** alpha,
        where length counts the generated tokens (eos included); alpha 0 ranks by the raw sum.
    `return_attention`: keep each hypothesis' attention rows (the argmax alignment is always kept).
    """

    beam_size: int = 1
    num_hypotheses: int = 1
    max_length: int = 64
    length_penalty: float = 0.0
    return_attention: bool = False

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {self.beam_size}")
        if not 1 <= self.num_hypotheses <= self.beam_size:
            raise ValueError(f"num_hypotheses must be 1..beam_size={self.beam_size}, got {self.num_hypotheses}")
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")
        if not (math.isfinite(self.length_penalty) and self.length_penalty >= 0.0):
            raise ValueError(f"length_penalty must be a finite number >= 0, got {self.length_penalty}")

    @property
    def greedy(self) -> bool:
        """True when the request decodes greedily (beam_size 1)."""
        return self.beam_size == 1


@dataclass(frozen=True, eq=False)
class TranslationRequest:
    """One source to decode, as token ids.

    `source_ids`: int64 [S], S >= 1, already ending with eos.
    `deadline`: time.monotonic() seconds after which the request fails with DeadlineExceeded; None = none.
    `stream`: deliver tokens as they are decoded (greedy only; a beam request streams nothing per step).
    `arrival`: time.monotonic() seconds when the request reached the server; every timing reported for the
        request (queue wait, first token, total) is measured from it.
    `tag`: an opaque label for logs (e.g. the RPC's request id); never used as a metric label.
    """

    source_ids: np.ndarray
    options: DecodeOptions = field(default_factory=DecodeOptions)
    deadline: float | None = None
    stream: bool = False
    arrival: float = field(default_factory=time.monotonic)
    tag: str = ""

    def __post_init__(self) -> None:
        ids = np.asarray(self.source_ids)
        if ids.ndim != 1 or ids.size < 1:
            raise ValueError(f"source_ids must be a non-empty 1-D array, got shape {ids.shape}")
        if ids.dtype != np.int64:
            ids = ids.astype(np.int64)
        object.__setattr__(self, "source_ids", ids)

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


@dataclass(frozen=True, eq=False)
class Hypothesis:
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


@dataclass(frozen=True, eq=False)
class TranslationResult:
    """A finished request.

    `hypotheses`: up to num_hypotheses, best (highest score) first; fewer only when the model gave fewer
        candidates with a finite log probability.
    `queue_wait_s`: seconds from `arrival` until the request entered the batch.
    `first_token_s`: seconds from `arrival` until its first decoder step finished.
    `total_s`: seconds from `arrival` until the result was delivered.
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


@dataclass(frozen=True, eq=False)
class TokenEvent:
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
