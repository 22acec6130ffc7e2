"""The proxy shipped for clients you do not control (deploy/proxy/nghttpx.conf), in front of a real server: what
the server answers passes through it unchanged, and it closes a connection that opens and resets streams in a loop
("rapid reset"), which gRPC core cannot do. `python -m loadtests.reliability.misbehaving --proxy nghttpx` measures
what a well-behaved client sees meanwhile (docs/reliability.md)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import grpc
import pytest

from loadtests.reliability import raw_http2 as h2
from loadtests.reliability.misbehaving import nghttpx_in_front
from service.gen.attnserve.v1 import translator_pb2 as pb
from service.gen.attnserve.v1 import translator_pb2_grpc as pb_grpc
from tests.service.server_harness import ServerThread

pytestmark = [
    pytest.mark.slow,  # starts a server on trained models
    pytest.mark.skipif(
        shutil.which("nghttpx") is None,
        reason="nghttpx is not installed: run `make proxy-tools` (Debian's nghttp2-proxy)",
    ),
]

TRANSLATE = "/attnserve.v1.Translator/Translate"
RESET_BURST = h2.NGHTTP2_RESET_BURST


@pytest.fixture(scope="module")
def proxy(server: ServerThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with nghttpx_in_front(server.address, tmp_path_factory.mktemp("proxy")) as (address, _):
        yield address


def answer(address: str, request: pb.TranslateRequest) -> pb.TranslateResponse | tuple[grpc.StatusCode, str]:
    """The server's answer on a connection of its own: the response, or the status and its details."""
    with grpc.insecure_channel(address) as channel:
        try:
            return pb_grpc.TranslatorStub(channel).Translate(request, timeout=30)
        except grpc.RpcError as error:
            return error.code(), error.details()


@pytest.mark.parametrize(
    "request_",
    [
        pb.TranslateRequest(model="dates", texts=["3 mars 1999"], options=pb.DecodeOptions(return_attention=True)),
        pb.TranslateRequest(
            model="dates", texts=["3 mars 1999", "12 juin 2001"], options=pb.DecodeOptions(beam_size=4)
        ),
        pb.TranslateRequest(model="nope", texts=["3 mars 1999"]),  # NOT_FOUND
        pb.TranslateRequest(model="dates", texts=["3 mars 1999"], options=pb.DecodeOptions(beam_size=10_000)),
    ],
    ids=["greedy-attention", "beam", "unknown-model", "beam-too-wide"],
)
def test_answers_and_errors_pass_through_the_proxy_unchanged(
    server: ServerThread, proxy: str, request_: pb.TranslateRequest
) -> None:
    assert answer(proxy, request_) == answer(server.address, request_)


def streamed(
    address: str, request: pb.TranslateRequest
) -> list[pb.TranslateStreamResponse] | tuple[grpc.StatusCode, str]:
    """TranslateStream's messages on a connection of its own, or the status and its details."""
    with grpc.insecure_channel(address) as channel:
        try:
            return list(pb_grpc.TranslatorStub(channel).TranslateStream(request, timeout=30))
        except grpc.RpcError as error:
            return error.code(), error.details()


@pytest.mark.parametrize(
    "request_",
    [pb.TranslateRequest(model="dates", texts=["3 mars 1999"]), pb.TranslateRequest(model="nope", texts=["3 mars"])],
    ids=["tokens", "unknown-model"],
)
def test_streamed_answers_pass_through_the_proxy_unchanged(
    server: ServerThread, proxy: str, request_: pb.TranslateRequest
) -> None:
    assert streamed(proxy, request_) == streamed(server.address, request_)


def test_a_connection_that_resets_fewer_streams_than_the_burst_stays_open(proxy: str) -> None:
    assert h2.reset_then_ping(proxy, TRANSLATE, RESET_BURST // 2) == "ping acknowledged"


def test_the_proxy_closes_a_connection_that_resets_streams_in_a_loop(server: ServerThread, proxy: str) -> None:
    """Past the burst nghttp2 ends the connection with GOAWAY INTERNAL_ERROR (its reset limit), not SETTINGS_TIMEOUT
    or any other reason; the server goes on answering everyone else."""
    assert h2.reset_then_ping(proxy, TRANSLATE, 2 * RESET_BURST) == f"goaway {h2.INTERNAL_ERROR}"
    request = pb.TranslateRequest(model="dates", texts=["3 mars 1999"])
    assert answer(proxy, request) == answer(server.address, request)
