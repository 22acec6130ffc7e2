"""The decoding engine: queueing, continuous batching and greedy/beam search on token ids.

It sits between the dataplane (which tokenizes and validates) and the runtime (which implements
`StepModel` on onnxruntime), and knows nothing of gRPC, tokenizers or model architectures.
"""

from __future__ import annotations

from service.engine.beam import length_penalty, normalised_score
from service.engine.records import (
    DecodeOptions,
    EncoderOutput,
    FinishReason,
    Hypothesis,
    StepModel,
    StepOutput,
    TokenEvent,
    TranslationRequest,
    TranslationResult,
)
from service.engine.scheduler import BatchingPolicy, EngineLimits, RequestHandle, Scheduler
from service.engine.stats import NullRecorder, RequestStats, StatsRecorder, StepStats

__all__ = [
    "BatchingPolicy",
    "DecodeOptions",
    "EncoderOutput",
    "EngineLimits",
    "FinishReason",
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
