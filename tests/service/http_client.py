"""A plain HTTP/1.1 client for the tests of the HTTP port (the standard library's http.client), and the reading of
server-sent events."""

from __future__ import annotations

import http.client
import json
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from loadtests.reliability.fuzz import sse_events


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    method: str,
    url: str,
    body: bytes | str | dict | None = None,
    headers: dict[str, str] | None = None,
    *,
    context: ssl.SSLContext | None = None,
    timeout_s: float = 60.0,
) -> Reply:
    """One request on a new connection; a dict body is sent as JSON with Content-Type: application/json."""
    parts = urlsplit(url)
    sent = dict(headers or {})
    if isinstance(body, dict):
        body = json.dumps(body)
        sent.setdefault("Content-Type", "application/json")
    if isinstance(body, str):
        body = body.encode("utf-8")
    if parts.scheme == "https":
        connection: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.hostname or "", parts.port, timeout=timeout_s, context=context
        )
    else:
        connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout_s)
    try:
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        connection.request(method, target, body=body, headers=sent)
        response = connection.getresponse()
        return Reply(response.status, {key.lower(): value for key, value in response.getheaders()}, response.read())
    finally:
        connection.close()


def events(body: bytes) -> list[tuple[str, Any]]:
    """The (event type, parsed JSON data) of every server-sent event of `body`, in order."""
    return [(kind, json.loads(data)) for kind, data in sse_events(body)]
