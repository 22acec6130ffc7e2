"""The decoding engine: queueing, continuous batching and greedy/beam search on token ids.

It sits between the dataplane (which tokenizes and validates) and the runtime (which implements
`StepModel` on onnxruntime), and knows nothing of gRPC, tokenizers or model architectures.

- core.py: `EngineCore`, one model version's queue, batch and decoder loop as synchronous calls (plan, step,
  update) with an injected clock;
- batch.py: `DecodeBatch`, every active request's decoding state in preallocated arrays;
- search.py: greedy and beam search over the whole batch (the hot loop's arithmetic);
- scheduler.py: `Scheduler`, the driver that runs a core on a worker thread for asyncio callers.
"""

from __future__ import annotations

from service.engine.core import BatchingPolicy, CoreOutput, EngineCore, EngineLimits, FinishedRequest
from service.engine.records import (
    DecodeOptions,
    FinishReason,
    Hypothesis,
    StepModel,
    TokenEvent,
    TranslationRequest,
    TranslationResult,
)
from service.engine.scheduler import RequestHandle, Scheduler
from service.engine.search import length_penalty, normalised_score
from service.engine.stats import NullRecorder, RequestStats, StatsRecorder, StepStats
from service.runtime.step import EncoderOutput, StepOutput

__all__ = [
    "BatchingPolicy",
    "CoreOutput",
    "DecodeOptions",
    "EncoderOutput",
    "EngineCore",
    "EngineLimits",
    "FinishReason",
    "FinishedRequest",
    "Hypothesis",
    "NullRecorder",
    "RequestHandle",
    "RequestStats",
    "Scheduler",
    "StatsRecorder",
    "StepModel",
    "StepOutput",
    "StepStats",
    "TokenEvent",
    "TranslationRequest",
    "TranslationResult",
    "length_penalty",
    "normalised_score",
]
