"""The report: targets computed from results, the Markdown tables, the plots, the JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from loadtests.bench import CellResult, pick_best
from loadtests.report import ceiling_at_rows, check_targets, find, nearest_level, write_report

pytestmark = pytest.mark.slow  # trains models or starts servers


def table_rows(markdown: str) -> list[tuple[str, ...]]:
    """The cells of every Markdown table row in a report, stripped of their padding."""
    return [
        tuple(cell.strip() for cell in line.strip().strip("|").split("|"))
        for line in markdown.splitlines()
        if line.startswith("|")
    ]


def cell(
    workload: str,
    contender: str,
    level: int,
    tokens: float,
    requests: float,
    p50: float = 1.0,
    p99: float = 2.0,
    rows: float | None = None,
    **details,
) -> dict:
    return {
        "workload": workload,
        "contender": contender,
        "level": level,
        "tokens_per_s": tokens,
        "requests_per_s": requests,
        "p50_ms": p50,
        "p90_ms": p99,
        "p99_ms": p99,
        "mean_decoder_rows": rows,
        "percent_of_peak": details.pop("percent_of_peak", None),
        "ok": 100,
        "failures": {},
        "cut": 0,
        "steady": True,
        "details": details,
    }


def report(results: list[dict], workloads: tuple[str, ...]) -> dict:
    return {
        "command": "attnserve bench --test",
        "config": {"warmup_s": 1.0, "duration_s": 4.0, "max_requests": 1000, "client_processes": 2},
        "machine": {
            "cpu": "Test CPU",
            "cores": 2,
            "provider": "cpu",
            "threads": 1,
            "onnxruntime": "x",
            "grpcio": "y",
            "python": "3.11",
            "load_average_at_start": [1.0, 1.0, 1.0],
            "load_average_at_end": [1.0, 1.0, 1.0],
        },
        "peak": {"flops_per_s": 100e9, "size": 1024},
        "models": {
            name: {
                "mean_source_tokens": 10.0,
                "mean_generated_tokens": 5.0,
                "flops_per_generated_token": 1e6,
                "step_flops_per_row": 9e5,
            }
            for name in workloads
        },
        "workloads": {name: {"description": name, "texts": 10} for name in workloads},
        "results": results,
        "request_tuning": [
            {
                "workload": "dates",
                "level": 64,
                "chosen": {"batch_size": 32, "batch_delay_ms": 0.0},
                "trials": [{"batch_size": 32, "batch_delay_ms": 0.0, "tokens_per_s": 10.0, "p99_ms": 3.0}],
            }
        ],
        "seconds": 60.0,
    }


def test_small_model_target_against_the_rpc_ceiling(tmp_path: Path) -> None:
    results = [
        cell("dates", "continuous", 64, 700, 70, decoder_busy=0.1, server_cpu_share=0.98),
        cell("dates", "rpc-ceiling", 64, math.nan, 100),
        cell("numbers", "continuous", 64, 500, 50, decoder_busy=0.1, server_cpu_share=0.98),
        cell("numbers", "rpc-ceiling", 64, math.nan, 100),
    ]
    checks = {
        check.target.split(":")[0]: check
        for check in check_targets(report(results, ("dates", "numbers")))
        if "of the RPC ceiling" in check.target
    }
    assert checks["dates"].met is True and "70%" in checks["dates"].figure
    assert checks["numbers"].met is False and "50%" in checks["numbers"].figure
    assert "Python process is saturated" in checks["numbers"].note  # diagnosed from its own profile


def test_large_model_targets_and_ceiling_interpolation() -> None:
    results = [
        cell("phrasebook", "continuous", 32, 3000, 100, rows=16.0, percent_of_peak=40.0),
        cell("phrasebook", "continuous", 64, 6000, 200, rows=32.0, percent_of_peak=65.0),
        cell("phrasebook", "none", 64, 900, 30),
        cell("phrasebook", "pytorch-eager", 64, 300, 10),
        cell("phrasebook", "engine-ceiling", 8, 2000, 60, rows=8.0),
        cell("phrasebook", "engine-ceiling", 32, 8000, 250, rows=32.0, percent_of_peak=70.0, step_ms=1.0),
    ]
    data = report(results, ("phrasebook",))
    assert ceiling_at_rows(data, "phrasebook", 16.0) == 5000  # halfway in log2 between 8 and 32 rows
    assert nearest_level(data, 64) == 64
    checks = {check.target: check for check in check_targets(data)}
    versus_none = next(check for target, check in checks.items() if "--batching none" in target)
    versus_eager = next(check for target, check in checks.items() if "PyTorch eager" in target)
    assert versus_none.met is True and "6.7x" in versus_none.figure
    assert versus_eager.met is True and "20.0x" in versus_eager.figure
    at_32 = next(check for target, check in checks.items() if "engine ceiling" in target and "(32 clients)" in target)
    assert at_32.met is False and "60%" in at_32.figure  # 3000 of 5000 at 16 rows
    at_64 = next(check for target, check in checks.items() if "engine ceiling" in target and "(64 clients)" in target)
    assert at_64.met is False and "75%" in at_64.figure  # 6000 of 8000 at 32 rows


def test_latency_at_one_client_and_mixed_lengths() -> None:
    results = [
        cell("phrasebook-mixed", "continuous", 1, 100, 10, p50=10.5, p99=15.0),
        cell("phrasebook-mixed", "engine-ceiling", 1, 120, 12, p50=9.0),
        cell("phrasebook-mixed", "rpc-ceiling", 1, math.nan, 1000, p50=0.5),
        cell("phrasebook-mixed", "continuous", 8, 800, 80, p99=20.0),
        cell("phrasebook-mixed", "request", 1, 100, 10, p99=16.0),
        cell("phrasebook-mixed", "request", 8, 1000, 90, p99=60.0),
    ]
    checks = check_targets(report(results, ("phrasebook-mixed",)))
    latency = next(check for check in checks if "1 client" in check.target)
    assert latency.met is True  # 10.5 <= 1.15 * (9.0 + 0.5)
    mixed = next(check for check in checks if "mixed" in check.target and "equal" in check.target)
    # Request-level's lowest p99 with >= 800 tok/s is 60 ms (at 1000 tok/s): 20 / 60 = 0.33.
    assert mixed.met is True and "0.33x" in mixed.figure


def test_mixed_lengths_throughput_at_equal_p99_and_a_miss() -> None:
    results = [
        cell("phrasebook-mixed", "continuous", 8, 900, 90, p99=50.0),
        cell("phrasebook-mixed", "request", 1, 300, 30, p99=40.0),
        cell("phrasebook-mixed", "request", 8, 1000, 100, p99=45.0),
    ]
    mixed = next(
        check for check in check_targets(report(results, ("phrasebook-mixed",))) if "equal p99" in check.target
    )
    # p99 ratio 50 / 45 = 1.11 (request is faster); throughput at p99 <= 50 ms: 900 / 1000 = 0.9.
    assert mixed.met is False and "1.11x" in mixed.figure and "0.90x" in mixed.figure
    ahead = [
        cell("phrasebook-mixed", "continuous", 8, 900, 90, p99=50.0),
        cell("phrasebook-mixed", "request", 8, 500, 50, p99=49.0),
    ]
    mixed = next(check for check in check_targets(report(ahead, ("phrasebook-mixed",))) if "equal p99" in check.target)
    assert mixed.met is True and "1.80x" in mixed.figure and "reached no level with 900 tok/s" in mixed.figure


def test_unmeasured_targets_are_not_claimed() -> None:
    checks = check_targets(report([cell("dates", "continuous", 64, 10, 1)], ("dates",)))
    assert [check.met for check in checks] == [None, None]  # vs the RPC ceiling, vs the composed ceiling


def test_pick_best_prefers_throughput_then_p99() -> None:
    slow = CellResult("w", "request", 8, 100.0, 10.0, 1, 1, 50.0)
    fast = CellResult("w", "request", 8, 200.0, 20.0, 1, 1, 90.0)
    close = CellResult("w", "request", 8, 196.0, 19.6, 1, 1, 30.0)
    assert pick_best([slow, fast]) is fast
    assert pick_best([slow, fast, close]) is close


def test_write_report_files(tmp_path: Path) -> None:
    results = [
        cell("dates", contender, level, 100.0 * level, 10.0 * level, rows=float(level))
        for contender in ("continuous", "none", "request", "engine-ceiling", "roofline")
        for level in (1, 8)
    ]
    results += [cell("dates", "rpc-ceiling", level, math.nan, 1000.0) for level in (1, 8)]
    results[0]["steady"] = False
    paths = write_report(report(results, ("dates",)), tmp_path)
    assert [path.name for path in paths] == ["bench.json", "bench.md", "throughput.png", "latency.png"]
    document = json.loads((tmp_path / "bench.json").read_text())
    assert find(document, "dates", "none", 8)["tokens_per_s"] == 800.0 and document["targets"]
    text = (tmp_path / "bench.md").read_text()
    assert "## dates" in text and ("continuous", "1") in {row[:2] for row in table_rows(text)} and "1.00*" in text
    assert "## Request-level batching: tuning" in text and "## Targets" in text and "Test CPU" in text
    for name in ("throughput.png", "latency.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_cell_that_completed_no_call_is_reported_not_crashed_on(tmp_path: Path) -> None:
    # A server cell in which no call finished (every call failed, or the window closed first) has no
    # client latencies, but its server-side profile is still there.
    silent = cell(
        "dates",
        "continuous",
        8,
        0.0,
        0.0,
        decoder_busy=0.2,
        encoder_busy=0.1,
        server_cpu_share=0.99,
        mean_rpc_s=0.004,
        mean_engine_s=0.003,
        mean_queue_s=0.001,
    )
    silent.update(p50_ms=None, p90_ms=None, p99_ms=None, ok=0, failures={"UNAVAILABLE": 12})
    results = [silent, cell("dates", "rpc-ceiling", 8, math.nan, 1000.0)]
    write_report(report(results, ("dates",)), tmp_path)
    text = (tmp_path / "bench.md").read_text()
    assert ("continuous", "8", "0", "0.0", "–", "–", "–", "–", "–", "0", "12") in table_rows(text)
    assert "4.00 ms in the server's handler, of which 3.00 ms in the engine (1.00 ms queued)" in text
    assert "client p50" not in text


def test_engine_targets_from_the_overhead_table_and_the_near_free_and_dates_cells(tmp_path: Path) -> None:
    overhead = [
        {
            "rows": rows,
            "beam": beam,
            "median_us": us,
            "p90_us": 2 * us,
            "per_row_us": us / rows,
            "requests_per_step": rows / 16,
        }
        for rows, beam, us in (
            (16, 1, 60.0),
            (64, 1, 100.0),
            (256, 1, 150.0),
            (16, 4, 300.0),
            (64, 4, 400.0),
            (256, 4, 700.0),
        )
    ]
    results = [
        cell("near-free", "continuous", 64, 50000, 5000, p50=0.5),
        cell("near-free", "rpc-ceiling", 64, math.nan, 6000),
        cell("near-free", "continuous", 1, 4000, 400, p50=0.9),
        cell("near-free", "rpc-ceiling", 1, math.nan, 2000, p50=0.4),
        cell("dates", "continuous", 64, 9000, 900),
        cell("dates", "engine-ceiling", 64, 30000, 3000),
        cell("dates", "rpc-ceiling", 64, math.nan, 6000),
    ]
    data = dict(report(results, ("near-free", "dates")), engine_overhead=overhead)
    checks = {check.target: check for check in check_targets(data)}
    at64 = checks["engine alone: <= 150 us per step at 64 greedy rows (zero-cost model)"]
    assert at64.met is True and at64.figure == "100 us"
    assert checks["engine alone: <= 400 us per step at 256 greedy rows (zero-cost model)"].met is True
    growth = checks["engine alone: the step at 256 greedy rows costs <= 2x the step at 16"]
    assert growth.met is False and growth.figure == "150 / 60 us = 2.50x"
    near_free = checks["near-free: continuous calls/s >= 80% of the no-op RPC ceiling's at 64 clients"]
    assert near_free.met is True and near_free.figure.endswith("= 83%")
    latency = checks["near-free: continuous p50 at 1 client <= 2x the no-op RPC ceiling's"]
    assert latency.met is False and latency.figure == "0.90 / 0.40 ms = 2.25x"
    dates = checks["dates: continuous calls/s >= 80% of the composed ceiling 1/(1/engine + 1/RPC) at 64 clients"]
    assert dates.met is False and "= 2000 calls/s = 45%" in dates.figure  # 1/(1/3000 + 1/6000) = 2000
    paths = write_report(data, tmp_path)
    assert "engine_overhead.png" in [path.name for path in paths]
    assert ("4", "256", "700", "1,400", "2.73", "16.0") in table_rows((tmp_path / "bench.md").read_text())
