"""The HTTP port of a REAL server (tiny trained models): KServe v2 over REST and the native JSON API give what the
gRPC port gives, bit for bit; server-sent events carry TranslateStream's messages; the OpenAPI document is valid
and describes the real answers; bad input gets a clear status and a JSON body, and the server keeps serving; the
calls are counted with protocol="http"; a drain answers the calls that are in flight.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate as validate_spec

from service.errors import ALL_ERRORS, AttnServeError
from service.gen.attnserve.v1 import translator_pb2 as pb
from service.gen.attnserve.v1 import translator_pb2_grpc as pb_grpc
from service.gen.inference import grpc_service_pb2 as v2_pb
from service.gen.inference import grpc_service_pb2_grpc as v2_grpc
from service.http_api.errors import HttpRequestError, http_error
from service.http_api.kserve import HEADER_LENGTH
from service.kserve import decode_raw_bytes, encode_raw_bytes
from service.settings import Settings
from tests.service.http_client import Reply, call, events
from tests.service.server_harness import PROJECT_ROOT, ServerThread, make_settings, metric, scrape, wait_for
from tests.service.test_kserve import INTEROP_PYTHON

pytestmark = pytest.mark.slow  # starts servers

DATES = ["samedi 21 novembre 2026", "3 mars 1999", "14 juillet 1789", "1 janvier 2000"]
BODY_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def server_settings(tiny_repository) -> Settings:  # type: ignore[no-untyped-def]
    return make_settings(tiny_repository, http_body_timeout_seconds=BODY_TIMEOUT_S)


@pytest.fixture(scope="module")
def base(server: ServerThread) -> str:
    return server.http_url


@pytest.fixture(scope="module")
def v2(channel: grpc.Channel) -> v2_grpc.GRPCInferenceServiceStub:
    return v2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(autouse=True)
def still_serving(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every test: the HTTP port still translates."""
    yield
    if "base" in request.fixturenames:
        reply = call("POST", f"{request.getfixturevalue('base')}/v1/translate", {"texts": ["3 mars 1999"]})
        assert reply.status == 200 and reply.json()["translations"][0]["hypotheses"][0]["text"]


def error_of(reply: Reply) -> tuple[int, str, str]:
    assert reply.headers["content-type"].startswith("application/json"), reply.headers
    body = reply.json()
    return reply.status, body["code"], body["error"]


def v2_infer_json(texts: list[str], **parameters: object) -> dict:
    request: dict = {
        "id": "r-1",
        "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [len(texts)], "data": texts}],
    }
    if parameters:
        request["parameters"] = parameters
    return request


def grpc_v2_infer(
    v2: v2_grpc.GRPCInferenceServiceStub, texts: list[str], *, model: str = "dates", **parameters: int
) -> v2_pb.ModelInferResponse:
    """ModelInfer on the gRPC port with raw input, so raw output: the bytes the REST binary output must equal."""
    request = v2_pb.ModelInferRequest(model_name=model, id="r-1")
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[len(texts)])
    request.raw_input_contents.append(encode_raw_bytes(text.encode() for text in texts))
    for name, value in parameters.items():
        request.parameters[name].int64_param = value
    return v2.ModelInfer(request, timeout=60)


# ----- KServe v2 over REST ---------------------------------------------------------------------------------


@pytest.mark.parametrize("parameters", [{}, {"beam_size": 3, "num_hypotheses": 3}], ids=["greedy", "beam"])
def test_v2_infer_json_equals_grpc_bit_for_bit(
    base: str, v2: v2_grpc.GRPCInferenceServiceStub, parameters: dict[str, int]
) -> None:
    expected = grpc_v2_infer(v2, DATES, **parameters)
    reply = call("POST", f"{base}/v2/models/dates/infer", v2_infer_json(DATES, **parameters))
    assert reply.status == 200, reply.body
    document = reply.json()
    assert (document["model_name"], document["model_version"], document["id"]) == ("dates", "1", "r-1")
    translation, score = document["outputs"]
    assert [output.name for output in expected.outputs] == [translation["name"], score["name"]]
    assert translation["shape"] == score["shape"] == list(expected.outputs[0].shape)
    assert translation["data"] == [item.decode() for item in decode_raw_bytes(expected.raw_output_contents[0], "T")]
    grpc_scores = np.frombuffer(expected.raw_output_contents[1], dtype="<f4")
    assert np.array_equal(np.asarray(score["data"], dtype=np.float32), grpc_scores)  # the same float32 bits


