"""The KServe v2 inference protocol ("Open Inference Protocol") over the same Dataplane as the native API.

`inference.GRPCInferenceService` on the server's one port, so Triton and KServe clients (tritonclient,
load tools, gateways) can call attnserve unchanged. Translation is presented as tensors:

    input   TEXT         BYTES  [-1]   one UTF-8 text per element (a batch of texts)
    output  TRANSLATION  BYTES  [-1]   the best translation of each text
    output  SCORE        FP32   [-1]   its score (log probability, length-normalised with length_penalty)

With `num_hypotheses` k > 1 both outputs have shape [n, k] (best first; a text whose beam produced
fewer than k hypotheses is padded with "" and -inf). Decoding options are request parameters (see
REQUEST_PARAMETERS). BYTES input is read from `contents.bytes_contents` or from `raw_input_contents`
(each element a 4-byte little-endian length and the bytes); outputs come back the same way the
request sent its inputs: raw_output_contents for raw requests, typed contents otherwise (as the KServe
server does).

This module only converts: requests go through Dataplane.translate / translate_stream, so they batch
with native traffic under the same limits and metrics. Unary errors propagate as `service.errors`
exceptions to RpcInterceptor (the one status table); on ModelStreamInfer they travel in-band as
`error_message` ("STATUS: details", status from the same table) so the stream survives them.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata

import numpy as np
from grpc import aio

from service.dataplane import Dataplane, StreamUpdate, TextTranslation, TranslateOutcome
from service.engine.records import DecodeOptions
from service.errors import AttnServeError, InvalidRequest
from service.gen.inference import grpc_service_pb2 as pb
from service.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.grpc_api.errors import note_model, status_for
from service.grpc_api.servicer import deadline_from_context
from service.registry import ModelDescription

log = logging.getLogger(__name__)

KSERVE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name

SERVER_NAME = "attnserve"
SERVER_EXTENSIONS = ("parameters",)
"""Protocol extensions reported by ServerMetadata: request parameters carry the decoding options."""

MODEL_PLATFORM = "attnserve_seq2seq"
"""ModelMetadata.platform: an ONNX encoder-decoder driven by attnserve's decoder, not a bare ONNX graph."""

BYTES = "BYTES"
FP32 = "FP32"
INPUT_TEXT = "TEXT"
OUTPUT_TRANSLATION = "TRANSLATION"
OUTPUT_SCORE = "SCORE"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output as ModelMetadata describes it; -1 = any size."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def describe(self) -> str:
        return f"{self.name} ({self.datatype}, shape {list(self.shape)})"


MODEL_INPUTS = (TensorSpec(INPUT_TEXT, BYTES, (-1,)),)
MODEL_OUTPUTS = (TensorSpec(OUTPUT_TRANSLATION, BYTES, (-1,)), TensorSpec(OUTPUT_SCORE, FP32, (-1,)))
_OUTPUT_NAMES = tuple(spec.name for spec in MODEL_OUTPUTS)

REQUEST_PARAMETERS: dict[str, str] = {
    "beam_size": "int: beam width, 0 or 1 = greedy",
    "num_hypotheses": "int: hypotheses per text, best first (outputs become [n, k])",
    "max_length": "int: maximum generated tokens, </s> included; 0 = the model's limit",
    "length_penalty": "float: length normalisation alpha >= 0",
    "replace_unknowns": "bool: replace unknown output tokens by the source piece they attend to most",
    "timeout": "int: microseconds the request may take (the earlier of it and the gRPC deadline wins)",
    "priority": "int: accepted and ignored (attnserve has one priority level)",
    "stream": "bool, ModelStreamInfer only: one response per generated token (greedy, one text)",
    "triton_enable_empty_final_response": "bool, ModelStreamInfer only: end each request with an empty final response",
}
"""Every request-level parameter attnserve accepts, and what it means; anything else is refused."""

_STREAM_ONLY_PARAMETERS = frozenset({"stream", "triton_enable_empty_final_response"})
FINAL_RESPONSE_PARAMETER = "triton_final_response"
"""Set on every ModelStreamInfer response: true on the last response of a request."""

_INT32_MAX = 2**31 - 1


# ----- the request as the dataplane needs it -------------------------------------------------------------


