"""The RPC ceiling: a server with attnserve's gRPC API that decodes nothing and returns a fixed translation.

It runs the same stack as `attnserve serve` (grpc.aio on the same event loop, uvloop's by default, with gRPC core's
call limits as the server sets them; the attnserve.v1.Translator service, gRPC health) and
answers every Translate with one fixed hypothesis per text, so a client measured against it shows what the
RPC path alone costs on the machine: the most requests per second any model could be served at.

    python -m loadtests.noop_server --port 50061
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator
from typing import get_args

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from service import event_loop
from service.event_loop import EventLoopChoice
from service.gen.attnserve.v1 import translator_pb2 as pb
from service.gen.attnserve.v1 import translator_pb2_grpc as pb_grpc
from service.grpc_api.server import call_limit_options
from service.lifecycle import stop_event
from service.settings import Settings

MODEL_NAME = "noop"
#: The fixed answer: about the size of a real one (a dates translation with its pieces).
FIXED_TOKENS = ("2", "0", "2", "6", "-", "1", "1", "-", "2", "1", "</s>")
FIXED_SOURCE_TOKENS = tuple("samedi 21 novembre 2026") + ("</s>",)


def fixed_hypothesis() -> pb.Hypothesis:
    return pb.Hypothesis(
        text="".join(FIXED_TOKENS[:-1]),
        score=-0.01,
        source_tokens=FIXED_SOURCE_TOKENS,
        target_tokens=FIXED_TOKENS,
    )


class NoopTranslator(pb_grpc.TranslatorServicer):
    """Answers every call at once with the fixed translation (whatever model or options it names)."""

    def __init__(self) -> None:
        self._hypothesis = fixed_hypothesis()
        self._info = pb.ModelInfo(
            name=MODEL_NAME,
            version="1",
            versions=["1"],
            loaded_versions=["1"],
            ready=True,
            attention="none",
            task=pb.Task(kind="noop", description="Returns a fixed translation (RPC ceiling)."),
            provider="none",
            limits=pb.ModelLimits(max_source_tokens=1024, max_target_tokens=len(FIXED_TOKENS), top_k=16),
            is_default=True,
        )

    async def Translate(self, request: pb.TranslateRequest, context: aio.ServicerContext) -> pb.TranslateResponse:
        translation = pb.Translation(hypotheses=[self._hypothesis])
        return pb.TranslateResponse(
            model=request.model or MODEL_NAME, version="1", translations=[translation] * len(request.texts)
        )

    async def TranslateStream(
        self, request: pb.TranslateRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.TranslateStreamResponse]:
        model = request.model or MODEL_NAME
        text = ""
        for index, token in enumerate(FIXED_TOKENS[:-1]):
            text += token
            yield pb.TranslateStreamResponse(token=token, text=text, index=index, model=model, version="1")
        yield pb.TranslateStreamResponse(
            text=text, index=len(FIXED_TOKENS) - 1, final=True, hypotheses=[self._hypothesis], model=model, version="1"
        )

    async def ListModels(self, request: pb.ListModelsRequest, context: aio.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[self._info], default_model=MODEL_NAME)

    async def GetModel(self, request: pb.GetModelRequest, context: aio.ServicerContext) -> pb.ModelInfo:
        return self._info


async def serve(
    host: str, port: int, stop: asyncio.Event | None = None, *, max_concurrent_streams: int | None = None
) -> None:
    """Serve until `stop` is set (or SIGTERM/SIGINT when None), with gRPC core's call limits as `attnserve serve`
    sets them (its per-connection stream limit `max_concurrent_streams` when given)."""
    settings = Settings() if max_concurrent_streams is None else Settings(max_concurrent_streams=max_concurrent_streams)
    server = aio.server(options=call_limit_options(settings))
    pb_grpc.add_TranslatorServicer_to_server(NoopTranslator(), server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    if stop is None:
        stop = stop_event()
    print(f"noop server listening on {host}:{bound}", flush=True)
    await stop.wait()
    await server.stop(1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.noop_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50061)
    parser.add_argument(
        "--event-loop", choices=get_args(EventLoopChoice), default="auto", help="as attnserve serve's (default auto)"
    )
    parser.add_argument(
        "--max-concurrent-streams",
        type=int,
        default=None,
        help="calls per connection, as attnserve serve's (default: its default; 0 = no limit)",
    )
    args = parser.parse_args(argv)
    event_loop.run(serve(args.host, args.port, max_concurrent_streams=args.max_concurrent_streams), args.event_loop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
