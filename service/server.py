"""`attnserve serve`: load the model repository and serve it over gRPC until SIGTERM/SIGINT.

On SIGTERM or SIGINT the server drains (health NOT_SERVING, new calls UNAVAILABLE, in-flight calls
get drain_grace_seconds to finish) and exits with status 0. SIGHUP scans the model repository at once
(as the periodic scan does every repository_poll_seconds). Exit status 1: no model could be served or
the port is taken; 2: bad settings, or a TLS or token file that does not load.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable

from service.dataplane import Dataplane
from service.errors import AttnServeError
from service.grpc_api.security import SecurityConfigError
from service.grpc_api.server import GrpcServer, PortInUse
from service.metrics import ServerMetrics
from service.models import ModelManager
from service.settings import Settings, SettingsError

log = logging.getLogger("attnserve.server")


def configure_logging(level: str) -> None:
    """Plain single-line logs on stderr at `level`, quiet third-party loggers."""
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def configure_onnxruntime_telemetry(enabled: bool) -> None:
    """Turn onnxruntime's telemetry off unless `enabled`. onnxruntime reads ORT_DISABLE_TELEMETRY when it loads
    (its disable_telemetry_events() comes too late for the device id it writes then, and warns about on a
    read-only root), and the processes this one starts inherit the variable."""
    if enabled:
        return
    os.environ["ORT_DISABLE_TELEMETRY"] = "1"
    loaded = sys.modules.get("onnxruntime")
    if loaded is not None:  # loaded before the settings were known (in-process use): stop its events at least
        loaded.disable_telemetry_events()


async def start_models(manager: ModelManager) -> bool:
    """Load the repository (ModelManager.start); False, with the reason logged, when not a single model loads."""
    try:
        await manager.start()
    except AttnServeError as error:
        log.error("cannot start: %s", error.message)
        await manager.stop(0.0)
        return False
    return True


async def serve(
    settings: Settings,
    *,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[int], None] | None = None,
) -> int:
    """Run the server until `stop` is set, then drain; returns the exit status.

    Without `stop`, one is created and set by SIGTERM/SIGINT (main thread only). `on_ready(port)` is
    called once the port is bound and the models are SERVING.
    """
    metrics = ServerMetrics()
    manager = ModelManager(settings, metrics)
    dataplane = Dataplane(manager.registry, settings)
    try:
        # Before loading any model: a TLS or token file that does not load fails the start at once.
        server = GrpcServer(settings, manager, dataplane, metrics)
    except SecurityConfigError as error:
        log.error("cannot start: %s", error)
        return 2
    if not await start_models(manager):
        return 1
    try:
        port = await server.start()
    except PortInUse as error:
        log.error("cannot start: %s", error)
        await manager.stop(0.0)
        return 1
    if settings.metrics_port:
        try:
            metrics.serve(settings.metrics_port, host=settings.metrics_address)
        except OSError as error:
            log.error("cannot serve metrics on port %d: %s", settings.metrics_port, error)
            await server.drain(0.0)
            return 1

    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    if stop is None:
        stop = asyncio.Event()
        for signal_number in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signal_number, stop.set)
            handled.append(signal_number)
        loop.add_signal_handler(signal.SIGHUP, manager.refresh_soon, "SIGHUP")
        handled.append(signal.SIGHUP)
    models = ", ".join(
        f"{served.name} v{served.version} ({served.model.provider})" for served in manager.registry.served_versions()
    )
    metrics_text = f", metrics on :{settings.metrics_port}/metrics" if settings.metrics_port else ""
    log.info(
        "attnserve listening on %s:%d (default model %s) serving %s%s",
        settings.host,
        port,
        manager.registry.default_model,
        models,
        metrics_text,
    )
    if on_ready is not None:
        on_ready(port)
    try:
        await stop.wait()
        log.info("shutting down: draining for up to %.1f s", settings.drain_grace_seconds)
        await server.drain(settings.drain_grace_seconds)
    finally:
        for signal_number in handled:
            loop.remove_signal_handler(signal_number)
        metrics.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`attnserve serve [flags]`; returns the process exit status."""
    try:
        settings = Settings.from_sources(argv, os.environ)
    except SettingsError as error:
        print(f"attnserve serve: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    configure_onnxruntime_telemetry(settings.onnxruntime_telemetry)
    frontends = settings.frontend_processes
    if frontends:
        from service.ipc.processes import supervise

        return supervise(settings, list(sys.argv[1:] if argv is None else argv), frontends)
    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
