"""Whose line a gRPC call waits its turn in (service/grpc_api/peers.py), read from real calls: the connection's peer,
or behind a proxy on this host (the reset guard, deploy/proxy/nghttpx.conf) the client address it forwards."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import grpc
import pytest
from grpc import aio

from loadtests.reliability.misbehaving import nghttpx_in_front
from service.grpc_api.peers import turn_line

Metadata = tuple[tuple[str, str], ...]


def lines_of(calls: list[Metadata], work: Path | None = None) -> list[str]:
    """The line of a call made with each metadata, on a real grpc.aio server whose handler answers with it; through
    nghttpx with the shipped configuration when `work` (its folder) is given."""

    async def scenario() -> list[str]:
        async def line(request: bytes, context: aio.ServicerContext) -> bytes:
            return turn_line(context)().encode()

        server = aio.server()
        methods = {"Line": grpc.unary_unary_rpc_method_handler(line)}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Lines", methods),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            address = f"127.0.0.1:{port}"
            if work is None:
                return await call_each(address)
            with nghttpx_in_front(address, work) as (proxied, _):
                return await call_each(proxied)
        finally:
            await server.stop(0)

    async def call_each(address: str) -> list[str]:
        async with aio.insecure_channel(address) as channel:
            method = channel.unary_unary("/test.Lines/Line")
            return [(await method(b"", metadata=metadata, timeout=10)).decode() for metadata in calls]

    return asyncio.run(scenario())


def test_a_direct_call_waits_in_its_connections_line_unless_a_local_proxy_forwarded_it() -> None:
    plain, forwarded, chain = lines_of(
        [(), (("x-forwarded-for", "10.1.2.3"),), (("x-forwarded-for", "192.0.2.7, 10.1.2.3"),)]
    )
    assert plain.startswith("ipv4:127.0.0.1:")  # the connection: address and port
    # From loopback the header is a local proxy's, and its last address is the one that proxy added.
    assert forwarded == "forwarded:10.1.2.3"
    assert chain == "forwarded:10.1.2.3"


@pytest.mark.skipif(shutil.which("nghttpx") is None, reason="nghttpx is not installed: run `make proxy-tools`")
def test_through_the_guard_each_call_waits_in_its_clients_line_whatever_it_claims(tmp_path: Path) -> None:
    # Whatever the client claims, the proxy puts the address it sees last (and drops the claim): here, loopback.
    lines = lines_of([(), (("x-forwarded-for", "203.0.113.9"),)], work=tmp_path)
    assert lines == ["forwarded:127.0.0.1", "forwarded:127.0.0.1"]
