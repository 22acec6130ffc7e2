"""Scale-out on one machine: three `attnserve serve` replicas on loopback, and a client that balances over them
with round_robin and retries UNAVAILABLE (client.balancing, what deploy/k8s's headless Service is for). Under
load one replica receives SIGTERM and drains: no call fails, the replica exits 0, and every replica's own request
counter shows the load was spread."""

from __future__ import annotations

import signal
import subprocess
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from client.balancing import balanced_channel_options, service_config
from service.gen.attnserve.v1 import translator_pb2 as pb
from service.gen.attnserve.v1 import translator_pb2_grpc as pb_grpc
from service.grpc_api.server import _connection_age_options
from tests.service.server_harness import (
    ServerThread,
    free_ports,
    make_settings,
    start_subprocess,
    wait_for,
    wait_until_serving,
)

pytestmark = pytest.mark.slow

DATES = ["samedi 21 novembre 2026", "3 mars 1999", "14 juillet 1789", "1 janvier 2000", "mardi 5 mai 2015"]
WORKERS = 6
MAX_CALLS = 4000  # the load stops by itself even if a wait below never ends
CALLS_PER_REPLICA_BEFORE_SIGTERM = 25
CALLS_AFTER_EXIT = 150


@dataclass
class Replica:
    """One server process, its ports, and everything it printed (read by a thread so the pipe never fills)."""

    port: int
    metrics_port: int
    process: subprocess.Popen[bytes]
    output: list[str] = field(default_factory=list)

    def start_reading(self) -> None:
        def read() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                self.output.append(line.decode(errors="replace"))

        threading.Thread(target=read, name=f"replica-{self.port}-output", daemon=True).start()

    def translated(self) -> float:
        """Translate calls this replica answered OK, from its own /metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "attnserve_requests"
            for sample in family.samples
            if sample.name == "attnserve_requests_total"
            and sample.labels.get("method") == "Translate"
            and sample.labels.get("code") == "OK"
        )


class Load:
    """WORKERS threads sending Translate calls through one balanced channel until stopped (or MAX_CALLS)."""

    def __init__(self, stub: pb_grpc.TranslatorStub) -> None:
        self._stub = stub
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.successes = 0
        self.failures: list[str] = []
        self._threads = [threading.Thread(target=self._work, args=(i,), daemon=True) for i in range(WORKERS)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _work(self, worker: int) -> None:
        for call in range(MAX_CALLS // WORKERS):
            if self._stop.is_set():
                return
            request = pb.TranslateRequest(model="dates", texts=[DATES[(worker + call) % len(DATES)]])
            try:
                response = self._stub.Translate(request, timeout=30)
                assert len(response.translations) == 1
                with self._lock:
                    self.successes += 1
            except grpc.RpcError as error:
                with self._lock:
                    self.failures.append(f"{error.code().name}: {error.details()}")


def test_service_config_balances_and_retries_only_unavailable() -> None:
    config = service_config()
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = config["methodConfig"]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert 2 <= method["retryPolicy"]["maxAttempts"] <= 5
    with pytest.raises(ValueError, match="max_attempts=9"):
        service_config(max_attempts=9)


def test_servers_age_out_connections_so_clients_re_resolve(tiny_repository: Path) -> None:
    assert _connection_age_options(make_settings(tiny_repository)) == []  # 0 (the default): never
    settings = make_settings(tiny_repository, max_connection_age_seconds=1.0, drain_grace_seconds=2.0)
    assert dict(_connection_age_options(settings)) == {
        "grpc.max_connection_age_ms": 1000,
        "grpc.max_connection_age_grace_ms": 2000,
    }
    server = ServerThread(settings).start()
    try:
        states: list[grpc.ChannelConnectivity] = []
        aged_out = threading.Event()

        def watch(state: grpc.ChannelConnectivity) -> None:
            states.append(state)
            if state is grpc.ChannelConnectivity.IDLE and grpc.ChannelConnectivity.READY in states:
                aged_out.set()

        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.TranslatorStub(channel)
            channel.subscribe(watch, try_to_connect=True)
            stub.Translate(pb.TranslateRequest(model="dates", texts=[DATES[0]]), timeout=30)
            # The server's GOAWAY after ~1 s drops the connection: the channel goes IDLE (and would re-resolve).
            assert aged_out.wait(30), states
            # The next call simply connects again.
            assert stub.Translate(pb.TranslateRequest(model="dates", texts=[DATES[1]]), timeout=30).translations
            channel.unsubscribe(watch)
    finally:
        assert server.stop() == 0


def test_sigterm_under_load_loses_no_call_and_load_is_spread(tiny_repository: Path) -> None:
    replicas: list[Replica] = []
    channel: grpc.Channel | None = None
    try:
        for _ in range(3):
            port, metrics_port = free_ports(2)
            process = start_subprocess(
                tiny_repository,
                port,
                "--metrics-port",
                str(metrics_port),
                "--intra-op-threads",
                "1",
                "--drain-grace-seconds",
                "10",
                "--log-level",
                "INFO",
            )
            replica = Replica(port, metrics_port, process)
            replica.start_reading()
            replicas.append(replica)
        for replica in replicas:
            wait_until_serving(f"127.0.0.1:{replica.port}", timeout_s=120, process=replica.process)

        target = "ipv4:" + ",".join(f"127.0.0.1:{replica.port}" for replica in replicas)
        channel = grpc.insecure_channel(target, options=balanced_channel_options())
        load = Load(pb_grpc.TranslatorStub(channel))
        load.start()

        wait_for(
            lambda: all(r.translated() >= CALLS_PER_REPLICA_BEFORE_SIGTERM for r in replicas), "load on every replica"
        )
        before = [replica.translated() for replica in replicas]
        victim, survivors = replicas[-1], replicas[:-1]
        victim.process.send_signal(signal.SIGTERM)  # while the load goes on
        exit_code = victim.process.wait(timeout=60)
        successes_at_exit = load.successes
        wait_for(
            lambda: load.successes >= successes_at_exit + CALLS_AFTER_EXIT or bool(load.failures),
            "the survivors carrying the load",
        )
        load.stop()

        assert load.failures == [], f"{len(load.failures)} calls failed, e.g. {load.failures[:3]}"
        assert exit_code == 0, "".join(victim.output)
        assert "draining" in "".join(victim.output)
        # Round robin spread the calls: each of the three took a fair share before the SIGTERM ...
        total = sum(before)
        assert all(count >= 0.1 * total for count in before), before
        # ... and the survivors took the victim's share after it left.
        after = [replica.translated() for replica in survivors]
        assert all(later > earlier for later, earlier in zip(after, before, strict=False)), (before, after)
        assert sum(after) - sum(before[:-1]) >= CALLS_AFTER_EXIT
    finally:
        if channel is not None:
            channel.close()
        for replica in replicas:
            if replica.process.poll() is None:
                replica.process.terminate()
                try:
                    replica.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    replica.process.kill()
                    replica.process.wait()