@dataclass(frozen=True)
class InferCall:
    """A validated ModelInferRequest.

    `outputs`: the output names to return, in order; `raw`: answer in raw_output_contents (the request
    used raw_input_contents); `timeout_s`: the `timeout` parameter in seconds, None when absent;
    `stream_tokens` / `empty_final_response`: the ModelStreamInfer parameters.
    """

    model: str
    version: str
    request_id: str
    texts: list[str]
    options: DecodeOptions
    outputs: tuple[str, ...]
    raw: bool
    timeout_s: float | None = None
    stream_tokens: bool = False
    empty_final_response: bool = False

    def deadline(self, call_deadline: float | None, now: float) -> float | None:
        """The earlier of the gRPC deadline and the `timeout` parameter, as time.monotonic() seconds."""
        if self.timeout_s is None:
            return call_deadline
        own = now + self.timeout_s
        return own if call_deadline is None else min(own, call_deadline)


def _parameter_kind(value: pb.InferParameter) -> str:
    return value.WhichOneof("parameter_choice") or "no value"


def _integer_parameter(name: str, value: pb.InferParameter) -> int:
    kind = _parameter_kind(value)
    if kind == "int64_param":
        number = value.int64_param
    elif kind == "uint64_param":
        number = value.uint64_param
    else:
        raise InvalidRequest(f"parameter {name} must be an integer (int64_param or uint64_param), got {kind}")
    if number < 0:
        raise InvalidRequest(f"parameter {name} is {number}; it must be >= 0")
    return min(number, _INT32_MAX)  # larger values are refused downstream with the real limit in the message


def _number_parameter(name: str, value: pb.InferParameter) -> float:
    kind = _parameter_kind(value)
    if kind == "double_param":
        return value.double_param
    if kind in ("int64_param", "uint64_param"):
        return float(getattr(value, kind))
    raise InvalidRequest(f"parameter {name} must be a number (double_param or an integer), got {kind}")


def _flag_parameter(name: str, value: pb.InferParameter) -> bool:
    kind = _parameter_kind(value)
    if kind != "bool_param":
        raise InvalidRequest(f"parameter {name} must be a bool (bool_param), got {kind}")
    return value.bool_param


def decode_raw_bytes(raw: bytes, tensor: str) -> list[bytes]:
    """The elements of a raw BYTES tensor: each a 4-byte little-endian length, then that many bytes."""
    elements: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidRequest(
                f"raw data of {tensor} is malformed: {len(raw) - offset} trailing bytes after element "
                f"{len(elements)}, where a 4-byte little-endian length was expected"
            )
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidRequest(
                f"raw data of {tensor} is malformed: element {len(elements)} declares {length} bytes but "
                f"only {len(raw) - offset} remain"
            )
        elements.append(raw[offset : offset + length])
        offset += length
    return elements


def encode_raw_bytes(elements: Iterable[bytes]) -> bytes:
    """Raw BYTES tensor data: every element as a 4-byte little-endian length followed by its bytes."""
    return b"".join(struct.pack("<I", len(element)) + element for element in elements)


def _typed_fields_in_use(contents: pb.InferTensorContents) -> list[str]:
    return [field.name for field, _ in contents.ListFields()]


