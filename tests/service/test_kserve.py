"""The KServe v2 inference protocol (inference.GRPCInferenceService) on the attnserve port.

Three layers of tests:
- converters: raw/typed tensor encodings, parameters, validation messages (no server);
- a REAL server with the tiny trained models, called with the project's own v2 stubs: same translations
  and same status codes as the native API, streaming, readiness, reflection, metrics;
- interoperability: NVIDIA's tritonclient[grpc] from PyPI, run from its own virtualenv (`make interop`,
  tests/interop/) as a subprocess, because it requires protobuf < 7 and the server protobuf >= 7.35.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import struct
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from service.dataplane import Dataplane, TextTranslation, TranslatedHypothesis, TranslateOutcome
from service.engine import DecodeOptions
from service.engine.records import FinishReason
from service.engine_client.in_process import InProcessClient
from service.errors import InvalidRequest
from service.gen.attnserve.v1 import translator_pb2 as native_pb
from service.gen.attnserve.v1 import translator_pb2_grpc as native_grpc
from service.gen.inference import grpc_service_pb2 as pb
from service.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.grpc_api.errors import MAX_DETAILS_CHARS
from service.grpc_api.kserve import (
    FINAL_RESPONSE_PARAMETER,
    KSERVE_SERVICE,
    infer_call_from_grpc,
    infer_response_to_grpc,
)
from service.kserve import InferCall, decode_raw_bytes, encode_raw_bytes
from tests.service.server_harness import PROJECT_ROOT, ServerThread, make_settings, metric, scrape

pytestmark = pytest.mark.slow  # trains models or starts servers

DATES = ["samedi 21 novembre 2026", "3 mars 1999", "14 juillet 1789", "1 janvier 2000"]
NUMBERS = ["quarante-deux", "cent vingt-trois"]
INTEROP_PYTHON = Path(os.environ.get("ATTNSERVE_INTEROP_PYTHON", PROJECT_ROOT / ".venv-interop" / "bin" / "python"))
PROBE = PROJECT_ROOT / "tests" / "interop" / "tritonclient_probe.py"


# ----- helpers ---------------------------------------------------------------------------------------------


def infer_request(
    texts: list[str], model: str = "dates", *, raw: bool = True, outputs: tuple[str, ...] = (), **parameters: object
) -> pb.ModelInferRequest:
    """A ModelInferRequest with TEXT in raw_input_contents (raw) or contents.bytes_contents (typed)."""
    request = pb.ModelInferRequest(model_name=model, id="req-1")
    tensor = request.inputs.add(name="TEXT", datatype="BYTES", shape=[len(texts)])
    encoded = [text.encode("utf-8") for text in texts]
    if raw:
        request.raw_input_contents.append(encode_raw_bytes(encoded))
    else:
        tensor.contents.bytes_contents.extend(encoded)
    for name in outputs:
        request.outputs.add(name=name)
    for name, value in parameters.items():
        if isinstance(value, bool):
            request.parameters[name].bool_param = value
        elif isinstance(value, int):
            request.parameters[name].int64_param = value
        elif isinstance(value, float):
            request.parameters[name].double_param = value
        else:
            request.parameters[name].string_param = str(value)
    return request


def output_values(response: pb.ModelInferResponse, name: str) -> tuple[list[int], list[object]]:
    """(shape, flat values) of one output, whichever encoding the response used; BYTES decoded as UTF-8."""
    for index, output in enumerate(response.outputs):
        if output.name != name:
            continue
        if response.raw_output_contents:
            raw = response.raw_output_contents[index]
            if output.datatype == "BYTES":
                values: list[object] = [item.decode("utf-8") for item in decode_raw_bytes(raw, name)]
            else:
                values = np.frombuffer(raw, dtype="<f4").tolist()
        elif output.datatype == "BYTES":
            values = [item.decode("utf-8") for item in output.contents.bytes_contents]
        else:
            values = list(output.contents.fp32_contents)
        return list(output.shape), values
    raise AssertionError(f"no output {name} in {[output.name for output in response.outputs]}")


def status_of(call) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code(), raised.value.details()


def invalid(request: pb.ModelInferRequest, *, streaming: bool = False) -> str:
    with pytest.raises(InvalidRequest) as raised:
        infer_call_from_grpc(request, streaming=streaming)
    return raised.value.message


def hypothesis(text: str, score: float) -> TranslatedHypothesis:
    return TranslatedHypothesis(text, score, score, FinishReason.EOS, ("a", "</s>"), ("b", "</s>"))


# ----- converters (no server) ----------------------------------------------------------------------------


def test_raw_bytes_round_trip_and_wire_format() -> None:
    elements = [b"", b"3 mars 1999", "ça va — ✓".encode(), b"\x00\xff"]
    raw = encode_raw_bytes(elements)
    assert raw[:4] == struct.pack("<I", 0) and raw[4:8] == struct.pack("<I", len(elements[1]))
    assert decode_raw_bytes(raw, "input TEXT") == elements
    assert decode_raw_bytes(b"", "input TEXT") == []


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x05\x00\x00\x00abc", "element 0 declares 5 bytes but only 3 remain"),
        (struct.pack("<I", 1) + b"a" + b"\x01\x00", "2 trailing bytes after element 1"),
    ],
)
def test_malformed_raw_bytes_are_refused(raw: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        decode_raw_bytes(raw, "input TEXT")


def test_raw_and_typed_requests_convert_to_the_same_call() -> None:
    texts = ["3 mars 1999", "quatorze juillet"]
    raw = infer_call_from_grpc(infer_request(texts, raw=True, beam_size=4, num_hypotheses=2, length_penalty=0.6))
    typed = infer_call_from_grpc(infer_request(texts, raw=False, beam_size=4, num_hypotheses=2, length_penalty=0.6))
    assert raw.texts == typed.texts == texts
    assert (raw.raw, typed.raw) == (True, False)
    assert raw.options == typed.options == DecodeOptions(beam_size=4, num_hypotheses=2, length_penalty=0.6)
    assert raw.outputs == ("TRANSLATION", "SCORE") and raw.request_id == "req-1"


def test_parameters_convert_with_their_types() -> None:
    request = infer_request(["x"], max_length=7, replace_unknowns=True, length_penalty=1, timeout=250_000, priority=3)
    request.parameters["beam_size"].uint64_param = 2
    call = infer_call_from_grpc(request)
    assert call.options == DecodeOptions(beam_size=2, max_length=7, length_penalty=1.0, replace_unknowns=True)
    assert call.timeout_s == pytest.approx(0.25)
    # the earlier of the gRPC deadline and the timeout parameter wins
    assert call.deadline(None, now=100.0) == pytest.approx(100.25)
    assert call.deadline(100.1, now=100.0) == pytest.approx(100.1)
    assert infer_call_from_grpc(infer_request(["x"])).deadline(5.0, now=1.0) == 5.0


def test_stream_parameters_only_on_the_stream() -> None:
    assert "applies to ModelStreamInfer only" in invalid(infer_request(["x"], stream=True))
    call = infer_call_from_grpc(
        infer_request(["x"], stream=True, triton_enable_empty_final_response=True), streaming=True
    )
    assert call.stream_tokens and call.empty_final_response
    assert "exactly one text, got 2" in invalid(infer_request(["x", "y"], stream=True), streaming=True)


def _with_input(name: str = "TEXT", datatype: str = "BYTES", shape: tuple[int, ...] = (1,)) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="dates")
    tensor = request.inputs.add(name=name, datatype=datatype, shape=list(shape))
    tensor.contents.bytes_contents.append(b"x")
    return request


def test_request_validation_messages() -> None:
    assert "unknown input 'SOURCE' for model dates; its only input is TEXT (BYTES, shape [-1])" in invalid(
        _with_input("SOURCE")
    )
    assert "datatype FP32; expected BYTES" in invalid(_with_input(datatype="FP32"))
    assert "shape [1, 1]; expected [n]" in invalid(_with_input(shape=(1, 1)))
    assert "shape [2] but carries 1 elements" in invalid(_with_input(shape=(2,)))
    assert "input TEXT is missing" in invalid(pb.ModelInferRequest(model_name="dates"))
    assert "model_name is empty" in invalid(infer_request(["x"], model=""))

    twice = _with_input()
    twice.inputs.add(name="TEXT", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"y")
    assert "given twice" in invalid(twice)

    counts = infer_request(["x"], raw=True)
    counts.raw_input_contents.append(b"")
    assert "raw_input_contents has 2 entries for 1 inputs" in invalid(counts)

    both = infer_request(["x"], raw=True)
    both.inputs[0].contents.bytes_contents.append(b"x")
    assert "both contents (bytes_contents) and raw_input_contents" in invalid(both)

    wrong_field = pb.ModelInferRequest(model_name="dates")
    wrong_field.inputs.add(name="TEXT", datatype="BYTES", shape=[1]).contents.fp32_contents.append(1.0)
    assert "contents.bytes_contents, not fp32_contents" in invalid(wrong_field)

    not_utf8 = pb.ModelInferRequest(model_name="dates")
    not_utf8.inputs.add(name="TEXT", datatype="BYTES", shape=[2]).contents.bytes_contents.extend([b"ok", b"\xff\xfe"])
    assert "TEXT[1] is not valid UTF-8" in invalid(not_utf8)

    shared_memory = _with_input()
    shared_memory.inputs[0].parameters["shared_memory_region"].string_param = "region"
    assert "shared memory is not supported" in invalid(shared_memory)


def test_parameter_and_output_validation_messages() -> None:
    assert "unknown parameter 'beam'; attnserve accepts beam_size" in invalid(infer_request(["x"], beam=4))
    assert "beam_size must be an integer" in invalid(infer_request(["x"], beam_size="4"))
    assert "num_hypotheses is -1; it must be >= 0" in invalid(infer_request(["x"], num_hypotheses=-1))
    assert "replace_unknowns must be a bool" in invalid(infer_request(["x"], replace_unknowns=1))
    assert "length_penalty must be a number" in invalid(infer_request(["x"], length_penalty=True))
    assert "no sequence batching" in invalid(infer_request(["x"], sequence_id=7))
    assert "unknown output 'ATTENTION'" in invalid(infer_request(["x"], outputs=("ATTENTION",)))
    assert "requested twice" in invalid(infer_request(["x"], outputs=("SCORE", "SCORE")))
    classification = infer_request(["x"], outputs=("TRANSLATION",))
    classification.outputs[0].parameters["classification"].int64_param = 3
    assert "no classification" in invalid(classification)


def _call(raw: bool, num_hypotheses: int = 0, outputs: tuple[str, ...] = ("TRANSLATION", "SCORE")) -> InferCall:
    return InferCall("dates", "", "id-7", ["a", "b"], DecodeOptions(num_hypotheses=num_hypotheses), outputs, raw)


def test_response_encodings_follow_the_request() -> None:
    outcome = TranslateOutcome(
        "dates", 1, [TextTranslation([hypothesis("1999-03-03", -0.5)]), TextTranslation([hypothesis("été", -1.25)])]
    )
    for raw in (True, False):
        response = infer_response_to_grpc(_call(raw), outcome)
        assert (response.model_name, response.model_version, response.id) == ("dates", "1", "id-7")
        assert len(response.raw_output_contents) == (2 if raw else 0)
        assert output_values(response, "TRANSLATION") == ([2], ["1999-03-03", "été"])
        assert output_values(response, "SCORE") == ([2], [-0.5, -1.25])
        assert [output.datatype for output in response.outputs] == ["BYTES", "FP32"]


def test_n_best_outputs_are_n_by_k_and_padded() -> None:
    outcome = TranslateOutcome(
        "dates",
        1,
        [
            TextTranslation([hypothesis("a", -1.0), hypothesis("b", -2.0)]),
            TextTranslation([hypothesis("c", -3.0)]),  # the beam found only one
        ],
    )
    response = infer_response_to_grpc(_call(raw=True, num_hypotheses=2, outputs=("SCORE", "TRANSLATION")), outcome)
    assert [output.name for output in response.outputs] == ["SCORE", "TRANSLATION"]  # requested order
    shape, texts = output_values(response, "TRANSLATION")
    assert shape == [2, 2] and texts == ["a", "b", "c", ""]
    _, scores = output_values(response, "SCORE")
    assert scores[:3] == [-1.0, -2.0, -3.0] and scores[3] == -math.inf


# ----- readiness, through the real manager ---------------------------------------------------------------


def test_readiness_follows_loading_and_draining(tiny_repository: Path, tmp_path: Path) -> None:
    repository = tmp_path / "models"
    shutil.copytree(tiny_repository, repository)
    broken = repository / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.json").write_text("{ not json", encoding="utf-8")

    async def scenario() -> None:
        settings = make_settings(repository)
        client = InProcessClient(settings)
        dataplane = Dataplane(client, settings)
        assert not dataplane.server_ready()  # not started
        await client.start()
        try:
            # one model of the repository has no loadable version: the server is not ready, its models are
            assert not dataplane.server_ready()
            assert dataplane.model_ready("dates", "") and dataplane.model_ready("dates", "1")
            assert not dataplane.model_ready("dates", "2")
            assert not dataplane.model_ready("broken", "")
            assert not dataplane.model_ready("unknown", "")
            with pytest.raises(InvalidRequest):
                dataplane.model_ready("dates", "one")
        finally:
            await client.stop(0.0)
        assert not dataplane.model_ready("dates", "")  # draining

    asyncio.run(scenario())

    async def healthy() -> None:
        settings = make_settings(tiny_repository)
        client = InProcessClient(settings)
        dataplane = Dataplane(client, settings)
        await client.start()
        try:
            assert dataplane.server_ready()
            client.begin_draining()
            assert not dataplane.server_ready()
        finally:
            await client.stop(0.0)

    asyncio.run(healthy())


# ----- a real server, the project's own v2 stubs -----------------------------------------------------------


@pytest.fixture(scope="module")
def v2(channel: grpc.Channel) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def native(channel: grpc.Channel) -> native_grpc.TranslatorStub:
    return native_grpc.TranslatorStub(channel)


def native_translations(
    native: native_grpc.TranslatorStub, texts: list[str], model: str = "dates", **options: float
) -> list[list[tuple[str, float]]]:
    """Every hypothesis (text, score) of every text, through the native Translate."""
    request = native_pb.TranslateRequest(model=model, texts=texts, options=native_pb.DecodeOptions(**options))
    response = native.Translate(request, timeout=60)
    return [[(h.text, h.score) for h in translation.hypotheses] for translation in response.translations]


@pytest.mark.slow
def test_live_ready_and_metadata(v2: pb_grpc.GRPCInferenceServiceStub) -> None:
    assert v2.ServerLive(pb.ServerLiveRequest(), timeout=10).live
    assert v2.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
    assert v2.ModelReady(pb.ModelReadyRequest(name="numbers", version="1"), timeout=10).ready
    assert not v2.ModelReady(pb.ModelReadyRequest(name="numbers", version="3"), timeout=10).ready
    server = v2.ServerMetadata(pb.ServerMetadataRequest(), timeout=10)
    assert server.name == "attnserve" and server.version and list(server.extensions) == ["parameters"]
    metadata = v2.ModelMetadata(pb.ModelMetadataRequest(name="numbers"), timeout=10)
    assert (metadata.name, list(metadata.versions), metadata.platform) == ("numbers", ["1"], "attnserve_seq2seq")
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("TEXT", "BYTES", [-1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("TRANSLATION", "BYTES", [-1]),
        ("SCORE", "FP32", [-1]),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
@pytest.mark.parametrize(
    "options", [{}, {"beam_size": 3, "num_hypotheses": 3, "length_penalty": 0.6}], ids=["greedy", "beam"]
)
def test_infer_equals_native_translate(
    v2: pb_grpc.GRPCInferenceServiceStub, native: native_grpc.TranslatorStub, raw: bool, options: dict
) -> None:
    expected = native_translations(native, DATES, **options)
    response = v2.ModelInfer(infer_request(DATES, raw=raw, **options), timeout=60)
    assert (response.model_name, response.model_version, response.id) == ("dates", "1", "req-1")
    assert len(response.raw_output_contents) == (2 if raw else 0)
    width = options.get("num_hypotheses", 1)
    shape, texts = output_values(response, "TRANSLATION")
    _, scores = output_values(response, "SCORE")
    assert shape == ([len(DATES)] if width == 1 else [len(DATES), width])
    got = [
        list(zip(texts[i * width : (i + 1) * width], scores[i * width : (i + 1) * width], strict=False))
        for i in range(len(DATES))
    ]
    for mine, theirs in zip(got, expected, strict=True):
        assert [text for text, _ in mine] == [text for text, _ in theirs]
        assert np.allclose([score for _, score in mine], [score for _, score in theirs], atol=1e-5)


@pytest.mark.slow
def test_other_model_version_and_requested_outputs(
    v2: pb_grpc.GRPCInferenceServiceStub, native: native_grpc.TranslatorStub
) -> None:
    request = infer_request(NUMBERS, model="numbers", outputs=("TRANSLATION",))
    request.model_version = "1"
    response = v2.ModelInfer(request, timeout=60)
    assert [output.name for output in response.outputs] == ["TRANSLATION"]
    expected = [hyps[0][0] for hyps in native_translations(native, NUMBERS, model="numbers")]
    assert output_values(response, "TRANSLATION")[1] == expected


@pytest.mark.slow
def test_errors_map_to_the_native_status_codes(
    v2: pb_grpc.GRPCInferenceServiceStub, native: native_grpc.TranslatorStub
) -> None:
    def both(v2_request: pb.ModelInferRequest, native_request: native_pb.TranslateRequest) -> None:
        v2_status = status_of(lambda: v2.ModelInfer(v2_request, timeout=30))
        native_status = status_of(lambda: native.Translate(native_request, timeout=30))
        assert v2_status == native_status

    both(infer_request(["x"], model="no-such-model"), native_pb.TranslateRequest(model="no-such-model", texts=["x"]))
    both(
        infer_request(["x"], beam_size=99),
        native_pb.TranslateRequest(model="dates", texts=["x"], options=native_pb.DecodeOptions(beam_size=99)),
    )
    both(infer_request(["   "]), native_pb.TranslateRequest(model="dates", texts=["   "]))
    both(infer_request([]), native_pb.TranslateRequest(model="dates", texts=[]))
    versioned = infer_request(["x"])
    versioned.model_version = "7"
    both(versioned, native_pb.TranslateRequest(model="dates", version="7", texts=["x"]))

    code, details = status_of(lambda: v2.ModelInfer(infer_request(["x"], model="../dates"), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "is not valid" in details
    # the model is checked first: an unknown model is NOT_FOUND whatever else is wrong with the request
    unknown_model_and_input = _with_input("SOURCE")
    unknown_model_and_input.model_name = "nope"
    assert status_of(lambda: v2.ModelInfer(unknown_model_and_input, timeout=30))[0] == grpc.StatusCode.NOT_FOUND
    code, details = status_of(lambda: v2.ModelInfer(_with_input("SOURCE"), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "unknown input 'SOURCE'" in details
    code, details = status_of(lambda: v2.ModelMetadata(pb.ModelMetadataRequest(name="nope"), timeout=30))
    assert code == grpc.StatusCode.NOT_FOUND and "available models: dates, numbers" in details
    code, details = status_of(lambda: v2.ModelReady(pb.ModelReadyRequest(name=""), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "model name is empty" in details
    # the timeout parameter (microseconds) is a deadline, as in Triton
    code, details = status_of(lambda: v2.ModelInfer(infer_request(["3 mars 1999"], timeout=1), timeout=30))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "deadline passed" in details


@pytest.mark.slow
def test_stream_answers_every_request_with_errors_in_band(
    v2: pb_grpc.GRPCInferenceServiceStub, native: native_grpc.TranslatorStub
) -> None:
    requests = [
        infer_request(DATES[:2]),
        infer_request(["x"], model="nope"),
        infer_request(["x"], beam_size=99),
        infer_request(NUMBERS, model="numbers", raw=False),
    ]
    for index, request in enumerate(requests):
        request.id = f"r{index}"
    responses = list(v2.ModelStreamInfer(iter(requests), timeout=60))
    assert len(responses) == 4
    by_id = {response.infer_response.id: response for response in responses}
    assert by_id["r1"].error_message.startswith("NOT_FOUND: model 'nope' not found")
    assert by_id["r2"].error_message.startswith("INVALID_ARGUMENT: beam_size 99 exceeds the maximum")
    first, last = by_id["r0"].infer_response, by_id["r3"].infer_response
    assert output_values(first, "TRANSLATION")[1] == [h[0][0] for h in native_translations(native, DATES[:2])]
    assert output_values(last, "TRANSLATION")[1] == [
        h[0][0] for h in native_translations(native, NUMBERS, model="numbers")
    ]
    assert not last.raw_output_contents  # typed in, typed out
    assert (
        first.parameters[FINAL_RESPONSE_PARAMETER].bool_param and last.parameters[FINAL_RESPONSE_PARAMETER].bool_param
    )


@pytest.mark.slow
def test_stream_answers_a_message_that_does_not_parse_in_band_and_reads_on(
    channel: grpc.Channel, native: native_grpc.TranslatorStub
) -> None:
    """Found by the fuzz campaign: a request message on ModelStreamInfer that did not parse failed the whole stream
    with UNKNOWN (or INTERNAL when messages followed), and the requests before it went unanswered."""
    stream = channel.stream_stream(
        "/inference.GRPCInferenceService/ModelStreamInfer",
        request_serializer=lambda data: data,
        response_deserializer=pb.ModelStreamInferResponse.FromString,
    )
    before, after = infer_request(DATES[:1]), infer_request(NUMBERS[:1], model="numbers")
    before.id, after.id = "before", "after"
    corrupt = b"\xff\xff\xff"
    payloads = [before.SerializeToString(), corrupt, after.SerializeToString()]
    responses = list(stream(iter(payloads), timeout=60))
    assert len(responses) == 3
    errors = [response.error_message for response in responses if response.error_message]
    assert len(errors) == 1 and errors[0].startswith(
        "INVALID_ARGUMENT: the ModelStreamInfer request is not a valid protobuf message"
    )
    by_id = {
        response.infer_response.id: response.infer_response for response in responses if not response.error_message
    }
    assert output_values(by_id["before"], "TRANSLATION")[1] == [native_translations(native, DATES[:1])[0][0][0]]
    assert output_values(by_id["after"], "TRANSLATION")[1] == [
        native_translations(native, NUMBERS[:1], model="numbers")[0][0][0]
    ]


@pytest.mark.slow
def test_a_refusal_that_quotes_a_long_input_keeps_its_status(v2: pb_grpc.GRPCInferenceServiceStub) -> None:
    """Found by the fuzz campaign: a message quoting 40,000 characters of the request travelled whole in the status
    trailer, which the client refused (over 16 KiB), so the call failed with RESOURCE_EXHAUSTED ("Stream removed")
    instead of its INVALID_ARGUMENT. Messages are cut to MAX_DETAILS_CHARS, saying so."""
    request = infer_request(DATES[:1])
    request.inputs[0].parameters["é" * 40_000].bool_param = True  # 2 bytes of UTF-8, 6 percent-encoded
    code, details = status_of(lambda: v2.ModelInfer(request, timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("input TEXT has parameters ['éééé")
    assert len(details) <= MAX_DETAILS_CHARS and details.endswith(" characters cut)")


@pytest.mark.slow
def test_stream_tokens_then_the_unary_result(v2: pb_grpc.GRPCInferenceServiceStub) -> None:
    text = DATES[1]
    unary = v2.ModelInfer(infer_request([text]), timeout=60)
    request = infer_request([text], stream=True, triton_enable_empty_final_response=True)
    streamed = list(v2.ModelStreamInfer(iter([request]), timeout=60))
    assert not any(message.error_message for message in streamed)
    *tokens, final, empty = [message.infer_response for message in streamed]
    assert tokens, "greedy streaming sends one response per generated token"
    assert [token.parameters["index"].int64_param for token in tokens] == list(range(len(tokens)))
    assert not any(token.parameters[FINAL_RESPONSE_PARAMETER].bool_param for token in tokens + [final])
    assert empty.parameters[FINAL_RESPONSE_PARAMETER].bool_param and not empty.outputs
    pieces = [token.parameters["token"].string_param for token in tokens]
    so_far = [output_values(token, "TRANSLATION")[1][0] for token in tokens]
    assert so_far[-1] == "".join(pieces)  # char tokenizer: the text so far is the pieces joined
    assert output_values(final, "TRANSLATION") == output_values(unary, "TRANSLATION")
    assert np.allclose(output_values(final, "SCORE")[1], output_values(unary, "SCORE")[1], atol=1e-5)


@pytest.mark.slow
def test_reflection_and_health_know_the_v2_service(channel: grpc.Channel) -> None:
    # what `grpcurl -plaintext HOST:PORT describe inference.GRPCInferenceService` does
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    service = pool.FindServiceByName(KSERVE_SERVICE)
    assert {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelStreamInfer",
    } == {method.name for method in service.methods}
    infer = pool.FindMessageTypeByName("inference.ModelInferRequest")
    assert {field.name: field.number for field in infer.fields} == {
        "model_name": 1,
        "model_version": 2,
        "id": 3,
        "parameters": 4,
        "inputs": 5,
        "outputs": 6,
        "raw_input_contents": 7,
    }
    health = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=KSERVE_SERVICE), timeout=10
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.slow
def test_v2_calls_share_the_engine_metrics(server: ServerThread, v2: pb_grpc.GRPCInferenceServiceStub) -> None:
    labels = {"model": "numbers", "version": "1"}
    before = scrape(server.metrics_url)
    v2.ModelInfer(infer_request(NUMBERS, model="numbers"), timeout=60)
    status_of(lambda: v2.ModelInfer(infer_request(["x"], model="numbers", beam_size=99), timeout=30))
    after = scrape(server.metrics_url)

    def grew(name: str, **extra: str) -> float:
        return metric(after, name, **labels, **extra) - metric(before, name, **labels, **extra)

    assert grew("attnserve_requests_total", method="ModelInfer", code="OK", protocol="grpc") == 1
    assert grew("attnserve_requests_total", method="ModelInfer", code="INVALID_ARGUMENT", protocol="grpc") == 1
    assert grew("attnserve_queue_wait_seconds_count") == len(NUMBERS)  # the same engine as Translate


# ----- interoperability: tritonclient[grpc] from its own virtualenv ----------------------------------------


@pytest.fixture(scope="module")
def tritonclient_report(server: ServerThread) -> dict:
    if not INTEROP_PYTHON.exists():
        message = f"no interop virtualenv at {INTEROP_PYTHON}: run `make interop` (tests/interop/requirements.txt)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    completed = subprocess.run(
        [str(INTEROP_PYTHON), str(PROBE), "--url", server.address, "--model", "dates", "--texts", json.dumps(DATES)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=PROJECT_ROOT,
        env={key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")},
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


@pytest.mark.slow
def test_tritonclient_health_and_metadata(tritonclient_report: dict) -> None:
    report = tritonclient_report
    assert report["live"] == {"value": True} and report["ready"] == {"value": True}
    assert report["model_ready"] == {"value": True} and report["model_ready_version_1"] == {"value": True}
    assert report["model_ready_missing_version"] == {"value": False}
    assert report["model_ready_unknown_model"] == {"value": False}
    assert report["server_metadata"]["value"]["name"] == "attnserve"
    metadata = report["model_metadata"]["value"]
    assert metadata["name"] == "dates" and metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "TEXT", "datatype": "BYTES", "shape": ["-1"]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in metadata["outputs"]] == [
        ("TRANSLATION", "BYTES", ["-1"]),
        ("SCORE", "FP32", ["-1"]),
    ]


@pytest.mark.slow
def test_tritonclient_infer_raw_and_typed_equal_native(
    tritonclient_report: dict, native: native_grpc.TranslatorStub
) -> None:
    expected = native_translations(native, DATES)
    best_texts = [hyps[0][0] for hyps in expected]
    best_scores = [hyps[0][1] for hyps in expected]

    raw = tritonclient_report["infer_raw"]["value"]
    assert (raw["id"], raw["model_name"], raw["model_version"], raw["raw_output_count"]) == ("raw-1", "dates", "1", 2)
    assert raw["tensors"]["TRANSLATION"] == {"shape": [len(DATES)], "dtype": "object", "values": best_texts}
    assert raw["tensors"]["SCORE"]["dtype"] == "float32"
    assert np.allclose(raw["tensors"]["SCORE"]["values"], best_scores, atol=1e-5)

    typed = tritonclient_report["infer_typed"]["value"]
    assert typed["raw_output_count"] == 0  # typed in, typed out
    assert typed["typed_translation"] == best_texts and typed["translation_shape"] == [len(DATES)]
    assert np.allclose(typed["typed_score"], best_scores, atol=1e-5)

    beam = tritonclient_report["infer_raw_beam"]["value"]["tensors"]
    expected_beam = native_translations(native, DATES, beam_size=3, num_hypotheses=2)
    assert beam["TRANSLATION"]["shape"] == [len(DATES), 2]
    assert beam["TRANSLATION"]["values"] == [text for hyps in expected_beam for text, _ in hyps]


@pytest.mark.slow
def test_tritonclient_errors_are_clear(tritonclient_report: dict) -> None:
    report = tritonclient_report
    assert report["unknown_model"]["error"]["status"] == "StatusCode.NOT_FOUND"
    assert (
        "model 'no-such-model' not found; available models: dates, numbers"
        in report["unknown_model"]["error"]["message"]
    )
    assert report["wrong_input_name"]["error"] == {
        "status": "StatusCode.INVALID_ARGUMENT",
        "message": "unknown input 'SOURCE' for model dates; its only input is TEXT (BYTES, shape [-1])",
    }
    assert report["wrong_datatype"]["error"] == {
        "status": "StatusCode.INVALID_ARGUMENT",
        "message": "input TEXT of model dates has datatype FP32; expected BYTES",
    }
    assert report["unknown_parameter"]["error"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "unknown parameter 'beam'" in report["unknown_parameter"]["error"]["message"]


@pytest.mark.slow
def test_tritonclient_stream(tritonclient_report: dict, native: native_grpc.TranslatorStub) -> None:
    events = tritonclient_report["stream"]["value"]
    errors = [event["error"] for event in events if "error" in event]
    assert len(errors) == 1 and errors[0].startswith("NOT_FOUND: model 'no-such-model' not found")
    batch = [event for event in events if event.get("id") == "batch"]
    assert len(batch) == 1 and batch[0]["parameters"] == {FINAL_RESPONSE_PARAMETER: True}
    assert batch[0]["tensors"]["TRANSLATION"]["values"] == [hyps[0][0] for hyps in native_translations(native, DATES)]
    tokens = [event for event in events if event.get("id") == "tokens"]
    *token_events, final, empty = tokens
    assert token_events and all(event["parameters"][FINAL_RESPONSE_PARAMETER] is False for event in token_events)
    assert [event["parameters"]["index"] for event in token_events] == list(range(len(token_events)))
    best = native_translations(native, DATES[:1])[0][0][0]
    assert final["tensors"]["TRANSLATION"]["values"] == [best]
    assert empty["parameters"] == {FINAL_RESPONSE_PARAMETER: True} and empty["tensors"] == {}
