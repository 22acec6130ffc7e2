"""The engine process's endpoint: front-ends' requests in, results, tokens and queue depths out.

It runs on the engine process's event loop next to the ModelManager, whose schedulers decode exactly as in a
single-process server. Each front-end holds one connection; a request lives in the connection's table from
Submit until it is resolved, and a connection that closes (its front-end died or stopped) cancels whatever
it still had in flight, so the batch never decodes for a caller that is gone.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from pathlib import Path

import numpy as np

from service.engine import DecodeOptions, RequestHandle, TranslationRequest, TranslationResult
from service.errors import AttnServeError, Unavailable, VersionRetired
from service.ipc.messages import (
    Cancel,
    Channel,
    Failed,
    HypothesisRecord,
    Message,
    ModelInfo,
    Models,
    QueueDepth,
    Result,
    ServedVersionInfo,
    Submit,
    Token,
)
from service.models import ModelEvent, ModelSource
from service.registry import ServedVersion

log = logging.getLogger(__name__)


def result_message(key: int, result: TranslationResult) -> Result:
    return Result(
        id=key,
        hypotheses=[
            HypothesisRecord(
                token_ids=[int(token) for token in hypothesis.token_ids],
                score=float(hypothesis.score),
                log_prob=float(hypothesis.log_prob),
                finish_reason=hypothesis.finish_reason.value,
                alignment=[int(position) for position in hypothesis.alignment],
                attention=None
                if hypothesis.attention is None
                else np.ascontiguousarray(hypothesis.attention, dtype=np.float32).tobytes(),
                attention_columns=0 if hypothesis.attention is None else int(np.shape(hypothesis.attention)[-1]),
            )
            for hypothesis in result.hypotheses
        ],
        queue_wait_s=result.queue_wait_s,
        first_token_s=result.first_token_s,
        total_s=result.total_s,
        generated_tokens=result.generated_tokens,
    )


class _Connection:
    """One front-end's connection and the requests it has in flight."""

    def __init__(self, endpoint: EngineEndpoint) -> None:
        self.endpoint = endpoint
        self.channel = Channel(self._received, self._lost)
        self.handles: dict[int, RequestHandle] = {}
        self._streams: set[asyncio.Task[None]] = set()

    def _received(self, messages: list[Message]) -> None:
        for message in messages:
            if isinstance(message, Submit):
                self._submit(message)
            elif isinstance(message, Cancel):
                handle = self.handles.get(message.id)
                if handle is not None:
                    handle.cancel()
            else:
                log.warning("a front-end sent %s, which only the engine sends; ignored", type(message).__name__)

    def _submit(self, message: Submit) -> None:
        options = message.options
        try:
            served = self._resolve(message.name, message.version)
            decode = DecodeOptions(
                beam_size=options.beam_size,
                num_hypotheses=options.num_hypotheses,
                max_length=options.max_length,
                length_penalty=options.length_penalty,
                return_attention=options.return_attention,
            )
            handles = served.scheduler.submit_all(
                [
                    TranslationRequest(
                        np.frombuffer(source, dtype=np.int64),
                        decode,
                        deadline=message.deadline,
                        stream=message.stream,
                        arrival=message.arrival,
                    )
                    for source in message.sources
                ]
            )
        except AttnServeError as error:
            for key in message.ids:
                self.channel.send(Failed(key, type(error).__name__, error.message))
            self.endpoint.queues_changed()
            return
        except ValueError as error:  # a record the front-end should never have built
            for key in message.ids:
                self.channel.send(Failed(key, "InvalidRequest", f"malformed request: {error}"))
            return
        for key, handle in zip(message.ids, handles, strict=True):
            self.handles[key] = handle
            if message.stream:
                task = asyncio.get_running_loop().create_task(self._forward_stream(key, handle))
                self._streams.add(task)
                task.add_done_callback(self._streams.discard)
            else:
                handle.when_resolved(functools.partial(self._answer, key))
        self.endpoint.queues_changed()

    def _resolve(self, name: str, version: int) -> ServedVersion:
        registry = self.endpoint.manager.registry
        entry = registry.entries.get(name)
        if entry is not None and version not in entry.served and not registry.draining:
            # The front-end had not yet heard of the reload when it sent the call.
            raise VersionRetired(f"model {name} version {version} was retired while this call was on its way; retry")
        return registry.resolve(name, str(version))

    async def _forward_stream(self, key: int, handle: RequestHandle) -> None:
        """Send a streaming request's tokens as they come, then its result: in this order, on one channel."""
        try:
            async for event in handle.tokens():
                attention = event.attention
                self.channel.send(
                    Token(
                        key,
                        event.token_id,
                        event.position,
                        event.log_prob,
                        event.alignment,
                        None if attention is None else np.asarray(attention, dtype=np.float32).tobytes(),
                    )
                )
        except AttnServeError:
            pass  # the request ended with an error: _answer sends it
        self._answer(key, handle)

    def _answer(self, key: int, handle: RequestHandle) -> None:
        if self.handles.pop(key, None) is None:
            return
        outcome = handle.outcome()
        if isinstance(outcome, AttnServeError):
            self.channel.send(Failed(key, type(outcome).__name__, outcome.message))
        else:
            self.channel.send(result_message(key, outcome))
        self.endpoint.queues_changed()

    def _lost(self, reason: str) -> None:
        if self.handles:
            log.warning("a front-end's connection ended (%s): cancelling its %d requests", reason, len(self.handles))
        for handle in list(self.handles.values()):
            handle.cancel()
        self.handles.clear()
        self.endpoint.connections.discard(self)


