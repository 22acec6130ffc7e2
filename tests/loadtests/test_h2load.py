"""h2load as the benchmark's load generator: its figures read from real short runs against real servers, the
server CPU per call at a fixed offered rate, and the shapes of its closed loops."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from loadtests import call_cost, h2load
from loadtests.loadgen import CellMeasurement, CellPlan, H2loadGenerator, count_server_errors
from loadtests.noop_server import FIXED_TOKENS
from loadtests.servers import attnserve_server, noop_server
from loadtests.workload import task_texts
from service.gen.attnserve.v1 import translator_pb2 as pb

needs_h2load = pytest.mark.skipif(not h2load.available(), reason=h2load.MISSING)


def test_closed_loop_shapes_keep_exactly_the_calls_in_flight() -> None:
    assert h2load.closed_loop_shape(64) == (8, 8)
    assert h2load.closed_loop_shape(128) == (8, 16)
    assert h2load.closed_loop_shape(1) == (1, 1)
    assert h2load.closed_loop_shape(3) == (3, 1)
    assert h2load.closed_loop_shape(12) == (6, 2)
    with pytest.raises(ValueError):
        h2load.closed_loop_shape(0)


def test_the_cpu_windows_rate_is_one_h2load_can_offer() -> None:
    # h2load offers whole calls/s per connection, over up to 8 connections.
    assert [call_cost.offered_rate(rate) for rate in (0, 1, 5, 8, 9, 629, 800)] == [1, 1, 5, 8, 8, 624, 800]


def test_the_summary_line_is_read_by_name() -> None:
    output = (
        "finished in 2.00s\nrequests: 90 total, 90 started, 88 done, 80 succeeded, 8 failed, 3 errored, 0 timeout\n"
    )
    assert h2load.parse_summary(output) == h2load.H2loadSummary(done=88, succeeded=80, failed=8, errored=3)
    with pytest.raises(ValueError, match="requests:"):
        h2load.parse_summary("connect failed\n")
    log = "1700000000000000\t200\t1500\n1700000000000100\t503\t900\n1700000000000200\t200\t2500\n"
    assert h2load.answered_latencies(log) == (0.0015, 0.0025)


def test_server_errors_leave_the_ok_count_and_its_rates() -> None:
    measured = CellMeasurement(
        ok=100,
        failures={},
        window_s=1.0,
        requests_per_s=100.0,
        tokens_per_s=1100.0,
        mean_tokens=11.0,
        latency_p50_s=0.001,
        latency_p90_s=0.002,
        latency_p99_s=0.003,
        latency_mean_s=0.001,
        cut=4,
        client_cpu_s=0.1,
        window_starts=0.0,
        window_ends=1.0,
    )
    corrected = count_server_errors(measured, {"INVALID_ARGUMENT": 25})
    assert corrected.ok == 75 and corrected.failures == {"INVALID_ARGUMENT": 25}
    assert corrected.requests_per_s == 75.0 and corrected.tokens_per_s == 825.0
    assert count_server_errors(measured, {}) is measured


@pytest.mark.slow
@needs_h2load
def test_h2load_against_the_no_op_server(tmp_path: Path) -> None:
    body = tmp_path / "call.bin"
    body.write_bytes(h2load.grpc_body(pb.TranslateRequest(model="noop", texts=["21.11.2026"])))
    with noop_server(tmp_path) as server:
        run = h2load.run(server.address, body, connections=2, streams=2, seconds=0.5, warmup_s=0.2)
        assert run.answered > 0 and run.failed == 0 and run.errored == 0
        # The per-request log holds exactly the window's answered calls (the warm-up's are not logged).
        assert len(run.latencies_s) == run.answered and run.p50_ms > 0
        assert run.calls_per_s == run.answered / 0.5 and run.client_cpu_s > 0
        # The cells of the bench: tokens counted by the probe call, 4 calls in flight reset at the end.
        with H2loadGenerator(tmp_path / "bodies") as generator:
            generator.schedule(CellPlan(server.address, "noop", ("a", "bb", "ccc"), 0, 4, 0.1, 0.5, 1000))
            measured = generator.collect()
        assert measured.ok > 0 and not measured.failures and measured.cut == 4
        assert measured.mean_tokens == len(FIXED_TOKENS)
        assert measured.tokens_per_s == pytest.approx(measured.requests_per_s * len(FIXED_TOKENS))
        assert measured.latency_p50_s <= measured.latency_p99_s
    # CPU per call at a fixed rate: an open loop never offers more than its rate (8 connections x 20 calls/s).
    cpu_us, answered, errors = call_cost.measure_cpu(noop_server(tmp_path), body, 1.0, 0.2, rate=160)
    assert 0 < answered <= 160 + call_cost.CONNECTIONS and errors == 0
    assert math.isfinite(cpu_us) and cpu_us > 0


@pytest.mark.slow
@needs_h2load
def test_h2load_cells_of_an_attnserve_server(tiny_repository: Path, tmp_path: Path) -> None:
    texts = tuple(task_texts("dates", 20, seed=4))
    server = attnserve_server(
        tiny_repository, batching="continuous", threads=1, provider="cpu", log_dir=tmp_path, http=True
    )
    with server, H2loadGenerator(tmp_path / "bodies") as generator:
        for protocol, address in (("grpc", server.address), ("http", server.http_address)):
            generator.schedule(CellPlan(address, "dates", texts, 0, 2, 0.1, 0.5, 1000, protocol=protocol))
            measured = generator.collect()
            assert measured.ok > 0 and not measured.failures and measured.tokens_per_s > 0, protocol
        # A call the server refuses is not measured: h2load would count its HTTP 200 as an answer.
        generator.schedule(CellPlan(server.address, "no-such-model", texts, 0, 2, 0.1, 0.5, 1000))
        refused = generator.collect()
        assert refused.ok == 0 and set(refused.failures) == {"NOT_FOUND"}
