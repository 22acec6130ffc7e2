"""`attnserve serve --frontends N`: one engine process, N gRPC front-end processes, and the supervisor over them.

The supervisor (the process started by `attnserve serve`) holds the gRPC port, starts the engine process and
then the front-ends, and waits for their exits:
- The engine process loads the repository, runs one scheduler per model version (exactly as a single-process
  server does) and serves the front-ends on a Unix socket in a private directory.
- Each front-end binds the gRPC port with SO_REUSEPORT (the kernel spreads connections over them) and runs the
  gRPC API, validation, tokenizing and detokenizing, with the engine's schedulers behind a client
  (service/ipc/frontend_side.py).
- A process that exits on its own is started again (with a growing pause); meanwhile the front-ends answer
  UNAVAILABLE and report NOT_SERVING, and calls that were in the engine get UNAVAILABLE at once. An engine
  that fails its very first start (no model loads) stops the whole server with its exit status.
- SIGTERM/SIGINT: the front-ends drain first (no admitted call is lost), then the engine stops. SIGHUP goes
  to the engine, which scans the repository.
- /metrics on metrics_port is the supervisor's: every process's series, each with a `process` label
  ('engine', 'frontend-0', ...), read from the children's loopback endpoints when scraped.

Each child is `python -m service.ipc.processes ROLE RUNTIME_DIR SUPERVISOR_PID -- <the serve flags>`: it reads
the same flags and environment, so every process holds the same settings. It prints one JSON line on stdout once
ready, and stops when the supervisor dies, however it died.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, ProcessCollector, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from service.settings import Settings, SettingsError

log = logging.getLogger("attnserve.processes")

ENGINE_SOCKET = "engine.sock"
RESTART_FIRST_S = 0.5
RESTART_LONGEST_S = 30.0
STABLE_AFTER_S = 60.0
"""A child that ran this long before it exited is restarted after the shortest pause again."""
SCRAPE_TIMEOUT_S = 2.0
PR_SET_PDEATHSIG = 1  # prctl(2)
STOP_MARGIN_S = 5.0
"""How long past the drain grace the whole shutdown may take before the children still running are killed."""
ENGINE_STOP_S = 2.0
"""The part of that budget kept for the engine, which stops last and has nothing in flight by then."""


# ----- the children ------------------------------------------------------------------------------------------


def _announce(**ready: object) -> None:
    """Tell the supervisor this process is ready (one JSON line on stdout)."""
    sys.stdout.write(json.dumps(ready) + "\n")
    sys.stdout.flush()


def _stop_event() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, stop.set)
    return stop


async def run_engine(settings: Settings, runtime_dir: Path) -> int:
    """The engine process: load the repository, serve the front-ends on the Unix socket until SIGTERM."""
    from service.ipc.engine_side import EngineEndpoint
    from service.metrics import ServerMetrics
    from service.models import ModelManager
    from service.server import start_models

    metrics = ServerMetrics()
    manager = ModelManager(settings, metrics)
    if not await start_models(manager):
        return 1
    endpoint = EngineEndpoint(manager)
    socket_path = runtime_dir / ENGINE_SOCKET
    socket_path.unlink(missing_ok=True)  # left by an engine process that died
    await endpoint.start(socket_path)
    stop = _stop_event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, manager.refresh_soon, "SIGHUP")
    metrics_port = metrics.serve(0, "127.0.0.1") if settings.metrics_port else 0
    _announce(metrics_port=metrics_port)
    await stop.wait()
    await endpoint.stop(settings.drain_grace_seconds)
    metrics.close()
    return 0


async def run_frontend(settings: Settings, runtime_dir: Path) -> int:
    """A front-end process: the gRPC API on the shared port, in front of the engine process."""
    from service.dataplane import Dataplane
    from service.grpc_api.security import SecurityConfigError
    from service.grpc_api.server import GrpcServer, PortInUse
    from service.ipc.frontend_side import EngineClient
    from service.metrics import ServerMetrics

    metrics = ServerMetrics()
    client = EngineClient(settings, runtime_dir / ENGINE_SOCKET)
    dataplane = Dataplane(client.registry, settings)
    try:
        server = GrpcServer(settings, client, dataplane, metrics, share_port=True)
    except SecurityConfigError as error:
        log.error("cannot start: %s", error)
        return 2
    stop = _stop_event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the supervisor sends SIGHUP to the engine
    connecting = loop.create_task(client.start())
    stopping = loop.create_task(stop.wait())
    await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():
        connecting.cancel()
        await client.stop(0.0)
        return 0
    try:
        await server.start()
    except PortInUse as error:
        log.error("cannot start: %s", error)
        await client.stop(0.0)
        return 1
    updates: set[asyncio.Task[None]] = set()

    def follow_engine(available: bool) -> None:
        task = loop.create_task(server.set_serving(available))
        updates.add(task)
        task.add_done_callback(updates.discard)

    client.on_availability = follow_engine
    metrics_port = metrics.serve(0, "127.0.0.1") if settings.metrics_port else 0
    _announce(metrics_port=metrics_port)
    await stopping
    await server.drain(settings.drain_grace_seconds)
    metrics.close()
    return 0


def _stop_with_parent(supervisor: int) -> None:
    """Have the kernel send this process SIGTERM when its supervisor dies, whatever killed it (Linux), so no
    front-end outlives it holding the port. A supervisor already gone by now means: stop at once."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the supervisor's own shutdown still stops its children
        return
    if os.getppid() != supervisor:
        os.kill(os.getpid(), signal.SIGTERM)


