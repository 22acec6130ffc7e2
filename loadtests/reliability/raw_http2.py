"""Just enough HTTP/2 (RFC 9113) and HPACK (RFC 7541) to be a client that misbehaves on purpose: idle connections,
streams it never reads, requests trickled a byte at a time, oversized metadata, streams opened and reset in a loop.

A gRPC client library does none of that (it reads, it honours flow control, it checks its own metadata), so these
clients write the frames themselves over a plain socket. Headers are HPACK literals without indexing and without
Huffman coding, which every decoder must accept.
"""

from __future__ import annotations

import socket
import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
CANCEL, INTERNAL_ERROR = 0x8, 0x2
NGHTTP2_RESET_BURST = 1000
"""The streams nghttp2 (nghttpx, the reset guard) lets one connection reset before it limits the rate to 33 a second
and ends the connection past that with GOAWAY INTERNAL_ERROR."""
SETTINGS_INITIAL_WINDOW_SIZE = 0x4


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """One frame: 24-bit length, type, flags, 31-bit stream id, payload."""
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", stream) + payload


def _integer(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """An HPACK integer with an N-bit prefix (RFC 7541, 5.1)."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def header_block(headers: list[tuple[str, str]]) -> bytes:
    """HPACK: each header as a literal without indexing, with a new name (RFC 7541, 6.2.2)."""
    block = bytearray()
    for name, value in headers:
        raw_name, raw_value = name.encode("ascii"), value.encode("latin-1")
        block += b"\x00" + _integer(len(raw_name), 7) + raw_name + _integer(len(raw_value), 7) + raw_value
    return bytes(block)


def grpc_headers(authority: str, path: str, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    """The HEADERS block of a gRPC call to `path` (e.g. '/attnserve.v1.Translator/Translate')."""
    return header_block(
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *extra,
        ]
    )


def grpc_message(message: bytes) -> bytes:
    """A gRPC length-prefixed, uncompressed message."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def connect(address: str, *, initial_window: int | None = None, timeout_s: float = 10.0) -> socket.socket:
    """A TCP connection that has sent the client preface and its SETTINGS (INITIAL_WINDOW_SIZE when given), read
    the server's SETTINGS and acknowledged them, as a client must (RFC 9113, 6.5.3): a peer that times out unanswered
    settings (nghttpx does, after 10 s) would otherwise close it. Only the frames up to the server's SETTINGS are
    read; whatever the server sends after them stays in the socket for the caller."""
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=timeout_s)
    settings = b"" if initial_window is None else struct.pack(">HI", SETTINGS_INITIAL_WINDOW_SIZE, initial_window)
    sock.sendall(PREFACE + frame(SETTINGS, 0, 0, settings))
    while True:
        header = _read_exactly(sock, 9)
        _read_exactly(sock, int.from_bytes(header[:3], "big"))
        if header[3] == SETTINGS and not header[4] & ACK:
            break
    sock.sendall(frame(SETTINGS, ACK, 0))
    return sock


def _read_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("the server closed the connection")
        data += chunk
    return data


def read_frames(sock: socket.socket, buffer: bytearray) -> list[tuple[int, int, int, bytes]]:
    """Read what has arrived (one recv) and return the complete frames: (type, flags, stream, payload). Raises
    ConnectionError when the server closed the connection."""
    data = sock.recv(1 << 16)
    if not data:
        raise ConnectionError("the server closed the connection")
    buffer += data
    frames = []
    while len(buffer) >= 9:
        length = int.from_bytes(buffer[:3], "big")
        if len(buffer) < 9 + length:
            break
        kind, flags = buffer[3], buffer[4]
        stream = int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
        frames.append((kind, flags, stream, bytes(buffer[9 : 9 + length])))
        del buffer[: 9 + length]
    return frames


def reset_then_ping(address: str, path: str, resets: int) -> str:
    """Open and at once reset `resets` streams of `path` on a new connection, then PING: what ended the wait,
    'ping acknowledged' or 'goaway N' (N its error code; a connection closed without one raises ConnectionError).
    Reads time out after 10 s. What a proxy that limits resets per connection does with a burst of them."""
    headers = grpc_headers(address, path)
    frames = b"".join(
        frame(HEADERS, END_HEADERS, stream, headers) + frame(RST_STREAM, 0, stream, CANCEL.to_bytes(4, "big"))
        for stream in range(1, 2 * resets, 2)
    )
    with connect(address) as sock:
        sock.sendall(frames + frame(PING, 0, 0, b"resets.."))
        buffer = bytearray()
        while True:
            for kind, flags, _, payload in read_frames(sock, buffer):
                if kind == GOAWAY:
                    return f"goaway {int.from_bytes(payload[4:8], 'big')}"
                if kind == PING and flags & ACK:
                    return "ping acknowledged"
