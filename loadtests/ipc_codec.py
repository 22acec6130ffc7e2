"""What one call's messages cost to encode and decode between a front-end and the engine process, per codec.

    python -m loadtests.ipc_codec

A call crosses twice: a Submit (one source of 12 token ids) to the engine, a Result (one hypothesis of 11 tokens)
back. Prints microseconds per call (encode + decode of both messages) and bytes, for msgspec's msgpack into typed
Structs (what service/ipc/messages.py uses), pickle of the same Structs, and json of the same fields as plain lists.
"""

from __future__ import annotations

import json
import pickle
import time
from collections.abc import Callable

import msgspec
import numpy as np

from service.ipc.messages import HypothesisRecord, Message, Options, Result, Submit

ROUNDS = 20_000


def sample() -> list[Message]:
    submit = Submit(
        ids=[1],
        name="dates",
        version=1,
        sources=[np.arange(12, dtype=np.int64).tobytes()],
        options=Options(1, 1, 64, 0.0, False),
        deadline=None,
        stream=False,
        arrival=12345.678,
    )
    result = Result(
        id=1,
        hypotheses=[HypothesisRecord(list(range(4, 15)), -0.01, -0.01, "eos", list(range(11)), None, 0)],
        queue_wait_s=0.0003,
        first_token_s=0.001,
        total_s=0.004,
        generated_tokens=11,
    )
    return [submit, result]


def per_call_us(encode: Callable[[object], bytes], decode: Callable[[bytes], object], messages: list) -> float:
    started = time.perf_counter()
    for _ in range(ROUNDS):
        for message in messages:
            decode(encode([message]))
    return (time.perf_counter() - started) / ROUNDS * 1e6


def main() -> int:
    messages = sample()
    plain = [msgspec.to_builtins(message) for message in messages]  # lists, bytes as base64 text
    decoder = msgspec.msgpack.Decoder(list[Message])
    rows: list[tuple[str, Callable[[object], bytes], Callable[[bytes], object], list]] = [
        ("msgspec msgpack (typed)", msgspec.msgpack.encode, decoder.decode, messages),
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
