"""Call an attnserve server through NVIDIA's tritonclient[grpc] and print what it saw, as JSON.

Runs in the interop virtualenv (`make interop`; tests/interop/requirements.txt), never in the project's
.venv: it imports nothing from attnserve, only tritonclient and numpy, so it is a genuinely independent
KServe v2 client. tests/service/test_kserve.py runs it as a subprocess and asserts on the report; this
script only observes (every call's outcome or error is recorded) and decides nothing.

    python tritonclient_probe.py --url 127.0.0.1:8001 --model dates --texts '["3 mars 1999", "..."]'
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

STREAM_TIMEOUT_S = 60.0


def text_input(texts: list[str], name: str = "TEXT") -> triton.InferInput:
    """A BYTES input as tritonclient builds it: set_data_from_numpy sends it in raw_input_contents."""
    tensor = triton.InferInput(name, [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([text.encode("utf-8") for text in texts], dtype=np.object_))
    return tensor


def outcome(call: Callable[[], Any]) -> dict[str, Any]:
    """{"value": ...} or {"error": {"status": "StatusCode.X", "message": ...}}."""
    try:
        return {"value": call()}
    except InferenceServerException as error:
        return {"error": {"status": str(error.status()), "message": error.message()}}


def result_tensors(result: triton.InferResult, names: tuple[str, ...] = ("TRANSLATION", "SCORE")) -> dict[str, Any]:
    """Each output through InferResult.as_numpy: {"shape": [...], "values": [...]} (BYTES decoded as UTF-8)."""
    tensors: dict[str, Any] = {}
    for name in names:
        array = result.as_numpy(name)
        if array is None:
            continue
        values = [item.decode("utf-8") if isinstance(item, bytes) else float(item) for item in array.ravel()]
        tensors[name] = {"shape": list(array.shape), "dtype": str(array.dtype), "values": values}
    return tensors


def infer(client: triton.InferenceServerClient, model: str, texts: list[str], **parameters: Any) -> dict[str, Any]:
    result = client.infer(model, [text_input(texts)], request_id="raw-1", parameters=parameters or None)
    response = result.get_response()
    return {
        "id": response.id,
        "model_name": response.model_name,
        "model_version": response.model_version,
        "raw_output_count": len(response.raw_output_contents),
        "tensors": result_tensors(result),
    }


def infer_typed(url: str, model: str, texts: list[str]) -> dict[str, Any]:
    """ModelInfer with the data in contents.bytes_contents (typed), built with tritonclient's own stubs and
    read back from the typed fields. (Not through InferResult.as_numpy: tritonclient 2.73 reads typed BYTES
    outputs with np.array(copy=False), which numpy 2 refuses; tritonclient itself always sends raw data,
    and so always gets raw outputs back.)"""
    request = service_pb2.ModelInferRequest(model_name=model, id="typed-1")
    tensor = request.inputs.add(name="TEXT", datatype="BYTES", shape=[len(texts)])
    tensor.contents.bytes_contents.extend(text.encode("utf-8") for text in texts)
    with grpc.insecure_channel(url) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    outputs = {output.name: output for output in response.outputs}
    return {
        "id": response.id,
        "raw_output_count": len(response.raw_output_contents),
        "typed_translation": [item.decode("utf-8") for item in outputs["TRANSLATION"].contents.bytes_contents],
        "typed_score": list(outputs["SCORE"].contents.fp32_contents),
        "translation_shape": list(outputs["TRANSLATION"].shape),
        "score_shape": list(outputs["SCORE"].shape),
    }


def stream(client: triton.InferenceServerClient, model: str, texts: list[str]) -> list[dict[str, Any]]:
    """Three requests on one ModelStreamInfer stream: a batch, an unknown model, and one text streamed token
    by token with an empty final response. Every callback is recorded in arrival order."""
    received: queue.Queue[dict[str, Any]] = queue.Queue()

    def callback(result: triton.InferResult | None, error: InferenceServerException | None) -> None:
        if error is not None:
            received.put({"error": error.message()})
            return
        assert result is not None
        response = result.get_response()
        parameters = {
            name: getattr(value, value.WhichOneof("parameter_choice")) for name, value in response.parameters.items()
        }
        received.put({"id": response.id, "parameters": parameters, "tensors": result_tensors(result)})

    client.start_stream(callback=callback, stream_timeout=STREAM_TIMEOUT_S)
    try:
        client.async_stream_infer(model, [text_input(texts)], request_id="batch")
        client.async_stream_infer("no-such-model", [text_input(texts[:1])], request_id="missing")
        client.async_stream_infer(
            model,
            [text_input(texts[:1])],
            request_id="tokens",
            parameters={"stream": True},
            enable_empty_final_response=True,
        )
    finally:
        client.stop_stream()  # waits until the server has answered every request and closed the stream
    events: list[dict[str, Any]] = []
    while not received.empty():
        events.append(received.get())
    return events


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="host:port of the server's gRPC port")
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
            "model_ready_version_1": outcome(lambda: client.is_model_ready(model, "1")),
            "model_ready_missing_version": outcome(lambda: client.is_model_ready(model, "99")),
            "model_ready_unknown_model": outcome(lambda: client.is_model_ready("no-such-model")),
            "server_metadata": outcome(lambda: client.get_server_metadata(as_json=True)),
            "model_metadata": outcome(lambda: client.get_model_metadata(model, as_json=True)),
            "infer_raw": outcome(lambda: infer(client, model, texts)),
            "infer_raw_beam": outcome(lambda: infer(client, model, texts, beam_size=3, num_hypotheses=2)),
            "infer_typed": outcome(lambda: infer_typed(arguments.url, model, texts)),
            "unknown_model": outcome(lambda: result_tensors(client.infer("no-such-model", [text_input(texts[:1])]))),
            "wrong_input_name": outcome(
                lambda: result_tensors(client.infer(model, [text_input(texts[:1], name="SOURCE")]))
            ),
            "wrong_datatype": outcome(
                lambda: result_tensors(
                    client.infer(
                        model,
                        [triton.InferInput("TEXT", [2], "FP32").set_data_from_numpy(np.zeros(2, dtype=np.float32))],
                    )
                )
            ),
            "unknown_parameter": outcome(lambda: infer(client, model, texts[:1], beam=4)),
            "stream": outcome(lambda: stream(client, model, texts)),
        }
    finally:
        client.close()
    json.dump(report, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
