"""Build, start and stop the HTTP server (aiohttp) on the same event loop as the gRPC server.

Routes: the KServe v2 REST endpoints (kserve.py), the native JSON API (native.py), /openapi.json and the page
at / with its static files. One middleware does what the gRPC interceptors do: bearer tokens (health, the page
and the OpenAPI document stay open), errors to statuses (errors.py) with a JSON body, and one per-call metric
observation with protocol="http", the method named after the RPC the endpoint mirrors (ModelInfer, Translate,
...). While the server drains, every response closes its connection, so keep-alive clients reconnect elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from service.dataplane import Dataplane
from service.errors import AttnServeError, Overloaded
from service.grpc_api.security import BearerTokens
from service.grpc_api.server import PortInUse
from service.http_api.body import JSON
from service.http_api.errors import check_http_table, error_body, http_error
from service.http_api.kserve import KServeRest
from service.http_api.native import NativeRest
from service.http_api.openapi import openapi_document
from service.http_api.security import TlsFiles, refusal
from service.metrics import ServerMetrics
from service.settings import Settings

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PAGE_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
"""The page's files (this package's static/ folder) and their content types."""

CERTIFICATE_CHECK_S = 1.0
"""How often the TLS files are checked for a change (a stat of each)."""


class _RefusedByTheParser(logging.Filter):
    """aiohttp logs a request its HTTP parser refused (a request line or header over its limits, broken framing) at
    ERROR with a traceback, though the client got its 400 and the server is fine: one client could fill the log.
    Such records are lowered to DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], HttpProcessingError):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


_REFUSED_BY_THE_PARSER = _RefusedByTheParser()


@dataclass
class _Call:
    """What the middleware records about one call: the model it resolved to, and the status a stream that had
    already answered 200 ended with."""

    model: str = ""
    version: int | None = None
    code: str = "OK"
    shed_reason: str = ""  # why it was refused for overload ('' = it was not)

    def note(self, model: str, version: int) -> None:
        self.model, self.version = model, version


@dataclass(frozen=True)
class _Route:
    method: str  # the RPC the endpoint mirrors: the metric's method label; '' for the page and the document
    open: bool  # answered without a bearer token


_CALL = web.RequestKey("attnserve_call", _Call)

ADMITTED_METHODS = frozenset({"Translate", "TranslateStream", "ModelInfer"})
"""The endpoints (by the RPC they mirror) judged as soon as a request arrives, before its body is read
(Dataplane.admit_pickup), as over gRPC."""


def _call(request: web.Request) -> _Call:
    return request[_CALL]


def _set_code(request: web.Request, code: str) -> None:
    _call(request).code = code


def _json_error(status: int, message: str, code: str) -> web.Response:
    return web.Response(text=error_body(message, code), status=status, content_type=JSON)


