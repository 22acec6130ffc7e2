"""The KServe v2 inference protocol ("Open Inference Protocol") whatever the transport: translation as tensors.

Both bindings of the protocol convert through this module, so the gRPC service (service/grpc_api/kserve.py) and
the REST endpoints (service/http_api/kserve.py) accept the same requests, refuse the same mistakes with the same
messages, and answer with the same tensors:

    input   TEXT         BYTES  [-1]   one UTF-8 text per element (a batch of texts)
    output  TRANSLATION  BYTES  [-1]   the best translation of each text
    output  SCORE        FP32   [-1]   its score (log probability, length-normalised with length_penalty)

With `num_hypotheses` k > 1 both outputs have shape [n, k] (best first; a text whose beam produced fewer than
k hypotheses is padded with "" and -inf). Decoding options are request parameters (REQUEST_PARAMETERS).

A transport reads its own wire format into `InputTensor` / `RequestedOutput` records and plain parameter values
(bool, int, float or str), calls `infer_call()`, hands the call to the Dataplane, and writes the
`output_tensors()` of the outcome in its own wire format. Errors are `service.errors` exceptions.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata

import numpy as np

from service.dataplane import TextTranslation, TranslateOutcome
from service.engine.records import DecodeOptions
from service.errors import InvalidRequest

SERVER_NAME = "attnserve"
SERVER_EXTENSIONS = ("parameters",)
"""Protocol extensions reported by server metadata: request parameters carry the decoding options."""

MODEL_PLATFORM = "attnserve_seq2seq"
"""Model metadata's platform: an ONNX encoder-decoder driven by attnserve's decoder, not a bare ONNX graph."""

BYTES = "BYTES"
FP32 = "FP32"
INPUT_TEXT = "TEXT"
OUTPUT_TRANSLATION = "TRANSLATION"
OUTPUT_SCORE = "SCORE"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output as model metadata describes it; -1 = any size."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def describe(self) -> str:
        return f"{self.name} ({self.datatype}, shape {list(self.shape)})"


MODEL_INPUTS = (TensorSpec(INPUT_TEXT, BYTES, (-1,)),)
MODEL_OUTPUTS = (TensorSpec(OUTPUT_TRANSLATION, BYTES, (-1,)), TensorSpec(OUTPUT_SCORE, FP32, (-1,)))
OUTPUT_NAMES = tuple(spec.name for spec in MODEL_OUTPUTS)

REQUEST_PARAMETERS: dict[str, str] = {
    "beam_size": "int: beam width, 0 or 1 = greedy",
    "num_hypotheses": "int: hypotheses per text, best first (outputs become [n, k])",
    "max_length": "int: maximum generated tokens, </s> included; 0 = the model's limit",
    "length_penalty": "float: length normalisation alpha >= 0",
    "replace_unknowns": "bool: replace unknown output tokens by the source piece they attend to most",
    "timeout": "int: microseconds the request may take (the earlier of it and the call's own deadline wins)",
    "priority": "int: accepted and ignored (attnserve has one priority level)",
    "stream": "bool, ModelStreamInfer only: one response per generated token (greedy, one text)",
    "triton_enable_empty_final_response": "bool, ModelStreamInfer only: end each request with an empty final response",
}
"""Every request-level parameter attnserve accepts, and what it means; anything else is refused."""

STREAM_ONLY_PARAMETERS = frozenset({"stream", "triton_enable_empty_final_response"})

ParameterValue = bool | int | float | str | None
"""A parameter's value as the transport read it (None: the parameter carries no value)."""

_INT32_MAX = 2**31 - 1


def server_version() -> str:
    """The installed attnserve package's version ('unknown' when it is not installed, e.g. from a source tree)."""
    try:
        return metadata.version("attnserve")
    except metadata.PackageNotFoundError:
        return "unknown"


def required_name(name: str, api: str) -> str:
    """`name`, unless it is empty: the protocol requires a model name for `api` (e.g. 'ModelReady')."""
    if not name:
        raise InvalidRequest(f"{api}: the model name is empty; the protocol requires one")
    return name


# ----- the request as the dataplane needs it -------------------------------------------------------------


@dataclass(frozen=True)
class InferCall:
    """A validated inference request.

    `outputs`: the output names to return, in order; `raw`: answer in the binary form the request used for its
    input (gRPC's raw_output_contents); `timeout_s`: the `timeout` parameter in seconds, None when absent;
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
        """The earlier of the call's own deadline and the `timeout` parameter, as time.monotonic() seconds."""
        if self.timeout_s is None:
            return call_deadline
        own = now + self.timeout_s
        return own if call_deadline is None else min(own, call_deadline)


@dataclass(frozen=True)
class InputTensor:
    """An input tensor as its transport read it. `read_elements()` gives its BYTES elements (raising
    InvalidRequest when the transport's encoding of them is malformed); it is called only once the name,
    datatype, shape and parameters passed their checks."""

    name: str
    datatype: str
    shape: Sequence[int]
    parameter_names: Sequence[str]
    read_elements: Callable[[], list[bytes]]


