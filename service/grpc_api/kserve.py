"""The KServe v2 inference protocol ("Open Inference Protocol") over the same Dataplane as the native API.

`inference.GRPCInferenceService` on the server's gRPC port, so Triton and KServe clients (tritonclient,
load tools, gateways) can call attnserve unchanged. The tensors, the parameters and the checks are
service/kserve.py's (shared with the REST binding); this module reads and writes the gRPC messages. BYTES
input is read from `contents.bytes_contents` or from `raw_input_contents` (each element a 4-byte
little-endian length and the bytes); outputs come back the same way the request sent its inputs:
raw_output_contents for raw requests, typed contents otherwise (as the KServe server does).

This module only converts: requests go through Dataplane.translate / translate_stream, so they batch
with native traffic under the same limits and metrics. Unary errors propagate as `service.errors`
exceptions to RpcInterceptor (the one status table); on ModelStreamInfer they travel in-band as
`error_message` ("STATUS: details", status from the same table) so the stream survives them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import numpy as np
from grpc import aio

from service.dataplane import Dataplane, StreamUpdate, TextTranslation, TranslateOutcome
from service.errors import AttnServeError, InvalidRequest
from service.gen.inference import grpc_service_pb2 as pb
from service.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.grpc_api.errors import note_model, status_for
from service.grpc_api.peers import turn_line
from service.grpc_api.servicer import deadline_from_context
from service.kserve import (
    BYTES,
    MODEL_INPUTS,
    MODEL_OUTPUTS,
    MODEL_PLATFORM,
    OUTPUT_TRANSLATION,
    SERVER_EXTENSIONS,
    SERVER_NAME,
    InferCall,
    InputTensor,
    OutputTensor,
    ParameterValue,
    RequestedOutput,
    TensorSpec,
    decode_raw_bytes,
    encode_raw_bytes,
    infer_call,
    output_tensors,
    required_name,
    server_version,
)
from service.registry import ModelDescription

log = logging.getLogger(__name__)

KSERVE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name

FINAL_RESPONSE_PARAMETER = "triton_final_response"
"""Set on every ModelStreamInfer response: true on the last response of a request."""


# ----- the request as the dataplane needs it -------------------------------------------------------------


def parameter_value(value: pb.InferParameter) -> ParameterValue:
    """An InferParameter's value as a plain Python value (None when it carries none)."""
    kind = value.WhichOneof("parameter_choice")
    return None if kind is None else getattr(value, kind)


