"""`attnserve bench` end to end on the tiny models: every contender measured on the same workload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtests import h2load
from loadtests.bench import CONTENDERS, Bench, build_parser, config_from_args
from loadtests.report import write_report
from service.cli import main as attnserve

pytestmark = pytest.mark.slow  # trains models or starts servers


@pytest.mark.slow
def test_bench_measures_every_contender(tiny_repository: Path, tmp_path: Path) -> None:
    args = build_parser().parse_args(
        [
            "--repository",
            str(tiny_repository),
            "--runs",
            str(tiny_repository.parent / "runs"),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out",
            str(tmp_path / "out"),
            "--workloads",
            "dates",
            "--levels",
            "1,3",
            "--warmup",
            "0.1",
            "--duration",
            "0.5",
            "--texts",
            "30",
            "--request-batch-sizes",
            "2,8",
            "--request-batch-delays-ms",
            "0",
            "--tune-duration",
            "0.3",
            "--ceiling-seconds",
            "0.1",
            "--client-processes",
            "1",
        ]
    )
    config = config_from_args(args)
    assert config.levels == (1, 3) and not config.phrasebook
    report = Bench(config, log=lambda _line: None).run()
    cells = {(cell["contender"], cell["level"]): cell for cell in report["results"]}
    per_level = [contender for contender in CONTENDERS if contender != "cpu-per-call"]  # a section of its own
    assert set(cells) == {(contender, level) for contender in per_level for level in (1, 3)}
    for (contender, level), cell in cells.items():
        assert cell["workload"] == "dates"
        assert not cell["failures"], (contender, level, cell["failures"])
        assert cell["requests_per_s"] > 0
        if contender not in ("rpc-ceiling",):
            assert cell["tokens_per_s"] > 0 and cell["percent_of_peak"] > 0
    assert cells[("engine-ceiling", 3)]["mean_decoder_rows"] == 3
    assert cells[("continuous", 3)]["mean_decoder_rows"] >= 1
    assert cells[("pytorch-eager", 3)]["mean_decoder_rows"] == 1
    assert cells[("roofline", 1)]["percent_of_peak"] == 100
    # Request-level batching was tuned over the grid, per level, then measured again with the full window.
    assert [entry["level"] for entry in report["request_tuning"]] == [1, 3]
    assert all(len(entry["trials"]) == 2 for entry in report["request_tuning"])
    assert cells[("request", 3)]["details"]["batch_size"] in (2, 8)
    # The cpu-per-call section: h2load against the no-op server and attnserve's defaults, one process and
    # --frontends 1, with every bar of the issue judged.
    if h2load.available():
        (entry,) = report["call_cost"]
        assert entry["model"] == "dates" and 0 < entry["rate"] <= 800
        servers = {figures["server"]: figures for figures in entry["servers"]}
        assert list(servers) == ["no-op", "attnserve", "attnserve --frontends 1"]
        for figures in servers.values():
            assert figures["calls_per_s_64"] > 0 and figures["p50_ms_1"] > 0 and figures["errors"] == 0
            assert figures["cpu_us_per_call"] > 0 and figures["cpu_calls"] > 0
        assert entry["composed_ceiling"] > 0 and entry["latency_floor_ms"] > 0
    else:
        assert report["call_cost"] == [] and "h2load" in report["call_cost_skipped"]
    paths = write_report(report, tmp_path / "out")
    document = json.loads(paths[0].read_text())
    assert document["workloads"] == {"dates": report["workloads"]["dates"]}
    judged = [target for target in document["targets"] if target["target"].startswith("dates, attnserve")]
    assert len(judged) == (6 if h2load.available() else 0)
    assert all(target["met"] in (True, False) for target in judged)


def test_bench_is_an_attnserve_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        attnserve(["bench", "--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_unknown_workload_is_refused(tmp_path: Path) -> None:
    args = build_parser().parse_args(["--workloads", "poetry"])
    with pytest.raises(SystemExit, match="poetry"):
        config_from_args(args)