def test_v2_binary_extension_equals_grpc_raw_bytes(base: str, v2: v2_grpc.GRPCInferenceServiceStub) -> None:
    """Triton's binary tensor data extension (tritonclient.http's default): the output bytes are gRPC's raw ones."""
    expected = grpc_v2_infer(v2, DATES, beam_size=2, num_hypotheses=2)
    raw = encode_raw_bytes(text.encode() for text in DATES)
    head = json.dumps(
        {
            "id": "r-1",
            "parameters": {"beam_size": 2, "num_hypotheses": 2, "binary_data_output": True},
            "inputs": [
                {
                    "name": "TEXT",
                    "datatype": "BYTES",
                    "shape": [len(DATES)],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
        }
    ).encode()
    reply = call(
        "POST",
        f"{base}/v2/models/dates/infer",
        head + raw,
        {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))},
    )
    assert reply.status == 200, reply.body
    length = int(reply.headers[HEADER_LENGTH.lower()])
    document = json.loads(reply.body[:length])
    sizes = [output["parameters"]["binary_data_size"] for output in document["outputs"]]
    assert all("data" not in output for output in document["outputs"])
    binary = reply.body[length:]
    assert [binary[: sizes[0]], binary[sizes[0] :]] == list(expected.raw_output_contents)


def test_v2_metadata_health_and_readiness(base: str, v2: v2_grpc.GRPCInferenceServiceStub) -> None:
    server = call("GET", f"{base}/v2").json()
    grpc_server = v2.ServerMetadata(v2_pb.ServerMetadataRequest(), timeout=10)
    assert server == {"name": grpc_server.name, "version": grpc_server.version, "extensions": ["parameters"]}
    assert call("GET", f"{base}/v2/health/live").json() == {"live": True}
    ready = call("GET", f"{base}/v2/health/ready")
    assert (ready.status, ready.json()) == (200, {"ready": True})
    for path in ("/v2/models/numbers", "/v2/models/numbers/versions/1"):
        metadata = call("GET", base + path).json()
        expected = json_format.MessageToDict(
            v2.ModelMetadata(v2_pb.ModelMetadataRequest(name="numbers"), timeout=10), preserving_proto_field_name=True
        )
        for tensor in expected["inputs"] + expected["outputs"]:
            tensor["shape"] = [int(size) for size in tensor["shape"]]  # int64 is a string in protobuf's mapping
        assert metadata == expected
    assert call("GET", f"{base}/v2/models/numbers/versions/1/ready").json() == {"name": "numbers", "ready": True}
    missing = call("GET", f"{base}/v2/models/numbers/versions/3/ready")
    assert (missing.status, missing.json()) == (503, {"name": "numbers", "ready": False})


