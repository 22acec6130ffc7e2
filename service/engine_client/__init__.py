"""The seam between the front-end (dataplane, transports) and the engine: one client protocol, two
implementations, as vLLM's EngineCoreClient has.

- in_process.py: `InProcessClient`, the engines of this process (a single-process server, the offline client);
- socket_client.py: `SocketClient`, the engine process's engines over a Unix socket (a front-end process).

The dataplane and the transports hold an `EngineClient` and never know which one. Both give the same records
(service/engine/records.py) and resolve the same `RequestHandle`s, so a call behaves the same in either mode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from service.engine import EngineRequest, RequestHandle
from service.registry import ModelEvent, ModelRegistry, ServedVersion


class EngineClient(Protocol):
    """The engine as the front-end sees it. Use on the event-loop thread.

    `registry`: what is served (the text side of every loaded version), for lookups; the client keeps it
    current. Cancelling a request is `RequestHandle.cancel()`.
    """

    @property
    def registry(self) -> ModelRegistry: ...

    async def start(self) -> None:
        """Ready to serve: models loaded (in process) or the engine process's first report applied."""
        ...

    def check_room(self, served: ServedVersion, count: int, waited_s: float = 0.0) -> None:
        """Raise Overloaded now unless `served`'s queue has room for `count` more requests and a call of them,
        which waited `waited_s` seconds to be picked up, could start within max_queue_wait_ms (InvalidRequest when
        they never fit; see QueueAdmission.check). Cheap, so that refusing under overload costs little."""
        ...

    def expected_wait_s(self, served: ServedVersion) -> float:
        """Seconds a call arriving now would wait in `served`'s queue before its first text joins the batch, as
        admission estimates it (0 while it cannot tell yet)."""
        ...

    def submit(self, served: ServedVersion, requests: Sequence[EngineRequest]) -> list[RequestHandle]:
        """Queue one call's requests for `served`, all or none. Raises (or resolves every handle with)
        Unavailable, InvalidRequest or Overloaded when they are refused."""
        ...

    def add_listener(self, listener: Callable[[ModelEvent], None]) -> None:
        """Call `listener(event)` on the event-loop thread whenever a version loads, fails or retires."""
        ...

    def begin_draining(self) -> None:
        """From now on every version reports not ready and new calls get Unavailable."""
        ...

    async def stop(self, grace_s: float) -> None:
        """Let the requests in flight finish for up to `grace_s` seconds, fail the rest with Unavailable, stop."""
        ...
