"""Admission at pickup for gRPC: a translation call is judged as soon as gRPC hands it to Python, before its request
is read or parsed (Dataplane.admit_pickup, told how long the call waited in gRPC core's backlog: CoreBacklog), and a
refused one is answered RESOURCE_EXHAUSTED with its retry hint.

Why an interceptor: it is the first code of ours a call runs, and it runs in the task that will run the call, which
is how the backlog and the dataplane count it until it ends or reaches translate(). The refusal is a handler of the
call's shape that raises the refusal decided here; RpcInterceptor, outside this one, turns it into the status, the
`grpc-retry-pushback-ms` trailer and the metrics, as for every other error.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import grpc
from grpc import aio

from service.errors import Overloaded
from service.grpc_api.backlog import CoreBacklog

_refusal: contextvars.ContextVar[Overloaded | None] = contextvars.ContextVar("attnserve_refusal", default=None)


async def _refuse(_request: Any, _context: aio.ServicerContext) -> Any:
    refusal = _refusal.get()
    assert refusal is not None, "a refusing handler runs only for a call refused at pickup"
    raise refusal


class PickupAdmissionInterceptor(aio.ServerInterceptor):
    """Counts every call as picked up in `backlog` (set once the server exists; until then, and when core's counts
    cannot be read, the backlog reads 0), and calls `admit(waited_s)` (Dataplane.admit_pickup) for every call of
    `methods` (full names, '/package.Service/Method'; unary-request methods only), answering the ones it refuses
    without reading their request.

    Place it last, after the token check: a call the token check refuses gets UNAUTHENTICATED whatever this says.
    """

    def __init__(self, admit: Callable[[float | None], None], methods: Collection[str]) -> None:
        self._admit = admit
        self.backlog: CoreBacklog | None = None
        self._methods = frozenset(methods)
        # One refusing handler per method, made once: RpcInterceptor wraps each handler object once.
        self._refusing: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        backlog = self.backlog
        task = asyncio.current_task()
        if backlog is not None and task is not None:
            backlog.picked_up(task)
        method = handler_call_details.method
        if handler is None or method not in self._methods or handler.request_streaming:
            return handler
        try:
            self._admit(backlog.waited_s() if backlog is not None else None)
        except Overloaded as refusal:
            _refusal.set(refusal)
            return self._refusing_handler(method, handler)
        return handler

    def _refusing_handler(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        refusing = self._refusing.get(method)
        if refusing is None:
            # No request deserializer: the request's bytes are never parsed.
            if handler.response_streaming:
                refusing = grpc.unary_stream_rpc_method_handler(
                    _refuse, response_serializer=handler.response_serializer
                )
            else:
                refusing = grpc.unary_unary_rpc_method_handler(_refuse, response_serializer=handler.response_serializer)
            self._refusing[method] = refusing
        return refusing
