"""Call an attnserve server's HTTP port through NVIDIA's tritonclient[http] and print what it saw, as JSON.

Runs in the interop virtualenv (`make interop`), like tritonclient_probe.py for gRPC: it imports nothing from
attnserve, only tritonclient and numpy. tests/service/test_http.py runs it as a subprocess and asserts on the
report; this script only observes (every call's outcome or error is recorded) and decides nothing.

    python tritonclient_http_probe.py --url 127.0.0.1:8000 --model dates --texts '["3 mars 1999", "..."]'
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException


def text_input(texts: list[str], *, binary: bool, name: str = "TEXT") -> triton.InferInput:
    tensor = triton.InferInput(name, [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([text.encode("utf-8") for text in texts], dtype=np.object_), binary_data=binary)
    return tensor


def outcome(call: Callable[[], Any]) -> dict[str, Any]:
    """{"value": ...} or {"error": {"status": HTTP status, "message": ...}}."""
    try:
        return {"value": call()}
    except InferenceServerException as error:
        return {"error": {"status": error.status(), "message": error.message()}}


def tensors(result: triton.InferResult) -> dict[str, Any]:
    """Each output through InferResult.as_numpy: shape, dtype, and the values (BYTES as text, FP32 as the hex of
    the float32 bits, so that the report compares bit for bit)."""
    found: dict[str, Any] = {}
    for name in ("TRANSLATION", "SCORE"):
        array = result.as_numpy(name)
        if array is None:
            continue
        if array.dtype == np.float32:
            values = [value.tobytes().hex() for value in array.ravel()]
        else:
            values = [item.decode("utf-8") if isinstance(item, bytes) else str(item) for item in array.ravel()]
        found[name] = {"shape": list(array.shape), "dtype": str(array.dtype), "values": values}
    return found


def infer(
    client: triton.InferenceServerClient, model: str, texts: list[str], *, binary: bool, **parameters: Any
) -> dict:
    outputs = (
        None if binary else [triton.InferRequestedOutput(name, binary_data=False) for name in ("TRANSLATION", "SCORE")]
    )
    result = client.infer(
        model, [text_input(texts, binary=binary)], outputs=outputs, request_id="http-1", parameters=parameters or None
    )
    response = result.get_response()
    return {"id": response.get("id"), "model_version": response.get("model_version"), "tensors": tensors(result)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="host:port of the server's HTTP port")
    parser.add_argument("--model", required=True)
    parser.add_argument("--texts", required=True, help="JSON list of texts to translate")
    arguments = parser.parse_args(argv)
    texts: list[str] = json.loads(arguments.texts)
    model = arguments.model
    client = triton.InferenceServerClient(arguments.url)
    try:
        report = {
            "live": outcome(client.is_server_live),
            "ready": outcome(client.is_server_ready),
            "model_ready": outcome(lambda: client.is_model_ready(model)),
            "model_ready_missing_version": outcome(lambda: client.is_model_ready(model, "99")),
            "model_ready_unknown_model": outcome(lambda: client.is_model_ready("no-such-model")),
            "server_metadata": outcome(client.get_server_metadata),
            "model_metadata": outcome(lambda: client.get_model_metadata(model)),
            "infer_binary": outcome(lambda: infer(client, model, texts, binary=True)),
            "infer_json": outcome(lambda: infer(client, model, texts, binary=False)),
            "infer_beam": outcome(lambda: infer(client, model, texts, binary=True, beam_size=3, num_hypotheses=2)),
            "unknown_model": outcome(lambda: infer(client, "no-such-model", texts[:1], binary=True)),
            "wrong_input_name": outcome(
                lambda: client.infer(model, [text_input(texts[:1], binary=True, name="SOURCE")]).get_response()
            ),
            "unknown_parameter": outcome(lambda: infer(client, model, texts[:1], binary=True, beam=4)),
        }
    finally:
        client.close()
    json.dump(report, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
