"""What one call's messages cost to encode and decode between a front-end and the engine process, per codec.

    python -m loadtests.ipc_codec

A call crosses twice: a Submit (one source of 12 token ids) to the engine, a Result (one hypothesis of 11 tokens)
back. Prints microseconds per call (encode + decode of both messages) and bytes, for msgspec's msgpack into typed
Structs (what service/ipc/messages.py uses, frames and numpy extensions included), pickle of the same Structs, and
json of the same fields as plain lists.
"""

from __future__ import annotations

import json
import pickle
import time
from collections.abc import Callable

import msgspec
import numpy as np

from service.engine.records import DecodeOptions, EngineRequest, EngineResult, FinishReason, Hypothesis
from service.ipc.messages import FrameReader, Message, Result, Submit, encode_frame

ROUNDS = 20_000


def sample() -> list[Message]:
    options = DecodeOptions(beam_size=1, num_hypotheses=1, max_length=64)
    request = EngineRequest(np.arange(12, dtype=np.int64), options, deadline=None, stream=False, arrival=12345.678)
    hypothesis = Hypothesis(list(range(4, 15)), -0.01, -0.01, FinishReason.EOS, list(range(11)))
    return [
        Submit(ids=[1], name="dates", version=1, requests=[request]),
        Result(id=1, result=EngineResult([hypothesis], 0.0003, 0.001, 0.004, 11)),
    ]


_received: list[Message] = []
_reader = FrameReader(_received.extend)  # one reader for every frame, as one connection has


def decode_frame(frame: bytes) -> list[Message]:
    _received.clear()
    _reader.feed(frame)
    return _received


def _builtin(value: object) -> object:
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise NotImplementedError


def per_call_us(encode: Callable[[object], bytes], decode: Callable[[bytes], object], messages: list) -> float:
    started = time.perf_counter()
    for _ in range(ROUNDS):
        for message in messages:
            decode(encode([message]))
    return (time.perf_counter() - started) / ROUNDS * 1e6


def main() -> int:
    messages = sample()
    plain = [msgspec.to_builtins(message, enc_hook=_builtin) for message in messages]  # arrays as lists
    rows: list[tuple[str, Callable[[object], bytes], Callable[[bytes], object], list]] = [
        ("msgspec msgpack (typed)", encode_frame, decode_frame, messages),  # type: ignore[list-item]
        ("pickle", pickle.dumps, pickle.loads, messages),
        ("json (plain lists)", lambda value: json.dumps(value).encode(), json.loads, plain),
    ]
    print(f"{'codec':<26} {'us per call':>12} {'bytes per call':>15}")
    for name, encode, decode, payload in rows:
        size = sum(len(encode([message])) for message in payload)
        print(f"{name:<26} {per_call_us(encode, decode, payload):12.2f} {size:15d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
