"""The native API as JSON: the attnserve.v1.Translator messages in protobuf's JSON mapping, over HTTP.

    POST /v1/translate                  TranslateRequest -> TranslateResponse
    POST /v1/translate:stream           TranslateRequest -> server-sent events, one TranslateStreamResponse each
    GET  /v1/models                     ListModelsResponse
    GET  /v1/models/{name}[/versions/{version}]   ModelInfo

Requests are parsed with google.protobuf.json_format (field names as in the proto or in lowerCamelCase; an
unknown field is an error), responses written the same way (lowerCamelCase, every field present), and converted
with the gRPC servicer's own converters, so both transports give the same answers.

A stream is checked before its first byte is sent, so a bad request gets an HTTP error status. Once events flow,
an error ends the stream with an `event: error` whose data is `{"error": MESSAGE, "code": GRPC_STATUS_NAME}`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import Message

from service.dataplane import Dataplane
from service.errors import AttnServeError, InvalidRequest
from service.gen.attnserve.v1 import translator_pb2 as pb
from service.grpc_api.servicer import model_to_grpc, options_from_grpc, outcome_to_grpc, update_to_grpc
from service.http_api.body import JSON, connection_of, read_body
from service.http_api.errors import HttpRequestError, error_body, http_error
from service.settings import Settings

log = logging.getLogger(__name__)

NoteModel = Callable[[str, int], None]
EVENT_STREAM = "text/event-stream"


def message_to_json(message: Message) -> str:
    """`message` in protobuf's JSON mapping, on one line, default values included."""
    return json_format.MessageToJson(message, indent=None, always_print_fields_with_no_presence=True)


def _json(message: Message) -> web.Response:
    return web.Response(text=message_to_json(message), content_type=JSON)


def _event(data: str, event: str = "") -> bytes:
    """One server-sent event; `data` is one line of JSON."""
    return (f"event: {event}\n" if event else "").encode() + b"data: " + data.encode("utf-8") + b"\n\n"


class NativeRest:
    """The /v1 endpoints over a Dataplane. `note(request)` records the call's model labels; `set_code(request,
    code)` the status a stream ended with (it has sent 200 already)."""

    def __init__(
        self,
        dataplane: Dataplane,
        settings: Settings,
        note: Callable[[web.Request], NoteModel],
        set_code: Callable[[web.Request, str], None],
    ) -> None:
        self.dataplane = dataplane
        self.settings = settings
        self._note = note
        self._set_code = set_code

    async def _request(self, request: web.Request) -> pb.TranslateRequest:
        body = await read_body(request, self.settings)
        message = pb.TranslateRequest()
        try:
            json_format.Parse(body.decode("utf-8"), message)
        except UnicodeDecodeError as error:
            raise HttpRequestError(f"the request body is not UTF-8 ({error.reason} at byte {error.start})") from None
        except json_format.ParseError as error:
            raise HttpRequestError(f"the request body is not a TranslateRequest in JSON: {error}") from None
        return message

    async def translate(self, request: web.Request) -> web.Response:
        message = await self._request(request)
        outcome = await self.dataplane.translate(
            message.model,
            message.version,
            list(message.texts),
            options_from_grpc(message.options),
            None,
            on_resolved=self._note(request),
            client=lambda: connection_of(request),
        )
        return _json(outcome_to_grpc(outcome))

    async def translate_stream(self, request: web.Request) -> web.StreamResponse:
        message = await self._request(request)
        if len(message.texts) != 1:
            raise InvalidRequest(
                f"/v1/translate:stream takes exactly one text, got {len(message.texts)}; use /v1/translate for several"
            )
        updates = self.dataplane.translate_stream(
            message.model,
            message.version,
            message.texts[0],
            options_from_grpc(message.options),
            None,
            on_resolved=self._note(request),
        )
        async with contextlib.aclosing(updates):  # a client that leaves cancels its engine request now
            first = await anext(updates)  # the checks run here: a refusal is still an HTTP status
            response = web.StreamResponse(headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            response.content_type = EVENT_STREAM
            await response.prepare(request)
            await response.write(_event(message_to_json(update_to_grpc(first))))
            try:
                async for update in updates:
                    await response.write(_event(message_to_json(update_to_grpc(update))))
            except ConnectionResetError:  # the client left: nobody to tell
                raise
            except Exception as error:  # the status line is sent: the error goes in-band, and the stream ends
                _, code, text = http_error(error)
                if not isinstance(error, AttnServeError):
                    log.error("/v1/translate:stream failed with an unexpected error", exc_info=error)
                self._set_code(request, code)
                await response.write(_event(error_body(text, code), "error"))
        await response.write_eof()
        return response

    async def list_models(self, request: web.Request) -> web.Response:
        return _json(
            pb.ListModelsResponse(
                models=[model_to_grpc(model) for model in self.dataplane.list_models()],
                default_model=self.dataplane.default_model,
            )
        )

    async def get_model(self, request: web.Request) -> web.Response:
        model = self.dataplane.get_model(request.match_info["name"], request.match_info.get("version", ""))
        self._note(request)(model.name, model.version)
        return _json(model_to_grpc(model))