def _input_tensor(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> InputTensor:
    def read_elements() -> list[bytes]:
        typed = [field.name for field, _ in tensor.contents.ListFields()]
        if raw is not None:
            if typed:
                raise InvalidRequest(
                    f"input {tensor.name} has both contents ({', '.join(typed)}) and raw_input_contents; send one"
                )
            return decode_raw_bytes(raw, f"input {tensor.name}")
        if set(typed) - {"bytes_contents"}:
            raise InvalidRequest(
                f"input {tensor.name} is {BYTES}: its data goes in contents.bytes_contents, not {', '.join(typed)}"
            )
        return list(tensor.contents.bytes_contents)

    return InputTensor(tensor.name, tensor.datatype, list(tensor.shape), list(tensor.parameters), read_elements)


def infer_call_from_grpc(request: pb.ModelInferRequest, *, streaming: bool = False) -> InferCall:
    """Validate a ModelInferRequest and convert it. Raises InvalidRequest with a message for the client.

    `streaming`: the request came on ModelStreamInfer (which alone accepts `stream` and
    `triton_enable_empty_final_response`). The model itself is not looked up here.
    """
    raw_inputs = list(request.raw_input_contents)
    if request.model_name and raw_inputs and len(raw_inputs) != len(request.inputs):
        raise InvalidRequest(
            f"raw_input_contents has {len(raw_inputs)} entries for {len(request.inputs)} inputs; a request "
            "sends raw data for every input or for none"
        )
    return infer_call(
        model=request.model_name,
        version=request.model_version,
        request_id=request.id,
        parameters={name: parameter_value(value) for name, value in request.parameters.items()},
        inputs=[
            _input_tensor(tensor, raw_inputs[index] if raw_inputs else None)
            for index, tensor in enumerate(request.inputs)
        ],
        outputs=[RequestedOutput(output.name, list(output.parameters)) for output in request.outputs],
        raw=bool(raw_inputs),
        streaming=streaming,
    )


# ----- responses -----------------------------------------------------------------------------------------


def _add_output(response: pb.ModelInferResponse, output: OutputTensor, raw: bool) -> None:
    spec = output.spec
    tensor = response.outputs.add(name=spec.name, datatype=spec.datatype, shape=output.shape)
    if spec.datatype == BYTES:
        elements = list(output.values)
        if raw:
            response.raw_output_contents.append(encode_raw_bytes(elements))
        else:
            tensor.contents.bytes_contents.extend(elements)
    else:
        numbers = np.asarray(output.values, dtype="<f4")
        if raw:
            response.raw_output_contents.append(numbers.tobytes())
        else:
            tensor.contents.fp32_contents.extend(numbers.tolist())


def infer_response_to_grpc(call: InferCall, outcome: TranslateOutcome) -> pb.ModelInferResponse:
    """The ModelInferResponse for a finished call: the requested outputs, raw or typed as the request was."""
    response = pb.ModelInferResponse(model_name=outcome.model, model_version=str(outcome.version), id=call.request_id)
    for output in output_tensors(call, outcome):
        _add_output(response, output, call.raw)
    return response


def token_response_to_grpc(call: InferCall, update: StreamUpdate) -> pb.ModelInferResponse:
    """A streamed token: TRANSLATION (when requested) = [the text so far]; parameters token and index."""
    response = pb.ModelInferResponse(model_name=update.model, model_version=str(update.version), id=call.request_id)
    if OUTPUT_TRANSLATION in call.outputs:
        _add_output(response, OutputTensor(MODEL_OUTPUTS[0], [1], [update.text.encode("utf-8")]), call.raw)
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


def _stream_error(request: pb.ModelInferRequest | None, error: Exception) -> pb.ModelStreamInferResponse:
    """The in-band error for `request` (None: a message that did not parse, so nothing of it can be echoed)."""
    status, details = status_for(error)
    if not isinstance(error, AttnServeError):
        log.error("ModelStreamInfer request failed with an unexpected error", exc_info=error)
    echo = (
        pb.ModelInferResponse()
        if request is None
        else pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version, id=request.id)
    )
    return pb.ModelStreamInferResponse(error_message=f"{status.name}: {details}", infer_response=echo)


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
        name = required_name(request.name, "ModelReady")
        return pb.ModelReadyResponse(ready=self.dataplane.model_ready(name, request.version))

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=server_version(), extensions=SERVER_EXTENSIONS)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        model = self.dataplane.get_model(required_name(request.name, "ModelMetadata"), request.version)
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
            client=turn_line(context),
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
            requests = aiter(request_iterator)
            try:
                while True:
                    try:
                        request = await anext(requests)
                    except StopAsyncIteration:
                        break
                    except InvalidRequest as error:  # a message that does not parse: answered in-band, read on
                        outbox.put_nowait(_stream_error(None, error))
                        continue
                    task = asyncio.create_task(
                        self._answer_on_stream(request, stream_deadline, outbox, turn_line(context))
                    )
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
        model = self.dataplane.get_model(required_name(request.model_name, "ModelInfer"), request.model_version)
        note_model(model.name, model.version)
        return infer_call_from_grpc(request, streaming=streaming)

    async def _answer_on_stream(
        self,
        request: pb.ModelInferRequest,
        stream_deadline: float | None,
        outbox: asyncio.Queue[pb.ModelStreamInferResponse | None],
        client: Callable[[], str],
    ) -> None:
        """Decode one request of a ModelStreamInfer call and queue its responses (or its error); `client` names
        the stream's connection for the dataplane's turns."""
        try:
            call = self._accept(request, streaming=True)
            deadline = call.deadline(stream_deadline, time.monotonic())
            if not call.stream_tokens:
                outcome = await self.dataplane.translate(
                    call.model, call.version, call.texts, call.options, deadline, client=client
                )
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
