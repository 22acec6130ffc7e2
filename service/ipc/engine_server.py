"""The engine process's server: front-ends' requests in, results, tokens, queue depths and reports out.

It owns the process's ModelManager, whose AsyncEngines decode exactly as in a single-process server. Each
front-end holds one connection; a request lives in the connection's table from Submit until it is resolved,
and a connection that closes (its front-end died or stopped) cancels whatever it still had in flight, so the
batch never decodes for a caller that is gone.

Hot reload across processes: a front-end resolves "the latest version" from the last report it applied, so
a call may name a version the engine has just retired. The engine keeps a retired version taking requests
until every connected front-end has acknowledged the report that retired it (`RegistryApplied`), and only then
lets it drain and stop. So such a call still decodes on the version it was resolved to, and no call is ever
refused because of a reload.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path

from service.engine import RequestHandle
from service.errors import AttnServeError, Unavailable
from service.ipc.messages import (
    Cancel,
    Channel,
    Failed,
    Message,
    QueueDepth,
    Registry,
    RegistryApplied,
    Result,
    Submit,
    Token,
)
from service.metrics import ServerMetrics
from service.models import ModelManager
from service.registry import ModelEvent
from service.runtime.model import LoadedModel
from service.settings import Settings

log = logging.getLogger(__name__)

ACKNOWLEDGE_TIMEOUT_S = 5.0
"""How long a retired version waits for the front-ends' acknowledgements before it drains anyway (a front-end
that takes longer is stuck; a call it still sends for the version then gets UNAVAILABLE)."""


class _Connection:
    """One front-end's connection, the requests it has in flight and the last report it applied."""

    def __init__(self, server: EngineServer) -> None:
        self.server = server
        self.channel = Channel(self._received, self._lost)
        self.handles: dict[int, RequestHandle] = {}
        self.applied = -1  # the generation of the last Registry it acknowledged
        self._streams: set[asyncio.Task[None]] = set()

    def _received(self, messages: list[Message]) -> None:
        for message in messages:
            if isinstance(message, Submit):
                self._submit(message)
            elif isinstance(message, Cancel):
                handle = self.handles.get(message.id)
                if handle is not None:
                    handle.cancel()
            elif isinstance(message, RegistryApplied):
                self.applied = message.generation
                self.server.acknowledged.set()
            else:
                log.warning("a front-end sent %s, which only the engine sends; ignored", type(message).__name__)

    def _submit(self, message: Submit) -> None:
        engine = self.server.manager.engine(message.name, message.version)
        try:
            if engine is None:
                raise Unavailable(f"model {message.name} version {message.version} is not served")
            handles = engine.submit_all(message.requests)
        except AttnServeError as error:
            for key in message.ids:
                self.channel.send(Failed(key, error.code, error.message))
            self.server.queues_changed()
            return
        for key, handle in zip(message.ids, handles, strict=True):
            self.handles[key] = handle
            if handle.streams:
                task = asyncio.get_running_loop().create_task(self._forward_stream(key, handle))
                self._streams.add(task)
                task.add_done_callback(self._streams.discard)
            else:
                handle.when_resolved(functools.partial(self._answer, key))
        self.server.queues_changed()

    async def _forward_stream(self, key: int, handle: RequestHandle) -> None:
        """Send a streaming request's tokens as they come, then its result: in this order, on one channel."""
        try:
            async for event in handle.tokens():
                self.channel.send(Token(key, event))
        except AttnServeError:
            pass  # the request ended with an error: _answer sends it
        self._answer(key, handle)

    def _answer(self, key: int, handle: RequestHandle) -> None:
        if self.handles.pop(key, None) is None:
            return
        outcome = handle.outcome()
        if isinstance(outcome, AttnServeError):
            self.channel.send(Failed(key, outcome.code, outcome.message))
        else:
            self.channel.send(Result(key, outcome))
        self.server.queues_changed()

    def _lost(self, reason: str) -> None:
        if self.handles:
            log.warning("a front-end's connection ended (%s): cancelling its %d requests", reason, len(self.handles))
        for handle in list(self.handles.values()):
            handle.cancel()
        self.handles.clear()
        self.server.connections.discard(self)
        self.server.acknowledged.set()  # a retirement no longer waits for this one


