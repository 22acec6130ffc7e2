"""What every server program does the same way: logging, starting the engine client, and stopping on a signal."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable

from service.engine_client import EngineClient
from service.errors import AttnServeError
from service.grpc_api.server import GrpcServer, PortInUse
from service.http_api.server import HttpServer
from service.settings import Settings, SettingsError

log = logging.getLogger("attnserve.server")


def settings_from(argv: list[str] | None) -> Settings | None:
    """The settings from these `attnserve serve` flags (None = sys.argv[1:]) and the environment, with logging
    and onnxruntime's telemetry configured by them; None, with the problem printed, when a value is bad."""
    try:
        settings = Settings.from_sources(argv, os.environ)
    except SettingsError as error:
        print(f"attnserve serve: {error}", file=sys.stderr)
        return None
    _configure_logging(settings.log_level)
    configure_onnxruntime_telemetry(settings.onnxruntime_telemetry)
    return settings


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


def _configure_logging(level: str) -> None:
    """Plain single-line logs on stderr at `level`."""
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


async def start_client(client: EngineClient) -> bool:
    """Start the engine client (for one that decodes here: load the repository); False, with the reason
    logged, when not a single model loads."""
    try:
        await client.start()
    except AttnServeError as error:
        log.error("cannot start: %s", error.message)
        await client.stop(0.0)
        return False
    return True


async def open_ports(server: GrpcServer, http: HttpServer | None, client: EngineClient) -> int | None:
    """Open the gRPC port, then the HTTP port (when there is one): the gRPC port's number, or None, with the
    reason logged and what had started stopped again, when a port is in use."""
    try:
        port = await server.start()
    except PortInUse as error:
        log.error("cannot start: %s", error)
        await client.stop(0.0)
        return None
    if http is not None:
        try:
            await http.start()
        except PortInUse as error:
            log.error("cannot start: %s", error)
            await server.drain(0.0)
            return None
    return port


def stop_event(on_hangup: Callable[[], None] | None = None) -> asyncio.Event:
    """An event that SIGTERM or SIGINT sets, on the running loop (main thread only). `on_hangup`, when given,
    is called on SIGHUP (the model repository is scanned again); otherwise SIGHUP is ignored rather than
    left to kill the process."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_hangup if on_hangup is not None else _ignore)
    return stop


def remove_signal_handlers() -> None:
    """Undo stop_event() (a server run inside a longer-lived program, e.g. a test)."""
    loop = asyncio.get_running_loop()
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.remove_signal_handler(number)


def _ignore() -> None:
    pass