def test_v2_errors_name_the_problem(base: str) -> None:
    infer = f"{base}/v2/models/dates/infer"
    assert error_of(call("POST", f"{base}/v2/models/nope/infer", v2_infer_json(["x"]))) == (
        404,
        "NOT_FOUND",
        "model 'nope' not found; available models: dates, numbers",
    )
    status, code, message = error_of(call("POST", infer, v2_infer_json(["x"], beam=4)))
    assert (status, code) == (400, "INVALID_ARGUMENT") and message.startswith("unknown parameter 'beam'")
    status, _, message = error_of(call("POST", infer, v2_infer_json(["x"], beam_size=99)))
    assert status == 400 and message.startswith("beam_size 99 exceeds the maximum 8 for model dates version 1")
    wrong_input = v2_infer_json(["x"])
    wrong_input["inputs"][0]["name"] = "SOURCE"
    assert error_of(call("POST", infer, wrong_input))[2] == (
        "unknown input 'SOURCE' for model dates; its only input is TEXT (BYTES, shape [-1])"
    )
    unknown_field = {**v2_infer_json(["x"]), "input": []}
    assert error_of(call("POST", infer, unknown_field))[2] == (
        "the inference request has unknown field 'input'; its fields are id, parameters, inputs, outputs"
    )
    not_text = v2_infer_json(["x"])
    not_text["inputs"][0]["data"] = [3]
    assert error_of(call("POST", infer, not_text))[2] == (
        "input TEXT: data[0] is not a string; BYTES elements are sent as strings"
    )
    short = v2_infer_json(["x"])
    short["inputs"][0]["shape"] = [2]
    assert error_of(call("POST", infer, short))[2] == "input TEXT has shape [2] but carries 1 elements"


# ----- input normalisation on every protocol -------------------------------------------------------------

# Texts as software and people write them, each beside the plain form the model's declared normalisation turns it
# into (the tiny models declare the recipes' normalisations: export/data/dates.py, export/data/numbers.py).
WRITTEN = {
    "dates": [
        ("SAMEDI\u00a021 NOVEMBRE \uff12\uff10\uff12\uff16\u200f", "samedi 21 novembre 2026"),
        ("\ufeff3\u202fmars  1999", "3 mars 1999"),
        ("14 Juillet\u20091789 ", "14 juillet 1789"),
    ],
    "numbers": [("VIER UND ACHTZIG", "vierundachtzig"), ("Quatre\u2010vingt\u00a0quatre\u200b", "quatre-vingt-quatre")],
}


@pytest.mark.parametrize("model", sorted(WRITTEN))
def test_every_protocol_normalises_as_the_model_declares(
    base: str, stub: pb_grpc.TranslatorStub, v2: v2_grpc.GRPCInferenceServiceStub, model: str
) -> None:
    """The written forms get exactly the plain forms' answers (texts, scores, source tokens) over gRPC, the JSON
    API and KServe v2 on both ports: the server tokenises what the model's tokenizer declares, not the raw text."""
    written, plain = [raw for raw, _ in WRITTEN[model]], [text for _, text in WRITTEN[model]]
    options = {"beamSize": 2, "numHypotheses": 2}

    def translate(texts: list[str]) -> pb.TranslateResponse:
        request = json_format.ParseDict({"model": model, "texts": texts, "options": options}, pb.TranslateRequest())
        return stub.Translate(request, timeout=60)

    expected = translate(plain)
    assert all(hypothesis.text for translation in expected.translations for hypothesis in translation.hypotheses)
    assert translate(written) == expected
    body = {"model": model, "texts": written, "options": options}
    assert as_message(call("POST", f"{base}/v1/translate", body), pb.TranslateResponse) == expected
    stream = call("POST", f"{base}/v1/translate:stream", {**body, "texts": written[:1]})
    final = json_format.ParseDict(events(stream.body)[-1][1], pb.TranslateStreamResponse())
    assert final.final and list(final.hypotheses) == list(expected.translations[0].hypotheses)

    rest = [call("POST", f"{base}/v2/models/{model}/infer", v2_infer_json(texts)) for texts in (written, plain)]
    assert rest[0].status == rest[1].status == 200
    assert rest[0].json()["outputs"] == rest[1].json()["outputs"]
    over_grpc = [grpc_v2_infer(v2, texts, model=model) for texts in (written, plain)]
    assert over_grpc[0].raw_output_contents == over_grpc[1].raw_output_contents


# ----- the native API as JSON ----------------------------------------------------------------------------


def as_message(reply: Reply, message: type) -> object:
    assert reply.status == 200, reply.body
    return json_format.Parse(reply.body, message())


