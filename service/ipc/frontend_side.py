"""A front-end process's view of the engine process.

`EngineClient` keeps a ModelRegistry in step with what the engine serves. Each served version's `scheduler`
is a `RemoteScheduler`, with the engine Scheduler's surface (check_room, submit, submit_all, and the
RequestHandle it returns), so the dataplane and the servicers run unchanged: they validate, tokenize and
detokenize here, and only token ids cross to the engine.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.engine import FinishReason, Hypothesis, RequestHandle, TokenEvent, TranslationRequest, TranslationResult
from service.errors import (
    ALL_ERRORS,
    AttnServeError,
    InvalidRequest,
    ModelLoadError,
    Overloaded,
    RequestCancelled,
    Unavailable,
)
from service.ipc.messages import (
    Cancel,
    Channel,
    Failed,
    HypothesisRecord,
    Message,
    Models,
    Options,
    QueueDepth,
    Result,
    Submit,
    Token,
)
from service.models import ModelEvent, ModelEventKind, notify_listeners
from service.registry import ModelEntry, ModelRegistry, ServedVersion
from service.runtime.model import read_text_side
from service.runtime.model_format import ModelDocument
from service.runtime.tokenizers import Tokenizer
from service.settings import Settings

log = logging.getLogger(__name__)

_ERRORS_BY_NAME = {error.__name__: error for error in ALL_ERRORS}

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


def hypothesis_from(record: HypothesisRecord) -> Hypothesis:
    attention = None
    if record.attention is not None:
        attention = np.frombuffer(record.attention, dtype=np.float32).reshape(-1, record.attention_columns)
    return Hypothesis(
        token_ids=record.token_ids,
        score=record.score,
        log_prob=record.log_prob,
        finish_reason=FinishReason(record.finish_reason),
        alignment=record.alignment,
        attention=attention,
    )


def _same(channel: Channel) -> Channel:
    return channel


class RemoteScheduler:
    """A model version's queue in the engine process, seen from a front-end (the registry's DecodeQueue).

    `check_room` refuses at once from the last queue depth the engine published (cheap, no round trip);
    the engine's own check at submission stays the exact one, for all front-ends together.
    """

    def __init__(self, client: EngineClient, name: str, version: int, waiting_limit: int) -> None:
        self.client = client
        self.name = name
        self.version = version
        self.waiting_limit = waiting_limit
        self.published_waiting = 0
        self._label = f"{name} version {version}"

    @property
    def waiting(self) -> int:
        return self.published_waiting

    @property
    def running(self) -> int:
        return 0  # the engine process reports it

    def check_room(self, count: int) -> None:
        if count > self.waiting_limit:
            raise InvalidRequest(
                f"this call brings {count} texts but model {self._label} queues at most "
                f"{self.waiting_limit}; send fewer texts per call"
            )
        if count > self.waiting_limit - self.published_waiting:
            raise Overloaded(
                f"model {self._label} has {self.published_waiting} requests waiting and this call brings "
                f"{count}; the limit is {self.waiting_limit}; retry later"
            )

    def submit(self, request: TranslationRequest) -> RequestHandle:
        return self.submit_all([request])[0]

    def submit_all(self, requests: Sequence[TranslationRequest]) -> list[RequestHandle]:
        """Send the requests to the engine, all or none; the engine's refusal (Overloaded, InvalidRequest,
        Unavailable) comes back through each handle's result()."""
        return self.client.submit(self.name, self.version, requests)

    async def stop(self, grace_s: float) -> None:
        """Nothing to stop here: the engine process drains its own scheduler."""


