"""`InProcessClient`: the engine client of a process that decodes itself (one-process server, offline client).

The model manager loads the repository and runs one AsyncEngine per served version; this client hands the
dataplane's requests to them. The dataplane resolves the version and submits in one turn of the event loop,
so a call always reaches a version that still takes requests.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from pathlib import Path

from service.engine import AsyncEngine, EngineRequest, RequestHandle
from service.errors import Unavailable
from service.metrics import ServerMetrics
from service.models import ModelManager
from service.registry import ModelEvent, ModelRegistry, ServedVersion
from service.runtime.model import LoadedModel
from service.settings import Settings


class InProcessClient:
    """The engines of this process behind the EngineClient protocol. `only` and `loader`: see ModelManager."""

    def __init__(
        self,
        settings: Settings,
        metrics: ServerMetrics | None = None,
        *,
        only: Collection[str] | None = None,
        loader: Callable[[Path], LoadedModel] | None = None,
    ) -> None:
        self.manager = ModelManager(settings, metrics, only=only, loader=loader)

    @property
    def registry(self) -> ModelRegistry:
        return self.manager.registry

    async def start(self) -> None:
        """Load the repository (ModelManager.start, with its errors)."""
        await self.manager.start()

    def check_room(self, served: ServedVersion, count: int) -> None:
        self._engine(served).check_room(count)

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