def child_main(argv: list[str]) -> int:
    """`python -m service.ipc.processes {engine,frontend} RUNTIME_DIR SUPERVISOR_PID -- FLAGS...`"""
    from service.server import configure_logging

    role, runtime_dir, supervisor, separator, *flags = argv
    if separator != "--" or role not in ("engine", "frontend") or not supervisor.isdigit():
        print(
            "usage: python -m service.ipc.processes {engine,frontend} RUNTIME_DIR SUPERVISOR_PID -- FLAGS...",
            file=sys.stderr,
        )
        return 2
    _stop_with_parent(int(supervisor))
    try:
        settings = Settings.from_sources(flags, os.environ)
    except SettingsError as error:
        print(f"attnserve serve: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    run = run_engine if role == "engine" else run_frontend
    return asyncio.run(run(settings, Path(runtime_dir)))


# ----- the supervisor ----------------------------------------------------------------------------------------


class _Child:
    """One child process slot: what runs there now and how it is restarted."""

    def __init__(self, role: str, label: str) -> None:
        self.role = role
        self.label = label  # 'engine', 'frontend-0', ...: the `process` label of its metrics
        self.process: asyncio.subprocess.Process | None = None
        self.metrics_port = 0
        self.started_at = 0.0
        self.restart_pause = RESTART_FIRST_S


class _ChildrenMetrics(Collector):
    """Every child's metrics, read from its loopback endpoint at scrape time, with a `process` label added."""

    def __init__(self, children: list[_Child]) -> None:
        self._children = children
        # The supervisor's own memory and CPU, in the same families as its children's (process="supervisor"):
        # one exposition must not hold two families of one name.
        self._own = ProcessCollector(registry=None)

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for family in self._own.collect():
            into = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type, family.unit))
            into.samples.extend(
                sample._replace(labels={**sample.labels, "process": "supervisor"}) for sample in family.samples
            )
        for child in list(self._children):
            if not child.metrics_port:
                continue
            try:
                url = f"http://127.0.0.1:{child.metrics_port}/metrics"
                with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
                    text = response.read().decode("utf-8")
            except OSError:  # restarting: its series are back at the next scrape
                continue
            for family in text_string_to_metric_families(text):
                into = merged.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type, family.unit)
                )
                for sample in family.samples:
                    into.samples.append(sample._replace(labels={**sample.labels, "process": child.label}))
        yield from merged.values()

    def describe(self) -> Iterator[Metric]:
        return iter(())  # read at scrape time only


