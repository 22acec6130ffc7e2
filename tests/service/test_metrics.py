"""The Prometheus recorder: synthetic engine stats in, the documented metric families out."""

from __future__ import annotations

import asyncio
import socket
import threading
import urllib.request

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.engine.records import FinishReason
from service.engine.stats import RequestStats, StatsRecorder, StepStats
from service.errors import Overloaded
from service.metrics import ServerMetrics
from tests.engine.fakes import NO_EOS, FakeStepModel, StepGate, engine_limits, make_request, outcome, running, source


def _samples(metrics: ServerMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.collectors).decode("utf-8")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def _step(rows: int, encoder_batch: int = 0, step_seconds: float = 0.002, encode_seconds: float = 0.0) -> StepStats:
    return StepStats(
        rows=rows,
        requests=max(rows, 1),
        step_seconds=step_seconds,
        encode_seconds=encode_seconds,
        encoder_batch=encoder_batch,
        admitted=encoder_batch,
        padded_source_len=10,
        tokens_generated=rows,
        retired=0,
    )


def _done(reason: FinishReason, tokens: int = 5, source: int = 7) -> RequestStats:
    return RequestStats(
        queue_wait_s=0.003,
        first_token_s=0.02,
        mean_inter_token_s=0.004 if tokens > 1 else None,
        total_s=0.05,
        generated_tokens=tokens,
        source_tokens=source,
        finish_reason=reason,
        beam_size=1,
    )


def test_recorder_implements_the_engine_protocol() -> None:
    recorder: StatsRecorder = ServerMetrics().recorder("dates", 1)
    assert callable(recorder.on_step) and callable(recorder.on_request_done) and callable(recorder.on_request_failed)


def test_recorder_turns_stats_into_metric_families() -> None:
    metrics = ServerMetrics()
    recorder = metrics.recorder("dates", 1)
    recorder.on_step(_step(rows=0, encoder_batch=3, encode_seconds=0.004))  # encoder only
    recorder.on_step(_step(rows=3, encoder_batch=0))
    recorder.on_step(_step(rows=12, encoder_batch=2, encode_seconds=0.001))
    recorder.on_request_done(_done(FinishReason.EOS, tokens=5, source=7))
    recorder.on_request_done(_done(FinishReason.LENGTH, tokens=1, source=4))
    recorder.on_request_failed(FinishReason.CANCELLED)
    recorder.on_request_failed(FinishReason.DEADLINE)
    metrics.recorder("numbers", 2).on_request_failed(FinishReason.ERROR)

    s = _samples(metrics)
    model = {"model": "dates", "version": "1"}
    # Decoder steps: two with rows, batch sizes 3 and 12.
    assert _value(s, "attnserve_decoder_batch_hypotheses_count", **model) == 2
    assert _value(s, "attnserve_decoder_batch_hypotheses_sum", **model) == 15
    assert _value(s, "attnserve_decoder_batch_hypotheses_bucket", le="4.0", **model) == 1
    assert _value(s, "attnserve_decoder_steps_total", **model) == 2
    assert _value(s, "attnserve_decoder_step_duration_seconds_count", **model) == 2
    assert _value(s, "attnserve_decoder_step_duration_seconds_sum", **model) == pytest.approx(0.004)
    # Encoder calls: two (3 and 2 sources).
    assert _value(s, "attnserve_encoder_batch_sources_sum", **model) == 5
    assert _value(s, "attnserve_encoder_duration_seconds_count", **model) == 2
    # Per-request timings: two finished requests, inter-token only for the one with several tokens.
    assert _value(s, "attnserve_queue_wait_seconds_count", **model) == 2
    assert _value(s, "attnserve_queue_wait_seconds_sum", **model) == pytest.approx(0.006)
    assert _value(s, "attnserve_time_to_first_token_seconds_count", **model) == 2
    assert _value(s, "attnserve_inter_token_latency_seconds_count", **model) == 1
    assert _value(s, "attnserve_engine_request_duration_seconds_sum", **model) == pytest.approx(0.1)
    assert _value(s, "attnserve_generated_tokens_total", **model) == 6
    assert _value(s, "attnserve_source_tokens_total", **model) == 11
    for reason, count in (("eos", 1), ("length", 1), ("cancelled", 1), ("deadline", 1), ("error", 0)):
        assert _value(s, "attnserve_finished_requests_total", reason=reason, **model) == count
    assert _value(s, "attnserve_finished_requests_total", model="numbers", version="2", reason="error") == 1


