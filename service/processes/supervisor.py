"""The supervisor: starts the engine and the front-end processes, restarts what exits, stops them in order, and
serves one /metrics for all of them (see the package docstring)."""

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
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, start_http_server

from service import event_loop
from service.lifecycle import stop_event
from service.processes.merged_metrics import ChildrenMetrics
from service.settings import Settings

log = logging.getLogger("attnserve.processes")

RESTART_FIRST_S = 0.5
RESTART_LONGEST_S = 30.0
STABLE_AFTER_S = 60.0
"""A child that ran this long before it exited is restarted after the shortest pause again."""
STOP_MARGIN_S = 5.0
"""How long past the drain grace the whole shutdown may take before the children still running are killed."""
ENGINE_STOP_S = 2.0
"""The part of that budget kept for the engine, which stops last and has nothing in flight by then."""


class _Child:
    """One child process slot: what runs there now and how it is restarted."""

    def __init__(self, role: str, label: str) -> None:
        self.role = role
        self.label = label  # 'engine', 'frontend-0', ...: the `process` label of its metrics
        self.process: asyncio.subprocess.Process | None = None
        self.metrics_port = 0
        self.started_at = 0.0
        self.restart_pause = RESTART_FIRST_S


class Supervisor:
    """Starts the engine and the front-ends, restarts what exits, stops them in order. See the module docstring."""

    def __init__(self, settings: Settings, flags: list[str], frontends: int) -> None:
        self.settings = settings
        self.flags = flags
        self.engine = _Child("engine", "engine")
        self.frontends = [_Child("frontend", f"frontend-{index}") for index in range(frontends)]
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="attnserve-"))
        self.stopping = False
        self.collectors = CollectorRegistry(auto_describe=True)
        self.restarts = Counter(
            "attnserve_process_restarts",
            "Child processes of the server started again after they exited on their own, by role.",
            ("role",),
            registry=self.collectors,
        )
        for role in ("engine", "frontend"):  # at 0 from the start, so that increase() sees the first restart
            self.restarts.labels(role)
        self.collectors.register(ChildrenMetrics([self.engine, *self.frontends]))
        self._metrics_server: object | None = None

    async def run(self) -> int:
        reservations = [self._reserve_port(port) for port in (self.settings.port, self.settings.http_port) if port]
        if None in reservations:
            for reservation in reservations:
                if reservation is not None:
                    reservation.close()
            return 1
        loop = asyncio.get_running_loop()
        stop = stop_event(on_hangup=self._forward_hangup)
        try:
            if self.settings.metrics_port:  # first: a taken port fails the start before any model loads
                try:
                    server, _ = start_http_server(
                        self.settings.metrics_port, addr=self.settings.metrics_address, registry=self.collectors
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
                "attnserve listening on %s%s with %d front-end processes and one engine process%s; front-ends on %s's "
                "event loop, the engine process on %s's",
                self.settings.grpc_address,
                f" (HTTP on :{self.settings.http_port})" if self.settings.http_port else "",
                len(self.frontends),
                f", metrics on :{self.settings.metrics_port}/metrics" if self.settings.metrics_port else "",
                event_loop.resolved(self.settings.event_loop),
                event_loop.resolved(self.settings.event_loop, serves_rpcs=False),
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
            for reservation in reservations:
                if reservation is not None:
                    reservation.close()
            if self._metrics_server is not None:
                self._metrics_server.shutdown()  # type: ignore[attr-defined]
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def _reserve_port(self, port: int) -> socket.socket | None:
        """Bind `port` (gRPC's or HTTP's) with SO_REUSEPORT (not listening), so a server without it cannot take
        the port while the front-ends hold it, and a port already in use fails the start at once."""
        host = self.settings.host.strip("[]")
        try:
            family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
            reservation = socket.socket(family, kind, protocol)
            reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            reservation.bind(address)
        except OSError as error:
            log.error("cannot start: cannot listen on %s:%d: %s", self.settings.host, port, error)
            return None
        return reservation

    async def _spawn(self, child: _Child, *, first: bool) -> bool:
        """Start the child and wait until it says it is ready; False when it exited first."""
        child.metrics_port = 0
        child.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service.processes",
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
    return event_loop.run(Supervisor(settings, flags, frontends).run(), settings.event_loop, serves_rpcs=False)