@pytest.mark.parametrize(
    "options", [{}, {"beamSize": 4, "numHypotheses": 3, "returnAttention": True, "lengthPenalty": 0.6}]
)
def test_translate_equals_grpc_bit_for_bit(base: str, stub: pb_grpc.TranslatorStub, options: dict) -> None:
    body = {"model": "dates", "texts": DATES, "options": options}
    expected = stub.Translate(json_format.ParseDict(body, pb.TranslateRequest()), timeout=60)
    assert as_message(call("POST", f"{base}/v1/translate", body), pb.TranslateResponse) == expected


def test_proto_field_names_are_accepted_too(base: str, stub: pb_grpc.TranslatorStub) -> None:
    body = {"texts": ["3 mars 1999"], "options": {"beam_size": 2, "num_hypotheses": 2}}
    expected = stub.Translate(json_format.ParseDict(body, pb.TranslateRequest()), timeout=60)
    reply = call("POST", f"{base}/v1/translate", body)
    assert as_message(reply, pb.TranslateResponse) == expected
    assert "sourceTokens" in reply.json()["translations"][0]["hypotheses"][0]  # written in lowerCamelCase


@pytest.mark.parametrize("options", [{"returnAttention": True}, {"beamSize": 3, "numHypotheses": 2}])
def test_stream_events_are_translate_stream_messages(base: str, stub: pb_grpc.TranslatorStub, options: dict) -> None:
    body = {"model": "numbers", "texts": ["quarante-deux"], "options": options}
    expected = list(stub.TranslateStream(json_format.ParseDict(body, pb.TranslateRequest()), timeout=60))
    reply = call("POST", f"{base}/v1/translate:stream", body)
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/event-stream")
    received = events(reply.body)
    assert {kind for kind, _ in received} == {"message"}
    assert [json_format.ParseDict(data, pb.TranslateStreamResponse()) for _, data in received] == expected
    assert len(expected) > 1 or options.get("beamSize")  # greedy streams token by token


def test_models_equal_grpc(base: str, stub: pb_grpc.TranslatorStub) -> None:
    assert as_message(call("GET", f"{base}/v1/models"), pb.ListModelsResponse) == stub.ListModels(
        pb.ListModelsRequest(), timeout=10
    )
    for path, request in (
        ("/v1/models/numbers", pb.GetModelRequest(name="numbers")),
        ("/v1/models/dates/versions/1", pb.GetModelRequest(name="dates", version="1")),
    ):
        assert as_message(call("GET", base + path), pb.ModelInfo) == stub.GetModel(request, timeout=10)
    assert error_of(call("GET", f"{base}/v1/models/dates/versions/7")) == (
        404,
        "NOT_FOUND",
        "model dates has no version 7; loaded versions: 1",
    )


def test_stream_refusals_come_before_the_stream(base: str) -> None:
    stream = f"{base}/v1/translate:stream"
    assert error_of(call("POST", stream, {"texts": ["a", "b"]})) == (
        400,
        "INVALID_ARGUMENT",
        "/v1/translate:stream takes exactly one text, got 2; use /v1/translate for several",
    )
    assert error_of(call("POST", stream, {"model": "klingon", "texts": ["a"]}))[:2] == (404, "NOT_FOUND")
    assert error_of(call("POST", stream, {"texts": ["a"], "options": {"maxLength": 99}}))[2] == (
        "max_length 99 exceeds the maximum 16 for model dates version 1 (its max_target_tokens)"
    )


# ----- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/translate", "/v2/models/dates/infer"])
def test_a_malformed_json_body(base: str, path: str) -> None:
    status, code, message = error_of(call("POST", base + path, '{"texts": ["a"', {"Content-Type": "application/json"}))
    assert (status, code) == (400, "INVALID_ARGUMENT")
    assert "JSON" in message and "line 1" in message