@dataclass(frozen=True)
class RequestedOutput:
    """An output the request names, with the names of the parameters it gives it."""

    name: str
    parameter_names: Sequence[str] = ()


def _kind(value: ParameterValue) -> str:
    if value is None:
        return "no value"
    if isinstance(value, bool):
        return "a bool"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return f"a {type(value).__name__}"


def _integer_parameter(name: str, value: ParameterValue) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"parameter {name} must be an integer, got {_kind(value)}")
    if value < 0:
        raise InvalidRequest(f"parameter {name} is {value}; it must be >= 0")
    return min(value, _INT32_MAX)  # larger values are refused downstream with the real limit in the message


def _number_parameter(name: str, value: ParameterValue) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"parameter {name} must be a number, got {_kind(value)}")
    return float(value)


def _flag_parameter(name: str, value: ParameterValue) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequest(f"parameter {name} must be a bool, got {_kind(value)}")
    return value


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


def _texts_from_input(tensor: InputTensor, model: str) -> list[str]:
    if tensor.datatype != BYTES:
        raise InvalidRequest(
            f"input {INPUT_TEXT} of model {model} has datatype {tensor.datatype or '(none)'}; expected {BYTES}"
        )
    shape = list(tensor.shape)
    if len(shape) != 1 or shape[0] < 0:
        raise InvalidRequest(
            f"input {INPUT_TEXT} of model {model} has shape {shape}; expected [n]: one dimension, the number of texts"
        )
    if tensor.parameter_names:
        raise InvalidRequest(
            f"input {INPUT_TEXT} has parameters {sorted(tensor.parameter_names)}; attnserve takes none "
            "(shared memory is not supported: send the data in the request)"
        )
    elements = tensor.read_elements()
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


def _requested_outputs(outputs: Sequence[RequestedOutput], model: str) -> tuple[str, ...]:
    if not outputs:
        return OUTPUT_NAMES
    names: list[str] = []
    for output in outputs:
        if output.name not in OUTPUT_NAMES:
            raise InvalidRequest(
                f"unknown output {output.name!r} for model {model}; its outputs are "
                + ", ".join(spec.describe() for spec in MODEL_OUTPUTS)
            )
        if output.name in names:
            raise InvalidRequest(f"output {output.name} is requested twice")
        if output.parameter_names:
            raise InvalidRequest(
                f"output {output.name} has parameters {sorted(output.parameter_names)}; attnserve takes none "
                "(no classification, no shared memory)"
            )
        names.append(output.name)
    return tuple(names)


def infer_call(
    *,
    model: str,
    version: str,
    request_id: str,
    parameters: Mapping[str, ParameterValue],
    inputs: Sequence[InputTensor],
    outputs: Sequence[RequestedOutput],
    raw: bool,
    streaming: bool = False,
) -> InferCall:
    """Validate an inference request and convert it. Raises InvalidRequest with a message for the client.

    `streaming`: the request came on ModelStreamInfer (which alone accepts `stream` and
    `triton_enable_empty_final_response`). The model itself is not looked up here.
    """
    if not model:
        raise InvalidRequest("model_name is empty: name the model to run (ModelMetadata describes it)")
    text_input: InputTensor | None = None
    for tensor in inputs:
        if tensor.name != INPUT_TEXT:
            raise InvalidRequest(
                f"unknown input {tensor.name!r} for model {model}; its only input is "
                + ", ".join(spec.describe() for spec in MODEL_INPUTS)
            )
        if text_input is not None:
            raise InvalidRequest(f"input {INPUT_TEXT} is given twice")
        text_input = tensor
    if text_input is None:
        raise InvalidRequest(f"input {INPUT_TEXT} is missing: model {model} needs {MODEL_INPUTS[0].describe()}")
    texts = _texts_from_input(text_input, model)

    options: dict[str, object] = {}
    timeout_s: float | None = None
    stream_tokens = empty_final = False
    for name, value in sorted(parameters.items()):
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
        elif name in STREAM_ONLY_PARAMETERS:
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
        version=version,
        request_id=request_id,
        texts=texts,
        options=DecodeOptions(**options),  # type: ignore[arg-type]
        outputs=_requested_outputs(outputs, model),
        raw=raw,
        timeout_s=timeout_s,
        stream_tokens=stream_tokens,
        empty_final_response=empty_final,
    )


# ----- responses -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputTensor:
    """One output of a response: BYTES `values` are UTF-8 elements, FP32 ones a float32 array (row-major)."""

    spec: TensorSpec
    shape: list[int]
    values: list[bytes] | np.ndarray


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


def output_tensors(call: InferCall, outcome: TranslateOutcome) -> list[OutputTensor]:
    """The requested outputs of a finished call, in the requested order."""
    width = max(call.options.num_hypotheses, 1)
    count = len(outcome.translations)
    shape = [count] if width == 1 else [count, width]
    texts, scores = _hypothesis_table(outcome.translations, width)
    specs = {spec.name: spec for spec in MODEL_OUTPUTS}
    return [OutputTensor(specs[name], shape, texts if name == OUTPUT_TRANSLATION else scores) for name in call.outputs]
