"""The engine process: load the repository and serve its engines to the front-ends until SIGTERM."""

from __future__ import annotations

from pathlib import Path

from service.errors import AttnServeError
from service.ipc.engine_server import EngineServer
from service.lifecycle import log, stop_event
from service.metrics import ServerMetrics
from service.processes.child import ENGINE_SOCKET, announce
from service.runtime.memory import MemoryReturner
from service.settings import Settings


async def run_engine(settings: Settings, runtime_dir: Path) -> int:
    """Serve on RUNTIME_DIR/engine.sock until SIGTERM (SIGHUP scans the repository); returns the exit status."""
    metrics = ServerMetrics()
    server = EngineServer(settings, metrics)
    socket_path = runtime_dir / ENGINE_SOCKET
    socket_path.unlink(missing_ok=True)  # left by an engine process that died
    try:
        await server.start(socket_path)
    except AttnServeError as error:
        log.error("cannot start: %s", error.message)
        await server.stop(0.0)
        return 1
    stop = stop_event(on_hangup=lambda: server.manager.refresh_soon("SIGHUP"))
    metrics_port = metrics.serve(0, "127.0.0.1") if settings.metrics_port else 0
    memory = MemoryReturner(settings.memory_return_seconds, server.manager.release_unused_memory)
    memory.start()
    announce(metrics_port=metrics_port)
    await stop.wait()
    await memory.stop()
    await server.stop(settings.drain_grace_seconds)
    metrics.close()
    return 0