@pytest.mark.parametrize("path", ["/v1/translate", "/v2/models/dates/infer"])
def test_json_nested_too_deeply(base: str, path: str) -> None:
    """Found by the fuzz campaign: arrays nested 5,000 deep made the v2 endpoint's JSON parser raise RecursionError,
    answered 500 INTERNAL."""
    deep = "[" * 5000 + '"3 mars 1999"' + "]" * 5000
    tensor = '{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ' + deep + "}"
    body = '{"texts": ' + deep + "}" if path.startswith("/v1") else '{"inputs": [' + tensor + "]}"
    status, code, message = error_of(call("POST", base + path, body, {"Content-Type": "application/json"}))
    assert (status, code) == (400, "INVALID_ARGUMENT")
    assert "nested too deeply" in message or "maximum recursion depth" in message


def test_v2_data_nested_as_deep_as_the_parser_reads_is_flattened(base: str) -> None:
    """Tensor data may be nested arrays; flattening them does not recurse, so any depth the JSON parser reads works."""
    nested = "[" * 300 + '"3 mars 1999"' + "]" * 300
    body = '{"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ' + nested + "}]}"
    reply = call("POST", f"{base}/v2/models/dates/infer", body, {"Content-Type": "application/json"})
    flat = call("POST", f"{base}/v2/models/dates/infer", v2_infer_json(["3 mars 1999"]))
    assert reply.status == flat.status == 200
    assert reply.json()["outputs"] == flat.json()["outputs"]


@pytest.mark.parametrize("path", ["/v1/translate", "/v2/models/dates/infer"])
def test_a_wrong_content_type(base: str, path: str) -> None:
    reply = call("POST", base + path, "texts=a", {"Content-Type": "application/x-www-form-urlencoded"})
    status, _, message = error_of(reply)
    assert status == 415
    assert message.startswith(
        "Content-Type 'application/x-www-form-urlencoded' is not accepted here; send application/json"
    )


def test_no_content_type_counts_as_json(base: str) -> None:
    reply = call("POST", f"{base}/v1/translate", json.dumps({"texts": ["3 mars 1999"]}))
    assert reply.status == 200


@pytest.mark.parametrize("path", ["/v1/translate", "/v1/translate:stream", "/v2/models/dates/infer"])
def test_a_ten_megabyte_body(base: str, path: str) -> None:
    body = json.dumps({"texts": ["7" * (10 * 1000 * 1000)]})
    reply = call("POST", base + path, body, {"Content-Type": "application/json"})
    assert error_of(reply) == (
        413,
        "INVALID_ARGUMENT",
        f"the request body is larger than the maximum of 4194304 bytes (max_receive_message_bytes): "
        f"Content-Length is {len(body)}",
    )
    assert reply.headers["connection"] == "close"


def test_unknown_fields(base: str) -> None:
    status, _, message = error_of(call("POST", f"{base}/v1/translate", {"texts": ["a"], "beam_size": 4}))
    assert status == 400
    assert 'no field named "beam_size" at "TranslateRequest"' in message
    status, _, message = error_of(call("POST", f"{base}/v1/translate", {"texts": ["a"], "options": {"beam": 4}}))
    assert status == 400 and 'no field named "beam" at "TranslateRequest.options"' in message


