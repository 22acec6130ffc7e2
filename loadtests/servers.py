"""Servers under test, each in its own process: start on a free loopback port, wait for health, read
Prometheus metrics, and stop (SIGTERM to the process we started, nothing else).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from loadtests.procfs import cpu_seconds

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (the OS picks it)."""
    return free_ports(1)[0]


def free_ports(count: int) -> tuple[int, ...]:
    """`count` different loopback TCP ports nobody listens on right now. Each is held until all are picked: ports
    picked one after another can repeat (a port closed is free again at once, and the OS may pick it next), and a
    server given the same port twice refuses to start."""
    with contextlib.ExitStack() as held:
        probes = [held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return tuple(int(probe.getsockname()[1]) for probe in probes)


def wait_until_serving(address: str, timeout_s: float = 120.0, process: subprocess.Popen | None = None) -> None:
    """Poll the gRPC health service until the whole server reports SERVING; raises RuntimeError otherwise."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the server exited with status {process.returncode} before serving")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"no SERVING health from {address} within {timeout_s:.0f} s")


@dataclass
class ServerProcess:
    """A server we started: its command, address, optional metrics URL and log file."""

    name: str
    command: list[str]
    port: int
    metrics_port: int = 0
    log_path: Path | None = None
    environment: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    cwd: Path = PROJECT_ROOT  # the checkout whose code the command runs (`python -m` imports from here)
    http_port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_address(self) -> str:
        """host:port of the HTTP port ('' when the server has none)."""
        return f"127.0.0.1:{self.http_port}" if self.http_port else ""

    @property
    def metrics_url(self) -> str | None:
        return f"http://127.0.0.1:{self.metrics_port}/metrics" if self.metrics_port else None

    def start(self, timeout_s: float = 180.0) -> ServerProcess:
        log = self.log_path.open("wb") if self.log_path else subprocess.DEVNULL
        environment = dict(os.environ, PYTHONUNBUFFERED="1", **self.environment)
        self.process = subprocess.Popen(
            self.command,
            cwd=self.cwd,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if not isinstance(log, int):
            log.close()  # the child keeps its own handle
        try:
            wait_until_serving(self.address, timeout_s, self.process)
        except RuntimeError as error:
            self.stop()
            tail = self.log_path.read_text(errors="replace")[-3000:] if self.log_path else ""
            raise RuntimeError(f"{self.name}: {error}\n{tail}") from None
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (the server drains), then SIGKILL after `timeout_s`; only this process."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the server has used so far, its child processes (front-ends, engine)
        included (Linux /proc; NaN elsewhere)."""
        return math.nan if self.process is None else cpu_seconds(self.process.pid)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve_command(repository: Path, port: int, metrics_port: int, provider: str, http_port: int = 0) -> list[str]:
    """`attnserve serve` (through the real CLI dispatch) on loopback: the start of every command line here. HTTP
    is off unless `http_port` is given (its default port would be shared by every server started here)."""
    return [
        sys.executable,
        "-m",
        "service.cli",
        "serve",
        "--model-repository",
        str(repository),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        "--http-port",
        str(http_port),
        "--provider",
        provider,
    ]


def attnserve_server(
    repository: Path,
    *,
    batching: str,
    threads: int,
    provider: str,
    log_dir: Path,
    extra: tuple[str, ...] = (),
    label: str = "",
    http: bool = False,
) -> ServerProcess:
    """`attnserve serve` with `--batching` on free loopback ports (gRPC and metrics; HTTP too with `http`)."""
    port, metrics_port, http_port = free_ports(3)
    http_port = http_port if http else 0
    command = [
        *serve_command(repository, port, metrics_port, provider, http_port),
        "--intra-op-threads",
        str(threads),
        "--inter-op-threads",
        "1",
        "--batching",
        batching,
        "--log-level",
        "WARNING",
        "--drain-grace-seconds",
        "5",
        *extra,
    ]
    name = label or f"attnserve-{batching}"
    return ServerProcess(name, command, port, metrics_port, log_dir / f"{name}.log", http_port=http_port)


def noop_server(log_dir: Path, extra: tuple[str, ...] = ()) -> ServerProcess:
    """The RPC ceiling (loadtests.noop_server) on a free loopback port; `extra`: more of its flags."""
    port = free_port()
    command = [sys.executable, "-m", "loadtests.noop_server", "--port", str(port), *extra]
    return ServerProcess("rpc-ceiling", command, port, 0, log_dir / "rpc-ceiling.log")


def eager_server(runs: dict[str, Path], *, threads: int, log_dir: Path, device: str = "cpu") -> ServerProcess:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "loadtests.eager_server",
        "--port",
        str(port),
        "--threads",
        str(threads),
        "--device",
        device,
    ]
    for name, run_dir in sorted(runs.items()):
        command += ["--model", f"{name}={run_dir}"]
    # torch's OpenMP pool must not spin on the cores the clients use.
    environment = {"OMP_NUM_THREADS": str(threads)}
    return ServerProcess("pytorch-eager", command, port, 0, log_dir / "pytorch-eager.log", environment)


