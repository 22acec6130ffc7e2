"""loadtests/reliability/false_refusals.py: the refusals it counts, read from scrapes
(loadtests.servers.shed_by_reason), and a whole run against a real server that it stops and continues mid-window."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtests import h2load
from loadtests.reliability import false_refusals
from loadtests.servers import shed_by_reason


def _shed(reason: str, protocol: str = "grpc") -> tuple[str, tuple[tuple[str, str], ...]]:
    labels = (("model", "dates"), ("version", "1"), ("reason", reason), ("protocol", protocol))
    return "attnserve_shed_calls_total", labels


def test_refusals_are_the_shed_counters_by_reason_and_between_scrapes_what_they_grew_by() -> None:
    before = {_shed("queue_wait"): 5.0, _shed("queue_full"): 2.0}
    after = {
        _shed("queue_wait"): 12.0,
        _shed("queue_wait", "http"): 3.0,  # a counter born between the scrapes counts from 0
        _shed("queue_full"): 2.0,  # did not grow
        ("attnserve_requests_total", (("code", "RESOURCE_EXHAUSTED"),)): 10.0,  # not a shed counter
    }
    assert shed_by_reason(after) == {"queue_wait": 15, "queue_full": 2}
    assert shed_by_reason(after) - shed_by_reason(before) == {"queue_wait": 10}


@pytest.mark.slow
@pytest.mark.skipif(not h2load.available(), reason=h2load.MISSING)
def test_a_run_pauses_a_real_server_and_prints_its_table(
    tiny_repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arguments = ["--repository", str(tiny_repository), "--servers", "1", "--warmup", "0.2", "--seconds", "1"]
    assert false_refusals.main([*arguments, "--in-flight", "8", "--pause", "0.3"]) == 0
    printed = capsys.readouterr().out
    assert "8 calls in flight, 0.2 s warm-up + 1 s counted, paused 0.3 s mid-window, 0 busy loops" in printed
    (row,) = [line for line in printed.splitlines() if line.startswith("| this checkout")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1] == "1"  # one server measured
    assert float(cells[2].replace(",", "")) > 0  # and it answered after the pause