class EngineClient:
    """A front-end's connection to the engine process and the registry it keeps filled. Event-loop thread only.

    It has the ModelManager's surface that the gRPC server uses (registry, add_listener, begin_draining,
    stop). `on_availability(available)` is called when the engine connection comes (True) or goes (False).
    """

    def __init__(self, settings: Settings, socket_path: Path) -> None:
        self.settings = settings
        self.socket_path = socket_path
        self.registry = ModelRegistry(settings.loaded_versions)
        self.registry.unavailable = "the engine process is starting"
        self.on_availability: Callable[[bool], None] | None = None
        self._listeners: list[Callable[[ModelEvent], None]] = []
        self._channel: Channel | None = None
        self._keys = itertools.count(1)
        self._outstanding: dict[int, RequestHandle] = {}
        self._schedulers: dict[tuple[str, int], RemoteScheduler] = {}
        self._first_models = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()  # reconnections in progress
        self._stopping = False

    # ----- life cycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (waiting for the engine process as long as it takes) and fill the registry from the
        engine's first report of what it serves."""
        await self._connect()
        await self._first_models.wait()

    async def _connect(self) -> None:
        delay = RECONNECT_FIRST_S
        loop = asyncio.get_running_loop()
        while not self._stopping:
            channel = Channel(self._received, self._lost)
            self._channel = channel  # before connecting: the engine's first report may arrive before we resume
            try:
                await loop.create_unix_connection(functools.partial(_same, channel), str(self.socket_path))
            except (FileNotFoundError, ConnectionRefusedError):
                # The engine process is starting or restarting: its socket appears once its models are loaded.
                self._channel = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_LONGEST_S)
                continue
            log.info("connected to the engine process")
            return

    def add_listener(self, listener: Callable[[ModelEvent], None]) -> None:
        self._listeners.append(listener)

    def begin_draining(self) -> None:
        self.registry.draining = True

    async def stop(self, grace_s: float) -> None:
        """Wait up to `grace_s` seconds for the calls in flight, fail the rest with Unavailable, disconnect."""
        self.begin_draining()
        self._stopping = True
        # This runs after gRPC's own drain, which normally left nothing in flight.
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

    def submit(self, name: str, version: int, requests: Sequence[TranslationRequest]) -> list[RequestHandle]:
        """Send one call's texts to the engine (RemoteScheduler.submit_all); raises Unavailable without a connection."""
        channel = self._channel
        if channel is None or not channel.open:
            raise Unavailable(f"model {name} version {version} accepts no requests now: the engine process is down")
        first = requests[0]
        options = first.options
        if any(
            (r.options, r.deadline, r.stream, r.arrival) != (options, first.deadline, first.stream, first.arrival)
            for r in requests
        ):
            raise ValueError("one Submit carries one call's texts: the same options, deadline, stream and arrival")
        loop = asyncio.get_running_loop()
        handles = [
            RequestHandle(next(self._keys), request, loop, self._cancel, request.arrival) for request in requests
        ]
        for handle in handles:
            self._outstanding[handle.key] = handle
        channel.send(
            Submit(
                ids=[handle.key for handle in handles],
                name=name,
                version=version,
                sources=[request.source_ids.tobytes() for request in requests],
                options=Options(
                    options.beam_size,
                    options.num_hypotheses,
                    options.max_length,
                    options.length_penalty,
                    options.return_attention,
                ),
                deadline=first.deadline,
                stream=first.stream,
                arrival=first.arrival,
            )
        )
        return handles

    def _cancel(self, handle: RequestHandle) -> None:
        if self._outstanding.pop(handle.key, None) is None:
            return
        handle._fail(RequestCancelled("request cancelled"))
        if self._channel is not None:
            self._channel.send(Cancel(handle.key))

    # ----- messages from the engine -----------------------------------------------------------------

    def _received(self, messages: list[Message]) -> None:
        for message in messages:
            if isinstance(message, Result):
                handle = self._outstanding.pop(message.id, None)
                if handle is not None:
                    handle._resolve(
                        TranslationResult(
                            hypotheses=[hypothesis_from(record) for record in message.hypotheses],
                            queue_wait_s=message.queue_wait_s,
                            first_token_s=message.first_token_s,
                            total_s=message.total_s,
                            generated_tokens=message.generated_tokens,
                        )
                    )
            elif isinstance(message, Failed):
                handle = self._outstanding.pop(message.id, None)
                if handle is not None:
                    handle._fail(_ERRORS_BY_NAME.get(message.error, AttnServeError)(message.message))
            elif isinstance(message, Token):
                handle = self._outstanding.get(message.id)
                if handle is not None:
                    attention = None if message.attention is None else np.frombuffer(message.attention, np.float32)
                    handle._push(
                        TokenEvent(message.token_id, message.position, message.log_prob, message.alignment, attention)
                    )
            elif isinstance(message, QueueDepth):
                scheduler = self._schedulers.get((message.name, message.version))
                if scheduler is not None:
                    scheduler.published_waiting = message.waiting
            elif isinstance(message, Models):
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
        self.registry.unavailable = "the engine process is restarting"
        self._fail_outstanding("the engine process stopped before it finished this call; retry")
        self._notify_availability(False)
        task = asyncio.get_running_loop().create_task(self._connect(), name="engine reconnect")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _fail_outstanding(self, why: str) -> None:
        outstanding, self._outstanding = self._outstanding, {}
        for handle in outstanding.values():
            handle._fail(Unavailable(why))

    def _notify_availability(self, available: bool) -> None:
        if self.on_availability is not None:
            try:
                self.on_availability(available)
            except Exception:
                log.exception("the engine availability listener failed")

    # ----- what the engine serves -------------------------------------------------------------------

    def _apply(self, models: Models) -> None:
        """Make the registry what the engine serves. Synchronous on purpose: a report is applied before the next
        message on the channel is read, so a VersionRetired refusal always finds the new version in place.
        A new version's tokenizers load here (milliseconds; the engine process did the slow part)."""
        registry = self.registry
        events: list[ModelEvent] = []
        entries: dict[str, ModelEntry] = {}
        for info in models.models:
            previous = registry.entries.get(info.name)
            entry = ModelEntry(versions_on_disk=tuple(info.versions_on_disk), failures=dict(info.failures))
            for served in info.served:
                known = previous.served.get(served.version) if previous is not None else None
                if known is not None and str(known.model.directory) == served.directory:
                    entry.served[served.version] = known
                    continue
                try:
                    document, source, target = read_text_side(Path(served.directory))
                except ModelLoadError as error:
                    log.error("model %s version %s: %s", info.name, served.version, error.message)
                    entry.failures[served.version] = error.message
                    continue
                model = TextSide(document, Path(served.directory), source, target, served.provider, served.load_seconds)
                scheduler = RemoteScheduler(self, info.name, served.version, self.settings.max_waiting_requests)
                self._schedulers[(info.name, served.version)] = scheduler
                entry.served[served.version] = ServedVersion(info.name, served.version, model, scheduler)
                events.append(ModelEvent(ModelEventKind.LOADED, info.name, served.version))
            entries[info.name] = entry
        registry.entries = entries
        registry.default_model = models.default_model
        registry.draining = registry.draining or models.draining
        serving = {(name, version) for name, entry in entries.items() for version in entry.served}
        for retired in set(self._schedulers) - serving:  # its calls in flight still resolve by request id
            del self._schedulers[retired]
        if self._channel is None:  # a report that arrived just before the connection went: still unavailable
            return
        was_unavailable = bool(registry.unavailable)
        registry.unavailable = ""
        for event in events:
            notify_listeners(self._listeners, event)
        if was_unavailable:
            self._notify_availability(True)
        self._first_models.set()