# ----- Prometheus metrics ------------------------------------------------------------------------------


def scrape(url: str, timeout_s: float = 5.0) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page: (name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        text = response.read().decode("utf-8")
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return samples


def metric(samples: dict, name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels` (0.0 when there are none)."""
    wanted = set(labels.items())
    return sum(
        value
        for (sample_name, sample_labels), value in samples.items()
        if sample_name == name and wanted <= set(sample_labels)
    )


def shed_by_reason(samples: dict) -> Counter[str]:
    """The calls a server refused for overload (`attnserve_shed_calls_total`) by reason, over its other labels
    (model, version, protocol); between two scrapes, the difference of theirs."""
    refused: Counter[str] = Counter()
    for (name, labels), value in samples.items():
        if name == "attnserve_shed_calls_total" and value:
            refused[dict(labels)["reason"]] += int(value)
    return refused


@dataclass(frozen=True)
class EngineWindow:
    """Server-side figures of one model over a measurement window, from two scrapes of /metrics.

    `mean_decoder_rows`: hypotheses per decoder step; `decoder_busy`: fraction of the window the decoder
    step ran (seconds of steps / window seconds); `encoder_busy` likewise; `mean_rpc_s`: mean server time
    of a Translate call; `mean_engine_s`: mean engine time of a text (queue wait included);
    `mean_queue_s`: mean queue wait of a text; `mean_step_s`: mean wall time of one decoder step call;
    `steps`: decoder steps in the window.
    """

    mean_decoder_rows: float
    decoder_busy: float
    encoder_busy: float
    mean_rpc_s: float
    mean_engine_s: float
    mean_queue_s: float
    mean_step_s: float
    steps: float


def engine_window(before: dict, after: dict, model: str, window_s: float) -> EngineWindow:
    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    def ratio(numerator: float, denominator: float) -> float:
        return numerator / denominator if denominator > 0 else math.nan

    rows = delta("attnserve_decoder_batch_hypotheses_sum", model=model)
    steps = delta("attnserve_decoder_batch_hypotheses_count", model=model)
    return EngineWindow(
        mean_decoder_rows=ratio(rows, steps),
        decoder_busy=ratio(delta("attnserve_decoder_step_duration_seconds_sum", model=model), window_s),
        encoder_busy=ratio(delta("attnserve_encoder_duration_seconds_sum", model=model), window_s),
        mean_rpc_s=ratio(
            delta("attnserve_request_duration_seconds_sum", model=model, method="Translate"),
            delta("attnserve_request_duration_seconds_count", model=model, method="Translate"),
        ),
        mean_engine_s=ratio(
            delta("attnserve_engine_request_duration_seconds_sum", model=model),
            delta("attnserve_engine_request_duration_seconds_count", model=model),
        ),
        mean_queue_s=ratio(
            delta("attnserve_queue_wait_seconds_sum", model=model),
            delta("attnserve_queue_wait_seconds_count", model=model),
        ),
        mean_step_s=ratio(delta("attnserve_decoder_step_duration_seconds_sum", model=model), steps),
        steps=steps,
    )


def wait_until_idle(url: str | None, timeout_s: float = 60.0) -> None:
    """Wait until the server has no text waiting or running (cancelled calls leave at the next step)."""
    if url is None:
        time.sleep(0.2)
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        samples = scrape(url)
        if metric(samples, "attnserve_requests_waiting") + metric(samples, "attnserve_requests_running") == 0:
            return
        time.sleep(0.1)