def _texts_from_input(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, model: str) -> list[str]:
    if tensor.datatype != BYTES:
        raise InvalidRequest(
            f"input {INPUT_TEXT} of model {model} has datatype {tensor.datatype or '(none)'}; expected {BYTES}"
        )
    shape = list(tensor.shape)
    if len(shape) != 1 or shape[0] < 0:
        raise InvalidRequest(
            f"input {INPUT_TEXT} of model {model} has shape {shape}; expected [n]: one dimension, the number of texts"
        )
    if tensor.parameters:
        raise InvalidRequest(
            f"input {INPUT_TEXT} has parameters {sorted(tensor.parameters)}; attnserve takes none "
            "(shared memory is not supported: send the data in the request)"
        )
    typed = _typed_fields_in_use(tensor.contents)
    if raw is not None:
        if typed:
            raise InvalidRequest(
                f"input {INPUT_TEXT} has both contents ({', '.join(typed)}) and raw_input_contents; send one"
            )
        elements = decode_raw_bytes(raw, f"input {INPUT_TEXT}")
    else:
        if set(typed) - {"bytes_contents"}:
            raise InvalidRequest(
                f"input {INPUT_TEXT} is {BYTES}: its data goes in contents.bytes_contents, not {', '.join(typed)}"
            )
        elements = list(tensor.contents.bytes_contents)
    if len(elements) != shape[0]:
        raise InvalidRequest(f"input {INPUT_TEXT} has shape {shape} but carries {len(elements)} elements")
    texts: list[str] = []
    for index, element in enumerate(elements):
        try:
            texts.append(element.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise InvalidRequest(
                f"{INPUT_TEXT}[{index}] is not valid UTF-8 ({error.reason} at byte {error.start})"
            ) from None
    return texts


def _requested_outputs(request: pb.ModelInferRequest, model: str) -> tuple[str, ...]:
    if not request.outputs:
        return _OUTPUT_NAMES
    names: list[str] = []
    for output in request.outputs:
        if output.name not in _OUTPUT_NAMES:
            raise InvalidRequest(
                f"unknown output {output.name!r} for model {model}; its outputs are "
                + ", ".join(spec.describe() for spec in MODEL_OUTPUTS)
            )
        if output.name in names:
            raise InvalidRequest(f"output {output.name} is requested twice")
        if output.parameters:
            raise InvalidRequest(
                f"output {output.name} has parameters {sorted(output.parameters)}; attnserve takes none "
                "(no classification, no shared memory)"
            )
        names.append(output.name)
    return tuple(names)


def infer_call_from_grpc(request: pb.ModelInferRequest, *, streaming: bool = False) -> InferCall:
    """Validate a ModelInferRequest and convert it. Raises InvalidRequest with a message for the client.

    `streaming`: the request came on ModelStreamInfer (which alone accepts `stream` and
    `triton_enable_empty_final_response`). The model itself is not looked up here.
    """
    model = request.model_name
    if not model:
        raise InvalidRequest("model_name is empty: name the model to run (ModelMetadata describes it)")

    raw_inputs = list(request.raw_input_contents)
    if raw_inputs and len(raw_inputs) != len(request.inputs):
        raise InvalidRequest(
            f"raw_input_contents has {len(raw_inputs)} entries for {len(request.inputs)} inputs; a request "
            "sends raw data for every input or for none"
        )
    text_input: pb.ModelInferRequest.InferInputTensor | None = None
    text_raw: bytes | None = None
    for index, tensor in enumerate(request.inputs):
        if tensor.name != INPUT_TEXT:
            raise InvalidRequest(
                f"unknown input {tensor.name!r} for model {model}; its only input is "
                + ", ".join(spec.describe() for spec in MODEL_INPUTS)
            )
        if text_input is not None:
            raise InvalidRequest(f"input {INPUT_TEXT} is given twice")
        text_input = tensor
        text_raw = raw_inputs[index] if raw_inputs else None
    if text_input is None:
        raise InvalidRequest(f"input {INPUT_TEXT} is missing: model {model} needs {MODEL_INPUTS[0].describe()}")
    texts = _texts_from_input(text_input, text_raw, model)

    options: dict[str, object] = {}
    timeout_s: float | None = None
    stream_tokens = empty_final = False
    for name, value in sorted(request.parameters.items()):
        if name in ("beam_size", "num_hypotheses", "max_length"):
            options[name] = _integer_parameter(name, value)
        elif name == "length_penalty":
            options[name] = _number_parameter(name, value)
        elif name == "replace_unknowns":
            options[name] = _flag_parameter(name, value)
        elif name == "timeout":
            microseconds = _integer_parameter(name, value)
            timeout_s = microseconds / 1e6 if microseconds > 0 else None  # 0 = no timeout, as in Triton
        elif name == "priority":
            _integer_parameter(name, value)  # checked, then ignored: there is one priority level
        elif name in _STREAM_ONLY_PARAMETERS:
            if not streaming:
                raise InvalidRequest(f"parameter {name} applies to ModelStreamInfer only")
            if name == "stream":
                stream_tokens = _flag_parameter(name, value)
            else:
                empty_final = _flag_parameter(name, value)
        elif name.startswith("sequence_"):
            raise InvalidRequest(f"parameter {name}: attnserve models are stateless, there is no sequence batching")
        else:
            raise InvalidRequest(f"unknown parameter {name!r}; attnserve accepts {', '.join(REQUEST_PARAMETERS)}")
    if stream_tokens and len(texts) != 1:
        raise InvalidRequest(f"stream=true takes exactly one text, got {len(texts)}; send one request per text")

    return InferCall(
        model=model,
        version=request.model_version,
        request_id=request.id,
        texts=texts,
        options=DecodeOptions(**options),  # type: ignore[arg-type]
        outputs=_requested_outputs(request, model),
        raw=bool(raw_inputs),
        timeout_s=timeout_s,
        stream_tokens=stream_tokens,
        empty_final_response=empty_final,
    )


# ----- responses -----------------------------------------------------------------------------------------


def _add_output(
    response: pb.ModelInferResponse,
    spec: TensorSpec,
    shape: Sequence[int],
    values: Sequence[bytes] | np.ndarray,
    raw: bool,
) -> None:
    tensor = response.outputs.add(name=spec.name, datatype=spec.datatype, shape=list(shape))
    if spec.datatype == BYTES:
        elements = list(values)
        if raw:
            response.raw_output_contents.append(encode_raw_bytes(elements))
        else:
            tensor.contents.bytes_contents.extend(elements)
    else:
        numbers = np.asarray(values, dtype="<f4")
        if raw:
            response.raw_output_contents.append(numbers.tobytes())
        else:
            tensor.contents.fp32_contents.extend(numbers.tolist())


def _hypothesis_table(translations: Sequence[TextTranslation], width: int) -> tuple[list[bytes], np.ndarray]:
    """Row-major [len(translations), width] texts (UTF-8) and scores; missing hypotheses are '' and -inf."""
    texts: list[bytes] = []
    scores = np.full((len(translations), width), -np.inf, dtype=np.float32)
    for row, translation in enumerate(translations):
        hypotheses = translation.hypotheses[:width]
        texts.extend(hypothesis.text.encode("utf-8") for hypothesis in hypotheses)
        texts.extend(b"" for _ in range(width - len(hypotheses)))
        scores[row, : len(hypotheses)] = [hypothesis.score for hypothesis in hypotheses]
    return texts, scores.ravel()


def infer_response_to_grpc(call: InferCall, outcome: TranslateOutcome) -> pb.ModelInferResponse:
    """The ModelInferResponse for a finished call: the requested outputs, raw or typed as the request was."""
    response = pb.ModelInferResponse(model_name=outcome.model, model_version=str(outcome.version), id=call.request_id)
    width = max(call.options.num_hypotheses, 1)
    count = len(outcome.translations)
    shape = [count] if width == 1 else [count, width]
    texts, scores = _hypothesis_table(outcome.translations, width)
    specs = {spec.name: spec for spec in MODEL_OUTPUTS}
    for name in call.outputs:
        _add_output(response, specs[name], shape, texts if name == OUTPUT_TRANSLATION else scores, call.raw)
    return response


def token_response_to_grpc(call: InferCall, update: StreamUpdate) -> pb.ModelInferResponse:
    """A streamed token: TRANSLATION (when requested) = [the text so far]; parameters token and index."""
    response = pb.ModelInferResponse(model_name=update.model, model_version=str(update.version), id=call.request_id)
    if OUTPUT_TRANSLATION in call.outputs:
        _add_output(response, MODEL_OUTPUTS[0], [1], [update.text.encode("utf-8")], call.raw)
    response.parameters["token"].string_param = update.token
    response.parameters["index"].int64_param = update.index
    return response


def model_metadata_to_grpc(model: ModelDescription) -> pb.ModelMetadataResponse:
    def tensor(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
        return pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))

    return pb.ModelMetadataResponse(
        name=model.name,
        versions=[str(version) for version in model.loaded_versions],
        platform=MODEL_PLATFORM,
        inputs=[tensor(spec) for spec in MODEL_INPUTS],
        outputs=[tensor(spec) for spec in MODEL_OUTPUTS],
    )


