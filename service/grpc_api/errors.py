"""The ONE table from attnserve errors to gRPC status codes, and the interceptor that applies it.

Servicers never call `context.abort` for domain errors: they let `service.errors.AttnServeError`
propagate, and `RpcInterceptor` turns it into its status (the error's message becomes the details).
Anything else is a bug: it is logged with its traceback and answered INTERNAL without internals.
The same interceptor reports every finished RPC (method, status, seconds, model) to the metrics, so
per-RPC accounting also lives in one place.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from grpc import aio

from service.errors import ALL_ERRORS, AttnServeError, DeadlineExceeded, InvalidRequest, Overloaded
from service.metrics import ServerMetrics

log = logging.getLogger(__name__)

STATUS_BY_CODE: dict[str, grpc.StatusCode] = {
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "DEADLINE_EXCEEDED": grpc.StatusCode.DEADLINE_EXCEEDED,
    "CANCELLED": grpc.StatusCode.CANCELLED,
    "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "UNAUTHENTICATED": grpc.StatusCode.UNAUTHENTICATED,
    "FAILED_PRECONDITION": grpc.StatusCode.FAILED_PRECONDITION,
    "INTERNAL": grpc.StatusCode.INTERNAL,
}
"""AttnServeError.code -> the status sent to the client. Every class in service.errors.ALL_ERRORS has a row."""


def check_status_table() -> None:
    """Raise RuntimeError at start-up if an error class has a code the table lacks."""
    missing = sorted({error.code for error in ALL_ERRORS} - STATUS_BY_CODE.keys())
    if missing:
        raise RuntimeError(f"service/grpc_api/errors.py STATUS_BY_CODE has no row for {missing}")


MAX_DETAILS_CHARS = 1000
"""The longest status message sent; a longer one is cut, saying how much was cut. Why: gRPC sends the message
percent-encoded in a trailer (up to 12 bytes per character), and a client refuses trailers over 16 KiB, failing the
call with RESOURCE_EXHAUSTED in place of its real status; a message quoting a long input would get there."""


def bounded_details(details: str) -> str:
    """`details`, cut to MAX_DETAILS_CHARS characters when longer."""
    if len(details) <= MAX_DETAILS_CHARS:
        return details
    suffix = f"... ({len(details) - MAX_DETAILS_CHARS + 40} characters cut)"
    return details[: MAX_DETAILS_CHARS - 40] + suffix


RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
"""The trailer in which gRPC's retry design (A6) lets a server tell a client when to retry, in milliseconds: a
client whose retry policy covers the status waits exactly that long before its next attempt."""


def trailing_metadata_for(error: BaseException) -> tuple[tuple[str, str], ...]:
    """The trailers a client gets with `error`'s status: the retry hint of an Overloaded that has one."""
    if isinstance(error, Overloaded) and error.retry_after_s is not None:
        return ((RETRY_PUSHBACK_KEY, str(max(1, math.ceil(error.retry_after_s * 1000.0)))),)
    return ()


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and details a client gets for `error` (details at most about MAX_DETAILS_CHARS characters)."""
    if isinstance(error, AttnServeError):
        return STATUS_BY_CODE.get(error.code, grpc.StatusCode.INTERNAL), bounded_details(error.message)
    return grpc.StatusCode.INTERNAL, f"internal server error ({type(error).__name__}); see the server log"


@dataclass
class CallLabels:
    """The model a call resolved to, for its metric labels; '' until (unless) it resolves one."""

    model: str = ""
    version: int | None = None


_current_call: contextvars.ContextVar[CallLabels | None] = contextvars.ContextVar("attnserve_call", default=None)


def note_model(model: str, version: int) -> None:
    """Record the model version serving the current RPC (a servicer calls it once it has resolved one)."""
    labels = _current_call.get()
    if labels is not None:
        labels.model, labels.version = model, version


@dataclass(frozen=True)
class _Undecodable:
    """Stands in for a request message that did not parse, so its call is answered INVALID_ARGUMENT
    (grpc itself would answer UNKNOWN, as if the server had a bug)."""

    error: str


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as error:  # DecodeError, or anything a generated parser raises on bad bytes
            return _Undecodable(str(error) or type(error).__name__)

    return deserialize


def _check_decoded(method: str, request: Any) -> None:
    if isinstance(request, _Undecodable):
        raise InvalidRequest(f"the {method} request is not a valid protobuf message: {request.error}")


class _CheckedRequests:
    """The request stream of a streaming-request call, where a message that did not parse raises InvalidRequest
    from `__anext__` and the stream can be read on past it (the next message is unaffected: gRPC frames each
    message with its length), so a servicer may answer that one message in-band and go on."""

    def __init__(self, method: str, requests: AsyncIterator[Any]) -> None:
        self._method = method
        self._requests = requests.__aiter__()

    def __aiter__(self) -> _CheckedRequests:
        return self

    async def __anext__(self) -> Any:
        request = await self._requests.__anext__()
        _check_decoded(self._method, request)
        return request


def _status_name(context: aio.ServicerContext, fallback: str) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        for status in grpc.StatusCode:
            if status.value[0] == code:
                return status.name
    return fallback


UNKNOWN_METHOD = "unknown"
"""The method label of calls to paths the server does not serve."""


Abort = tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]
"""What a failed call is answered with: its status, details and trailing metadata."""


async def send_status(context: aio.ServicerContext, abort: Abort) -> None:
    """End the call with `abort`'s status: `context.abort` sends it and raises AbortError, which grpc turns into
    the call's end. When gRPC core has ended the call already, in the same instant as the error (the call's
    deadline fired there as the engine gave up on it, or the client reset the stream), the send fails with
    `aio.InternalError`: core has answered the client itself and there is nobody left to tell. The call then ends
    as a cancelled one, which grpc logs at debug level, not as a failed send, which grpc logs with a traceback at
    error level (a dozen times in a 10-minute soak whose calls have 2-50 ms deadlines)."""
    try:
        await context.abort(*abort)
    except aio.InternalError as failure:
        log.debug("gRPC had ended the call before its %s status could be sent: %s", abort[0].name, failure)
        raise asyncio.CancelledError from failure


async def end_failed_call(context: aio.ServicerContext, error: BaseException, abort: Abort | None) -> NoReturn:
    """End a call whose handler raised `error`: with `abort`'s status when there is one (send_status); as a
    cancelled call when the handler's own send failed because core had ended the call (`aio.InternalError`, as in
    send_status); else by raising `error` on (a cancellation, or an abort the handler did itself). It suspends only
    to send a status, never for GeneratorExit or a cancellation, so a streaming wrapper being closed may await it."""
    if abort is not None:
        await send_status(context, abort)
    if isinstance(error, aio.InternalError):
        raise asyncio.CancelledError from error
    raise error


class RpcInterceptor(aio.ServerInterceptor):
    """Maps exceptions to statuses with STATUS_BY_CODE and reports each finished RPC to the metrics.

    Wraps unary-unary and unary-stream handlers (every attnserve and health method), counted in the metrics, and
    streaming-request methods written as async generators (ModelStreamInfer, reflection), not counted.
    """

    def __init__(self, metrics: ServerMetrics | None = None, methods: Collection[str] | None = None) -> None:
        """`methods`: the full paths ('/package.Service/Method') the server serves; a call to any other path
        (refused by the token check before gRPC answers UNIMPLEMENTED) is counted as method UNKNOWN_METHOD, so
        a client cannot add label values. None: every call is counted under its own method name."""
        self._metrics = metrics
        self._methods = frozenset(methods) if methods is not None else None
        # gRPC asks for a method's handler at every call, and gets the same handler object for every call of a
        # method, so each is wrapped once: (id(handler), method label) -> (handler, wrapper), the handler kept
        # so its id stays its own. The label is in the key because one handler may stand for several paths
        # (the token check's refusal of every unknown method); the labels are a bounded set.
        self._wrapped: dict[tuple[int, str], tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        path = handler_call_details.method
        method = path.rsplit("/", 1)[-1] if self._methods is None or path in self._methods else UNKNOWN_METHOD
        cached = self._wrapped.get((id(handler), method))
        if cached is not None:
            return cached[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[(id(handler), method)] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(method, handler.unary_unary),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            behavior = handler.unary_stream
            wrapped = (
                self._wrap_stream(method, behavior)
                if inspect.isasyncgenfunction(behavior)
                else self._wrap_unary(method, behavior)  # a coroutine writing with context.write()
            )
            return grpc.unary_stream_rpc_method_handler(
                wrapped,
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None and inspect.isasyncgenfunction(handler.stream_stream):
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_bidi(method, handler.stream_stream),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler

    def _wrap_unary(self, method: str, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def unary(request: Any, context: aio.ServicerContext) -> Any:
            labels = CallLabels()
            _current_call.set(labels)
            started = time.perf_counter()
            code, observed = "OK", False
            try:
                _check_decoded(method, request)
                response = await behavior(request, context)
                remaining = context.time_remaining()  # None: the call has no deadline
                if remaining is not None and remaining <= 0:
                    # The answer is ready only after the deadline: the client has given up (its deadline is no
                    # later than ours), and core ends the call as its timer fires, so sending it would only fail.
                    raise DeadlineExceeded("the deadline passed as the answer was ready")
                return response
            except BaseException as error:
                code, abort = self._classify(error, context, method)
                if abort is not None:
                    # abort() sends the status at once: count the call first, so a client that reads the
                    # metrics right after its error sees it.
                    self._observe(method, code, started, labels, error)
                    observed = True
                await end_failed_call(context, error, abort)
            finally:
                if not observed:
                    self._observe(method, code, started, labels)

        return unary

    def _wrap_stream(
        self, method: str, behavior: Callable[..., AsyncGenerator[Any, None]]
    ) -> Callable[..., AsyncGenerator[Any, None]]:
        async def stream(request: Any, context: aio.ServicerContext) -> AsyncGenerator[Any, None]:
            labels = CallLabels()
            _current_call.set(labels)
            started = time.perf_counter()
            code, observed = "OK", False
            responses = behavior(request, context)
            try:
                _check_decoded(method, request)
                async for response in responses:
                    yield response
            except BaseException as error:
                code, abort = self._classify(error, context, method)
                if abort is not None:
                    self._observe(method, code, started, labels, error)  # before abort() sends the status
                    observed = True
                await end_failed_call(context, error, abort)
            finally:
                await responses.aclose()
                if not observed:
                    self._observe(method, code, started, labels)

        return stream

    def _wrap_bidi(
        self, method: str, behavior: Callable[..., AsyncGenerator[Any, None]]
    ) -> Callable[..., AsyncGenerator[Any, None]]:
        """A streaming-request method: a request message that does not parse raises InvalidRequest where the
        servicer reads it (ModelStreamInfer answers it in-band and reads on; a servicer that lets it propagate
        fails the call with INVALID_ARGUMENT, as gRPC alone would answer UNKNOWN). These calls are not counted
        in the per-call metrics (a stream of many requests is not one call's worth of latency)."""

        async def bidi(requests: AsyncIterator[Any], context: aio.ServicerContext) -> AsyncGenerator[Any, None]:
            responses = behavior(_CheckedRequests(method, requests), context)
            try:
                async for response in responses:
                    yield response
            except BaseException as error:
                _, abort = self._classify(error, context, method)
                await end_failed_call(context, error, abort)
            finally:
                await responses.aclose()

        return bidi

    @staticmethod
    def _classify(error: BaseException, context: aio.ServicerContext, method: str) -> tuple[str, Abort | None]:
        """The status name to record for `error`, and the (status, details, trailers) to abort with, or None
        when the error must propagate as it is (cancellation, or an abort the handler did itself)."""
        if isinstance(error, aio.AbortError):
            return _status_name(context, "UNKNOWN"), None
        if isinstance(error, aio.InternalError):
            # The handler's own send (a write, an abort) failed: core had ended the call meanwhile (its deadline
            # fired, the client went away). There is nobody to answer, and nothing went wrong here (send_status).
            return "CANCELLED", None
        if not isinstance(error, Exception):
            # asyncio.CancelledError (the client went away, or the server is stopping), GeneratorExit:
            # there is nobody to send a status to.
            return "CANCELLED", None
        status, details = status_for(error)
        if not isinstance(error, AttnServeError):
            log.error("%s failed with an unexpected error", method, exc_info=error)
        return status.name, (status, details, trailing_metadata_for(error))

    def _observe(
        self, method: str, code: str, started: float, labels: CallLabels, error: BaseException | None = None
    ) -> None:
        if self._metrics is not None:
            self._metrics.observe_rpc(method, code, time.perf_counter() - started, labels.model, labels.version)
            if isinstance(error, Overloaded):
                self._metrics.observe_shed(error.reason, labels.model, labels.version)
