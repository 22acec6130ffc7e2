"""An error's status when gRPC core has ended the call already, in the same instant as the error.

The race seen in soaks with 2-50 ms deadlines: the engine gives up on a call as its deadline passes, the interceptor
sends DEADLINE_EXCEEDED, and core, whose own timer fired too, has answered the client and fails the send. grpc logs
a failed send with a traceback at error level; the interceptor ends such a call as a cancelled one instead.
"""

from __future__ import annotations

import asyncio
import logging
from typing import NamedTuple

import grpc
import pytest
from grpc import aio
from grpc._cython import cygrpc

from service.errors import DeadlineExceeded
from service.grpc_api.errors import RpcInterceptor
from service.metrics import ServerMetrics


class CallDetails(NamedTuple):
    method: str


class CallEndedByCore:
    """Stands in for grpc's servicer context of a call that core has ended: sending a status fails as it does in
    grpc (ExecuteBatchError, one of aio.InternalError)."""

    def __init__(self) -> None:
        self.statuses_tried: list[grpc.StatusCode] = []

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: tuple = ()) -> None:
        self.statuses_tried.append(code)
        raise cygrpc.ExecuteBatchError('Failed "execute_batch"')


def _deadline_passed() -> DeadlineExceeded:
    return DeadlineExceeded("the deadline passed after 0.004 s while decoding (model dates version 2)")


async def _unary(request, context):
    raise _deadline_passed()


async def _server_stream(request, context):
    raise _deadline_passed()
    yield  # an async generator, as the streaming servicers are


async def _bidi(requests, context):
    async for _ in requests:
        raise _deadline_passed()
    yield


async def _requests():
    yield b"one"


async def _run(kind: str, context: CallEndedByCore) -> None:
    handlers = {
        "unary": grpc.unary_unary_rpc_method_handler(_unary),
        "server-stream": grpc.unary_stream_rpc_method_handler(_server_stream),
        "bidi": grpc.stream_stream_rpc_method_handler(_bidi),
    }
    handler = await RpcInterceptor().intercept_service(
        _returning(handlers[kind]), CallDetails("/attnserve.v1.Translator/Translate")
    )
    if kind == "unary":
        await handler.unary_unary(b"request", context)
    elif kind == "server-stream":
        async for _ in handler.unary_stream(b"request", context):
            pass
    else:
        async for _ in handler.stream_stream(_requests(), context):
            pass


@pytest.mark.parametrize("kind", ["unary", "server-stream", "bidi"])
def test_a_status_core_could_not_send_ends_the_call_as_cancelled(kind):
    context = CallEndedByCore()
    with pytest.raises(asyncio.CancelledError) as ended:
        asyncio.run(_run(kind, context))
    assert context.statuses_tried == [grpc.StatusCode.DEADLINE_EXCEEDED]  # the status was tried, once
    assert isinstance(ended.value.__cause__, aio.InternalError)


class CallWithTimeLeft:
    """Stands in for grpc's servicer context of a call that core has not ended: `remaining` seconds to its deadline
    (None: it has none; 0: the deadline has passed, as grpc reports it), and a status can still be sent."""

    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining
        self.statuses_sent: list[tuple[grpc.StatusCode, str]] = []

    def time_remaining(self) -> float | None:
        return self.remaining

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: tuple = ()) -> None:
        self.statuses_sent.append((code, details))
        raise aio.AbortError("Locally aborted.")


async def _answer(context: CallWithTimeLeft, metrics: ServerMetrics | None = None) -> bytes:
    async def answers(request, context):
        return b"the answer"

    handler = await RpcInterceptor(metrics).intercept_service(
        _returning(grpc.unary_unary_rpc_method_handler(answers)), CallDetails("/attnserve.v1.Translator/Translate")
    )
    return await handler.unary_unary(b"request", context)


def test_an_answer_ready_only_after_the_deadline_is_not_sent_the_call_ends_with_deadline_exceeded():
    context, metrics = CallWithTimeLeft(remaining=0.0), ServerMetrics()
    with pytest.raises(aio.AbortError):
        asyncio.run(_answer(context, metrics))
    assert context.statuses_sent == [(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed as the answer was ready")]
    assert _calls_by_code(metrics) == {"DEADLINE_EXCEEDED": 1}  # counted once, as what the client saw


@pytest.mark.parametrize("remaining", [None, 0.001, 30.0], ids=["no-deadline", "a-millisecond-left", "seconds-left"])
def test_an_answer_ready_before_the_deadline_is_sent(remaining):
    context, metrics = CallWithTimeLeft(remaining), ServerMetrics()
    assert asyncio.run(_answer(context, metrics)) == b"the answer"
    assert context.statuses_sent == []
    assert _calls_by_code(metrics) == {"OK": 1}


def _calls_by_code(metrics: ServerMetrics) -> dict[str, float]:
    return {
        sample.labels["code"]: sample.value
        for family in metrics.collectors.collect()
        for sample in family.samples
        if sample.name == "attnserve_requests_total"
    }


def _returning(handler):
    async def continuation(details):
        return handler

    return continuation


async def _writes_to_an_ended_call(request, context):
    raise cygrpc.ExecuteBatchError('Failed "execute_batch"')  # what grpc raises from a write core cannot make


async def _streams_to_an_ended_call(request, context):
    raise cygrpc.ExecuteBatchError('Failed "execute_batch"')
    yield


@pytest.mark.parametrize("kind", ["unary", "server-stream"])
def test_a_handler_whose_own_send_core_could_not_make_ends_as_cancelled_without_an_error_log(kind, caplog):
    handler = (
        grpc.unary_unary_rpc_method_handler(_writes_to_an_ended_call)
        if kind == "unary"
        else grpc.unary_stream_rpc_method_handler(_streams_to_an_ended_call)
    )
    metrics = ServerMetrics()

    async def run():
        wrapped = await RpcInterceptor(metrics).intercept_service(
            _returning(handler), CallDetails("/attnserve.v1.Translator/Translate")
        )
        if kind == "unary":
            await wrapped.unary_unary(b"request", CallEndedByCore())
        else:
            async for _ in wrapped.unary_stream(b"request", CallEndedByCore()):
                pass

    with caplog.at_level(logging.DEBUG, logger="service.grpc_api.errors"), pytest.raises(asyncio.CancelledError):
        asyncio.run(run())
    assert _calls_by_code(metrics) == {"CANCELLED": 1}
    assert [record for record in caplog.records if record.levelno >= logging.WARNING] == []