class HttpServer:
    """The process's HTTP server over the same Dataplane as gRPC. Use on the event-loop thread.

    `start()` binds settings.host:http_port and serves; `stop(grace_s)` stops listening, lets the calls in flight
    finish for up to `grace_s` seconds, then cancels them. `share_port`: let the other front-end processes bind
    the same port (SO_REUSEPORT). Raises SecurityConfigError at construction for TLS or token files that do not
    load.
    """

    def __init__(
        self,
        settings: Settings,
        dataplane: Dataplane,
        metrics: ServerMetrics | None = None,
        *,
        share_port: bool = False,
    ) -> None:
        check_http_table()
        logging.getLogger("aiohttp.server").addFilter(_REFUSED_BY_THE_PARSER)  # once: the same filter object
        self.settings = settings
        self.dataplane = dataplane
        self._metrics = metrics
        self._share_port = share_port
        self._tls = TlsFiles.from_settings(settings)
        self._tokens = BearerTokens.from_settings(settings)
        self._routes: dict[Handler, _Route] = {}
        self._page = {
            name: (resources.files(__package__).joinpath("static", name).read_bytes(), content_type)
            for name, content_type in PAGE_FILES.items()
        }
        self._document = json.dumps(openapi_document(), indent=1).encode("utf-8")
        self.app = web.Application(client_max_size=settings.max_receive_message_bytes, middlewares=[self._middleware])
        self._add_routes()
        self._runner: web.AppRunner | None = None
        self._watch: asyncio.Task[None] | None = None
        self.port = 0

    # ----- routes ----------------------------------------------------------------------------------------

    def _route(self, verb: str, path: str, handler: Handler, method: str = "", *, open: bool = False) -> None:
        self.app.router.add_route(verb, path, handler)
        self._routes[handler] = _Route(method, open)

    def _add_routes(self) -> None:
        v2 = KServeRest(self.dataplane, self.settings, lambda request: _call(request).note)
        native = NativeRest(self.dataplane, self.settings, lambda request: _call(request).note, _set_code)
        self._route("GET", "/v2", v2.server_metadata, "ServerMetadata")
        self._route("GET", "/v2/health/live", v2.server_live, "ServerLive", open=True)
        self._route("GET", "/v2/health/ready", v2.server_ready, "ServerReady", open=True)
        for model in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            self.app.router.add_get(model, v2.model_metadata)
            self.app.router.add_get(model + "/ready", v2.model_ready)
            self.app.router.add_post(model + "/infer", v2.model_infer)
        self._routes[v2.model_metadata] = _Route("ModelMetadata", False)
        self._routes[v2.model_ready] = _Route("ModelReady", False)
        self._routes[v2.model_infer] = _Route("ModelInfer", False)
        self._route("POST", "/v1/translate", native.translate, "Translate")
        self._route("POST", "/v1/translate:stream", native.translate_stream, "TranslateStream")
        self._route("GET", "/v1/models", native.list_models, "ListModels")
        self.app.router.add_get("/v1/models/{name}", native.get_model)
        self._route("GET", "/v1/models/{name}/versions/{version}", native.get_model, "GetModel")
        self._route("GET", "/openapi.json", self._openapi, open=True)
        self._route("GET", "/", self._index, open=True)
        self._route("GET", "/static/{file}", self._static, open=True)

    async def _openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=self._document, content_type=JSON)

    async def _index(self, request: web.Request) -> web.Response:
        return self._asset("index.html")

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["file"]
        if name not in self._page or name == "index.html":
            return _json_error(404, f"no file {name!r}; the page's files are {', '.join(PAGE_FILES)}", "NOT_FOUND")
        return self._asset(name)

    def _asset(self, name: str) -> web.Response:
        body, content_type = self._page[name]
        response = web.Response(body=body, content_type=content_type, charset="utf-8")
        response.headers["Cache-Control"] = "no-cache"  # the page follows the server's version at once
        return response

    # ----- every call ------------------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = self._routes.get(request.match_info.route.handler)
        call = _Call()
        request[_CALL] = call
        started = time.perf_counter()
        try:
            response = await self._answer(request, handler, route, call)
        except (asyncio.CancelledError, ConnectionResetError):
            call.code = "CANCELLED"  # the client went away: nobody to answer
            raise
        finally:
            if route is not None and route.method and self._metrics is not None:
                self._metrics.observe_rpc(
                    route.method, call.code, time.perf_counter() - started, call.model, call.version, "http"
                )
                if call.shed_reason:
                    self._metrics.observe_shed(call.shed_reason, call.model, call.version, "http")
        if self.dataplane.registry.draining or response.status in (408, 413):
            # Draining: clients reconnect, elsewhere. 408/413: the rest of the body is not worth reading.
            response.force_close()
        return response

    async def _answer(
        self, request: web.Request, handler: Handler, route: _Route | None, call: _Call
    ) -> web.StreamResponse:
        try:
            if route is not None and not route.open and self._tokens is not None:
                why = refusal(self._tokens, request.headers)
                if why is not None:
                    call.code = "UNAUTHENTICATED"
                    response = _json_error(401, why, call.code)
                    response.headers["WWW-Authenticate"] = "Bearer"
                    return response
            if route is not None and route.method in ADMITTED_METHODS:
                # What waits before aiohttp hands a request over (the kernel's accept queue, requests behind
                # another on a keep-alive connection) is not visible here.
                self.dataplane.admit_pickup()
            return await handler(request)
        except web.HTTPException as error:  # the router's own answers: no such path, or not that verb
            if error.status == 404:
                message = f"no endpoint {request.path}; the API is described at /openapi.json"
            elif error.status == 405:
                allowed = ", ".join(sorted(getattr(error, "allowed_methods", ())))
                message = f"{request.method} is not allowed on {request.path}; use {allowed}"
            else:
                message = error.reason
            return _json_error(error.status, message, "NOT_FOUND" if error.status == 404 else "INVALID_ARGUMENT")
        except Exception as error:
            status, call.code, message = http_error(error)
            if not isinstance(error, AttnServeError):
                log.error("%s %s failed with an unexpected error", request.method, request.path, exc_info=error)
            response = _json_error(status, message, call.code)
            if isinstance(error, Overloaded):
                call.shed_reason = error.reason
                if error.retry_after_s is not None:
                    # Retry-After counts whole seconds (RFC 9110): rounded up, so a client never comes back early.
                    response.headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
            return response

    # ----- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> int:
        """Bind and serve; returns the port. Raises PortInUse when the address cannot be bound."""
        runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(
            runner,
            self.settings.http_address,
            self.settings.http_port,
            ssl_context=self._tls.context if self._tls is not None else None,
            reuse_port=self._share_port,
        )
        try:
            await site.start()
        except OSError as error:
            await runner.cleanup()
            raise PortInUse(
                f"cannot listen on {self.settings.http_address}:{self.settings.http_port}: {error}"
            ) from error
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        if self._tls is not None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_certificates(self._tls))
        if self._tokens is not None and self._tls is None:
            log.warning("bearer tokens are required but the HTTP port is plaintext: tokens cross the network readable")
        return self.port

    async def _watch_certificates(self, tls: TlsFiles) -> None:
        while True:
            await asyncio.sleep(CERTIFICATE_CHECK_S)
            tls.refresh()

    async def stop(self, grace_s: float) -> None:
        """Stop listening, let the calls in flight finish for up to `grace_s` seconds, cancel the rest, close every
        connection. Idempotent."""
        runner, self._runner = self._runner, None
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if runner is None:
            return
        for site in list(runner.sites):
            await site.stop()
        server = runner.server
        if server is not None:
            server.pre_shutdown()  # idle keep-alive connections close now, busy ones after their call
            await server.shutdown(grace_s)
        await runner.cleanup()