def test_a_client_that_never_finishes_its_body(base: str) -> None:
    """The body stops halfway: the server answers 408 once http_body_timeout_seconds has passed, closes the
    connection, and meanwhile (and afterwards) serves everyone else."""
    port = int(base.rsplit(":", 1)[1])
    body = json.dumps({"texts": ["3 mars 1999"]}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as slow:
        slow.sendall(
            b"POST /v1/translate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[: len(body) // 2]
        )
        assert call("POST", f"{base}/v1/translate", {"texts": ["1 janvier 2000"]}).status == 200  # not held up
        answer = b""
        while chunk := slow.recv(65536):  # until the server closes the connection
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ")
    assert json.loads(payload) == {
        "error": f"the request body did not arrive within {BODY_TIMEOUT_S:g} s (http_body_timeout_seconds)",
        "code": "INVALID_ARGUMENT",
    }


def test_a_request_line_over_the_parsers_limit_is_refused_without_an_error_in_the_log(
    base: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by the fuzz campaign: aiohttp answered a 20 KB request line 400 and logged it at ERROR with a traceback,
    so one client could fill the server's log. It is logged at DEBUG now."""
    with caplog.at_level(logging.INFO, logger="aiohttp.server"):
        reply = call("GET", f"{base}/v2/models/{'x' * 20_000}")
    assert reply.status == 400 and b"Got more than" in reply.body
    assert [record for record in caplog.records if record.name == "aiohttp.server"] == []


def test_unknown_paths_and_verbs(base: str) -> None:
    assert error_of(call("GET", f"{base}/v3/models")) == (
        404,
        "NOT_FOUND",
        "no endpoint /v3/models; the API is described at /openapi.json",
    )
    assert error_of(call("GET", f"{base}/v1/translate")) == (
        405,
        "INVALID_ARGUMENT",
        "GET is not allowed on /v1/translate; use POST",
    )
    assert error_of(call("GET", f"{base}/static/secret.txt"))[:2] == (404, "NOT_FOUND")


def test_every_error_class_has_its_http_status() -> None:
    expected = {
        "InvalidRequest": 400,
        "ModelNotFound": 404,
        "Overloaded": 429,
        "DeadlineExceeded": 504,
        "RequestCancelled": 499,
        "Unavailable": 503,
        "Unauthenticated": 401,
        "EngineFailure": 500,
        "ModelLoadError": 400,
        "AttnServeError": 500,
    }
    assert {error.__name__: http_error(error("why"))[0] for error in ALL_ERRORS} == expected
    assert http_error(HttpRequestError("too big", 413)) == (413, "INVALID_ARGUMENT", "too big")
    assert http_error(KeyError("x"))[:2] == (500, "INTERNAL")  # a bug: no internals in the message
    assert all(isinstance(error("x"), AttnServeError) for error in ALL_ERRORS)


# ----- OpenAPI ---------------------------------------------------------------------------------------------


def test_the_openapi_document_is_valid_and_describes_the_answers(base: str) -> None:
    document = call("GET", f"{base}/openapi.json").json()
    validate_spec(document)  # raises with the reason when the document is not valid OpenAPI 3.1

    def check(reply: Reply, schema: str) -> None:
        validator = OAS31Validator({"$ref": f"#/components/schemas/{schema}", "components": document["components"]})
        validator.validate(reply.json())

    check(
        call("POST", f"{base}/v1/translate", {"texts": DATES[:2], "options": {"returnAttention": True}}),
        "TranslateResponse",
    )
    check(call("GET", f"{base}/v1/models"), "ListModelsResponse")
    check(call("GET", f"{base}/v1/models/dates"), "ModelInfo")
    check(call("GET", f"{base}/v2"), "ServerMetadataResponse")
    check(call("GET", f"{base}/v2/models/dates"), "ModelMetadataResponse")
    check(
        call("POST", f"{base}/v2/models/dates/infer", v2_infer_json(DATES, beam_size=2, num_hypotheses=2)),
        "InferenceResponse",
    )
    check(call("POST", f"{base}/v1/translate", {"model": "nope", "texts": ["x"]}), "ErrorResponse")
    OAS31Validator({"$ref": "#/components/schemas/InferenceRequest", "components": document["components"]}).validate(
        v2_infer_json(DATES, beam_size=2)
    )
    assert set(document["paths"]) >= {
        "/v1/translate",
        "/v1/translate:stream",
        "/v1/models",
        "/v2/models/{name}/infer",
        "/v2/health/ready",
    }


# ----- curl ------------------------------------------------------------------------------------------------


def test_curl_gets_what_grpc_gets(
    base: str, v2: v2_grpc.GRPCInferenceServiceStub, stub: pb_grpc.TranslatorStub
) -> None:
    curl = shutil.which("curl")
    assert curl is not None, "curl is needed (Debian's curl package)"

    def run(*arguments: str) -> str:
        return subprocess.run(
            [curl, "--silent", "--show-error", *arguments], capture_output=True, text=True, check=True, timeout=60
        ).stdout

    request = json.dumps(v2_infer_json(DATES))
    document = json.loads(run("-H", "Content-Type: application/json", "-d", request, f"{base}/v2/models/dates/infer"))
    expected = grpc_v2_infer(v2, DATES)
    assert document["outputs"][0]["data"] == [
        item.decode() for item in decode_raw_bytes(expected.raw_output_contents[0], "T")
    ]
    assert np.array_equal(
        np.asarray(document["outputs"][1]["data"], dtype=np.float32),
        np.frombuffer(expected.raw_output_contents[1], "<f4"),
    )
    streamed = run(
        "-N",
        "-H",
        "Content-Type: application/json",
        "-d",
        json.dumps({"texts": [DATES[1]]}),
        f"{base}/v1/translate:stream",
    )
    final = json_format.ParseDict(events(streamed.encode())[-1][1], pb.TranslateStreamResponse())
    assert final.final and list(final.hypotheses) == list(
        stub.Translate(pb.TranslateRequest(texts=[DATES[1]]), timeout=60).translations[0].hypotheses
    )


# ----- interoperability: tritonclient[http] from its own virtualenv ----------------------------------------


@pytest.fixture(scope="module")
def tritonclient_http_report(server: ServerThread) -> dict:
    if not INTEROP_PYTHON.exists():
        message = f"no interop virtualenv at {INTEROP_PYTHON}: run `make interop` (tests/interop/requirements.txt)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    probe = PROJECT_ROOT / "tests" / "interop" / "tritonclient_http_probe.py"
    completed = subprocess.run(
        [str(INTEROP_PYTHON), str(probe), "--url", server.http_url.removeprefix("http://"), "--model", "dates"]
        + ["--texts", json.dumps(DATES)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=PROJECT_ROOT,
        env={key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")},
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


def test_tritonclient_http_health_and_metadata(tritonclient_http_report: dict) -> None:
    report = tritonclient_http_report
    assert report["live"] == report["ready"] == report["model_ready"] == {"value": True}
    assert report["model_ready_missing_version"] == report["model_ready_unknown_model"] == {"value": False}
    assert report["server_metadata"]["value"]["name"] == "attnserve"
    metadata = report["model_metadata"]["value"]
    assert (metadata["name"], metadata["versions"], metadata["platform"]) == ("dates", ["1"], "attnserve_seq2seq")
    assert metadata["inputs"] == [{"name": "TEXT", "datatype": "BYTES", "shape": [-1]}]


def test_tritonclient_http_infer_equals_grpc_bit_for_bit(
    tritonclient_http_report: dict, v2: v2_grpc.GRPCInferenceServiceStub
) -> None:
    for key, parameters in (
        ("infer_binary", {}),
        ("infer_json", {}),
        ("infer_beam", {"beam_size": 3, "num_hypotheses": 2}),
    ):
        expected = grpc_v2_infer(v2, DATES, **parameters)
        got = tritonclient_http_report[key]["value"]
        assert (got["id"], got["model_version"]) == ("http-1", "1"), key
        translation, score = got["tensors"]["TRANSLATION"], got["tensors"]["SCORE"]
        assert translation["shape"] == score["shape"] == list(expected.outputs[0].shape), key
        assert translation["values"] == [
            item.decode() for item in decode_raw_bytes(expected.raw_output_contents[0], "T")
        ]
        grpc_bits = [value.tobytes().hex() for value in np.frombuffer(expected.raw_output_contents[1], dtype="<f4")]
        assert (score["dtype"], score["values"]) == ("float32", grpc_bits), key


def test_tritonclient_http_errors_are_clear(tritonclient_http_report: dict) -> None:
    report = tritonclient_http_report
    assert report["unknown_model"]["error"] == {
        "status": "404",
        "message": "model 'no-such-model' not found; available models: dates, numbers",
    }
    assert report["wrong_input_name"]["error"] == {
        "status": "400",
        "message": "unknown input 'SOURCE' for model dates; its only input is TEXT (BYTES, shape [-1])",
    }
    assert report["unknown_parameter"]["error"]["status"] == "400"
    assert report["unknown_parameter"]["error"]["message"].startswith("unknown parameter 'beam'")


# ----- metrics ---------------------------------------------------------------------------------------------


def test_http_calls_are_counted_with_their_protocol(server: ServerThread, base: str) -> None:
    before = scrape(server.metrics_url)
    call("POST", f"{base}/v1/translate", {"model": "numbers", "texts": ["quarante-deux"]})
    call("POST", f"{base}/v2/models/numbers/infer", v2_infer_json(["x"], beam_size=99))
    call("POST", f"{base}/v1/translate", {"model": "klingon", "texts": ["x"]})
    after = scrape(server.metrics_url)

    def grew(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    numbers = {"model": "numbers", "version": "1", "protocol": "http"}
    assert grew("attnserve_requests_total", method="Translate", code="OK", **numbers) == 1
    assert grew("attnserve_requests_total", method="ModelInfer", code="INVALID_ARGUMENT", **numbers) == 1
    unknown = {"model": "", "version": "", "protocol": "http", "method": "Translate"}
    assert grew("attnserve_requests_total", code="NOT_FOUND", **unknown) == 1
    assert grew("attnserve_request_duration_seconds_count", method="Translate", **numbers) == 1
    assert grew("attnserve_queue_wait_seconds_count", model="numbers", version="1") == 1  # the same engine


# ----- drain -----------------------------------------------------------------------------------------------


def test_a_drain_answers_the_calls_in_flight_then_closes_the_port(tiny_repository) -> None:  # type: ignore[no-untyped-def]
    """A request whose body is still arriving when SIGTERM comes is answered (503: the server takes no new
    work), ready turns 503 at once, every response closes its connection, and the port closes at the end."""
    settings = make_settings(tiny_repository, drain_delay_seconds=20.0, drain_grace_seconds=60.0)
    server = ServerThread(settings).start()
    base = server.http_url
    body = json.dumps({"texts": ["3 mars 1999"]}).encode()
    with socket.create_connection(("127.0.0.1", settings.http_port), timeout=60) as in_flight:
        in_flight.sendall(
            b"POST /v1/translate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:5]
        )
        server.request_stop()
        wait_for(lambda: call("GET", f"{base}/v2/health/ready").status == 503, "readiness to turn 503")
        refused = call("POST", f"{base}/v1/translate", {"texts": ["3 mars 1999"]})
        assert error_of(refused)[:2] == (503, "UNAVAILABLE") and refused.headers["connection"] == "close"
        assert "shutting down" in error_of(refused)[2]
        in_flight.sendall(body[5:])
        answer = b""
        while chunk := in_flight.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 503 ") and b'"code": "UNAVAILABLE"' in answer
    assert server.stop() == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", settings.http_port), timeout=10).close()


@pytest.mark.parametrize("taken", ["grpc", "http"])
def test_a_port_in_use_stops_the_start_and_frees_the_other(
    tiny_repository: Path, taken: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Someone else listens on one of the two ports: the server exits 1 saying why, and leaves the other port free.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        settings = make_settings(tiny_repository, **({"port": port} if taken == "grpc" else {"http_port": port}))
        running = ServerThread(settings)
        with pytest.raises(RuntimeError, match="exit 1"):
            running.start()
        running.stop()
    assert running.exit_code == 1
    assert "cannot start" in caplog.text
    other = settings.http_port if taken == "grpc" else settings.port
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", other))  # free again (or never taken)
