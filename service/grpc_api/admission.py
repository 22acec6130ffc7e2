"""Admission at pickup for gRPC: a translation call is judged as soon as gRPC hands it to Python, before its request
is read or parsed (Dataplane.admit_pickup), and a refused one is answered RESOURCE_EXHAUSTED with its retry hint.

Why an interceptor: it is the first code of ours a call runs, and it runs in the task that will run the call, which
is how the dataplane counts it as pending until it reaches translate(). The refusal is a handler of the call's
shape that raises the refusal decided here; RpcInterceptor, outside this one, turns it into the status, the
`grpc-retry-pushback-ms` trailer and the metrics, as for every other error.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import grpc
from grpc import aio

from service.errors import Overloaded

_refusal: contextvars.ContextVar[Overloaded | None] = contextvars.ContextVar("attnserve_refusal", default=None)


async def _refuse(_request: Any, _context: aio.ServicerContext) -> Any:
    refusal = _refusal.get()
    assert refusal is not None, "a refusing handler runs only for a call refused at pickup"
    raise refusal


class PickupAdmissionInterceptor(aio.ServerInterceptor):
    """Calls `admit()` (Dataplane.admit_pickup) for every call of `methods` (full names, '/package.Service/Method';
    unary-request methods only) and answers the ones it refuses without reading their request.

    Place it last, after the token check: an unauthenticated call is refused for that, and never counted here.
    """

    def __init__(self, admit: Callable[[], None], methods: Collection[str]) -> None:
        self._admit = admit
        self._methods = frozenset(methods)
        # One refusing handler per method, made once: RpcInterceptor wraps each handler object once.
        self._refusing: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method not in self._methods or handler.request_streaming:
            return handler
        try:
            self._admit()
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
