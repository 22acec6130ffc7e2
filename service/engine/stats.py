"""Plain numbers the engine records, and the protocol of whoever turns them into metrics.

The core fills a `StepStats` per iteration, which its driver hands to a `StatsRecorder` after it (on the worker
thread); a `RequestStats` is made from the core's `FinishedRequest` when the driver resolves the request (on the
event-loop thread, where the request is resolved exactly once), so the hot loop does not make it. The
recorder (e.g. a Prometheus one, elsewhere) must be cheap, thread-safe and must not block. Nothing here
imports a metrics library, so the hot loop never touches one.
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from service.engine.records import FinishReason

# Records are msgspec Structs without cycles (gc=False): one is made per request and per step in the hot loop, and
# a Struct is made in a quarter of the time of a NamedTuple.


class StepStats(msgspec.Struct, gc=False):
    """One engine iteration that ran the encoder, the decoder step, or both.

    `rows`: decoder rows in the step (0 when only the encoder ran); `requests`: requests in the step;
    `step_seconds` / `encode_seconds`: wall time of the decoder / encoder call (0.0 when not run);
    `encoder_batch`: sources encoded this iteration; `admitted`: requests that entered the batch;
    `padded_source_len`: the step's memory length (longest source in the batch), tokens;
    `tokens_generated`: tokens produced by the step, one per row (beam rows included);
    `retired`: requests that finished (or failed) in this iteration;
    `memory_generation`: which build of the batch's memory the step used (it changes only when the set of
    requests does).
    """

    rows: int
    requests: int
    step_seconds: float
    encode_seconds: float
    encoder_batch: int
    admitted: int
    padded_source_len: int
    tokens_generated: int
    retired: int
    memory_generation: int = 0


class RequestStats(msgspec.Struct, gc=False):
    """One request that finished with a result (finish reason eos or length).

    Times are seconds from the request's arrival: `queue_wait_s` until it entered the batch,
    `first_token_s` until its first decoder step finished, `total_s` until its last one finished.
    `mean_inter_token_s`: mean seconds between its consecutive decoder steps (None after one step).
    `generated_tokens`: decoder steps it ran; `source_tokens`: its source length, eos included;
    `finish_reason`: the best hypothesis' reason; `beam_size`: its beam width.
    """

    queue_wait_s: float
    first_token_s: float
    mean_inter_token_s: float | None
    total_s: float
    generated_tokens: int
    source_tokens: int
    finish_reason: FinishReason
    beam_size: int


class StatsRecorder(Protocol):
    """Receives one engine's numbers: `on_step` on the thread that steps the core (its worker thread, or the
    event loop's in `on_loop` mode), the others on the event loop's thread. Every method must be quick; each
    is called by one thread only, so a recorder that keeps the numbers of `on_step` apart from the others'
    needs no lock."""

    def on_step(self, stats: StepStats) -> None:
        """After each iteration that ran the encoder or the decoder."""
        ...

    def on_request_done(self, stats: RequestStats) -> None:
        """When a request finishes with a result."""
        ...

    def on_request_failed(self, reason: FinishReason) -> None:
        """When an accepted request ends without a result: CANCELLED, DEADLINE, or ERROR (the model
        failed, or the engine stopped first). Requests refused at submission are not reported here; they
        raise to the caller."""
        ...


class NullRecorder:
    """A recorder that drops everything (the default)."""

    def on_step(self, stats: StepStats) -> None:
        pass

    def on_request_done(self, stats: RequestStats) -> None:
        pass

    def on_request_failed(self, reason: FinishReason) -> None:
        pass
