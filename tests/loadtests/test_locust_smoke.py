"""The Locust load test, headless, against live servers: every call kind reported, thresholds enforced."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests.servers import PROJECT_ROOT, attnserve_server, noop_server
from loadtests.workload import WorkloadItem, read_workload, write_workload

pytestmark = pytest.mark.slow  # trains models or starts servers


def run_locust(host: str, out: Path, workload: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(PROJECT_ROOT / "loadtests" / "locustfile.py"),
        "--headless",
        "--host",
        host,
        "--users",
        "4",
        "--spawn-rate",
        "4",
        "--run-time",
        "5s",
        "--stop-timeout",
        "10",
        "--csv",
        str(out / "locust"),
        "--html",
        str(out / "report.html"),
        "--only-summary",
        "--workload",
        str(workload),
        *extra,
    ]
    return subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)


def test_locust_reports_every_call_kind_against_attnserve(tiny_repository: Path, tmp_path: Path) -> None:
    workload = tmp_path / "workload.jsonl"  # missing: the locustfile generates it for the served models
    with attnserve_server(
        tiny_repository, batching="continuous", threads=1, provider="cpu", log_dir=tmp_path
    ) as server:
        completed = run_locust(
            server.address,
            tmp_path,
            workload,
            "--max-fail-ratio",
            "0",
            "--greedy-weight",
            "1",
            "--beam-weight",
            "1",
            "--stream-weight",
            "1",
        )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert {item.model for item in read_workload(workload)} == {"dates", "numbers"}
    with (tmp_path / "locust_stats.csv").open() as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    names = set(rows)
    assert any(name.startswith("Translate ") and name.endswith("greedy") for name in names)
    assert any(name.endswith("beam4") for name in names)
    assert any(name.startswith("TranslateStream ") and name.endswith("(first token)") for name in names)
    assert int(rows["Aggregated"]["Request Count"]) > 0 and int(rows["Aggregated"]["Failure Count"]) == 0
    assert (tmp_path / "report.html").stat().st_size > 10000


def test_locust_exits_nonzero_over_the_latency_threshold(tmp_path: Path) -> None:
    workload = tmp_path / "workload.jsonl"
    write_workload(workload, [WorkloadItem("noop", "hello")])
    with noop_server(tmp_path) as server:
        completed = run_locust(server.address, tmp_path, workload, "--max-p99-ms", "0.0001")
    assert completed.returncode == 1
    assert "p99 latency" in completed.stdout + completed.stderr


def test_failed_calls_carry_their_status_code(tiny_repository: Path, tmp_path: Path) -> None:
    workload = tmp_path / "workload.jsonl"
    # Far beyond the tiny model's source limit: every call is refused with INVALID_ARGUMENT.
    write_workload(workload, [WorkloadItem("dates", "1" * 500)])
    with attnserve_server(
        tiny_repository, batching="continuous", threads=1, provider="cpu", log_dir=tmp_path
    ) as server:
        completed = run_locust(server.address, tmp_path, workload, "--max-fail-ratio", "0", "--stream-weight", "0")
    assert completed.returncode == 1
    with (tmp_path / "locust_failures.csv").open() as handle:
        errors = [row["Error"] for row in csv.DictReader(handle)]
    assert errors and all(error.startswith("INVALID_ARGUMENT") for error in errors)
