"""The engine ceiling: the bare encoder + decoder-step loop on pre-batched input, no gRPC, no scheduler.

For a batch size B, the workload's sources are taken B at a time (in workload order), tokenized and
padded, encoded in one call, and decoded greedily with the exported step graph until every row has emitted
eos or reached the length limit. Every decoder call and every encoder call is timed.

The ceiling figure assumes the best any server could do with those measured costs: every decoder step full
(B requests, beam x B rows) and nothing but the encoder and the decoder steps on the critical path:

    tokens/s(B) = B x L / (encode(B) + L x step(B))

with L the mean generated length (tokens, eos included, of the greedy decode), encode(B) the encoder call
for B sources and step(B) the decoder step for beam x B rows, each the 20th percentile of its calls: a
ceiling is what the runtime does when nothing else disturbs it, and on a shared machine the slow tail of
the calls measures the neighbours, not the model. Beam search is measured
as beam x B rows fed with each row's best token (its bookkeeping is left out, so its ceiling is if
anything a little high) and keeps the greedy lengths. Single-request latency at B = 1 is
encode(1) + L x step(1) for each source's own L; its median is reported.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from service.runtime.model import LoadedModel
from service.runtime.tokenizers import BOS, EOS

#: Which percentile of the measured call times counts as the runtime's undisturbed time.
QUIET_PERCENTILE = 20.0


@dataclass(frozen=True)
class CeilingPoint:
    """The engine ceiling of one workload at one batch size (see the module docstring).

    `tokens_per_s` / `requests_per_s`: the ceiling; `latency_s`: encode(B) + L x step(B), one wave of B
    requests (at B = 1: the median over the sources of one request alone); `encode_s`, `step_s`: median encoder
    call and decoder step;
    `mean_tokens`: L; `mean_source_tokens`: mean source length (eos included); `waves`: batches measured.
    `encode_s` and `step_s` are the QUIET_PERCENTILE-th percentiles of their calls.
    """

    batch: int
    rows: int
    tokens_per_s: float
    requests_per_s: float
    latency_s: float
    encode_s: float
    step_s: float
    mean_tokens: float
    mean_source_tokens: float
    waves: int


def tokenize_sources(model: LoadedModel, texts: Sequence[str]) -> list[np.ndarray]:
    """Source ids (eos appended) of every text that fits the model's source limit."""
    sources = []
    for text in texts:
        ids = model.source_tokenizer.encode(text) + [EOS]
        if len(ids) <= model.document.limits.max_source_tokens:
            sources.append(np.asarray(ids, dtype=np.int64))
    return sources


def pad_sources(sources: Sequence[Sequence[int] | np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Source ids as the encoder takes them: one row each, padded with 0 to the longest, and their lengths."""
    lengths = np.array([len(ids) for ids in sources], dtype=np.int64)
    padded = np.zeros((len(sources), int(lengths.max())), dtype=np.int64)
    for row, ids in enumerate(sources):
        padded[row, : len(ids)] = ids
    return padded, lengths


def measure_ceiling(
    model: LoadedModel,
    sources: Sequence[np.ndarray],
    batch: int,
    *,
    beam_size: int = 1,
    max_length: int = 0,
    min_seconds: float = 1.0,
    max_waves: int = 50,
) -> CeilingPoint:
    """Measure the ceiling at `batch` sources per wave (see the module docstring); at least one wave,
    then more until `min_seconds` of measuring or `max_waves`."""
    if batch < 1 or beam_size < 1:
        raise ValueError(f"batch and beam_size must be >= 1, got {batch}, {beam_size}")
    if not sources:
        raise ValueError("no sources to measure")
    step_model = model.step_model
    limit = (
        min(max_length, model.document.limits.max_target_tokens)
        if max_length > 0
        else model.document.limits.max_target_tokens
    )
    encode_times: list[float] = []
    step_times: list[float] = []
    lengths_out: list[int] = []
    source_lengths: list[int] = []
    started = time.perf_counter()
    waves = 0
    offset = 0
    while waves < 1 or (time.perf_counter() - started < min_seconds and waves < max_waves):
        wave = [sources[(offset + i) % len(sources)] for i in range(batch)]
        offset += batch
        ids, lengths = pad_sources(wave)
        tick = time.perf_counter()
        encoded = step_model.encode(ids, lengths)
        encode_times.append(time.perf_counter() - tick)
        memory, state, row_lengths = encoded.memory, encoded.state, lengths
        if beam_size > 1:
            memory = {name: np.repeat(value, beam_size, axis=0) for name, value in memory.items()}
            state = {name: np.repeat(value, beam_size, axis=0) for name, value in state.items()}
            row_lengths = np.repeat(lengths, beam_size)
        tokens = np.full((batch * beam_size,), BOS, dtype=np.int64)
        generated = np.zeros(batch, dtype=np.int64)
        done = np.zeros(batch, dtype=bool)
        for _ in range(limit):
            tick = time.perf_counter()
            output = step_model.step(tokens, row_lengths, memory, state)
            step_times.append(time.perf_counter() - tick)
            tokens = output.topk_ids[:, 0].astype(np.int64)
            state = output.state
            best = tokens[::beam_size]
            generated += ~done
            done |= best == EOS
            if done.all():
                break
        lengths_out.extend(int(value) for value in generated)
        source_lengths.extend(int(value) for value in lengths)
        waves += 1
    encode_s = float(np.percentile(encode_times, QUIET_PERCENTILE))
    step_s = float(np.percentile(step_times, QUIET_PERCENTILE))
    mean_tokens = statistics.fmean(lengths_out)
    wave_s = encode_s + mean_tokens * step_s
    if batch == 1:
        latency = statistics.median(encode_s + length * step_s for length in lengths_out)
    else:
        latency = wave_s
    return CeilingPoint(
        batch=batch,
        rows=batch * beam_size,
        tokens_per_s=batch * mean_tokens / wave_s,
        requests_per_s=batch / wave_s,
        latency_s=latency,
        encode_s=encode_s,
        step_s=step_s,
        mean_tokens=mean_tokens,
        mean_source_tokens=statistics.fmean(source_lengths),
        waves=waves,
    )


def interpolate_ceiling(points: Sequence[CeilingPoint], rows: float) -> float:
    """Ceiling tokens/s at `rows` decoder rows, linear in log(rows) between measured points (clamped)."""
    ordered = sorted(points, key=lambda point: point.rows)
    if not ordered or not math.isfinite(rows) or rows <= 0:
        return math.nan
    if rows <= ordered[0].rows:
        return ordered[0].tokens_per_s
    for low, high in zip(ordered, ordered[1:], strict=False):
        if rows <= high.rows:
            fraction = (math.log(rows) - math.log(low.rows)) / (math.log(high.rows) - math.log(low.rows))
            return low.tokens_per_s + fraction * (high.tokens_per_s - low.tokens_per_s)
    return ordered[-1].tokens_per_s