def test_rpc_observations_and_model_info() -> None:
    metrics = ServerMetrics()
    metrics.observe_rpc("Translate", "OK", 0.02, model="dates", version=1)
    metrics.observe_rpc("Translate", "OK", 0.04, model="dates", version=1)
    metrics.observe_rpc("Translate", "NOT_FOUND", 0.001)
    metrics.observe_rpc("Translate", "RESOURCE_EXHAUSTED", 0.003, model="dates", version=1, protocol="http")
    metrics.model_loaded("dates", 1, "CPUExecutionProvider", 0.75)
    s = _samples(metrics)
    dates = {"model": "dates", "version": "1", "method": "Translate"}
    assert _value(s, "attnserve_requests_total", code="OK", protocol="grpc", **dates) == 2
    assert _value(s, "attnserve_requests_total", code="RESOURCE_EXHAUSTED", protocol="http", **dates) == 1
    unknown = {"model": "", "version": "", "method": "Translate", "protocol": "grpc"}
    assert _value(s, "attnserve_requests_total", code="NOT_FOUND", **unknown) == 1
    assert _value(s, "attnserve_request_duration_seconds_sum", protocol="grpc", **dates) == pytest.approx(0.06)
    assert _value(s, "attnserve_request_duration_seconds_sum", protocol="http", **dates) == pytest.approx(0.003)
    assert _value(s, "attnserve_model_info", model="dates", version="1", provider="CPUExecutionProvider") == 1
    assert _value(s, "attnserve_model_load_seconds", model="dates", version="1") == 0.75


def test_queue_gauges_are_read_at_scrape_time() -> None:
    gate = StepGate()
    model = FakeStepModel(support=NO_EOS, gate=gate)
    metrics = ServerMetrics()

    async def main() -> None:
        async with running(model, limits=engine_limits(max_active_hypotheses=2, max_waiting_requests=9)) as engine:
            metrics.watch_queue("dates", 1, engine)
            active = engine.submit_all([make_request(source(3), max_length=3) for _ in range(2)])
            await gate.until_blocked()  # both in the batch
            queued = engine.submit_all([make_request(source(4), max_length=3) for _ in range(4)])
            s = _samples(metrics)
            assert _value(s, "attnserve_requests_waiting", model="dates", version="1") == 4
            assert _value(s, "attnserve_requests_running", model="dates", version="1") == 2
            assert _value(s, "attnserve_requests_waiting_limit", model="dates", version="1") == 9
            gate.open()
            for handle in [*active, *queued]:
                await handle.result()
            s = _samples(metrics)
            assert _value(s, "attnserve_requests_waiting", model="dates", version="1") == 0
            assert _value(s, "attnserve_requests_running", model="dates", version="1") == 0
            metrics.unwatch_queue("dates", 1)
            assert ("attnserve_requests_running", (("model", "dates"), ("version", "1"))) not in _samples(metrics)

    asyncio.run(main())


def test_scrapes_while_requests_come_and_go_leave_the_count_and_the_limit_exact() -> None:
    """A thread scrapes /metrics without pause while requests are admitted, cancelled and retired: the scrape
    only reads (each count has one writer), so afterwards the queue holds exactly its limit again."""
    limit = 6
    model = FakeStepModel(support=NO_EOS)
    metrics = ServerMetrics()
    done = threading.Event()
    seen: list[tuple[float, float]] = []

    def scrape_until_done() -> None:
        for _ in range(1_000_000):  # bounded; ends when the load below ends
            if done.is_set():
                return
            s = _samples(metrics)
            key = (("model", "dates"), ("version", "1"))
            seen.append((s[("attnserve_requests_waiting", key)], s[("attnserve_requests_running", key)]))

    async def main() -> None:
        limits = engine_limits(max_active_hypotheses=3, max_waiting_requests=limit)
        async with running(model, limits=limits) as engine:
            metrics.watch_queue("dates", 1, engine)
            scraper = threading.Thread(target=scrape_until_done)
            scraper.start()
            try:
                for wave in range(40):
                    handles = []
                    while True:  # fill the queue to its limit
                        try:
                            handles.append(engine.submit(make_request(source(3 + wave % 5), max_length=1 + wave % 4)))
                        except Overloaded:
                            break
                    handles[wave % len(handles)].cancel()
                    for handle in handles:
                        await outcome(handle)
            finally:
                done.set()
                scraper.join()
            assert (engine.waiting, engine.running, engine.outstanding) == (0, 0, 0)
            # The limit is exact: with the batch held full, exactly `limit` more fit, and one more is refused.
            gate = StepGate()
            model.gate = gate
            active = engine.submit_all([make_request(source(3), max_length=2) for _ in range(3)])
            await gate.until_blocked()
            queued = engine.submit_all([make_request(source(4), max_length=2) for _ in range(limit)])
            with pytest.raises(Overloaded):
                engine.submit(make_request(source(5), max_length=2))
            gate.open()
            for handle in [*active, *queued]:
                await handle.result()

    asyncio.run(main())
    assert seen, "the scraper never ran"
    assert all(0 <= waiting <= limit and 0 <= running <= 3 for waiting, running in seen)


def test_registries_are_private_and_served_over_http() -> None:
    first, second = ServerMetrics(), ServerMetrics()  # no "duplicated timeseries" error: separate registries
    first.observe_rpc("ListModels", "OK", 0.001)
    assert (
        "attnserve_requests_total",
        (("code", "OK"), ("method", "ListModels"), ("model", ""), ("protocol", "grpc"), ("version", "")),
    ) not in _samples(second)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    first.serve(port, host="127.0.0.1")
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        first.close()
    assert 'attnserve_requests_total{code="OK",method="ListModels",model="",protocol="grpc",version=""} 1.0' in body
    resident = next(line for line in body.splitlines() if line.startswith("process_resident_memory_bytes "))
    assert float(resident.split()[1]) > 0