class EngineEndpoint:
    """Serves the schedulers of `manager` (the ModelManager) to front-end processes over a Unix socket.
    Event-loop thread only."""

    def __init__(self, manager: ModelSource) -> None:
        self.manager = manager
        self.connections: set[_Connection] = set()
        self._server: asyncio.AbstractServer | None = None
        self._published: dict[tuple[str, int], int] = {}
        self._depths_pending = False
        manager.add_listener(self._on_model_event)

    async def start(self, path: Path) -> None:
        """Listen on the Unix socket `path` (only this user may connect)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(self._connect, str(path))
        os.chmod(path, 0o600)

    def _connect(self) -> Channel:
        connection = _Connection(self)
        self.connections.add(connection)
        self._send_models_to(connection)  # queued: leaves as the first frame once the connection is made
        return connection.channel

    def _send_models_to(self, connection: _Connection) -> None:
        connection.channel.send(self.models())
        for (name, version), waiting in self._published.items():
            connection.channel.send(QueueDepth(name, version, waiting))

    def models(self) -> Models:
        registry = self.manager.registry
        return Models(
            default_model=registry.default_model,
            draining=registry.draining,
            models=[
                ModelInfo(
                    name=name,
                    versions_on_disk=list(entry.versions_on_disk),
                    served=[
                        ServedVersionInfo(
                            version, str(served.model.directory), served.model.provider, served.model.load_seconds
                        )
                        for version, served in sorted(entry.served.items())
                    ],
                    failures=dict(entry.failures),
                )
                for name, entry in sorted(registry.entries.items())
            ],
        )

    def broadcast_models(self) -> None:
        """Tell every front-end what is served now."""
        models = self.models()
        for connection in self.connections:
            connection.channel.send(models)

    def _on_model_event(self, event: ModelEvent) -> None:
        self.broadcast_models()

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
            waiting = served.scheduler.waiting
            self._published[key] = waiting
            if published.get(key) != waiting:
                for connection in self.connections:
                    connection.channel.send(QueueDepth(served.name, served.version, waiting))

    async def stop(self, grace_s: float) -> None:
        """Refuse new requests (Unavailable), let the requests in flight finish for up to `grace_s` seconds,
        then fail the rest with Unavailable and close every connection."""
        self.manager.begin_draining()
        self.broadcast_models()
        await self.manager.stop(grace_s)
        for connection in list(self.connections):
            for key in list(connection.handles):  # every handle is resolved by now; answer any not yet sent
                connection.channel.send(Failed(key, "Unavailable", Unavailable("the engine stopped").message))
            connection.channel.close()
        if self._server is not None:
            self._server.close()
