"""The benchmark's client processes and server processes: real gRPC on loopback, bounded windows."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from loadtests.loadgen import CellPlan, LoadGenerator, WorkerReport, summarize
from loadtests.noop_server import FIXED_TOKENS
from loadtests.servers import attnserve_server, engine_window, metric, noop_server, scrape, wait_until_idle
from loadtests.workload import task_texts

pytestmark = pytest.mark.slow  # trains models or starts servers


def test_summarize_counts_each_worker_over_its_own_window() -> None:
    first = WorkerReport(
        latencies=[0.01, 0.02, 0.03, 0.5],
        codes=["OK", "OK", "OK", "UNAVAILABLE"],
        tokens=[5, 5, 6, 0],
        window_starts=10.0,
        window_ends=12.0,
        cut=1,
        cpu_s=0.5,
    )
    second = WorkerReport(latencies=[0.04], codes=["OK"], tokens=[4], window_starts=10.0, window_ends=11.0, cpu_s=0.25)
    measured = summarize([first, second])
    assert measured.ok == 4 and measured.failures == {"UNAVAILABLE": 1} and measured.completed == 5
    assert measured.requests_per_s == pytest.approx(3 / 2 + 1 / 1)
    assert measured.tokens_per_s == pytest.approx(16 / 2 + 4 / 1)
    assert measured.mean_tokens == pytest.approx(20 / 4)
    assert measured.latency_p50_s == pytest.approx(0.025)
    assert measured.cut == 1 and measured.client_cpu_s == 0.75 and measured.window_s == 2.0


def test_summarize_keeps_the_first_message_of_each_failing_status() -> None:
    first = WorkerReport(codes=["NOT_FOUND"], latencies=[0.1], tokens=[0], messages={"NOT_FOUND": "first"})
    second = WorkerReport(
        codes=["NOT_FOUND", "UNAVAILABLE"],
        latencies=[0.1, 0.1],
        tokens=[0, 0],
        messages={"NOT_FOUND": "second", "UNAVAILABLE": "gone"},
    )
    for report in (first, second):
        report.window_starts, report.window_ends = 0.0, 1.0
    assert summarize([first, second]).failure_messages == {"NOT_FOUND": "first", "UNAVAILABLE": "gone"}


def test_summarize_raises_the_workers_error() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        summarize([WorkerReport(error="ValueError: boom")])


def test_summarize_without_calls_gives_nan_latencies() -> None:
    measured = summarize([WorkerReport(window_starts=0.0, window_ends=1.0)])
    assert measured.ok == 0 and math.isnan(measured.latency_p99_s) and math.isnan(measured.mean_tokens)


def test_cell_plan_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        CellPlan("a", "m", ("t",), 0, 0, 0.1, 1.0, 10)
    with pytest.raises(ValueError, match="text"):
        CellPlan("a", "m", (), 0, 1, 0.1, 1.0, 10)


def test_closed_loop_against_the_rpc_ceiling(tmp_path: Path) -> None:
    with noop_server(tmp_path) as server, LoadGenerator(processes=2, clients_per_process=2) as generator:
        plan = CellPlan(
            server.address, "noop", ("a", "b", "c"), 0, 4, warmup_s=0.2, duration_s=0.6, max_requests=100000
        )
        measured = generator.run(plan)
        assert measured.ok > 4 and not measured.failures
        assert measured.mean_tokens == len(FIXED_TOKENS)
        assert measured.requests_per_s > 0 and measured.latency_p50_s <= measured.latency_p99_s
        # The request cap closes the window early, in every process.
        capped = generator.run(CellPlan(server.address, "noop", ("a",), 0, 4, 0.1, 30.0, max_requests=20))
        assert 20 <= capped.ok <= 24 and capped.window_s < 30.0


def test_attnserve_cell_and_its_server_metrics(tiny_repository: Path, tmp_path: Path) -> None:
    texts = tuple(task_texts("dates", 20, seed=4))
    server = attnserve_server(tiny_repository, batching="continuous", threads=1, provider="cpu", log_dir=tmp_path)
    with server, LoadGenerator(processes=1) as generator:
        before = scrape(server.metrics_url)
        measured = generator.run(CellPlan(server.address, "dates", texts, 0, 4, 0.2, 0.8, 100000))
        after = scrape(server.metrics_url)
        wait_until_idle(server.metrics_url, timeout_s=30.0)
        assert measured.ok > 0 and not measured.failures and measured.tokens_per_s > 0
        window = engine_window(before, after, "dates", 1.0)
        assert 1.0 <= window.mean_decoder_rows <= 4.0
        assert window.steps > 0 and 0 < window.decoder_busy
        assert window.mean_rpc_s >= window.mean_engine_s > 0
        assert metric(after, "attnserve_requests_total", model="dates", method="Translate", code="OK") >= measured.ok
        # A beam request uses beam rows per step.
        beam = generator.run(CellPlan(server.address, "dates", texts, 4, 1, 0.1, 0.5, 100000))
        assert beam.ok > 0 and not beam.failures
        # A failing status comes with the server's own message.
        unknown = generator.run(CellPlan(server.address, "no-such-model", texts, 0, 1, 0.1, 0.3, 100000))
        assert unknown.ok == 0 and set(unknown.failures) == {"NOT_FOUND"}
        assert "no-such-model" in unknown.failure_messages["NOT_FOUND"]
    assert server.process is None  # stopped
