"""A front-end process: the gRPC and HTTP APIs on the shared ports, in front of the engine process."""

from __future__ import annotations

import asyncio
from pathlib import Path

from service.dataplane import Dataplane
from service.engine_client.socket_client import SocketClient
from service.grpc_api.security import SecurityConfigError
from service.grpc_api.server import GrpcServer
from service.http_api.server import HttpServer
from service.lifecycle import log, open_ports, stop_event
from service.metrics import ServerMetrics
from service.processes.child import ENGINE_SOCKET, announce
from service.runtime.memory import MemoryReturner
from service.settings import Settings


async def run_frontend(settings: Settings, runtime_dir: Path) -> int:
    """Connect to the engine process (waiting for it), serve gRPC and HTTP on the shared ports until SIGTERM,
    drain."""
    metrics = ServerMetrics()
    client = SocketClient(settings, runtime_dir / ENGINE_SOCKET)
    dataplane = Dataplane(client, settings, narrow_when_backlogged=True)  # FairGate.follow_backlog
    metrics.watch_turns(dataplane.gate)
    try:
        server = GrpcServer(settings, client, dataplane, metrics, share_port=True)
        http = HttpServer(settings, dataplane, metrics, share_port=True) if settings.http_port else None
    except SecurityConfigError as error:
        log.error("cannot start: %s", error)
        return 2
    stop = stop_event()  # SIGHUP is the engine's: the supervisor sends it there
    loop = asyncio.get_running_loop()
    connecting = loop.create_task(client.start())
    stopping = loop.create_task(stop.wait())
    await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():
        connecting.cancel()
        await client.stop(0.0)
        return 0
    also_stop = [http.stop] if http is not None else []
    if await open_ports(server, http, client) is None:
        return 1
    updates: set[asyncio.Task[None]] = set()

    def follow_engine(available: bool) -> None:
        task = loop.create_task(server.set_serving(available))
        updates.add(task)
        task.add_done_callback(updates.discard)

    client.on_availability = follow_engine
    metrics_port = metrics.serve(0, "127.0.0.1") if settings.metrics_port else 0
    memory = MemoryReturner(settings.memory_return_seconds)  # no models here: the heap only
    memory.start()
    announce(metrics_port=metrics_port)
    await stopping
    await memory.stop()
    await server.drain(settings.drain_grace_seconds, also_stop)
    metrics.close()
    return 0
