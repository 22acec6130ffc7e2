"""What front-end processes and the engine process say to each other, and how it travels.

Transport: one Unix stream socket per front-end, in a directory only the server's user can open. Each
write is a frame: a 4-byte little-endian length, then a msgpack array of messages (msgspec Structs,
tagged by class name). The messages carry the engine's own records (service/engine/records.py) and the
registry's report as they are: nothing is converted by hand on either side. Both sides buffer what they
send during one turn of their event loop and write it as one frame, so a busy loop pays one system call and
one encode per turn, not one per message.

Why a stream socket rather than ZeroMQ: the front-end must learn at once that the engine died (its calls
fail with UNAVAILABLE rather than hang); a connection-oriented socket reports that as end-of-file, where a
ZeroMQ socket would silently wait for a peer to reconnect and would need heartbeats. Why msgspec: it
decodes msgpack straight into typed Structs, several times faster than json or pickle for these records.

Times are time.monotonic() seconds. CLOCK_MONOTONIC is one clock for every process on a Linux host, and
these sockets only connect processes of one host, so deadlines and arrival times cross unchanged.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import cast

import msgspec
import numpy as np

from service.engine.records import EngineRequest, EngineResult, TokenEvent
from service.registry import RegistryReport

# ----- front-end -> engine ----------------------------------------------------------------------------------


class Submit(msgspec.Struct, tag=True, array_like=True):
    """One call's requests for model `name` version `version`, all or none (AsyncEngine.submit_all); `ids`:
    one request id per request, unique per connection."""

    ids: list[int]
    name: str
    version: int
    requests: list[EngineRequest]


class Cancel(msgspec.Struct, tag=True, array_like=True):
    """The caller gave up on request `id` (idempotent: unknown or finished ids are ignored)."""

    id: int


class RegistryApplied(msgspec.Struct, tag=True, array_like=True):
    """The front-end now serves what `Registry` number `generation` said: whatever it sends from here on names
    only versions of that report."""

    generation: int


# ----- engine -> front-end ----------------------------------------------------------------------------------


class Registry(msgspec.Struct, tag=True, array_like=True):
    """What the engine serves now, report number `generation`: sent when a front-end connects and after every
    change (load, failure, retirement, drain)."""

    generation: int
    report: RegistryReport


class QueueDepth(msgspec.Struct, tag=True, array_like=True):
    """Requests waiting in model `name` version `version`'s queue, and requests that have left it since its engine
    started (`dequeued`, a count that only grows), sent when either changed: a front-end refuses a call for a full
    queue, or one that could not start in time (it measures the drain rate from `dequeued`), without asking the
    engine."""

    name: str
    version: int
    waiting: int
    dequeued: int


class Result(msgspec.Struct, tag=True, array_like=True):
    """Request `id` finished."""

    id: int
    result: EngineResult


class Failed(msgspec.Struct, tag=True, array_like=True):
    """Request `id` ended with an AttnServeError: its status `code` and `message` (errors.error_from_status)."""

    id: int
    code: str
    message: str


class Token(msgspec.Struct, tag=True, array_like=True):
    """One streamed token of request `id`."""

    id: int
    event: TokenEvent


Message = Submit | Cancel | RegistryApplied | Registry | QueueDepth | Result | Failed | Token

# numpy arrays (token ids, attention) travel as msgpack extension NDARRAY: a byte for the dtype (ARRAY_DTYPES), a
# byte for the number of dimensions, each dimension as a little-endian uint32, then the raw little-endian data.
NDARRAY = 1
ARRAY_DTYPES = (np.dtype("<i8"), np.dtype("<f4"), np.dtype("<i4"), np.dtype("<f8"), np.dtype("|b1"))
_DTYPE_CODES = {dtype: code for code, dtype in enumerate(ARRAY_DTYPES)}
_DIMENSIONS = [struct.Struct(f"<BB{ndim}I") for ndim in range(8)]


def _encode_array(array: np.ndarray) -> msgspec.msgpack.Ext:
    code = _DTYPE_CODES.get(array.dtype)
    if code is None or array.ndim >= len(_DIMENSIONS):
        raise NotImplementedError(f"cannot send an array of {array.dtype} with {array.ndim} dimensions")
    return msgspec.msgpack.Ext(NDARRAY, _DIMENSIONS[array.ndim].pack(code, array.ndim, *array.shape) + array.tobytes())


def _decode_array(data: memoryview) -> np.ndarray:
    code, ndim = data[0], data[1]
    if code >= len(ARRAY_DTYPES) or ndim >= len(_DIMENSIONS):
        raise ValueError(f"an array extension with dtype code {code} and {ndim} dimensions")
    shape = _DIMENSIONS[ndim].unpack_from(data)[2:]
    # A copy: `data` is a view of the frame being decoded, which the reader reuses.
    return np.frombuffer(data, dtype=ARRAY_DTYPES[code], offset=2 + 4 * ndim).reshape(shape).copy()


def _enc_hook(value: object) -> object:
    if isinstance(value, np.ndarray):
        return _encode_array(value)
    raise NotImplementedError(f"cannot send {type(value).__name__}")


def _ext_hook(code: int, data: memoryview) -> object:
    if code != NDARRAY:
        raise ValueError(f"unknown msgpack extension {code}")
    return _decode_array(data)


def _dec_hook(kind: type, value: object) -> object:
    if kind is np.ndarray and isinstance(value, np.ndarray):
        return value
    raise NotImplementedError(f"cannot receive {kind}")


_LENGTH = struct.Struct("<I")
MAX_FRAME_BYTES = 1 << 30
"""A frame this large means a broken peer, not a busy one: the connection is closed."""

_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_decoder = msgspec.msgpack.Decoder(list[Message], ext_hook=_ext_hook, dec_hook=_dec_hook)


def encode_frame(messages: list[Message]) -> bytes:
    """The bytes of one frame holding `messages`."""
    body = _encoder.encode(messages)
    return _LENGTH.pack(len(body)) + body


READ_SPACE = 64 * 1024
"""The least room a read is offered."""
RESTING_BUFFER = 2 * READ_SPACE
"""A reader's buffer at rest: one grown past twice this for a large frame is replaced once that frame is decoded."""


