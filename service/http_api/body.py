"""Reading a request body with the limits of the HTTP port: its content type, its size and the time it takes."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import hdrs, web

from service.http_api.errors import HttpRequestError
from service.settings import Settings

JSON = "application/json"
OCTET_STREAM = "application/octet-stream"


async def read_body(request: web.Request, settings: Settings, accepted: tuple[str, ...] = (JSON,)) -> bytes:
    """The whole body, once it is checked: a Content-Type of `accepted` (none at all counts as JSON, as curl and
    tritonclient may send none), at most settings.max_receive_message_bytes, sent within
    settings.http_body_timeout_seconds. Raises HttpRequestError with 415, 413 or 408."""
    if hdrs.CONTENT_TYPE in request.headers and request.content_type not in accepted:
        raise HttpRequestError(
            f"Content-Type {request.headers[hdrs.CONTENT_TYPE]!r} is not accepted here; send {' or '.join(accepted)}",
            415,
        )
    limit = settings.max_receive_message_bytes
    too_large = f"the request body is larger than the maximum of {limit} bytes (max_receive_message_bytes)"
    if request.content_length is not None and request.content_length > limit:
        raise HttpRequestError(f"{too_large}: Content-Length is {request.content_length}", 413)
    timeout = settings.http_body_timeout_seconds
    try:
        async with asyncio.timeout(timeout):
            return await request.read()
    except TimeoutError:
        raise HttpRequestError(
            f"the request body did not arrive within {timeout:g} s (http_body_timeout_seconds)", 408
        ) from None
    except web.HTTPRequestEntityTooLarge:  # a body without Content-Length that grew past the limit
        raise HttpRequestError(too_large, 413) from None


def json_document(body: bytes, what: str) -> Any:
    """`body` parsed as JSON; HttpRequestError (400) naming `what` it should have been when it is not."""
    try:
        return json.loads(body)
    except UnicodeDecodeError as error:
        raise HttpRequestError(f"the request body is not UTF-8 JSON ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise HttpRequestError(f"the request body is not valid JSON ({error}); it should be {what}") from None
    except RecursionError:  # the parser recurses once per nested array or object
        raise HttpRequestError(f"the request body is JSON nested too deeply to read; it should be {what}") from None


def connection_of(request: web.Request) -> str:
    """The request's connection, named as the dataplane's turns know clients (one line per connection):
    'http:host:port' of the peer, or 'http:' once the connection is gone."""
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    return f"http:{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "http:"
