"""HTTP statuses for attnserve's errors, derived from the one gRPC table, and the JSON body that carries them.

An error gets its gRPC status from `service.grpc_api.errors.status_for` (the one place that decides statuses) and
its HTTP status from that gRPC status with HTTP_STATUS_BY_GRPC (the mapping of google.rpc.Code: INVALID_ARGUMENT
400, NOT_FOUND 404, RESOURCE_EXHAUSTED 429, UNAVAILABLE 503, ...). The one exception is `HttpRequestError`: a
request the HTTP layer refuses before it reaches an API (a body that is too large, too slow, not JSON, of the wrong
content type), which is INVALID_ARGUMENT for the metrics and names its own HTTP status (413, 408, 415, 400).

Every error body is `{"error": MESSAGE, "code": GRPC_STATUS_NAME}`; "error" is what the KServe v2 REST protocol
specifies and what tritonclient reads.
"""

from __future__ import annotations

import json

import grpc

from service.errors import InvalidRequest
from service.grpc_api.errors import STATUS_BY_CODE, status_for

HTTP_STATUS_BY_GRPC: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,  # the client closed the request (there is nobody to read it)
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
"""The HTTP status of each gRPC status the server answers with (STATUS_BY_CODE's values)."""


def check_http_table() -> None:
    """Raise RuntimeError at start-up if a status of the gRPC table has no HTTP status here."""
    missing = sorted(status.name for status in set(STATUS_BY_CODE.values()) - HTTP_STATUS_BY_GRPC.keys())
    if missing:
        raise RuntimeError(f"service/http_api/errors.py HTTP_STATUS_BY_GRPC has no row for {missing}")


class HttpRequestError(InvalidRequest):
    """A request refused by the HTTP layer itself; `http_status` is 400, 408, 413 or 415."""

    def __init__(self, message: str, http_status: int = 400) -> None:
        super().__init__(message)
        self.http_status = http_status


def http_error(error: BaseException) -> tuple[int, str, str]:
    """(HTTP status, gRPC status name, message) for `error`; anything but an AttnServeError is a 500."""
    status, message = status_for(error)
    if isinstance(error, HttpRequestError):
        return error.http_status, status.name, message
    return HTTP_STATUS_BY_GRPC.get(status, 500), status.name, message


def error_body(message: str, code: str) -> str:
    """The JSON body of an error response."""
    return json.dumps({"error": message, "code": code}, ensure_ascii=False)