class Supervisor:
    """Starts the engine and the front-ends, restarts what exits, stops them in order. See the module docstring."""

    def __init__(self, settings: Settings, flags: list[str], frontends: int) -> None:
        self.settings = settings
        self.flags = flags
        self.engine = _Child("engine", "engine")
        self.frontends = [_Child("frontend", f"frontend-{index}") for index in range(frontends)]
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="attnserve-"))
        self.stopping = False
        self.registry = CollectorRegistry(auto_describe=True)
        self.restarts = Counter(
            "attnserve_process_restarts",
            "Child processes of the server started again after they exited on their own, by role.",
            ("role",),
            registry=self.registry,
        )
        for role in ("engine", "frontend"):  # at 0 from the start, so that increase() sees the first restart
            self.restarts.labels(role)
        self.registry.register(_ChildrenMetrics([self.engine, *self.frontends]))
        self._metrics_server: object | None = None

    async def run(self) -> int:
        reservation = self._reserve_port()
        if reservation is None:
            return 1
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for number in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(number, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._forward_hangup)
        try:
            if self.settings.metrics_port:  # first: a taken port fails the start before any model loads
                try:
                    server, _ = start_http_server(
                        self.settings.metrics_port, addr=self.settings.metrics_address, registry=self.registry
                    )
                    self._metrics_server = server
                except OSError as error:
                    log.error("cannot serve metrics on port %d: %s", self.settings.metrics_port, error)
                    return 1
            if not await self._spawn(self.engine, first=True):
                return self._exit_status(self.engine)
            for child in self.frontends:
                if not await self._spawn(child, first=True):
                    await self._stop_children(self.frontends + [self.engine], loop.time() + STOP_MARGIN_S)
                    return self._exit_status(child)
            log.info(
                "attnserve listening on %s with %d front-end processes and one engine process%s",
                self.settings.grpc_address,
                len(self.frontends),
                f", metrics on :{self.settings.metrics_port}/metrics" if self.settings.metrics_port else "",
            )
            watchers = [loop.create_task(self._watch(child)) for child in [self.engine, *self.frontends]]
            await stop.wait()
            self.stopping = True
            log.info("shutting down: the front-ends drain, then the engine stops")
            # One budget for the whole shutdown, as for a single-process server: the drain grace, plus a margin.
            deadline = loop.time() + self.settings.drain_grace_seconds + STOP_MARGIN_S
            await self._stop_children(self.frontends, deadline - ENGINE_STOP_S)
            await self._stop_children([self.engine], deadline)
            for watcher in watchers:
                watcher.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
            return 0
        finally:
            reservation.close()
            if self._metrics_server is not None:
                self._metrics_server.shutdown()  # type: ignore[attr-defined]
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def _reserve_port(self) -> socket.socket | None:
        """Bind the gRPC port with SO_REUSEPORT (not listening), so a server without it cannot take the port
        while the front-ends hold it, and a port already in use fails the start at once."""
        host = self.settings.host.strip("[]")
        try:
            family, kind, protocol, _, address = socket.getaddrinfo(host, self.settings.port, type=socket.SOCK_STREAM)[
                0
            ]
            reservation = socket.socket(family, kind, protocol)
            reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            reservation.bind(address)
        except OSError as error:
            log.error("cannot start: cannot listen on %s: %s", self.settings.grpc_address, error)
            return None
        return reservation

    async def _spawn(self, child: _Child, *, first: bool) -> bool:
        """Start the child and wait until it says it is ready; False when it exited first."""
        child.metrics_port = 0
        child.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service.ipc.processes",
            child.role,
            str(self.runtime_dir),
            str(os.getpid()),
            "--",
            *self.flags,
            stdout=asyncio.subprocess.PIPE,
        )
        child.started_at = time.monotonic()
        assert child.process.stdout is not None
        line = await child.process.stdout.readline()
        if not line:
            await child.process.wait()
            if first:
                log.error(
                    "the %s process exited with status %s before it was ready", child.label, child.process.returncode
                )
            return False
        child.metrics_port = int(json.loads(line).get("metrics_port", 0))
        return True

    @staticmethod
    def _exit_status(child: _Child) -> int:
        code = child.process.returncode if child.process is not None else 1
        return code if code and code > 0 else 1

    async def _watch(self, child: _Child) -> None:
        """Start the child again whenever it exits on its own, with a pause that grows while it keeps failing."""
        while True:
            assert child.process is not None
            code = await child.process.wait()
            if self.stopping:
                return
            ran = time.monotonic() - child.started_at
            if ran >= STABLE_AFTER_S:
                child.restart_pause = RESTART_FIRST_S
            log.error(
                "the %s process exited with status %s after %.1f s; starting it again in %.1f s",
                child.label,
                code,
                ran,
                child.restart_pause,
            )
            await asyncio.sleep(child.restart_pause)
            child.restart_pause = min(child.restart_pause * 2, RESTART_LONGEST_S)
            if self.stopping:
                return
            self.restarts.labels(child.role).inc()
            await self._spawn(child, first=False)

    async def _stop_children(self, children: list[_Child], deadline: float) -> None:
        """SIGTERM them, wait for their drain until `deadline` (event-loop time), kill those still running then."""
        running = [
            child.process for child in children if child.process is not None and child.process.returncode is None
        ]
        for process in running:
            process.send_signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        for process in running:
            try:
                await asyncio.wait_for(process.wait(), max(deadline - loop.time(), 0.0))
            except TimeoutError:
                log.error("process %d had not stopped by the end of the drain; killing it", process.pid)
                process.kill()
                await process.wait()

    def _forward_hangup(self) -> None:
        process = self.engine.process
        if process is not None and process.returncode is None:
            log.info("SIGHUP: the engine scans the model repository")
            process.send_signal(signal.SIGHUP)


def supervise(settings: Settings, flags: list[str], frontends: int) -> int:
    """Run the server as an engine process and `frontends` front-end processes; returns the exit status."""
    return asyncio.run(Supervisor(settings, flags, frontends).run())


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
