"""The caller's side of one engine request: a future for its result, and its streamed tokens.

Whoever owns the request's engine resolves the handle: `AsyncEngine` in the process that decodes, the socket
client (service/engine_client/socket_client.py) in a front-end process. Callers await `result()` or iterate
`tokens()`, and `cancel()` when they give up. Use a handle on its event loop's thread only.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Callable

from service.engine.records import EngineResult, TokenEvent
from service.errors import AttnServeError

_END_OF_STREAM = object()


def _raised(error: BaseException) -> BaseException:
    """A copy of a handle's stored error, to raise: the same class, message and attributes, and no traceback yet.
    Raised itself, the stored error would take a traceback holding every frame it passed through, among them the
    handle's own and its callers': a reference cycle from the handle back to itself. Only the garbage collector's
    full passes free such cycles, and in an engine process they come minutes apart."""
    return copy.copy(error)


class RequestHandle:
    """One submitted request, as its caller sees it; resolved exactly once (result or error).

    `key` identifies the request to its owner. `on_cancel(handle)` is the owner's: called by `cancel()` while
    the handle is unresolved, it must fail the handle (with RequestCancelled) and drop the request.

    The outcome is kept on the handle itself; a future exists only while a caller awaits `result()`, so a
    handle whose owner answers through `when_resolved` (the engine process's server) never makes one."""

    __slots__ = ("key", "_loop", "_waiters", "_events", "_stream_taken", "_on_cancel", "_when_resolved", "_outcome")

    def __init__(
        self, key: int, stream: bool, loop: asyncio.AbstractEventLoop, on_cancel: Callable[[RequestHandle], None]
    ) -> None:
        self.key = key
        self._loop = loop
        self._waiters: list[asyncio.Future[None]] | None = None
        self._events: asyncio.Queue[object] | None = asyncio.Queue() if stream else None
        self._stream_taken = False
        self._on_cancel: Callable[[RequestHandle], None] | None = on_cancel  # None once resolved
        self._when_resolved: Callable[[RequestHandle], None] | None = None
        self._outcome: EngineResult | AttnServeError | None = None

    # ----- for the caller ----------------------------------------------------------------------------

    @property
    def streams(self) -> bool:
        """True when the request was submitted with stream=True (its tokens are delivered as decoded)."""
        return self._events is not None

    @property
    def done(self) -> bool:
        """True once the request is resolved (result, error or cancellation)."""
        return self._outcome is not None

    async def result(self) -> EngineResult:
        """Wait for the result; raises the AttnServeError that ended the request otherwise.

        If the awaiting task is cancelled (e.g. the RPC was), the request is cancelled too.
        """
        if self._outcome is None:
            waiter: asyncio.Future[None] = self._loop.create_future()
            if self._waiters is None:
                self._waiters = [waiter]
            else:
                self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                self.cancel()
                raise
        outcome = self._outcome
        if isinstance(outcome, AttnServeError):
            raise _raised(outcome)
        assert outcome is not None
        return outcome

    def tokens(self) -> AsyncIterator[TokenEvent]:
        """The tokens of a streaming request (submitted with stream=True) as they are decoded; iterate it once.

        Greedy requests yield every generated token (eos included) right after its step; beam requests
        yield nothing (await result() for the n-best). The iteration ends when the request finishes, or
        raises the AttnServeError that ended it. Cancelling the iterating task cancels the request; a
        caller that merely stops iterating should call cancel() itself.
        """
        if self._events is None:
            raise ValueError("tokens() needs a request submitted with stream=True")
        if self._stream_taken:
            raise RuntimeError("tokens() can be iterated only once per request")
        self._stream_taken = True
        return self._iterate_events(self._events)

    def cancel(self) -> None:
        """Cancel the request (idempotent): result() raises RequestCancelled at once; its rows leave the
        batch at the next step. No effect once the request is resolved."""
        if self._on_cancel is not None:
            self._on_cancel(self)

    def when_resolved(self, callback: Callable[[RequestHandle], None]) -> None:
        """Call `callback(self)` right when the request is resolved, in the same turn of the event loop (one
        callback per handle; it must not raise or block); `outcome()` then says how it ended."""
        self._when_resolved = callback

    def outcome(self) -> EngineResult | AttnServeError:
        """A resolved request's result, or the AttnServeError that ended it (InvalidStateError before then)."""
        if self._outcome is None:
            raise asyncio.InvalidStateError("the request is not resolved yet")
        return self._outcome

    async def _iterate_events(self, events: asyncio.Queue[object]) -> AsyncIterator[TokenEvent]:
        while True:
            try:
                item = await events.get()
            except asyncio.CancelledError:
                self.cancel()
                raise
            if item is _END_OF_STREAM:
                return
            if isinstance(item, BaseException):
                raise _raised(item)
            assert isinstance(item, TokenEvent)
            yield item

    # ----- for the owner ------------------------------------------------------------------------------
    # Each returns False when the handle was already resolved: that is how "exactly once" holds when a
    # cancellation races a result.

    def push(self, event: TokenEvent) -> None:
        """Deliver a streamed token (ignored once resolved, or when the request does not stream)."""
        if self._events is not None and self._outcome is None:
            self._events.put_nowait(event)

    def resolve(self, result: EngineResult) -> bool:
        """End the request with its result."""
        return self._end(result, _END_OF_STREAM)

    def fail(self, error: AttnServeError) -> bool:
        """End the request with `error`."""
        return self._end(error, error)

    def _end(self, outcome: EngineResult | AttnServeError, last_event: object) -> bool:
        if self._outcome is not None:
            return False
        self._outcome = outcome
        # A resolved handle holds nothing of its owner's: a handle outlives its request (its caller's frames, an
        # error's traceback), and through `on_cancel` it would keep a retired version's engine, sessions and batch.
        self._on_cancel = None
        if self._waiters is not None:
            for waiter in self._waiters:
                if not waiter.done():  # a waiter whose task was cancelled is done already
                    waiter.set_result(None)
            self._waiters = None
        if self._events is not None:
            self._events.put_nowait(last_event)
        if self._when_resolved is not None:
            self._when_resolved(self)
        return True
