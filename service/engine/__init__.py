"""The decoding engine: queueing, continuous batching and greedy/beam search on token ids.

It sits between the engine clients above (service/engine_client/, which the dataplane talks to) and the
runtime below (which implements `StepModel` on onnxruntime), and knows nothing of gRPC, tokenizers, model
architectures or processes.

- records.py: what goes in and comes out (msgspec Structs, which are also the wire records between processes);
- core.py: `EngineCore`, one model version's queue, batch and decoder loop as synchronous calls (plan, step,
  update) with an injected clock;
- batch.py: `DecodeBatch`, every active request's decoding state in preallocated arrays;
- search.py: greedy and beam search over the whole batch (the hot loop's arithmetic);
- async_engine.py: `AsyncEngine`, the driver that runs a core on a worker thread for asyncio callers;
- handle.py: `RequestHandle`, a caller's side of one request.
"""

from __future__ import annotations

from service.engine.async_engine import AsyncEngine
from service.engine.core import BatchingPolicy, CoreOutput, EngineCore, EngineLimits, FinishedRequest
from service.engine.handle import RequestHandle
from service.engine.records import (
    DecodeOptions,
    EncoderOutput,
    EngineRequest,
    EngineResult,
    FinishReason,
    Hypothesis,
    StepModel,
    StepOutput,
    TokenEvent,
)
from service.engine.search import length_penalty, normalised_score
from service.engine.stats import NullRecorder, RequestStats, StatsRecorder, StepStats

__all__ = [
    "AsyncEngine",
    "BatchingPolicy",
    "CoreOutput",
    "DecodeOptions",
    "EncoderOutput",
    "EngineCore",
    "EngineLimits",
    "EngineRequest",
    "EngineResult",
    "FinishReason",
    "FinishedRequest",
    "Hypothesis",
    "NullRecorder",
    "RequestHandle",
    "RequestStats",
    "StatsRecorder",
    "StepModel",
    "StepOutput",
    "StepStats",
    "TokenEvent",
    "length_penalty",
    "normalised_score",
]
