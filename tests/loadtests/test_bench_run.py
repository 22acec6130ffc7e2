"""`attnserve bench` end to end on the tiny models: every contender measured on the same workload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
    assert set(cells) == {(contender, level) for contender in CONTENDERS for level in (1, 3)}
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
    paths = write_report(report, tmp_path / "out")
    assert json.loads(paths[0].read_text())["workloads"] == {"dates": report["workloads"]["dates"]}


def test_bench_is_an_attnserve_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        attnserve(["bench", "--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_unknown_workload_is_refused(tmp_path: Path) -> None:
    args = build_parser().parse_args(["--workloads", "poetry"])
    with pytest.raises(SystemExit, match="poetry"):
        config_from_args(args)
