"""Whose line a gRPC call waits its turn in (Dataplane.translate's `client`): the client, as this process can tell.

A call's connection names its client (`context.peer()`: address and port), so each client connection has a line of
its own. Behind the reset guard (deploy/proxy/nghttpx.conf, a sidecar on this host) every call arrives on the
proxy's connections from loopback, and all the clients of a pod would share one line; the proxy forwards each
client's address in X-Forwarded-For (stripping any the client sent itself), so a call from loopback that carries it
is put in the line of the address the proxy added: the last one of the header. That line is per client host, not
per connection. Trusting the header from loopback alone is safe: only a process on this host can send it, and all
it could choose is which line it waits in.
"""

from __future__ import annotations

from collections.abc import Callable

from grpc import aio

FORWARDED_FOR = "x-forwarded-for"
LOOPBACK_PEERS = ("ipv4:127.", "ipv6:[::1]", "ipv6:%5B::1%5D", "unix:")
"""How gRPC core names a loopback peer (or a Unix socket's)."""


def turn_line(context: aio.ServicerContext) -> Callable[[], str]:
    """The call's line, asked for only when the call must wait its turn: its peer, or `forwarded:ADDRESS` for a call
    a proxy on this host passed on with X-Forwarded-For."""

    def line() -> str:
        peer = context.peer()
        if peer.startswith(LOOPBACK_PEERS):
            for key, value in context.invocation_metadata() or ():
                if key == FORWARDED_FOR:
                    return "forwarded:" + value.rsplit(",", 1)[-1].strip()
        return peer

    return line
