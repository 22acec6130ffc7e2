"""`attnserve serve`: load the model repository and serve it over gRPC and HTTP until SIGTERM/SIGINT.

With `--frontends 0` (the default on fewer than 3 CPUs) everything runs in this process: the gRPC and HTTP
servers (on one event loop), the dataplane and the engines, behind an InProcessClient. Otherwise the
supervisor (service/processes/) runs an engine process and front-end processes.

On SIGTERM or SIGINT the server drains (health NOT_SERVING, new calls UNAVAILABLE, in-flight calls
get drain_grace_seconds to finish) and exits with status 0. SIGHUP scans the model repository at once
(as the periodic scan does every repository_poll_seconds). Exit status 1: no model could be served or
the port is taken; 2: bad settings, or a TLS or token file that does not load.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable

from service import event_loop
from service.dataplane import Dataplane
from service.engine_client.in_process import InProcessClient
from service.grpc_api.security import SecurityConfigError
from service.grpc_api.server import GrpcServer
from service.http_api.server import HttpServer
from service.lifecycle import open_ports, remove_signal_handlers, settings_from, start_client, stop_event
from service.metrics import ServerMetrics
from service.runtime import allocator
from service.runtime.memory import MemoryReturner
from service.settings import Settings

log = logging.getLogger("attnserve.server")


async def serve(
    settings: Settings,
    *,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[int], None] | None = None,
) -> int:
    """Run the one-process server until `stop` is set, then drain; returns the exit status.

    Without `stop`, one is created and set by SIGTERM/SIGINT (main thread only). `on_ready(port)` is
    called once the port is bound and the models are SERVING.
    """
    metrics = ServerMetrics()
    client = InProcessClient(settings, metrics)
    dataplane = Dataplane(client, settings)
    metrics.watch_turns(dataplane.gate)
    try:
        # Before loading any model: a TLS or token file that does not load fails the start at once.
        server = GrpcServer(settings, client, dataplane, metrics)
        http = HttpServer(settings, dataplane, metrics) if settings.http_port else None
    except SecurityConfigError as error:
        log.error("cannot start: %s", error)
        return 2
    if not await start_client(client):
        return 1
    also_stop = [http.stop] if http is not None else []
    port = await open_ports(server, http, client)
    if port is None:
        return 1
    if settings.metrics_port:
        try:
            metrics.serve(settings.metrics_port, host=settings.metrics_address)
        except OSError as error:
            log.error("cannot serve metrics on port %d: %s", settings.metrics_port, error)
            await server.drain(0.0, also_stop)
            return 1

    own_signals = stop is None
    if stop is None:
        stop = stop_event(on_hangup=lambda: client.refresh_soon("SIGHUP"))
    registry = client.registry
    models = ", ".join(
        f"{served.name} v{served.version} ({served.model.provider})" for served in registry.served_versions()
    )
    metrics_text = f", metrics on :{settings.metrics_port}/metrics" if settings.metrics_port else ""
    http_text = f", HTTP on :{http.port}" if http is not None else ""
    log.info(
        "attnserve listening on %s:%d (default model %s) serving %s%s%s, on %s's event loop and %s",
        settings.host,
        port,
        registry.default_model,
        models,
        http_text,
        metrics_text,
        event_loop.running_loop_name(),
        allocator.active_allocator(),
    )
    memory = MemoryReturner(settings.memory_return_seconds, client.manager.release_unused_memory)
    memory.start()
    if on_ready is not None:
        on_ready(port)
    try:
        await stop.wait()
        log.info("shutting down: draining for up to %.1f s", settings.drain_grace_seconds)
        await server.drain(settings.drain_grace_seconds, also_stop)
    finally:
        await memory.stop()
        if own_signals:
            remove_signal_handlers()
        metrics.close()
    return 0


def main(argv: list[str] | None = None, *, own_process: bool = False) -> int:
    """`attnserve serve [flags]`; returns the process exit status. With `own_process` (the command run as a program,
    service/cli.py), before anything starts, the process may start itself again on the malloc `memory_allocator`
    chooses (os.execve, same pid, same arguments)."""
    settings = settings_from(argv)
    if settings is None:
        return 2
    if own_process:
        try:
            allocator.exec_with_allocator(settings.memory_allocator)
        except allocator.AllocatorError as error:
            print(f"attnserve serve: {error}", file=sys.stderr)
            return 2
    frontends = settings.frontend_processes
    if frontends:
        from service.processes.supervisor import supervise

        return supervise(settings, list(sys.argv[1:] if argv is None else argv), frontends)
    return event_loop.run(serve(settings), settings.event_loop)


if __name__ == "__main__":
    sys.exit(main(own_process=True))