class EngineServer:
    """Loads the repository and serves its engines to front-end processes over a Unix socket. Event-loop
    thread only."""

    def __init__(
        self,
        settings: Settings,
        metrics: ServerMetrics | None = None,
        *,
        loader: Callable[[Path], LoadedModel] | None = None,
    ) -> None:
        """`loader`: see ModelManager. The engines step on worker threads, or with the setting
        `engine_steps_on_loop` on this process's event loop (see Settings)."""
        self.settings = settings
        self.manager = ModelManager(
            settings,
            metrics,
            acknowledge=self._acknowledged_by_all,
            loader=loader,
            engines_on_loop=settings.engine_steps_on_loop,
        )
        self.connections: set[_Connection] = set()
        self.generation = 0  # of the last Registry report sent
        self.acknowledged = asyncio.Event()  # set whenever an acknowledgement arrives or a connection ends
        self._server: asyncio.AbstractServer | None = None
        self._published: dict[tuple[str, int], tuple[int, int]] = {}  # (waiting, dequeued) last sent
        self._depths_pending = False
        self.manager.add_listener(self._on_model_event)

    async def start(self, path: Path) -> None:
        """Load the repository (ModelManager.start, with its errors), then listen on the Unix socket `path`
        (only this user may connect)."""
        await self.manager.start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(self._connect, str(path))
        os.chmod(path, 0o600)

    def _connect(self) -> Channel:
        connection = _Connection(self)
        self.connections.add(connection)
        # Queued: they leave as the first frame once the connection is made.
        connection.channel.send(Registry(self.generation, self.manager.registry.report()))
        for (name, version), (waiting, dequeued) in self._published.items():
            connection.channel.send(QueueDepth(name, version, waiting, dequeued))
        return connection.channel

    def broadcast_registry(self) -> None:
        """Tell every front-end what is served now, as a new generation."""
        self.generation += 1
        message = Registry(self.generation, self.manager.registry.report())
        for connection in self.connections:
            connection.channel.send(message)

    def _on_model_event(self, event: ModelEvent) -> None:
        self.broadcast_registry()

    async def _acknowledged_by_all(self) -> None:
        """Wait until every connected front-end applied the latest report (at most ACKNOWLEDGE_TIMEOUT_S)."""
        generation = self.generation
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ACKNOWLEDGE_TIMEOUT_S
        while any(connection.applied < generation for connection in self.connections):
            self.acknowledged.clear()
            try:
                await asyncio.wait_for(self.acknowledged.wait(), max(deadline - loop.time(), 0.0))
            except TimeoutError:
                late = sum(connection.applied < generation for connection in self.connections)
                log.warning("%d front-ends did not acknowledge report %d in time; retiring anyway", late, generation)
                return

    def queues_changed(self) -> None:
        """Publish the queue depths that changed, once per turn of the event loop however many calls asked."""
        if not self._depths_pending:
            self._depths_pending = True
            asyncio.get_running_loop().call_soon(self._publish_depths)

    def _publish_depths(self) -> None:
        self._depths_pending = False
        published, self._published = self._published, {}  # retired versions drop out here
        for served in self.manager.registry.served_versions():
            key = (served.name, served.version)
            engine = self.manager.engine(*key)
            if engine is None:
                continue
            progress = engine.queue_progress()
            self._published[key] = progress
            if published.get(key) != progress:
                message = QueueDepth(served.name, served.version, *progress)
                for connection in self.connections:
                    connection.channel.send(message)

    async def stop(self, grace_s: float) -> None:
        """Refuse new requests (Unavailable), let the requests in flight finish for up to `grace_s` seconds,
        then fail the rest with Unavailable and close every connection."""
        self.manager.begin_draining()
        self.broadcast_registry()
        await self.manager.stop(grace_s)
        for connection in list(self.connections):
            for key in list(connection.handles):  # every handle is resolved by now; answer any not yet sent
                connection.channel.send(Failed(key, Unavailable.code, "the engine stopped"))
            connection.channel.close()
        if self._server is not None:
            self._server.close()
