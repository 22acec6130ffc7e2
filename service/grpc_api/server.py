"""Build, start and drain the gRPC server: Translator + KServe v2 + Health + Reflection on one port.

Health reports "" (the whole server), "attnserve.v1.Translator", "inference.GRPCInferenceService" (the
KServe v2 API) and every model name: SERVING once the model has a loaded version, NOT_SERVING otherwise
and for everything from the start of a drain. "liveness" is SERVING from the start until the drain, whatever
the models and the engine process do: it tells a liveness probe that this process answers, so an engine
process being restarted makes the pod unready, never a container restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from service.dataplane import Dataplane
from service.engine_client import EngineClient
from service.gen.attnserve.v1 import translator_pb2 as pb
from service.gen.attnserve.v1 import translator_pb2_grpc as pb_grpc
from service.gen.inference import grpc_service_pb2 as kserve_pb
from service.gen.inference import grpc_service_pb2_grpc as kserve_pb_grpc
from service.grpc_api.admission import PickupAdmissionInterceptor
from service.grpc_api.backlog import CoreBacklog, server_ids
from service.grpc_api.errors import RpcInterceptor, check_status_table
from service.grpc_api.kserve import KSERVE_SERVICE, KServeServicer
from service.grpc_api.security import BearerTokens, TokenAuthInterceptor, server_credentials
from service.grpc_api.servicer import TranslatorServicer
from service.metrics import ServerMetrics
from service.registry import ModelEvent, ModelEventKind
from service.settings import Settings

log = logging.getLogger(__name__)

TRANSLATOR_SERVICE = pb.DESCRIPTOR.services_by_name["Translator"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
LIVENESS_SERVICE = "liveness"

ADMITTED_METHODS = (
    f"/{TRANSLATOR_SERVICE}/Translate",
    f"/{TRANSLATOR_SERVICE}/TranslateStream",
    f"/{KSERVE_SERVICE}/ModelInfer",
)
"""The calls judged as soon as they are picked up (Dataplane.admit_pickup): those that decode one request. Health,
metadata and reflection calls are never refused for load; ModelStreamInfer's requests are judged one by one."""

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class PortInUse(RuntimeError):
    """The gRPC port could not be bound."""


def _connection_age_options(settings: Settings) -> list[tuple[str, int]]:
    """Channel options that close client connections after settings.max_connection_age_seconds (none when 0).

    Why: a client balancing with `dns:///` + round_robin resolves the replicas only when it connects, so
    without an age limit it never sees replicas added later (autoscaling, rollouts)."""
    if settings.max_connection_age_seconds <= 0:
        return []
    return [
        ("grpc.max_connection_age_ms", int(settings.max_connection_age_seconds * 1000)),
        ("grpc.max_connection_age_grace_ms", int(settings.drain_grace_seconds * 1000)),
    ]


def _backlog_options(settings: Settings) -> list[tuple[str, int]]:
    """How many calls gRPC core holds before Python picks them up (a soft limit, and twice that as the hard one).

    Why: beyond its defaults (about a thousand), gRPC core fails calls the Python layer has not picked up yet
    with CANCELLED, which clients cannot tell from a real cancellation and do not retry, and which no
    metric of ours sees. Under a burst the calls now wait there instead (each holds its request and HTTP/2
    stream state, a few KB) and are served or refused by the engine's queue limit when picked up."""
    return [
        ("grpc.server.max_pending_requests", settings.max_pending_calls),
        ("grpc.server.max_pending_requests_hard_limit", 2 * settings.max_pending_calls),
    ]


def _stream_limit_options(settings: Settings) -> list[tuple[str, int]]:
    """The per-connection call limit (none when settings.max_concurrent_streams is 0)."""
    if settings.max_concurrent_streams <= 0:
        return []
    return [("grpc.max_concurrent_streams", settings.max_concurrent_streams)]


def call_limit_options(settings: Settings) -> list[tuple[str, int]]:
    """gRPC core's limits on the calls it takes: per connection, and held before Python picks them up.

    Public so that the RPC-ceiling server (loadtests.noop_server) runs core as this server does: what a
    misbehaving client costs a bare grpc.aio server under the same limits is the share that belongs to gRPC."""
    return [*_stream_limit_options(settings), *_backlog_options(settings)]


