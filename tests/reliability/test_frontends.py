"""`attnserve serve --frontends N`: the real server as a supervisor, one engine process and N gRPC front-end
processes on a loopback port. What a single-process server does, it does across processes: the same
answers, streaming, KServe v2, health, one queue limit per model, deadlines, cancellation, hot reload, one
/metrics page; and an engine process killed under load fails its calls with UNAVAILABLE (never a hang) and is
started again."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loadtests.procfs import child_processes
from loadtests.servers import serve_command
from service.gen.attnserve.v1 import translator_pb2 as pb
from service.gen.attnserve.v1 import translator_pb2_grpc as pb_grpc
from service.gen.inference import grpc_service_pb2 as kserve_pb
from service.gen.inference import grpc_service_pb2_grpc as kserve_pb_grpc
from tests.deploy.binaries import require_binary
from tests.reliability.reliability_support import copy_version, metric, metric_sum, scrape, wait_for
from tests.reliability.test_overload import burst, fire
from tests.service.server_harness import (
    PROJECT_ROOT,
    ServerThread,
    free_port,
    free_ports,
    make_settings,
    start_subprocess,
    wait_until_serving,
)

pytestmark = pytest.mark.slow

TEXTS = ["3 mars 1999", "samedi 21 novembre 2026", "14 juillet 1789", "1 janvier 2000"]
FRONTENDS = 2


class MultiProcessServer:
    """`attnserve serve --frontends N` as a child process, with its port and metrics URL."""

    def __init__(self, repository: Path, *extra: str, frontends: int = FRONTENDS) -> None:
        self.port, self.metrics_port, self.http_port = free_ports(3)
        # Output to a file, not a pipe: a test that reads it only at the end would block the processes'
        # logging once a pipe's buffer is full (a killed engine makes every front-end log).
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [
                *serve_command(repository, self.port, 0, "cpu", self.http_port),
                "--frontends",
                str(frontends),
                "--metrics-port",
                str(self.metrics_port),
                "--intra-op-threads",
                "1",
                "--max-queue-wait-ms",  # off, as in make_settings: refusals from a measured rate depend on speed
                "0",
                *extra,
            ],
            cwd=PROJECT_ROOT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.address = f"127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        # Serving once one front-end is; the supervisor logs this line once every process is up.
        wait_for(lambda: "attnserve listening on" in self.output(), what="every process to be ready")
        wait_until_serving(self.address, process=self.process)

    def output(self) -> str:
        """What the processes logged so far (the file's offset, shared with them, is left alone)."""
        descriptor = self.log.fileno()
        return os.pread(descriptor, os.fstat(descriptor).st_size, 0).decode("utf-8", "replace")

    def children(self, role: str) -> list[int]:
        """Process ids of the supervisor's children in `role` ('engine' or 'frontend')."""
        found = []
        for pid in child_processes(self.process.pid):
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"service.processes" in command and role.encode() in command:
                found.append(pid)
        return found

    def stop(self) -> tuple[int, str]:
        """SIGTERM, wait, and return the exit status and the output."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=90)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        return code, self.output()


@pytest.fixture(scope="module")
def multi(tiny_repository: Path) -> Iterator[MultiProcessServer]:
    server = MultiProcessServer(tiny_repository)
    yield server
    code, output = server.stop()
    assert code == 0, output[-3000:]


@pytest.fixture(scope="module")
def single(tiny_repository: Path) -> Iterator[ServerThread]:
    """The single-process server on the same repository: the reference for every answer."""
    server = ServerThread(make_settings(tiny_repository)).start()
    yield server
    assert server.stop() == 0


def _requests() -> list[pb.TranslateRequest]:
    return [
        pb.TranslateRequest(texts=TEXTS),
        pb.TranslateRequest(texts=TEXTS[:2], options=pb.DecodeOptions(beam_size=4, num_hypotheses=3)),
        pb.TranslateRequest(texts=TEXTS[2:], options=pb.DecodeOptions(return_attention=True)),
        pb.TranslateRequest(model="numbers", texts=["dreihundertzwölf", "quarante-deux"]),
    ]


def test_answers_are_those_of_the_single_process_server(multi: MultiProcessServer, single: ServerThread) -> None:
    with grpc.insecure_channel(multi.address) as left, grpc.insecure_channel(single.address) as right:
        many, one = pb_grpc.TranslatorStub(left), pb_grpc.TranslatorStub(right)
        for request in _requests():
            got, expected = many.Translate(request, timeout=30), one.Translate(request, timeout=30)
            assert (got.model, got.version) == (expected.model, expected.version)
            assert len(got.translations) == len(expected.translations)
            for mine, theirs in zip(got.translations, expected.translations, strict=True):
                assert [h.text for h in mine.hypotheses] == [h.text for h in theirs.hypotheses]
                assert [h.target_tokens for h in mine.hypotheses] == [h.target_tokens for h in theirs.hypotheses]
                assert [h.score for h in mine.hypotheses] == pytest.approx(
                    [h.score for h in theirs.hypotheses], abs=1e-5
                )
                for a, b in zip(mine.hypotheses, theirs.hypotheses, strict=True):
                    assert list(a.attention) == pytest.approx(list(b.attention), abs=1e-5)
        streamed = list(many.TranslateStream(pb.TranslateRequest(texts=TEXTS[1:2]), timeout=30))
        reference = list(one.TranslateStream(pb.TranslateRequest(texts=TEXTS[1:2]), timeout=30))
        assert [(m.token, m.text, m.final) for m in streamed] == [(m.token, m.text, m.final) for m in reference]
        assert len(streamed) > 2 and streamed[-1].final


def test_kserve_health_and_errors_cross_the_processes(multi: MultiProcessServer) -> None:
    with grpc.insecure_channel(multi.address) as channel:
        kserve = kserve_pb_grpc.GRPCInferenceServiceStub(channel)
        assert kserve.ServerReady(kserve_pb.ServerReadyRequest(), timeout=10).ready
        assert kserve.ModelReady(kserve_pb.ModelReadyRequest(name="dates"), timeout=10).ready
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "attnserve.v1.Translator", "dates", "numbers", "liveness"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        stub = pb_grpc.TranslatorStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Translate(pb.TranslateRequest(model="nope", texts=["x"]), timeout=10)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as raised:
            stub.Translate(pb.TranslateRequest(texts=["x"], options=pb.DecodeOptions(beam_size=99)), timeout=10)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "beam_size 99" in (raised.value.details() or "")


def test_http_is_served_by_every_frontend_on_the_shared_port(multi: MultiProcessServer, single: ServerThread) -> None:
    """Each request on a new connection (the kernel spreads them over the front-ends): the same answers as the
    single-process server's HTTP port, and each front-end counts the calls it served."""
    from google.protobuf import json_format

    from tests.service.http_client import call

    before = scrape(multi.metrics_url)
    base = f"http://127.0.0.1:{multi.http_port}"
    for request in _requests():
        body = json_format.MessageToDict(request)
        got = call("POST", f"{base}/v1/translate", body)
        expected = call("POST", f"{single.http_url}/v1/translate", body)
        assert got.status == expected.status == 200
        mine = json_format.Parse(got.body, pb.TranslateResponse())
        theirs = json_format.Parse(expected.body, pb.TranslateResponse())
        for a, b in zip(mine.translations, theirs.translations, strict=True):
            assert [h.text for h in a.hypotheses] == [h.text for h in b.hypotheses]
            assert [h.score for h in a.hypotheses] == pytest.approx([h.score for h in b.hypotheses], abs=1e-5)
    assert call("GET", f"{base}/v2/health/ready").json() == {"ready": True}
    missing = call("POST", f"{base}/v2/models/nope/infer", {"inputs": []})
    assert (missing.status, missing.json()["code"]) == (404, "NOT_FOUND")
    after = scrape(multi.metrics_url)
    served = metric_sum(after, "attnserve_requests_total", method="Translate", code="OK", protocol="http")
    assert served - metric_sum(before, "attnserve_requests_total", method="Translate", code="OK", protocol="http") == 4


def test_one_metrics_page_with_every_process(multi: MultiProcessServer) -> None:
    with grpc.insecure_channel(multi.address) as channel:
        stub = pb_grpc.TranslatorStub(channel)
        for _ in range(8):  # new connections: the kernel spreads them over the front-ends
            with grpc.insecure_channel(multi.address) as fresh:
                pb_grpc.TranslatorStub(fresh).Translate(pb.TranslateRequest(texts=TEXTS[:1]), timeout=30)
        stub.Translate(pb.TranslateRequest(texts=TEXTS[:1]), timeout=30)
    with urllib.request.urlopen(multi.metrics_url, timeout=10) as response:
        page = response.read().decode()
    # One valid exposition: every family once, each process's series told apart by their label.
    promtool = require_binary("promtool")
    checked = subprocess.run([promtool, "check", "metrics"], input=page, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    samples = scrape(multi.metrics_url)
    labels = {dict(key[1]).get("process") for key in samples if key[0] == "process_resident_memory_bytes"}
    assert labels == {"supervisor", "engine", *(f"frontend-{index}" for index in range(FRONTENDS))}
    # RPCs are counted by the front-ends, decoding by the engine; the engine's finished count covers every text.
    served = metric_sum(samples, "attnserve_requests_total", method="Translate", code="OK")
    assert served >= 9
    assert metric_sum(samples, "attnserve_requests_total", process="engine") == 0
    assert metric_sum(samples, "attnserve_finished_requests_total", process="engine") >= 9
    assert metric(samples, "attnserve_requests_waiting_limit", model="dates", version="1", process="engine") == 1024


def test_deadlines_and_abandoned_streams_are_answered_once(multi: MultiProcessServer) -> None:
    before = scrape(multi.metrics_url)
    with grpc.insecure_channel(multi.address) as channel:
        stub = pb_grpc.TranslatorStub(channel)
        # A stream the client abandons after its first token: cancelled in the engine, or finished there if
        # it was faster; either way the engine ends it exactly once.
        stream = stub.TranslateStream(pb.TranslateRequest(texts=[TEXTS[1]]))
        next(stream)
        stream.cancel()

        def ended_in_engine() -> bool:
            now = scrape(multi.metrics_url)
            return metric_sum(now, "attnserve_finished_requests_total", process="engine") > metric_sum(
                before, "attnserve_finished_requests_total", process="engine"
            )

        wait_for(ended_in_engine, what="the engine to end the abandoned stream")
        with pytest.raises(grpc.RpcError) as raised:
            stub.Translate(pb.TranslateRequest(texts=TEXTS * 16, options=pb.DecodeOptions(beam_size=8)), timeout=0.001)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert stub.Translate(pb.TranslateRequest(texts=TEXTS[:1]), timeout=30).translations[0].hypotheses
    after = scrape(multi.metrics_url)
    grown = metric_sum(after, "attnserve_finished_requests_total", process="engine") - metric_sum(
        before, "attnserve_finished_requests_total", process="engine"
    )
    # The stream, the call's texts that reached the engine before its deadline, and the last call's text.
    assert 2 <= grown <= 2 + len(TEXTS) * 16


def test_one_queue_limit_across_frontends(tiny_repository: Path) -> None:
    server = MultiProcessServer(tiny_repository, "--max-waiting-requests", "4", "--max-active-hypotheses", "8")
    try:
        # Calls on several connections (channels do not share one here), so that both front-ends receive some.
        channels = [
            grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(4)
        ]
        outcomes = []
        threads = []
        lock = threading.Lock()

        def run(channel: grpc.Channel, seed: int) -> None:
            ended = fire(pb_grpc.TranslatorStub(channel), burst(60, seed=seed))
            with lock:
                outcomes.extend(ended)

        for seed, channel in enumerate(channels):
            threads.append(threading.Thread(target=run, args=(channel, seed)))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(180)
        for channel in channels:
            channel.close()
        codes = {outcome.code for outcome in outcomes}
        assert len(outcomes) == 240 and codes <= {"OK", "RESOURCE_EXHAUSTED"}, [
            (outcome.code, outcome.details) for outcome in outcomes if outcome.code not in ("OK", "RESOURCE_EXHAUSTED")
        ]
        shed = [outcome for outcome in outcomes if outcome.code == "RESOURCE_EXHAUSTED"]
        assert shed and len(shed) < len(outcomes)
        for outcome in shed:
            assert outcome.details.startswith("model dates version 1 has ")
            assert outcome.details.endswith("the limit is 4; retry later")
    finally:
        code, output = server.stop()
    assert code == 0, output[-3000:]


def test_killed_engine_and_frontend_fail_calls_with_unavailable_and_come_back(tiny_repository: Path) -> None:
    server = MultiProcessServer(tiny_repository)
    outcomes: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def load(index: int) -> None:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.TranslatorStub(channel)
            while not stop.is_set():
                request = pb.TranslateRequest(texts=TEXTS, options=pb.DecodeOptions(beam_size=1 + index % 4))
                try:
                    stub.Translate(request, timeout=60)
                    code = "OK"
                except grpc.RpcError as error:
                    code = error.code().name
                with lock:
                    outcomes.append(code)

    try:
        engines = server.children("engine")
        assert len(engines) == 1 and len(server.children("frontend")) == FRONTENDS
        workers = [threading.Thread(target=load, args=(index,)) for index in range(6)]
        for worker in workers:
            worker.start()
        wait_for(lambda: outcomes.count("OK") >= 20, what="steady load")
        os.kill(engines[0], signal.SIGKILL)
        wait_for(lambda: "UNAVAILABLE" in outcomes, what="calls refused while the engine is down")
        with grpc.insecure_channel(server.address) as channel:  # what a liveness probe asks: the process answers
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="liveness"), timeout=10
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        wait_for(lambda: server.children("engine") not in ([], engines), what="a new engine process")
        wait_until_serving(server.address, process=server.process)
        served_before = len(outcomes)
        wait_for(lambda: outcomes[served_before:].count("OK") >= 10, what="calls served by the new engine")
        # A front-end killed under load: the calls it held fail (their connections reset), the other keeps
        # serving, and the supervisor starts it again.
        frontends = server.children("frontend")
        os.kill(frontends[0], signal.SIGKILL)
        wait_for(
            lambda: len(server.children("frontend")) == FRONTENDS and frontends[0] not in server.children("frontend"),
            what="a new front-end process",
        )
        served_before = len(outcomes)
        wait_for(lambda: outcomes[served_before:].count("OK") >= 10, what="calls served after the front-end restart")
        stop.set()
        for worker in workers:
            worker.join(90)
        assert not any(worker.is_alive() for worker in workers), "a call hung"
        assert set(outcomes) <= {"OK", "UNAVAILABLE"}, set(outcomes)
        samples = scrape(server.metrics_url)
        assert metric(samples, "attnserve_process_restarts_total", role="engine") == 1
        assert metric(samples, "attnserve_process_restarts_total", role="frontend") == 1
    finally:
        stop.set()
        code, output = server.stop()
    assert code == 0, output[-3000:]
    assert "lost the engine process" in output


def test_hot_reload_reaches_every_frontend(tiny_repository: Path, tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    for name in ("dates", "numbers"):
        copy_version(tiny_repository / name / "1", repository, name, 1)
    server = MultiProcessServer(repository, "--repository-poll-seconds", "0.2")
    try:
        copy_version(tiny_repository / "dates" / "1", repository, "dates", 2)

        def every_frontend_serves_version_2() -> bool:
            versions = set()
            for _ in range(12):  # fresh connections land on either front-end
                with grpc.insecure_channel(server.address) as channel:
                    reply = pb_grpc.TranslatorStub(channel).Translate(pb.TranslateRequest(texts=TEXTS[:1]), timeout=30)
                    versions.add(reply.version)
            return versions == {"2"}

        wait_for(every_frontend_serves_version_2, what="version 2 on every front-end")
    finally:
        code, output = server.stop()
    assert code == 0, output[-3000:]


def test_a_model_that_does_not_load_stops_the_start(tmp_path: Path) -> None:
    port = free_port()
    process = start_subprocess(tmp_path, port, "--frontends", "2")
    assert process.wait(timeout=60) == 1
    output = process.stdout.read().decode("utf-8", "replace") if process.stdout else ""
    assert "no models" in output, output
