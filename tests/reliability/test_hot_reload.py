"""Hot reload on a real server under traffic: new versions are loaded, warmed up and switched to with
zero failed calls while the old version drains; broken versions are reported and never served; removing
the newest version rolls back; a model that appears is served.

The server scans its repository every 0.2 s here (repository_poll_seconds). Versions are published the
way `attnserve export` does it: written to a hidden folder, then renamed into place.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.gen.attnserve.v1 import translator_pb2 as pb
from service.gen.attnserve.v1 import translator_pb2_grpc as pb_grpc
from tests.reliability.reliability_support import (
    CallOutcome,
    Traffic,
    copy_version,
    has_sample,
    metric,
    metric_sum,
    outcome_of,
    scrape,
    wait_for,
)
from tests.service.server_harness import ServerThread, make_settings

pytestmark = pytest.mark.slow

TEXTS = ["3 mars 1999", "1 janvier 2000", "samedi 21 novembre 2026", "14 juillet 1789", "5 mai 2015"]
DATES = {"model": "dates"}


@pytest.fixture()
def repository(tiny_repository: Path, tmp_path: Path) -> Path:
    """A fresh repository holding dates version 1 only (each test changes it)."""
    root = tmp_path / "repository"
    copy_version(tiny_repository / "dates" / "1", root, "dates", 1)
    return root


@pytest.fixture()
def server(repository: Path) -> Iterator[ServerThread]:
    running = ServerThread(make_settings(repository, repository_poll_seconds=0.2, drain_grace_seconds=20.0)).start()
    yield running
    assert running.stop() == 0


def start_traffic(address: str, threads: int = 3) -> tuple[Traffic, grpc.Channel]:
    """Unary calls (greedy and beam) and streaming calls to the latest dates version, in a loop."""
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.TranslatorStub(channel)

    def one(index: int) -> CallOutcome:
        text = TEXTS[index % len(TEXTS)]
        if index % 3 == 2:
            request = pb.TranslateRequest(model="dates", texts=[text])
            return outcome_of(lambda: _final(stub.TranslateStream(request, timeout=30)), [text])
        options = pb.DecodeOptions(beam_size=1 + index % 4)
        request = pb.TranslateRequest(model="dates", texts=[text], options=options)
        return outcome_of(lambda: stub.Translate(request, timeout=30), [text])

    return Traffic(one, threads=threads).start(), channel


def _final(messages: Iterator[pb.TranslateStreamResponse]) -> pb.TranslateStreamResponse:
    *_, last = messages
    assert last.final
    return last


def served_versions(traffic: Traffic) -> set[str]:
    return {outcome.version for outcome in traffic.snapshot() if outcome.code == "OK"}


def failures(outcomes: list[CallOutcome]) -> list[CallOutcome]:
    return [outcome for outcome in outcomes if outcome.code != "OK"]


def test_a_new_version_is_swapped_in_under_traffic_without_a_failed_call(
    server: ServerThread, repository: Path, tiny_repository: Path
) -> None:
    traffic, channel = start_traffic(server.address)
    try:
        wait_for(lambda: traffic.count(lambda o: o.version == "1") >= 30, what="traffic on version 1")
        copy_version(tiny_repository / "dates" / "1", repository, "dates", 2)
        wait_for(lambda: traffic.count(lambda o: o.version == "2") >= 30, what="traffic on version 2")
        outcomes = traffic.stop()
    finally:
        traffic.stop()
        channel.close()
    assert failures(outcomes) == []
    assert {outcome.version for outcome in outcomes} == {"1", "2"}

    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.TranslatorStub(channel)
        model = stub.GetModel(pb.GetModelRequest(name="dates"), timeout=10)
        assert (model.version, list(model.versions), list(model.loaded_versions)) == ("2", ["1", "2"], ["2"])
        with pytest.raises(grpc.RpcError) as retired:
            stub.Translate(pb.TranslateRequest(model="dates", version="1", texts=TEXTS[:1]), timeout=10)
        assert retired.value.code() == grpc.StatusCode.NOT_FOUND
        assert "version 1 is in the repository but not loaded" in (retired.value.details() or "")

    def drained() -> bool:
        samples = scrape(server.metrics_url)
        return metric(samples, "attnserve_model_version_retirements_total", **DATES) == 1 and not has_sample(
            samples, "attnserve_requests_waiting", model="dates", version="1"
        )

    wait_for(drained, what="version 1 to drain and stop")
    samples = scrape(server.metrics_url)
    # The old version drained: every text it accepted finished with a result (none cancelled or failed).
    on_v1 = sum(1 for outcome in outcomes if outcome.version == "1")
    assert metric_sum(samples, "attnserve_finished_requests_total", model="dates", version="1") == on_v1
    for reason in ("cancelled", "deadline", "error"):
        assert metric(samples, "attnserve_finished_requests_total", model="dates", version="1", reason=reason) == 0
    info = {
        "provider": "CPUExecutionProvider",
        "intra_op_threads": "1",
        "spinning": "false",
        "encoder_overlap": "false",
    }
    assert not has_sample(samples, "attnserve_model_info", model="dates", version="1", **info)
    assert has_sample(samples, "attnserve_model_info", model="dates", version="2", **info)
    assert metric_sum(samples, "attnserve_model_load_failures_total") == 0


def _corrupt_decoder(folder: Path) -> None:
    (folder / "decoder.onnx").write_bytes(b"this is not an ONNX graph" * 100)


def _remove_encoder(folder: Path) -> None:
    (folder / "encoder.onnx").unlink()


def test_broken_versions_are_reported_and_never_served_and_the_previous_keeps_serving(
    server: ServerThread, repository: Path, tiny_repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service.models")
    dates = tiny_repository / "dates" / "1"
    numbers_tokenizer = tiny_repository / "numbers" / "1" / "source.tokenizer.json"
    traffic, channel = start_traffic(server.address)
    try:
        wait_for(lambda: traffic.count(lambda o: o.version == "1") >= 20, what="traffic on version 1")
        copy_version(dates, repository, "dates", 2, prepare=_corrupt_decoder)
        copy_version(dates, repository, "dates", 3, prepare=_remove_encoder)
        copy_version(
            dates,
            repository,
            "dates",
            4,
            prepare=lambda folder: shutil.copyfile(numbers_tokenizer, folder / "source.tokenizer.json"),
        )

        def all_reported() -> bool:
            samples = scrape(server.metrics_url)
            return all(
                metric(samples, "attnserve_model_load_failures_total", model="dates", version=str(version)) >= 1
                for version in (2, 3, 4)
            )

        wait_for(all_reported, what="the three broken versions to be reported")
        seen = len(traffic.snapshot())
        wait_for(lambda: len(traffic.snapshot()) >= seen + 30, what="traffic after the failed loads")
        # A failed version is not retried while its files stay as they are.
        scans_later = scrape(server.metrics_url)
        for version in (2, 3, 4):
            assert metric(scans_later, "attnserve_model_load_failures_total", model="dates", version=str(version)) == 1
        assert served_versions(traffic) == {"1"}

        # Fixing version 3 in place (the missing file arrives) makes it load and take over.
        shutil.copyfile(dates / "encoder.onnx", repository / "dates" / "3" / "encoder.onnx")
        wait_for(lambda: traffic.count(lambda o: o.version == "3") >= 20, what="traffic on the repaired version 3")
        outcomes = traffic.stop()
    finally:
        traffic.stop()
        channel.close()
    assert failures(outcomes) == []
    assert {outcome.version for outcome in outcomes} == {"1", "3"}

    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.TranslatorStub(channel)
        for version, why in (("2", "cannot load ONNX graphs"), ("4", "source tokenizer has")):
            with pytest.raises(grpc.RpcError) as broken:
                stub.Translate(pb.TranslateRequest(model="dates", version=version, texts=TEXTS[:1]), timeout=10)
            assert broken.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert f"model dates version {version} failed to load" in (broken.value.details() or "")
            assert why in (broken.value.details() or "")
    logged = "\n".join(record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR)
    for version in (2, 3, 4):
        assert f"model dates version {version} is not served" in logged


def test_removing_the_newest_version_rolls_back_and_a_new_model_is_served(
    server: ServerThread, repository: Path, tiny_repository: Path
) -> None:
    copy_version(tiny_repository / "dates" / "1", repository, "dates", 2)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.TranslatorStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        def latest() -> str:
            return stub.Translate(pb.TranslateRequest(model="dates", texts=TEXTS[:1]), timeout=10).version

        wait_for(lambda: latest() == "2", what="version 2 to serve")
        traffic, traffic_channel = start_traffic(server.address)
        try:
            shutil.rmtree(repository / "dates" / "2")  # the rollout is called off: back to version 1
            wait_for(lambda: traffic.count(lambda o: o.version == "1") >= 20, what="traffic back on version 1")
            # Removing every version keeps the last one serving from memory rather than dropping the model.
            shutil.rmtree(repository / "dates" / "1")
            seen = len(traffic.snapshot())
            wait_for(lambda: len(traffic.snapshot()) >= seen + 30, what="traffic after the repository emptied")
            outcomes = traffic.stop()
        finally:
            traffic.stop()
            traffic_channel.close()
        assert failures(outcomes) == []
        assert latest() == "1"

        with pytest.raises(grpc.RpcError) as unknown:
            stub.Translate(pb.TranslateRequest(model="numbers", texts=["quarante-deux"]), timeout=10)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        copy_version(tiny_repository / "numbers" / "1", repository, "numbers", 1)

        def numbers_serving() -> bool:
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(service="numbers"), timeout=5)
            except grpc.RpcError:
                return False
            return reply.status == health_pb2.HealthCheckResponse.SERVING

        wait_for(numbers_serving, what="the new model to be SERVING")
        response = stub.Translate(pb.TranslateRequest(model="numbers", texts=["quarante-deux"]), timeout=10)
        assert (response.model, response.version) == ("numbers", "1")
        assert [model.name for model in stub.ListModels(pb.ListModelsRequest(), timeout=10).models] == [
            "dates",
            "numbers",
        ]
