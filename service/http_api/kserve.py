"""The KServe v2 inference protocol over REST: the same models, parameters, checks and tensors as the gRPC service
(both convert through service/kserve.py), as JSON.

    GET  /v2                                                  server metadata
    GET  /v2/health/live, /v2/health/ready                    200 {"live"|"ready": true}, 503 when not ready
    GET  /v2/models/{name}[/versions/{version}]               model metadata
    GET  /v2/models/{name}[/versions/{version}]/ready         200 {"name", "ready": true}, 503 when not ready
    POST /v2/models/{name}[/versions/{version}]/infer         inference

Tensor data is JSON (BYTES elements as strings, FP32 as numbers; a score of -inf, which pads an n-best row that
its beam could not fill, is null: JSON has no infinity), or, with Triton's binary tensor data extension (what
tritonclient.http sends by default), binary after the JSON: the header `Inference-Header-Content-Length` gives the
JSON's length, an input's `binary_data_size` parameter its bytes (BYTES: 4-byte little-endian lengths and the bytes,
as gRPC's raw contents), and an output is returned binary when its `binary_data` parameter or the request's
`binary_data_output` parameter is true. Those three parameters are the transport's; every other one is the
protocol's and is checked exactly as on gRPC.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web

from service.dataplane import Dataplane, TranslateOutcome
from service.errors import InvalidRequest
from service.http_api.body import JSON, OCTET_STREAM, connection_of, json_document, read_body
from service.http_api.errors import HttpRequestError
from service.kserve import (
    BYTES,
    MODEL_INPUTS,
    MODEL_OUTPUTS,
    MODEL_PLATFORM,
    SERVER_EXTENSIONS,
    SERVER_NAME,
    InferCall,
    InputTensor,
    ParameterValue,
    RequestedOutput,
    decode_raw_bytes,
    encode_raw_bytes,
    infer_call,
    output_tensors,
    required_name,
    server_version,
)
from service.registry import ModelDescription
from service.settings import Settings

HEADER_LENGTH = "Inference-Header-Content-Length"
"""Triton's binary tensor data extension: the length in bytes of the JSON that starts the body."""

_REQUEST_FIELDS = ("id", "parameters", "inputs", "outputs")
_INPUT_FIELDS = ("name", "shape", "datatype", "parameters", "data")
_OUTPUT_FIELDS = ("name", "parameters")

NoteModel = Callable[[str, int], None]


# ----- the request -----------------------------------------------------------------------------------------


