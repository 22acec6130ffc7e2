"""Clients that misbehave, the cheap cases, on a real server: idle connections, a request that never finishes
arriving, calls whose answers are never read, oversized metadata and streams opened and reset in a loop. After
each, a well-behaved call on its own connection gets the same answer as before, and the server holds nothing for
the misbehaving calls once their connections are gone. (`python -m loadtests.reliability.misbehaving` runs the big
versions and prints the well-behaved client's latency and the server's memory throughout.)"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import grpc
import pytest

from loadtests.reliability import raw_http2 as h2
from service.gen.attnserve.v1 import translator_pb2 as pb
from service.gen.attnserve.v1 import translator_pb2_grpc as pb_grpc
from tests.reliability.reliability_support import metric, metric_sum, scrape, wait_for
from tests.service.server_harness import ServerThread

pytestmark = pytest.mark.slow  # starts a server on trained models

TRANSLATE = "/attnserve.v1.Translator/Translate"
TEXT = "3 mars 1999"
DATES = {"model": "dates", "version": "1"}


@pytest.fixture(scope="module")
def reference(stub: pb_grpc.TranslatorStub) -> pb.TranslateResponse:
    """What a well-behaved call gets from the server when nothing else happens."""
    return stub.Translate(pb.TranslateRequest(model="dates", texts=[TEXT]), timeout=30)


def well_behaved(server: ServerThread) -> pb.TranslateResponse:
    """One call on a connection of its own."""
    with grpc.insecure_channel(server.address) as channel:
        return pb_grpc.TranslatorStub(channel).Translate(pb.TranslateRequest(model="dates", texts=[TEXT]), timeout=30)


def translate_frames(address: str, stream: int, request: pb.TranslateRequest) -> bytes:
    return h2.frame(h2.HEADERS, h2.END_HEADERS, stream, h2.grpc_headers(address, TRANSLATE)) + h2.frame(
        h2.DATA, h2.END_STREAM, stream, h2.grpc_message(request.SerializeToString())
    )


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def test_idle_connections_hold_nothing_up(
    server: ServerThread, reference: pb.TranslateResponse, sockets: list[socket.socket]
) -> None:
    sockets.extend(h2.connect(server.address) for _ in range(200))
    assert well_behaved(server) == reference


def test_a_request_that_never_finishes_arriving_holds_nothing_up(
    server: ServerThread, reference: pb.TranslateResponse, sockets: list[socket.socket]
) -> None:
    frames = translate_frames(server.address, 1, pb.TranslateRequest(model="dates", texts=[TEXT]))
    for cut in (5, 9 + 20, len(frames) - 3):  # inside a frame header, inside HEADERS, inside the message
        sock = h2.connect(server.address)
        sock.sendall(frames[:cut])
        sockets.append(sock)
    assert well_behaved(server) == reference


def test_answers_never_read_are_held_by_flow_control_and_end_with_their_connection(
    server: ServerThread, reference: pb.TranslateResponse, sockets: list[socket.socket]
) -> None:
    """Calls on a connection whose window is 0: their answers (attention matrices) cannot be sent, so they wait in
    gRPC core; the calls of other clients go on, and closing the connection ends them all."""
    before = scrape(server.metrics_url)
    request = pb.TranslateRequest(
        model="dates", texts=[TEXT] * 4, options=pb.DecodeOptions(beam_size=4, return_attention=True)
    )
    sock = h2.connect(server.address, initial_window=0)
    sock.sendall(b"".join(translate_frames(server.address, stream, request) for stream in range(1, 40, 2)))
    sockets.append(sock)

    def finished() -> float:
        return metric(scrape(server.metrics_url), "attnserve_finished_requests_total", reason="eos", **DATES)

    # Their texts are decoded (the engine does not wait for a reader) ...
    wait_for(
        lambda: finished() - metric(before, "attnserve_finished_requests_total", reason="eos", **DATES) >= 80,
        what="the silent calls' 80 texts to be decoded",
    )
    assert well_behaved(server) == reference
    # ... and their calls end once the connection goes: each is counted once (the server had handed its answer
    # over when the connection went, so it counts it as answered), and nothing of them stays in the engine.
    sock.close()
    translate = {"method": "Translate", "protocol": "grpc", **DATES}

    def ended() -> bool:
        grown = metric_sum(scrape(server.metrics_url), "attnserve_requests_total", **translate)
        return grown - metric_sum(before, "attnserve_requests_total", **translate) == 20 + 1  # and the good call

    wait_for(ended, what="the 20 unread calls to end with their connection")
    samples = scrape(server.metrics_url)
    assert metric(samples, "attnserve_requests_waiting", **DATES) == 0
    assert metric(samples, "attnserve_requests_running", **DATES) == 0
    assert well_behaved(server) == reference


def test_oversized_metadata_gets_a_clear_status(server: ServerThread, reference: pb.TranslateResponse) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.TranslatorStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Translate(
                pb.TranslateRequest(model="dates", texts=[TEXT]), metadata=[("x-padding", "x" * 65536)], timeout=30
            )
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "metadata" in (refused.value.details() or "").lower()
        # The same channel goes on.
        assert stub.Translate(pb.TranslateRequest(model="dates", texts=[TEXT]), timeout=30) == reference


def test_streams_opened_and_reset_in_a_loop_leave_nothing_behind(
    server: ServerThread, reference: pb.TranslateResponse, sockets: list[socket.socket]
) -> None:
    sock = h2.connect(server.address)
    sockets.append(sock)
    headers = h2.grpc_headers(server.address, TRANSLATE)
    try:
        for first in range(1, 4000, 200):
            sock.sendall(
                b"".join(
                    h2.frame(h2.HEADERS, h2.END_HEADERS, stream, headers)
                    + h2.frame(h2.RST_STREAM, 0, stream, h2.CANCEL.to_bytes(4, "big"))
                    for stream in range(first, first + 200, 2)
                )
            )
    except OSError:
        pass  # the server may close a connection that does this (gRPC core's answer to rapid resets)
    assert well_behaved(server) == reference
    samples = scrape(server.metrics_url)
    assert metric(samples, "attnserve_requests_waiting", **DATES) == 0
    assert metric(samples, "attnserve_requests_running", **DATES) == 0
