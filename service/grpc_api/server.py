"""Build, start and drain the gRPC server: Translator + Health + Reflection on one port.

Health reports "" (the whole server), "attnserve.v1.Translator" and every model name: SERVING once
the model has a loaded version, NOT_SERVING otherwise and for everything from the start of a drain.
"""

from __future__ import annotations

import logging
import time

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from service.dataplane import Dataplane
from service.gen.attnserve.v1 import translator_pb2 as pb
from service.gen.attnserve.v1 import translator_pb2_grpc as pb_grpc
from service.grpc_api.errors import RpcInterceptor, check_status_table
from service.grpc_api.servicer import TranslatorServicer
from service.metrics import ServerMetrics
from service.models import ModelManager
from service.settings import Settings

log = logging.getLogger(__name__)

TRANSLATOR_SERVICE = pb.DESCRIPTOR.services_by_name["Translator"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class PortInUse(RuntimeError):
    """The gRPC port could not be bound."""


class GrpcServer:
    """The process's gRPC server over a started ModelManager. Use on the event-loop thread.

    `start()` binds and serves; `drain(grace_s)` stops it gracefully (see its docstring).
    """

    def __init__(
        self,
        settings: Settings,
        manager: ModelManager,
        dataplane: Dataplane,
        metrics: ServerMetrics | None = None,
    ) -> None:
        check_status_table()
        self.settings = settings
        self.manager = manager
        self.health = HealthServicer()
        self._server = aio.server(
            interceptors=[RpcInterceptor(metrics)],
            options=[
                ("grpc.max_receive_message_length", settings.max_receive_message_bytes),
                ("grpc.max_send_message_length", settings.max_send_message_bytes),
                # Without this, Linux lets a second server bind the same port and silently share traffic.
                ("grpc.so_reuseport", 0),
            ],
        )
        pb_grpc.add_TranslatorServicer_to_server(TranslatorServicer(dataplane), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection((TRANSLATOR_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), self._server)
        self.port = 0
        self._draining = False

    async def start(self) -> int:
        """Bind settings.host:port, start serving and mark the loaded models SERVING; returns the port.

        Raises PortInUse when the address cannot be bound."""
        try:
            self.port = self._server.add_insecure_port(self.settings.grpc_address)
        except RuntimeError as error:
            raise PortInUse(f"cannot listen on {self.settings.grpc_address}: {error}") from error
        if self.port == 0:
            raise PortInUse(f"cannot listen on {self.settings.grpc_address}")
        await self._server.start()
        loaded = set(self.manager.model_names)
        for name in self.manager.all_model_names:
            await self.health.set(name, SERVING if name in loaded else NOT_SERVING)
        await self.health.set(TRANSLATOR_SERVICE, SERVING)
        await self.health.set("", SERVING)
        return self.port

    async def drain(self, grace_s: float) -> None:
        """Graceful stop: health NOT_SERVING for everything and new translations refused (UNAVAILABLE)
        at once; in-flight calls get up to `grace_s` seconds to finish, then are cancelled; finally the
        engines stop. Idempotent."""
        if self._draining:
            return
        self._draining = True
        started = time.monotonic()
        await self.health.enter_graceful_shutdown()
        self.manager.begin_draining()
        log.info("draining: in-flight calls have %.1f s to finish", grace_s)
        await self._server.stop(grace_s)
        remaining = max(grace_s - (time.monotonic() - started), 0.0)
        await self.manager.stop(remaining)
        log.info("stopped after %.2f s of draining", time.monotonic() - started)

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()