def server_version() -> str:
    """The installed attnserve package's version ('unknown' when it is not installed, e.g. from a source tree)."""
    try:
        return metadata.version("attnserve")
    except metadata.PackageNotFoundError:
        return "unknown"


def _required_name(name: str, rpc: str) -> str:
    if not name:
        raise InvalidRequest(f"{rpc}: the model name is empty; the protocol requires one")
    return name


def _stream_error(request: pb.ModelInferRequest, error: Exception) -> pb.ModelStreamInferResponse:
    status, details = status_for(error)
    if not isinstance(error, AttnServeError):
        log.error("ModelStreamInfer request failed with an unexpected error", exc_info=error)
    return pb.ModelStreamInferResponse(
        error_message=f"{status.name}: {details}",
        infer_response=pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        ),
    )


# ----- the servicer --------------------------------------------------------------------------------------


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService on top of a Dataplane (the one the native Translator uses)."""

    def __init__(self, dataplane: Dataplane) -> None:
        self.dataplane = dataplane

    async def ServerLive(self, request: pb.ServerLiveRequest, context: aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.dataplane.server_ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: aio.ServicerContext) -> pb.ModelReadyResponse:
        name = _required_name(request.name, "ModelReady")
        return pb.ModelReadyResponse(ready=self.dataplane.model_ready(name, request.version))

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=server_version(), extensions=SERVER_EXTENSIONS)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        model = self.dataplane.get_model(_required_name(request.name, "ModelMetadata"), request.version)
        note_model(model.name, model.version)
        return model_metadata_to_grpc(model)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: aio.ServicerContext) -> pb.ModelInferResponse:
        call = self._accept(request, streaming=False)
        outcome = await self.dataplane.translate(
            call.model,
            call.version,
            call.texts,
            call.options,
            call.deadline(deadline_from_context(context), time.monotonic()),
            on_resolved=note_model,
        )
        return infer_response_to_grpc(call, outcome)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Every request on the stream is decoded concurrently (they batch together); responses are sent
        as they are ready, so a fast request is not held behind a slow one (match them by `id`). The
        stream ends once the client has closed its side and every request is answered."""
        stream_deadline = deadline_from_context(context)
        outbox: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        pending: set[asyncio.Task[None]] = set()

        async def read_requests() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.create_task(self._answer_on_stream(request, stream_deadline, outbox))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                await asyncio.gather(*pending)  # _answer_on_stream reports its own failures in-band
            finally:
                outbox.put_nowait(None)

        reader = asyncio.create_task(read_requests())
        try:
            while (response := await outbox.get()) is not None:
                yield response
            await reader  # surfaces a failure to read the request stream
        finally:
            reader.cancel()
            for task in list(pending):
                task.cancel()  # the client went away: cancel its engine requests

    # ----- helpers --------------------------------------------------------------------------------------

    def _accept(self, request: pb.ModelInferRequest, *, streaming: bool) -> InferCall:
        """The converted request, after checking that its model and version are served (so an unknown
        model is NOT_FOUND whatever else is wrong with the request)."""
        model = self.dataplane.get_model(_required_name(request.model_name, "ModelInfer"), request.model_version)
        note_model(model.name, model.version)
        return infer_call_from_grpc(request, streaming=streaming)

    async def _answer_on_stream(
        self,
        request: pb.ModelInferRequest,
        stream_deadline: float | None,
        outbox: asyncio.Queue[pb.ModelStreamInferResponse | None],
    ) -> None:
        """Decode one request of a ModelStreamInfer call and queue its responses (or its error)."""
        try:
            call = self._accept(request, streaming=True)
            deadline = call.deadline(stream_deadline, time.monotonic())
            if not call.stream_tokens:
                outcome = await self.dataplane.translate(call.model, call.version, call.texts, call.options, deadline)
                self._send_last(call, infer_response_to_grpc(call, outcome), outbox)
                return
            updates = self.dataplane.translate_stream(call.model, call.version, call.texts[0], call.options, deadline)
            try:
                async for update in updates:
                    if update.final:
                        outcome = TranslateOutcome(update.model, update.version, [TextTranslation(update.hypotheses)])
                        self._send_last(call, infer_response_to_grpc(call, outcome), outbox)
                    else:
                        outbox.put_nowait(_final_flag(token_response_to_grpc(call, update), False))
            finally:
                await updates.aclose()  # cancels the engine request if this task is cancelled mid-stream
        except Exception as error:  # reported in-band: the other requests on the stream go on
            outbox.put_nowait(_stream_error(request, error))

    @staticmethod
    def _send_last(
        call: InferCall, response: pb.ModelInferResponse, outbox: asyncio.Queue[pb.ModelStreamInferResponse | None]
    ) -> None:
        if call.empty_final_response:
            outbox.put_nowait(_final_flag(response, False))
            empty = pb.ModelInferResponse(
                model_name=response.model_name, model_version=response.model_version, id=call.request_id
            )
            outbox.put_nowait(_final_flag(empty, True))
        else:
            outbox.put_nowait(_final_flag(response, True))


def _final_flag(response: pb.ModelInferResponse, final: bool) -> pb.ModelStreamInferResponse:
    response.parameters[FINAL_RESPONSE_PARAMETER].bool_param = final
    return pb.ModelStreamInferResponse(infer_response=response)