class GrpcServer:
    """The process's gRPC server over a started engine client. Use on the event-loop thread.

    `start()` binds and serves; `drain(grace_s)` stops it gracefully (see its docstring). `share_port`: let
    the other front-end processes of this server bind the same port (SO_REUSEPORT; the kernel spreads
    connections over them); otherwise a second process binding the port is refused.
    """

    def __init__(
        self,
        settings: Settings,
        client: EngineClient,
        dataplane: Dataplane,
        metrics: ServerMetrics | None = None,
        *,
        share_port: bool = False,
    ) -> None:
        check_status_table()
        self.settings = settings
        self.client = client
        self.health = HealthServicer()
        # Both raise SecurityConfigError (a missing, unreadable or empty file) before anything binds.
        self._credentials = server_credentials(settings)
        self._tokens = BearerTokens.from_settings(settings)
        served = (
            pb.DESCRIPTOR.services_by_name["Translator"],
            kserve_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"],
            health_pb2.DESCRIPTOR.services_by_name["Health"],
        )
        methods = [f"/{service.full_name}/{method.name}" for service in served for method in service.methods]
        interceptors: list[aio.ServerInterceptor] = [RpcInterceptor(metrics, methods)]
        if self._tokens is not None:
            # After RpcInterceptor, so refused calls are counted (code UNAUTHENTICATED) like any other.
            interceptors.append(TokenAuthInterceptor(self._tokens))
        admission = PickupAdmissionInterceptor(dataplane.admit_pickup, ADMITTED_METHODS)
        interceptors.append(admission)
        servers_before = server_ids()
        self._server = aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", settings.max_receive_message_bytes),
                ("grpc.max_send_message_length", settings.max_send_message_bytes),
                *call_limit_options(settings),
                # Without this, Linux lets a second server bind the same port and silently share traffic.
                ("grpc.so_reuseport", 1 if share_port else 0),
                *_connection_age_options(settings),
            ],
        )
        admission.backlog = CoreBacklog.of_new_server(servers_before, time.monotonic)
        pb_grpc.add_TranslatorServicer_to_server(TranslatorServicer(dataplane), self._server)
        kserve_pb_grpc.add_GRPCInferenceServiceServicer_to_server(KServeServicer(dataplane), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        if settings.reflection:
            reflection.enable_server_reflection(
                (TRANSLATOR_SERVICE, KSERVE_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), self._server
            )
        self.port = 0
        self._draining = False
        self._health_updates: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        """Bind settings.host:port, start serving and mark the loaded models SERVING; returns the port.

        Raises PortInUse when the address cannot be bound."""
        try:
            if self._credentials is not None:
                self.port = self._server.add_secure_port(self.settings.grpc_address, self._credentials)
            else:
                self.port = self._server.add_insecure_port(self.settings.grpc_address)
        except RuntimeError as error:
            raise PortInUse(f"cannot listen on {self.settings.grpc_address}: {error}") from error
        if self.port == 0:
            raise PortInUse(f"cannot listen on {self.settings.grpc_address}")
        await self._server.start()
        loaded = set(self.client.registry.model_names)
        for name in self.client.registry.all_model_names:
            await self.health.set(name, SERVING if name in loaded else NOT_SERVING)
        await self.health.set(TRANSLATOR_SERVICE, SERVING)
        await self.health.set(KSERVE_SERVICE, SERVING)
        await self.health.set("", SERVING)
        await self.health.set(LIVENESS_SERVICE, SERVING)
        self.client.add_listener(self._on_model_event)
        if self._tokens is not None and self._credentials is None:
            log.warning(
                "bearer tokens are required but the port is plaintext: tokens cross the network readable "
                "unless a proxy or mesh encrypts it (set tls_cert_file and tls_key_file)"
            )
        return self.port

    async def set_serving(self, serving: bool) -> None:
        """Report every service and loaded model SERVING (or all NOT_SERVING): a front-end process follows
        its connection to the engine process with it. Nothing changes once draining has begun."""
        if self._draining:
            return
        status = SERVING if serving else NOT_SERVING
        loaded = set(self.client.registry.model_names)
        for name in self.client.registry.all_model_names:
            await self.health.set(name, status if name in loaded else NOT_SERVING)
        for service in (TRANSLATOR_SERVICE, KSERVE_SERVICE, ""):
            await self.health.set(service, status)

    def _on_model_event(self, event: ModelEvent) -> None:
        """A model that appears in the repository while serving becomes SERVING once it loads."""
        if event.kind is not ModelEventKind.LOADED or self._draining:
            return
        update = asyncio.get_running_loop().create_task(self.health.set(event.name, SERVING))
        self._health_updates.add(update)
        update.add_done_callback(self._health_updates.discard)

    async def drain(self, grace_s: float, also_stop: Sequence[Callable[[float], Awaitable[None]]] = ()) -> None:
        """Graceful stop: health NOT_SERVING for everything and new translations refused (UNAVAILABLE)
        at once; in-flight calls get up to `grace_s` seconds to finish, then are cancelled; finally the
        engines stop. `also_stop`: the stop(grace_s) of the other transports' servers on the same engine client,
        run beside this server's own stop, before the engines stop. Idempotent."""
        if self._draining:
            return
        self._draining = True
        started = time.monotonic()
        await self.health.enter_graceful_shutdown()
        self.client.begin_draining()
        log.info("draining: in-flight calls have %.1f s to finish", grace_s)
        # Closing the server at once would cancel calls that reached its transport but not yet a handler
        # (the client sees CANCELLED, which is not safe to retry). Clients with health checking take this
        # server out of rotation as soon as it reports NOT_SERVING; meanwhile new calls get UNAVAILABLE.
        await asyncio.sleep(min(self.settings.drain_delay_seconds, grace_s))
        remaining = max(grace_s - (time.monotonic() - started), 0.0)
        await asyncio.gather(self._server.stop(remaining), *(stop(remaining) for stop in also_stop))
        remaining = max(grace_s - (time.monotonic() - started), 0.0)
        await self.client.stop(remaining)
        log.info("stopped after %.2f s of draining", time.monotonic() - started)
