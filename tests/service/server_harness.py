"""Run a real attnserve server (the same `service.server.serve`) on a free loopback port, for tests.

In-process: the server's event loop runs on a background thread, so tests use the ordinary
synchronous grpc client. Out-of-process: `start_subprocess` runs `python -m service.cli serve`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc

# The same helpers the load tools use, re-exported for the tests (metric_sum: the sum over the samples whose
# labels include the given ones).
from loadtests.servers import free_port, free_ports, serve_command, wait_until_serving
from loadtests.servers import metric as metric_sum
from loadtests.servers import scrape as _scrape_page
from service import event_loop
from service.gen.attnserve.v1 import translator_pb2 as pb
from service.gen.attnserve.v1 import translator_pb2_grpc as pb_grpc
from service.server import serve
from service.settings import Settings

__all__ = [
    "PROJECT_ROOT",
    "ServerThread",
    "free_port",
    "free_ports",
    "has_sample",
    "make_settings",
    "metric",
    "metric_sum",
    "scrape",
    "serve_once",
    "start_subprocess",
    "wait_for",
    "wait_until_serving",
    "with_settings",
]

PROJECT_ROOT = Path(__file__).resolve().parents[2]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    """Every sample of a server's /metrics page: (name, sorted labels) -> value."""
    return _scrape_page(url, timeout_s=10.0)


def metric(samples: Samples, name: str, **labels: str) -> float:
    """The value of the one sample with exactly these labels (0.0 when absent)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def has_sample(samples: Samples, name: str, **labels: str) -> bool:
    return (name, tuple(sorted(labels.items()))) in samples


def make_settings(repository: Path, **overrides: object) -> Settings:
    """Settings for a loopback test server with free gRPC, HTTP and metrics ports."""
    port, metrics_port, http_port = free_ports(3)
    values: dict[str, object] = dict(
        model_repository=repository,
        host="127.0.0.1",
        port=port,
        metrics_port=metrics_port,
        http_port=http_port,
        provider="cpu",
        intra_op_threads=1,
        drain_grace_seconds=10.0,
        log_level="WARNING",
        # Admission's wait bound refuses from a measured drain rate, which depends on the machine's speed: off
        # unless a test is about it (tests/reliability/test_overload_admission.py sets it).
        max_queue_wait_ms=0.0,
    )
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


class ServerThread:
    """`serve(settings)` on its own event loop in a daemon thread; `stop()` drains it like SIGTERM."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.exit_code: int | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="attnserve-test-server", daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.settings.port}"

    @property
    def http_url(self) -> str:
        """The HTTP port's base URL (no trailing slash)."""
        return f"http://127.0.0.1:{self.settings.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.metrics_port}/metrics"

    def start(self, timeout_s: float = 60.0) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError(f"the test server did not start within {timeout_s} s (error: {self._error!r})")
        if self._error is not None or self.exit_code is not None:
            raise RuntimeError(f"the test server failed to start: exit {self.exit_code}, error {self._error!r}")
        return self

    def request_stop(self) -> None:
        """Begin draining (as SIGTERM would) without waiting."""
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """Drain, wait for the server to finish, and return its exit status."""
        if self._thread.is_alive():
            self.request_stop()
            self._thread.join(timeout_s)
        return self.exit_code

    def _run(self) -> None:
        async def main() -> int:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            return await serve(self.settings, stop=self._stop, on_ready=lambda _port: self._ready.set())

        try:
            # On the loop the settings choose, as `attnserve serve` runs it (uvloop's by default).
            self.exit_code = event_loop.run(main(), self.settings.event_loop)
        except BaseException as error:  # surfaced by start()
            self._error = error
        finally:
            self._ready.set()


def wait_for(condition: Callable[[], object], what: str, timeout_s: float = 60.0, interval_s: float = 0.05) -> None:
    """Poll `condition` until it is true; fail the test after `timeout_s` seconds.

    For conditions the test cannot be told about (a metric, another process, an external tool): the
    timeout is a generous bound on a hang, never a measurement, and nothing is asserted about how long
    the wait took."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def with_settings(settings: Settings, **changes: object) -> Settings:
    return Settings(**{**dict(settings), **changes})


def start_subprocess(repository: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    """`attnserve serve` (through the real CLI dispatch) as a child process; stdout+stderr piped."""
    environment = dict(os.environ, PYTHONUNBUFFERED="1")
    command = [*serve_command(repository, port, 0, "cpu"), *extra]
    return subprocess.Popen(
        command, cwd=PROJECT_ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


SERVE_ONCE_TEXTS = ["samedi 21 novembre 2026", "3 mars 1999", "14 juillet 1789"]
"""What `serve_once` translates (the `dates` model's inputs)."""


def serve_once(
    repository: Path, *flags: str, while_serving: Callable[[subprocess.Popen[bytes]], None] | None = None
) -> tuple[list[str], str]:
    """`attnserve serve` as a child process with `flags`: the best translation of each of SERVE_ONCE_TEXTS, and its
    output once SIGTERM has drained it (exit status 0 asserted). `while_serving(process)` runs once it serves."""
    port = free_port()
    process = start_subprocess(repository, port, *flags)
    try:
        wait_until_serving(f"127.0.0.1:{port}", process=process)
        if while_serving is not None:
            while_serving(process)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            request = pb.TranslateRequest(texts=SERVE_ONCE_TEXTS)
            response = pb_grpc.TranslatorStub(channel).Translate(request, timeout=30)
        texts = [translation.hypotheses[0].text for translation in response.translations]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return texts, process.stdout.read().decode("utf-8", "replace") if process.stdout else ""