def _object(value: Any, what: str, fields: Sequence[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidRequest(f"{what} must be a JSON object with the fields {', '.join(fields)}")
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise InvalidRequest(f"{what} has unknown field {unknown[0]!r}; its fields are {', '.join(fields)}")
    return value


def _parameters(value: Any, what: str) -> dict[str, ParameterValue]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"{what}.parameters must be a JSON object of name: value")
    for name, item in value.items():
        if not isinstance(item, (bool, int, float, str)):
            raise InvalidRequest(f"{what}.parameters.{name} must be a bool, a number or a string")
    return dict(value)


def _flag(parameters: dict[str, ParameterValue], name: str, what: str) -> bool | None:
    """Take the transport's bool parameter `name` out of `parameters` (None when absent)."""
    if name not in parameters:
        return None
    value = parameters.pop(name)
    if not isinstance(value, bool):
        raise InvalidRequest(f"{what}.parameters.{name} must be a bool")
    return value


_END = object()


def _flatten(data: list[Any]) -> list[Any]:
    """Tensor data in row-major order: the protocol allows nested arrays. Without recursion: the JSON parser
    accepts nesting deeper than Python's recursion limit leaves room for here."""
    flat: list[Any] = []
    pending: list[Any] = [iter(data)]
    while pending:
        item = next(pending[-1], _END)
        if item is _END:
            pending.pop()
        elif isinstance(item, list):
            pending.append(iter(item))
        else:
            flat.append(item)
    return flat


def _json_elements(data: Any, name: str) -> list[bytes]:
    if not isinstance(data, list):
        raise InvalidRequest(f"input {name}: data must be an array (BYTES elements as strings)")
    elements = []
    for index, item in enumerate(_flatten(data)):
        if not isinstance(item, str):
            raise InvalidRequest(f"input {name}: data[{index}] is not a string; {BYTES} elements are sent as strings")
        # surrogatepass: a lone surrogate escape in the JSON reaches the UTF-8 check, which names it.
        elements.append(item.encode("utf-8", "surrogatepass"))
    return elements


@dataclass
class _BinaryData:
    """The bytes after the JSON, handed out to the inputs that declare binary_data_size, in order."""

    data: bytes
    offset: int = 0

    def take(self, size: int, name: str) -> bytes:
        if self.offset + size > len(self.data):
            raise InvalidRequest(
                f"input {name} declares {size} bytes of binary data but only {len(self.data) - self.offset} remain"
            )
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk


def _input(value: Any, index: int, binary: _BinaryData) -> InputTensor:
    what = f"inputs[{index}]"
    tensor = _object(value, what, _INPUT_FIELDS)
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not isinstance(name, str) or not isinstance(datatype, str):
        raise InvalidRequest(f"{what} needs a name and a datatype, both strings")
    if not isinstance(shape, list) or not all(isinstance(size, int) and not isinstance(size, bool) for size in shape):
        raise InvalidRequest(f"input {name}: shape must be an array of integers")
    parameters = _parameters(tensor.get("parameters"), what)
    size = parameters.pop("binary_data_size", None)
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidRequest(f"input {name}: binary_data_size must be an integer >= 0")
        if "data" in tensor:
            raise InvalidRequest(f"input {name} has both data and binary_data_size; send one")
        chunk = binary.take(size, name)

        def read_elements() -> list[bytes]:
            return decode_raw_bytes(chunk, f"input {name}")

    else:
        if "data" not in tensor:
            raise InvalidRequest(f"input {name} has no data (nor a binary_data_size parameter)")
        data = tensor["data"]

        def read_elements() -> list[bytes]:
            return _json_elements(data, name)

    return InputTensor(name, datatype, shape, list(parameters), read_elements)


def infer_call_from_rest(
    body: bytes, header_length: str | None, model: str, version: str
) -> tuple[InferCall, set[str]]:
    """Validate a REST inference request (the model named by the path) and convert it; also returns the names of
    the outputs to answer in binary. Raises InvalidRequest with a message for the client."""
    binary = b""
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            length = -1
        if not 0 <= length <= len(body):
            raise HttpRequestError(
                f"{HEADER_LENGTH} is {header_length!r}; it must be the JSON's length in bytes, at most the "
                f"body's {len(body)}"
            )
        body, binary = body[:length], body[length:]
    request = _object(json_document(body, "an inference request"), "the inference request", _REQUEST_FIELDS)
    request_id = request.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidRequest("id must be a string")
    parameters = _parameters(request.get("parameters"), "the inference request")
    binary_by_default = _flag(parameters, "binary_data_output", "the inference request") or False
    inputs = request.get("inputs")
    if not isinstance(inputs, list):
        raise InvalidRequest(f"inputs must be an array; model {model} needs {MODEL_INPUTS[0].describe()}")
    data = _BinaryData(binary)
    tensors = [_input(value, index, data) for index, value in enumerate(inputs)]
    if data.offset != len(binary):
        raise InvalidRequest(f"{len(binary) - data.offset} bytes of binary data follow the inputs' and belong to none")
    outputs = request.get("outputs") or []
    if not isinstance(outputs, list):
        raise InvalidRequest("outputs must be an array of {name, parameters}")
    requested: list[RequestedOutput] = []
    binary_outputs: dict[str, bool] = {}
    for index, value in enumerate(outputs):
        output = _object(value, f"outputs[{index}]", _OUTPUT_FIELDS)
        name = output.get("name")
        if not isinstance(name, str):
            raise InvalidRequest(f"outputs[{index}] needs a name, a string")
        output_parameters = _parameters(output.get("parameters"), f"outputs[{index}]")
        flag = _flag(output_parameters, "binary_data", f"outputs[{index}]")
        if flag is not None:
            binary_outputs[name] = flag
        requested.append(RequestedOutput(name, list(output_parameters)))
    call = infer_call(
        model=model,
        version=version,
        request_id=request_id,
        parameters=parameters,
        inputs=tensors,
        outputs=requested,
        raw=False,
    )
    return call, {name for name in call.outputs if binary_outputs.get(name, binary_by_default)}


# ----- the response ----------------------------------------------------------------------------------------


def infer_response_to_rest(call: InferCall, outcome: TranslateOutcome, binary: set[str]) -> tuple[bytes, int | None]:
    """The response body and, when some output is binary, the length of its JSON part."""
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for output in output_tensors(call, outcome):
        entry: dict[str, Any] = {"name": output.spec.name, "datatype": output.spec.datatype, "shape": output.shape}
        if output.spec.datatype == BYTES:
            elements = list(output.values)
            if output.spec.name in binary:
                chunks.append(encode_raw_bytes(elements))
            else:
                entry["data"] = [element.decode("utf-8") for element in elements]
        else:
            numbers = np.asarray(output.values, dtype="<f4")
            if output.spec.name in binary:
                chunks.append(numbers.tobytes())
            else:
                entry["data"] = [value if math.isfinite(value) else None for value in numbers.tolist()]
        if output.spec.name in binary:
            entry["parameters"] = {"binary_data_size": len(chunks[-1])}
        outputs.append(entry)
    document = {
        "model_name": outcome.model,
        "model_version": str(outcome.version),
        "id": call.request_id,
        "outputs": outputs,
    }
    head = json.dumps(document, ensure_ascii=False, allow_nan=False).encode("utf-8")
    if not chunks:
        return head, None
    return head + b"".join(chunks), len(head)


def model_metadata_to_rest(model: ModelDescription) -> dict[str, Any]:
    def tensors(specs: Sequence[Any]) -> list[dict[str, Any]]:
        return [{"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)} for spec in specs]

    return {
        "name": model.name,
        "versions": [str(version) for version in model.loaded_versions],
        "platform": MODEL_PLATFORM,
        "inputs": tensors(MODEL_INPUTS),
        "outputs": tensors(MODEL_OUTPUTS),
    }


# ----- the handlers ----------------------------------------------------------------------------------------


def _json(document: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(document, ensure_ascii=False), status=status, content_type=JSON)


class KServeRest:
    """The v2 REST endpoints over a Dataplane; `note(request)` gives the call's model-label recorder."""

    def __init__(self, dataplane: Dataplane, settings: Settings, note: Callable[[web.Request], NoteModel]) -> None:
        self.dataplane = dataplane
        self.settings = settings
        self._note = note

    async def server_metadata(self, request: web.Request) -> web.Response:
        return _json({"name": SERVER_NAME, "version": server_version(), "extensions": list(SERVER_EXTENSIONS)})

    async def server_live(self, request: web.Request) -> web.Response:
        return _json({"live": True})

    async def server_ready(self, request: web.Request) -> web.Response:
        ready = self.dataplane.server_ready()
        return _json({"ready": ready}, 200 if ready else 503)

    async def model_metadata(self, request: web.Request) -> web.Response:
        name, version = request.match_info["name"], request.match_info.get("version", "")
        model = self.dataplane.get_model(required_name(name, "ModelMetadata"), version)
        self._note(request)(model.name, model.version)
        return _json(model_metadata_to_rest(model))

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = request.match_info["name"], request.match_info.get("version", "")
        ready = self.dataplane.model_ready(required_name(name, "ModelReady"), version)
        return _json({"name": name, "ready": ready}, 200 if ready else 503)

    async def model_infer(self, request: web.Request) -> web.Response:
        name, version = request.match_info["name"], request.match_info.get("version", "")
        note = self._note(request)
        # The model first, so an unknown model is 404 whatever else is wrong with the request (as on gRPC).
        model = self.dataplane.get_model(required_name(name, "ModelInfer"), version)
        note(model.name, model.version)
        body = await read_body(request, self.settings, (JSON, OCTET_STREAM))
        call, binary = infer_call_from_rest(body, request.headers.get(HEADER_LENGTH), name, version)
        outcome = await self.dataplane.translate(
            call.model,
            call.version,
            call.texts,
            call.options,
            call.deadline(None, time.monotonic()),
            on_resolved=note,
            client=lambda: connection_of(request),
        )
        data, header_length = infer_response_to_rest(call, outcome, binary)
        if header_length is None:
            return web.Response(body=data, content_type=JSON)
        return web.Response(body=data, content_type=OCTET_STREAM, headers={HEADER_LENGTH: str(header_length)})
