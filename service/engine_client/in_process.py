"""`InProcessClient`: the engine client of a process that decodes itself (one-process server, offline client).

The model manager loads the repository and runs one AsyncEngine per served version; this client hands the
dataplane's requests to them. The dataplane resolves the version and submits in one turn of the event loop,
so a call always reaches a version that still takes requests.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

from service.engine import AsyncEngine, EngineRequest, RequestHandle
from service.engine_client.admission import QueueAdmission
from service.errors import Unavailable
from service.metrics import ServerMetrics
from service.models import ModelManager
from service.registry import ModelEvent, ModelEventKind, ModelRegistry, ServedVersion
from service.runtime.model import LoadedModel
from service.settings import Settings


class InProcessClient:
    """The engines of this process behind the EngineClient protocol. `only` and `loader`: see ModelManager.

    `check_room` reads the engine's queue (its length and how many texts have left it) and decides with that
    version's QueueAdmission; `clock` (time.monotonic) times the samples its drain rate is measured from.
    """

    def __init__(
        self,
        settings: Settings,
        metrics: ServerMetrics | None = None,
        *,
        only: Collection[str] | None = None,
        loader: Callable[[Path], LoadedModel] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.manager = ModelManager(settings, metrics, only=only, loader=loader)
        self._clock = clock
        self._admissions: dict[tuple[str, int], QueueAdmission] = {}
        self.manager.add_listener(self._forget_retired)

    @property
    def registry(self) -> ModelRegistry:
        return self.manager.registry

    async def start(self) -> None:
        """Load the repository (ModelManager.start, with its errors)."""
        await self.manager.start()

    def check_room(self, served: ServedVersion, count: int, waited_s: float = 0.0) -> None:
        waiting, dequeued = self._engine(served).queue_progress()
        admission = self.admission(served)
        admission.observe(self._clock(), waiting, dequeued)
        # Calls are checked and submitted in one turn of the event loop: none is picked up and not yet queued.
        admission.check(count, waiting, 0, waited_s)

    def expected_wait_s(self, served: ServedVersion) -> float:
        engine = self.manager.engine(served.name, served.version)
        if engine is None:
            return 0.0
        waiting, dequeued = engine.queue_progress()
        admission = self.admission(served)
        admission.observe(self._clock(), waiting, dequeued)
        return admission.expected_wait_s(waiting)

    def admission(self, served: ServedVersion) -> QueueAdmission:
        """The admission state of `served` (made at its first call)."""
        key = (served.name, served.version)
        admission = self._admissions.get(key)
        if admission is None:
            admission = self._admissions[key] = QueueAdmission(
                served.label, self.settings.max_waiting_requests, self.settings.max_queue_wait_ms / 1000.0
            )
        return admission

    def _forget_retired(self, event: ModelEvent) -> None:
        if event.kind is ModelEventKind.RETIRED:
            self._admissions.pop((event.name, event.version), None)

    def submit(self, served: ServedVersion, requests: Sequence[EngineRequest]) -> list[RequestHandle]:
        return self._engine(served).submit_all(requests)

    def add_listener(self, listener: Callable[[ModelEvent], None]) -> None:
        self.manager.add_listener(listener)

    def begin_draining(self) -> None:
        self.manager.begin_draining()

    async def stop(self, grace_s: float) -> None:
        await self.manager.stop(grace_s)

    def refresh_soon(self, reason: str) -> None:
        """Scan the model repository now (SIGHUP)."""
        self.manager.refresh_soon(reason)

    def _engine(self, served: ServedVersion) -> AsyncEngine:
        engine = self.manager.engine(served.name, served.version)
        if engine is None:
            raise Unavailable(f"model {served.label} was retired and accepts no requests")
        return engine