class FrameReader:
    """Splits a byte stream into frames and hands each frame's messages to `deliver`, in order.

    The bytes are received into the reader's own buffer (asyncio's BufferedProtocol: `get_buffer()`, then
    `buffer_updated(n)`), which is reused from read to read. Why: a plain asyncio Protocol receives each read into a
    new bytes object of 256 KiB that is then shrunk to what arrived. At hundreds of reads a second, that pattern
    fragmented glibc's heap: a front-end's heap grew by about 1 MB a minute while what it held stayed flat.
    `feed(data)` is the same for bytes received elsewhere (tests, benchmarks).
    """

    def __init__(self, deliver: Callable[[list[Message]], None]) -> None:
        self._deliver = deliver
        self._buffer = bytearray()
        self._start = 0  # the first byte not yet decoded
        self._end = 0  # the end of the bytes received
        self._frame_end = 0  # where the frame at _start ends, once its length has arrived (else 0)

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Room for the next read: READ_SPACE bytes, or the rest of a frame that has begun to arrive if that is more."""
        buffer, start, end = self._buffer, self._start, self._end
        room = max(READ_SPACE, self._frame_end - end)
        if len(buffer) - end < room or (start == end and len(buffer) > 2 * RESTING_BUFFER):
            pending = end - start
            size = max(RESTING_BUFFER, pending + room)
            if size <= len(buffer) <= 2 * size:
                buffer[:pending] = buffer[start:end]  # the pending bytes to the front (same length: no resize)
            else:
                # A new array rather than a resize: the view handed to the last read may still exist.
                grown = bytearray(size)
                grown[:pending] = buffer[start:end]
                self._buffer = buffer = grown
            if self._frame_end:
                self._frame_end -= start
            self._start, self._end = 0, pending
        return memoryview(buffer)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """Decode and deliver every frame completed by the `nbytes` just written into get_buffer()'s room. Raises
        ValueError for a frame that is too large or does not decode."""
        self._end += nbytes
        buffer, start, end = self._buffer, self._start, self._end
        while end - start >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(buffer, start)
            if size > MAX_FRAME_BYTES:
                raise ValueError(f"a frame of {size} bytes, above the {MAX_FRAME_BYTES} bytes allowed")
            frame_end = start + _LENGTH.size + size
            if end < frame_end:
                self._frame_end = frame_end
                break
            with memoryview(buffer) as view:
                messages = _decoder.decode(view[start + _LENGTH.size : frame_end])
            start = self._start = frame_end
            self._frame_end = 0
            self._deliver(messages)
        if start == end:  # all decoded: the next read starts at the front, nothing to move
            self._start = self._end = 0
        else:
            self._start = start

    def feed(self, data: bytes) -> None:
        """Take bytes received elsewhere, as if read into get_buffer()'s room. Raises as buffer_updated()."""
        with memoryview(data) as remaining:
            while remaining:
                room = self.get_buffer()
                count = min(len(room), len(remaining))
                room[:count] = remaining[:count]
                room.release()
                self.buffer_updated(count)
                remaining = remaining[count:]


class Channel(asyncio.BufferedProtocol):
    """One end of a connection: `send()` queues a message, and everything queued during one turn of the event
    loop leaves as one frame. Received messages go to `on_messages`; `on_lost(reason)` is called once when the
    connection ends (the peer closed it or died, or a frame was malformed). Use on the event-loop thread."""

    def __init__(self, on_messages: Callable[[list[Message]], None], on_lost: Callable[[str], None]) -> None:
        self._on_messages = on_messages
        self._on_lost = on_lost
        self._reader = FrameReader(on_messages)
        self._transport: asyncio.Transport | None = None
        self._outgoing: list[Message] = []
        self._lost = False

    @property
    def open(self) -> bool:
        return self._transport is not None and not self._lost

    def send(self, message: Message) -> None:
        """Queue `message` (also before the connection is made); dropped when the connection is gone (its
        calls were failed when it went)."""
        if self._lost:
            return
        if not self._outgoing:
            asyncio.get_running_loop().call_soon(self.flush)
        self._outgoing.append(message)

    def flush(self) -> None:
        """Write what is queued now, as one frame."""
        if self._transport is None or self._lost or not self._outgoing:
            return  # not connected yet: connection_made flushes
        outgoing, self._outgoing = self._outgoing, []
        self._transport.write(encode_frame(outgoing))

    def close(self) -> None:
        """Send what is queued, then close."""
        self.flush()
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Drop the connection at once, unsent messages too (the peer sees it as a process that died)."""
        if self._transport is not None:
            self._transport.abort()

    # asyncio.BufferedProtocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream's transport: asyncio's subclasses asyncio.Transport, uvloop's has its methods without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self.flush()  # what was queued before the connection was made

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self._reader.buffer_updated(nbytes)
        except (ValueError, msgspec.DecodeError) as error:
            if self._transport is not None:
                self._transport.abort()  # connection_lost follows, with the reason below
            self._lose(f"a malformed message: {error}")

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose("the connection closed" if exc is None else f"the connection failed: {exc}")

    def _lose(self, reason: str) -> None:
        if self._lost:
            return
        self._lost = True
        self._outgoing.clear()
        self._on_lost(reason)
