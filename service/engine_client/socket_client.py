"""`SocketClient`: a front-end process's engine client, talking to the engine process over a Unix socket.

It keeps a ModelRegistry in step with the engine's reports (the text side of every served version: model.json
and tokenizers, no onnxruntime session), so the dataplane validates, tokenizes and detokenizes here and only
token ids cross to the engine (service/ipc/messages.py). After applying a report it acknowledges it, which is
what lets the engine retire a replaced version only once no call can still be on its way to it
(service/ipc/engine_server.py).

Every call is answered exactly once: a handle is resolved by the engine's Result or Failed, by its own
cancellation, or, when the connection to the engine ends (the engine process died or stopped), with
Unavailable, which clients may retry. While there is no connection, every model reports not ready and new
calls get Unavailable; the client reconnects on its own once the engine process is back.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from service.engine import EngineRequest, RequestHandle
from service.engine_client.admission import QueueAdmission
from service.errors import ModelLoadError, RequestCancelled, Unavailable, error_from_status
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
from service.registry import (
    ModelEvent,
    ModelEventKind,
    ModelRegistry,
    ServedVersion,
    ServedVersionReport,
    notify_listeners,
)
from service.runtime.model import read_text_side
from service.runtime.model_format import ModelDocument
from service.runtime.tokenizers import Tokenizer
from service.settings import Settings

log = logging.getLogger(__name__)

RECONNECT_FIRST_S = 0.05
RECONNECT_LONGEST_S = 1.0


@dataclass(frozen=True)
class TextSide:
    """A model version as a front-end holds it: model.json and tokenizers, no onnxruntime session."""

    document: ModelDocument
    directory: Path
    source_tokenizer: Tokenizer
    target_tokenizer: Tokenizer
    provider: str
    load_seconds: float


def load_text_side(name: str, reported: ServedVersionReport) -> TextSide:
    """The text side of a version the engine reported; raises (and logs) ModelLoadError."""
    directory = Path(reported.directory)
    try:
        document, source, target = read_text_side(directory)
    except ModelLoadError as error:
        log.error("model %s version %s: %s", name, reported.version, error.message)
        raise
    return TextSide(document, directory, source, target, reported.provider, reported.load_seconds)


def _same(channel: Channel) -> Channel:
    return channel


@dataclass
class _QueueView:
    """One model version's queue as this front-end sees it: what the engine last reported (`waiting`, `dequeued`),
    the texts this front-end has sent it since (`picked_up`: not in that count yet), and its admission state."""

    admission: QueueAdmission
    waiting: int = 0
    dequeued: int = 0
    picked_up: int = 0


class SocketClient:
    """The engine process's engines behind the EngineClient protocol. Event-loop thread only.

    `check_room` refuses at once from the last queue depth the engine published and the texts sent since (cheap,
    no round trip), with the version's QueueAdmission, whose drain rate is measured from the engine's reports as
    they arrive (`clock`: time.monotonic); the engine's own check at submission stays the exact one for the queue
    limit, for all front-ends together. `on_availability(available)` is called when the engine connection comes
    (True) or goes (False).
    """

    def __init__(self, settings: Settings, socket_path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.socket_path = socket_path
        self._registry = ModelRegistry(settings.loaded_versions)
        self._registry.set_unavailable("the engine process is starting")
        self.on_availability: Callable[[bool], None] | None = None
        self._listeners: list[Callable[[ModelEvent], None]] = []
        self._channel: Channel | None = None
        self._keys = itertools.count(1)
        self._outstanding: dict[int, RequestHandle] = {}
        self._clock = clock
        self._queues: dict[tuple[str, int], _QueueView] = {}
        self._first_report = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()  # reconnections in progress
        self._stopping = False

    @property
    def registry(self) -> ModelRegistry:
        return self._registry

    # ----- life cycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (waiting for the engine process as long as it takes) and fill the registry from the
        engine's first report of what it serves."""
        await self._connect()
        await self._first_report.wait()

    async def _connect(self) -> None:
        delay = RECONNECT_FIRST_S
        loop = asyncio.get_running_loop()
        while not self._stopping:
            channel = Channel(self._received, self._lost)
            self._channel = channel  # before connecting: the engine's first report may arrive before we resume
            try:
                await loop.create_unix_connection(functools.partial(_same, channel), str(self.socket_path))
            except OSError as error:
                # The engine process is starting or restarting: its socket appears once its models are loaded
                # (FileNotFoundError, ConnectionRefusedError). A process that dies while it accepts resets the
                # connection (ConnectionResetError), and one that is swamped may have a full backlog
                # (BlockingIOError): all pass, so every error is tried again. A soak lost a front-end to the reset:
                # its reconnection ended there, and all its calls were refused until it was killed 4 minutes later.
                log.debug("connecting to the engine process failed (%s); trying again in %.2f s", error, delay)
                self._channel = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_LONGEST_S)
                continue
            log.info("connected to the engine process")
            return

    def add_listener(self, listener: Callable[[ModelEvent], None]) -> None:
        self._listeners.append(listener)

    def begin_draining(self) -> None:
        self._registry.begin_draining()

    async def stop(self, grace_s: float) -> None:
        """Wait up to `grace_s` seconds for the calls in flight, fail the rest with Unavailable, disconnect."""
        self.begin_draining()
        self._stopping = True
        # This runs after the transports' own drain, which normally left nothing in flight.
        waiting = [asyncio.ensure_future(handle.result()) for handle in self._outstanding.values()]
        if waiting:
            await asyncio.wait(waiting, timeout=max(grace_s, 0.0))
        self._fail_outstanding("the front-end stopped before the engine answered")
        await asyncio.gather(*waiting, return_exceptions=True)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._channel is not None:
            self._channel.close()

    # ----- requests ---------------------------------------------------------------------------------

    def check_room(self, served: ServedVersion, count: int, waited_s: float = 0.0) -> None:
        queue = self._queue(served.name, served.version, served.label)
        # The engine reports every change, so no report since the last one means the queue still holds what it
        # said: a sample now, which is how a stalled queue shows (its count does not move).
        queue.admission.observe(self._clock(), queue.waiting, queue.dequeued)
        queue.admission.check(count, queue.waiting, queue.picked_up, waited_s)

    def expected_wait_s(self, served: ServedVersion) -> float:
        queue = self._queue(served.name, served.version, served.label)
        queue.admission.observe(self._clock(), queue.waiting, queue.dequeued)
        return queue.admission.expected_wait_s(queue.waiting, queue.picked_up)

    def reported_queue(self, served: ServedVersion) -> tuple[int, int]:
        """(waiting, dequeued) of `served`'s queue as the engine last reported them ((0, 0) before any report)."""
        queue = self._queues.get((served.name, served.version))
        return (0, 0) if queue is None else (queue.waiting, queue.dequeued)

    def _queue(self, name: str, version: int, label: str) -> _QueueView:
        queue = self._queues.get((name, version))
        if queue is None:
            admission = QueueAdmission(
                label, self.settings.max_waiting_requests, self.settings.max_queue_wait_ms / 1000.0
            )
            queue = self._queues[(name, version)] = _QueueView(admission)
        return queue

    def submit(self, served: ServedVersion, requests: Sequence[EngineRequest]) -> list[RequestHandle]:
        """Send one call's requests to the engine, all or none; the engine's refusal (Overloaded,
        InvalidRequest, Unavailable) comes back through each handle's result(). Raises Unavailable without a
        connection."""
        channel = self._channel
        if channel is None or not channel.open:
            raise Unavailable(f"model {served.label} accepts no requests now: the engine process is down")
        loop = asyncio.get_running_loop()
        handles = [RequestHandle(next(self._keys), request.stream, loop, self._cancel) for request in requests]
        for handle in handles:
            self._outstanding[handle.key] = handle
        channel.send(Submit([handle.key for handle in handles], served.name, served.version, list(requests)))
        self._queue(served.name, served.version, served.label).picked_up += len(requests)
        return handles

    def _cancel(self, handle: RequestHandle) -> None:
        if self._outstanding.pop(handle.key, None) is None:
            return
        handle.fail(RequestCancelled("request cancelled"))
        if self._channel is not None:
            self._channel.send(Cancel(handle.key))

    # ----- messages from the engine -----------------------------------------------------------------

    def _received(self, messages: list[Message]) -> None:
        outstanding = self._outstanding
        for message in messages:
            if isinstance(message, Result):
                handle = outstanding.pop(message.id, None)
                if handle is not None:
                    handle.resolve(message.result)
            elif isinstance(message, Token):
                handle = outstanding.get(message.id)
                if handle is not None:
                    handle.push(message.event)
            elif isinstance(message, Failed):
                handle = outstanding.pop(message.id, None)
                if handle is not None:
                    handle.fail(error_from_status(message.code, message.message))
            elif isinstance(message, QueueDepth):
                queue = self._queue(message.name, message.version, f"{message.name} version {message.version}")
                queue.waiting, queue.dequeued, queue.picked_up = message.waiting, message.dequeued, 0
                queue.admission.observe(self._clock(), message.waiting, message.dequeued)
            elif isinstance(message, Registry):
                self._apply(message)
            else:
                log.warning("the engine sent %s, which only front-ends send; ignored", type(message).__name__)

    def _lost(self, reason: str) -> None:
        self._channel = None
        if self._stopping:
            return
        log.error(
            "lost the engine process (%s): failing %d calls in flight with UNAVAILABLE", reason, len(self._outstanding)
        )
        self._registry.set_unavailable("the engine process is restarting")
        # What the lost engine reported of its queues says nothing of the next one's, which starts empty and reports
        # only when its counts change: a queue left as last seen (texts waiting, never moving) would look stalled
        # and refuse every call, so the new engine would never get one.
        self._queues = {}
        self._fail_outstanding("the engine process stopped before it finished this call; retry")
        self._notify_availability(False)
        task = asyncio.get_running_loop().create_task(self._connect(), name="engine reconnect")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _fail_outstanding(self, why: str) -> None:
        outstanding, self._outstanding = self._outstanding, {}
        for handle in outstanding.values():
            handle.fail(Unavailable(why))

    def _notify_availability(self, available: bool) -> None:
        if self.on_availability is not None:
            try:
                self.on_availability(available)
            except Exception:
                log.exception("the engine availability listener failed")

    # ----- what the engine serves -------------------------------------------------------------------

    def _apply(self, message: Registry) -> None:
        """Make the registry what the engine serves, then acknowledge it. Synchronous on purpose: a report is
        applied before the next message on the channel is read, and before any call resolved against it is
        sent. A new version's tokenizers load here (milliseconds; the engine process did the slow part)."""
        channel = self._channel
        added = self._registry.apply_report(message.report, load_text_side)
        serving = {(served.name, served.version) for served in self._registry.served_versions()}
        self._queues = {key: queue for key, queue in self._queues.items() if key in serving}
        if channel is None:  # a report that arrived just before the connection went: still unavailable
            return
        channel.send(RegistryApplied(message.generation))
        was_unavailable = bool(self._registry.unavailable)
        self._registry.set_unavailable("")
        for served in added:
            notify_listeners(self._listeners, ModelEvent(ModelEventKind.LOADED, served.name, served.version))
        if was_unavailable:
            self._notify_availability(True)
        self._first_report.set()
