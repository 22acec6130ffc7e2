"""`make fuzz`: a fuzz campaign against a real server over gRPC and HTTP, and its figures.

    python -m loadtests.reliability.fuzz                                   # 100,000 gRPC + 50,000 HTTP inputs
    python -m loadtests.reliability.fuzz --grpc-inputs 2000 --http-inputs 1000 --seed 7
    python -m loadtests.reliability.fuzz --seconds 300 --frontends 2       # for five minutes, three processes
    python -m loadtests.reliability.fuzz --replay grpc:1234 --seed 23      # one input again, shown and sent

The server (`attnserve serve`, started here on loopback ports) gets inputs made by loadtests/reliability/
fuzz_inputs.py: request messages of every attnserve.v1.Translator and inference.GRPCInferenceService method,
generated from their descriptors or mutated from valid ones, sent as raw bytes (so byte-level mutations reach the
server's parser), and the JSON bodies of /v1/translate, /v1/translate:stream and /v2/models/.../infer. Input N of a
seed is the same on every run and machine: a finding is reproduced with `--replay PROTOCOL:N`.

After every input it checks (anything else is a finding):
- the call got an answer before its deadline (a deadline the client had to enforce is a hang; DEADLINE_EXCEEDED is
  only accepted when the server said so, with its own message);
- gRPC: the status is OK, INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED or an honest DEADLINE_EXCEEDED, never
  INTERNAL, UNKNOWN or anything else; bytes that do not parse as the request message are INVALID_ARGUMENT; an OK
  answer parses and fits the request (a translation per text, streams with exactly one final message last,
  ModelStreamInfer with exactly one final response or error per request sent);
- HTTP: the status is 200 or 4xx, or 503/504 with an error body; never another 5xx; an error body is
  {"error", "code"} with a code that is not INTERNAL or UNKNOWN; a 200 parses, and a stream ends with its final
  message or an error event;
- the server process is alive (checked as the run goes and at its end, when it must still be healthy and
  translate), and its log holds no unexpected error;
- at the end, the server counted every call exactly once with the status the client saw: its
  attnserve_requests_total, per protocol, method and status, equals the client's tally.
Exit status 1 when there was a finding; the inputs of each finding go to OUT/findings.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from grpc import aio

from loadtests.reliability.common import print_table, repository_or_smoke
from loadtests.reliability.fuzz_inputs import (
    ProtoFuzzer,
    dump_json,
    infer_request_rest,
    mutate_bytes,
    mutate_json,
    translate_request_json,
    valid_infer_request,
    valid_translate_request,
)
from loadtests.servers import ServerProcess, attnserve_server, scrape
from service.gen.attnserve.v1 import translator_pb2 as pb
from service.gen.inference import grpc_service_pb2 as kserve_pb

# ----- what is called -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GrpcMethod:
    name: str
    path: str
    shape: str  # unary_unary, unary_stream, stream_stream
    request: type[Message]
    response: type[Message]
    weight: float


GRPC_METHODS = (
    GrpcMethod("Translate", "/attnserve.v1.Translator/Translate", "unary_unary", pb.TranslateRequest,
               pb.TranslateResponse, 30),
    GrpcMethod("TranslateStream", "/attnserve.v1.Translator/TranslateStream", "unary_stream", pb.TranslateRequest,
               pb.TranslateStreamResponse, 18),
    GrpcMethod("GetModel", "/attnserve.v1.Translator/GetModel", "unary_unary", pb.GetModelRequest, pb.ModelInfo, 3),
    GrpcMethod("ListModels", "/attnserve.v1.Translator/ListModels", "unary_unary", pb.ListModelsRequest,
               pb.ListModelsResponse, 1),
    GrpcMethod("ModelInfer", "/inference.GRPCInferenceService/ModelInfer", "unary_unary",
               kserve_pb.ModelInferRequest, kserve_pb.ModelInferResponse, 30),
    GrpcMethod("ModelStreamInfer", "/inference.GRPCInferenceService/ModelStreamInfer", "stream_stream",
               kserve_pb.ModelInferRequest, kserve_pb.ModelStreamInferResponse, 10),
    GrpcMethod("ModelMetadata", "/inference.GRPCInferenceService/ModelMetadata", "unary_unary",
               kserve_pb.ModelMetadataRequest, kserve_pb.ModelMetadataResponse, 3),
    GrpcMethod("ModelReady", "/inference.GRPCInferenceService/ModelReady", "unary_unary",
               kserve_pb.ModelReadyRequest, kserve_pb.ModelReadyResponse, 3),
    GrpcMethod("ServerReady", "/inference.GRPCInferenceService/ServerReady", "unary_unary",
               kserve_pb.ServerReadyRequest, kserve_pb.ServerReadyResponse, 1),
    GrpcMethod("ServerMetadata", "/inference.GRPCInferenceService/ServerMetadata", "unary_unary",
               kserve_pb.ServerMetadataRequest, kserve_pb.ServerMetadataResponse, 1),
)  # fmt: skip
GRPC_BY_NAME = {method.name: method for method in GRPC_METHODS}

ACCEPTED_GRPC = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"}
"""Statuses a fuzzed call may end with; DEADLINE_EXCEEDED too when the server says so (HONEST_DEADLINE)."""
HONEST_DEADLINE = "the deadline passed"
"""How the server's own DEADLINE_EXCEEDED messages begin (the engine's); the client's deadline says otherwise."""
ACCEPTED_HTTP = {200, 400, 404, 405, 408, 413, 415, 429}
"""HTTP statuses a fuzzed call may end with; 503 and 504 too with an error body that says why."""
NOT_COUNTED_HTTP = ("no endpoint ", " is not allowed on ")
"""The router's own 404 and 405 (no endpoint matched): the server counts no call for them."""


def _pick(rng: random.Random, weights: Sequence[tuple[Any, float]]) -> Any:
    return rng.choices([item for item, _ in weights], [weight for _, weight in weights])[0]


# ----- the inputs -------------------------------------------------------------------------------------------

KINDS = (("generate", 0.3), ("mutate", 0.4), ("bytes", 0.3))


def _valid_message(method: str, rng: random.Random) -> Message:
    if method in ("Translate", "TranslateStream"):
        return valid_translate_request(rng, stream=method == "TranslateStream")
    if method in ("ModelInfer", "ModelStreamInfer"):
        return valid_infer_request(rng, streaming=method == "ModelStreamInfer")
    if method == "GetModel":
        return pb.GetModelRequest(name=rng.choice(("", "dates", "numbers")))
    if method == "ModelMetadata":
        return kserve_pb.ModelMetadataRequest(name=rng.choice(("dates", "numbers")))
    if method == "ModelReady":
        return kserve_pb.ModelReadyRequest(name=rng.choice(("dates", "numbers")))
    return GRPC_BY_NAME[method].request()


def _message(method: str, kind: str, rng: random.Random) -> Message:
    fuzzer = ProtoFuzzer(rng)
    if kind == "generate":
        return fuzzer.fill(GRPC_BY_NAME[method].request())
    message = _valid_message(method, rng)
    return fuzzer.mutate(message) if kind == "mutate" else message


def _wire(method: str, kind: str, rng: random.Random) -> bytes:
    data = _message(method, kind, rng).SerializeToString(deterministic=True)
    if kind == "bytes":
        data = mutate_bytes(rng, data, _valid_message(method, rng).SerializeToString())
    return data


@dataclass(frozen=True)
class GrpcInput:
    index: int
    method: str
    kind: str
    payloads: tuple[bytes, ...]  # one per request message (several on ModelStreamInfer)


def grpc_input(seed: int, index: int) -> GrpcInput:
    """Input `index` of gRPC's sequence for `seed`: the same on every run."""
    rng = random.Random(f"{seed}/grpc/{index}")
    method = _pick(rng, [(method.name, method.weight) for method in GRPC_METHODS])
    kind = _pick(rng, KINDS)
    count = rng.choice((1, 1, 2, 3, 4)) if method == "ModelStreamInfer" else 1
    payloads = tuple(_wire(method, kind if number == 0 else _pick(rng, KINDS), rng) for number in range(count))
    return GrpcInput(index, method, kind, payloads)


@dataclass(frozen=True)
class HttpInput:
    index: int
    method: str  # the RPC the endpoint mirrors (the server's metric label)
    kind: str
    verb: str
    path: str
    headers: dict[str, str]
    body: bytes


JSON_TYPES = (
    ("application/json", 0.85),
    ("", 0.04),
    ("application/json; charset=utf-8", 0.03),
    ("text/plain", 0.03),
    ("application/x-www-form-urlencoded", 0.02),
    ("application/octet-stream", 0.03),
)


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def http_input(seed: int, index: int) -> HttpInput:
    """Input `index` of HTTP's sequence for `seed`: the same on every run."""
    rng = random.Random(f"{seed}/http/{index}")
    method = _pick(
        rng,
        (("Translate", 35), ("TranslateStream", 20), ("ModelInfer", 35), ("GetModel", 4), ("ModelMetadata", 3),
         ("ModelReady", 3)),
    )  # fmt: skip
    kind = _pick(rng, (("generate", 0.3), ("mutate", 0.4), ("json", 0.15), ("bytes", 0.15)))
    headers: dict[str, str] = {}
    message_kind = kind if kind in ("generate", "mutate") else "mutate" if rng.random() < 0.5 else "valid"
    body = b""
    if method in ("Translate", "TranslateStream"):
        request = _message(method, message_kind, rng)
        assert isinstance(request, pb.TranslateRequest)
        document: Any = translate_request_json(request)
        if kind == "json":
            document = mutate_json(rng, document)
        body = dump_json(rng, document)
        path = "/v1/translate" if method == "Translate" else "/v1/translate:stream"
    elif method == "ModelInfer":
        infer = _message(method, message_kind, rng)
        assert isinstance(infer, kserve_pb.ModelInferRequest)
        document, binary = infer_request_rest(infer, rng)
        if kind == "json":
            document = mutate_json(rng, document)
        head = dump_json(rng, document)
        body = head + binary
        if binary or rng.random() < 0.05:
            length = len(head) if rng.random() < 0.85 else rng.choice((-1, 0, len(head) + 1, len(body) + 5, 2**70))
            headers["Inference-Header-Content-Length"] = str(length)
        version = infer.model_version
        path = f"/v2/models/{_quote(infer.model_name)}" + (f"/versions/{_quote(version)}" if version else "")
        path += "/infer"
    else:
        fuzzer = ProtoFuzzer(rng)
        name = fuzzer.scalar(pb.GetModelRequest.DESCRIPTOR.fields_by_name["name"])
        version = fuzzer.scalar(pb.GetModelRequest.DESCRIPTOR.fields_by_name["version"])
        base = "/v1/models/" if method == "GetModel" else "/v2/models/"
        path = base + _quote(name) + (f"/versions/{_quote(version)}" if version else "")
        path += "/ready" if method == "ModelReady" else ""
        return HttpInput(index, method, kind, "GET", path, headers, b"")
    if kind == "bytes":
        body = mutate_bytes(rng, body)
    content_type = _pick(rng, JSON_TYPES)
    if content_type:
        headers["Content-Type"] = content_type
    return HttpInput(index, method, kind, "POST", path, headers, body)


# ----- the checks ---------------------------------------------------------------------------------------------


@dataclass
class Finding:
    protocol: str
    index: int
    method: str
    what: str

    def to_json(self, seed: int) -> str:
        return json.dumps({"seed": seed, **self.__dict__}, ensure_ascii=False)


def _parse(message_type: type[Message], data: bytes) -> Message | None:
    try:
        return message_type.FromString(data)
    except DecodeError:
        return None


def _finite(scores: Sequence[float]) -> bool:
    return all(math.isfinite(score) for score in scores)


def _check_translate(request: Message | None, data: bytes) -> str | None:
    response = pb.TranslateResponse.FromString(data)
    assert isinstance(request, pb.TranslateRequest)
    if len(response.translations) != len(request.texts):
        return f"{len(response.translations)} translations for {len(request.texts)} texts"
    wanted = max(request.options.num_hypotheses, 1)
    for translation in response.translations:
        if not 1 <= len(translation.hypotheses) <= wanted:
            return f"{len(translation.hypotheses)} hypotheses where 1 to {wanted} were asked for"
        if not _finite([hypothesis.score for hypothesis in translation.hypotheses]):
            return "a score that is not finite"
    return None


def _check_token_stream(messages: Sequence[bytes]) -> str | None:
    parsed = [pb.TranslateStreamResponse.FromString(data) for data in messages]
    if not parsed or not parsed[-1].final or any(message.final for message in parsed[:-1]):
        return f"a stream of {len(parsed)} messages without exactly one final message, last"
    if [message.index for message in parsed[:-1]] != list(range(len(parsed) - 1)) or parsed[-1].index != len(
        parsed
    ) - 1:
        return "token messages out of order"
    return None


def _check_stream_infer(requests: int, messages: Sequence[bytes]) -> str | None:
    """Each request sent on ModelStreamInfer gets exactly one final response or one error."""
    ends = 0
    for data in messages:
        response = kserve_pb.ModelStreamInferResponse.FromString(data)
        if response.error_message:
            status = response.error_message.split(":", 1)[0]
            if status not in ACCEPTED_GRPC and not (
                status == "DEADLINE_EXCEEDED" and HONEST_DEADLINE in response.error_message
            ):
                return f"an in-band error {response.error_message[:200]!r}"
            ends += 1
        elif response.infer_response.parameters["triton_final_response"].bool_param:
            ends += 1
    if ends != requests:
        return f"{ends} final responses or errors for {requests} requests"
    return None


def check_grpc(item: GrpcInput, code: str, details: str, responses: Sequence[bytes]) -> str | None:
    """What is wrong with the answer to `item` (None when nothing is)."""
    method = GRPC_BY_NAME[item.method]
    if code == "DEADLINE_EXCEEDED" and not details.startswith(HONEST_DEADLINE):
        return f"hang: no answer before the client's deadline ({details})"
    if code not in ACCEPTED_GRPC and code != "DEADLINE_EXCEEDED":
        return f"status {code}: {details[:300]}"
    parsed = [_parse(method.request, payload) for payload in item.payloads]
    if method.shape != "stream_stream" and parsed[0] is None and code != "INVALID_ARGUMENT":
        return f"bytes that are not a {method.request.DESCRIPTOR.name} answered {code}, not INVALID_ARGUMENT"
    if code != "OK":
        return None if details else f"status {code} without a message"
    if method.shape == "stream_stream":
        return _check_stream_infer(len(item.payloads), responses)
    if method.shape == "unary_stream":
        return _check_token_stream(responses)
    if item.method == "Translate":
        return _check_translate(parsed[0], responses[0])
    method.response.FromString(responses[0])
    return None


def _error_document(body: bytes) -> tuple[str, str] | None:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(document, dict) or not isinstance(document.get("error"), str):
        return None
    if not isinstance(document.get("code"), str) or not document["error"]:
        return None
    return document["code"], document["error"]


def sse_events(body: bytes) -> list[tuple[str, str]]:
    """The (event type, data) of every server-sent event of `body`, in order (the data as sent: text)."""
    events = []
    for block in body.decode("utf-8").split("\n\n"):
        if not block.strip():
            continue
        kind, data = "message", ""
        for line in block.split("\n"):
            if line.startswith("event: "):
                kind = line[len("event: ") :]
            elif line.startswith("data: "):
                data += line[len("data: ") :]
        events.append((kind, data))
    return events


def check_http(item: HttpInput, status: int, headers: dict[str, str], body: bytes) -> tuple[str | None, str | None]:
    """(what is wrong with the answer to `item` or None, the gRPC status name the server counts it under or None
    when it counts no call)."""
    if item.method == "ModelReady" and status in (200, 503):  # the readiness itself: 503 = not ready
        try:
            ready = json.loads(body).get("ready")
        except (ValueError, UnicodeDecodeError, AttributeError):
            ready = None
        if ready is not (status == 200):
            return f"ModelReady {status} with the body {body[:200]!r}", "OK"
        return None, "OK"
    if status != 200:
        error = _error_document(body)
        if error is None and status == 400 and headers.get("content-type", "").startswith("text/plain"):
            return None, None  # aiohttp's HTTP parser refused the request line or a header before any handler
        if error is None:
            return f"HTTP {status} without an error body: {body[:200]!r}", None
        code, message = error
        counted = None if status in (404, 405) and any(part in message for part in NOT_COUNTED_HTTP) else code
        if code in ("INTERNAL", "UNKNOWN") or code not in ACCEPTED_GRPC | {"DEADLINE_EXCEEDED", "UNAVAILABLE"}:
            return f"HTTP {status} {code}: {message[:300]}", counted
        if status == 504 and not message.startswith(HONEST_DEADLINE):
            return f"HTTP 504 that is not the server's deadline: {message[:300]}", counted
        if status not in ACCEPTED_HTTP | {503, 504}:
            return f"HTTP {status} {code}: {message[:300]}", counted
        return None, counted
    try:
        if item.method == "TranslateStream":
            events = sse_events(body)
            if not events:
                return "a 200 stream without events", "OK"
            kind, data = events[-1]
            if kind == "error":
                error = _error_document(data.encode("utf-8"))
                if error is None or error[0] not in ACCEPTED_GRPC | {"DEADLINE_EXCEEDED"}:
                    return f"a stream that ended with the error {data[:300]}", error[0] if error else None
                return None, error[0]
            finals = [json.loads(data).get("final", False) for _, data in events]
            if finals[-1] is not True or any(finals[:-1]):
                return f"a stream of {len(events)} events without exactly one final message, last", "OK"
            return None, "OK"
        if item.method == "ModelInfer" and "inference-header-content-length" in headers:
            json.loads(body[: int(headers["inference-header-content-length"])])
        elif item.method == "Translate":
            json_format.Parse(body.decode("utf-8"), pb.TranslateResponse())
        else:
            json.loads(body)
    except (ValueError, UnicodeDecodeError, json_format.ParseError) as error:
        return f"a 200 whose body does not parse ({error})", "OK"
    return None, "OK"


# ----- the campaign -------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What one protocol's run saw."""

    protocol: str
    inputs: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    counted: Counter[tuple[str, str]] = field(default_factory=Counter)  # (method, code) the server must count
    findings: list[Finding] = field(default_factory=list)
    hangs: int = 0
    seconds: float = 0.0


@dataclass
class Campaign:
    seed: int
    grpc_inputs: int
    http_inputs: int
    seconds: float
    concurrency: int
    call_timeout_s: float
    alive: Callable[[], bool]
    on_finding: Callable[[Finding], None] = lambda finding: None
    first_index: int = 0  # inputs first_index .. count - 1 are sent (a replay sends one)

    def __post_init__(self) -> None:
        self.grpc = Tally("grpc")
        self.http = Tally("http")
        self.crashed = False

    def _out_of_time(self, started: float) -> bool:
        return self.seconds > 0 and time.monotonic() - started >= self.seconds

    def _found(self, tally: Tally, finding: Finding) -> None:
        tally.findings.append(finding)
        self.on_finding(finding)

    async def _workers(self, tally: Tally, count: int, one: Callable[[int], Any]) -> None:
        started = time.monotonic()
        next_index = self.first_index

        async def worker() -> None:
            nonlocal next_index
            while next_index < count and not self._out_of_time(started) and not self.crashed:
                index = next_index
                next_index += 1
                await one(index)
                tally.inputs += 1
                if tally.inputs % 500 == 0 and not self.alive():
                    self.crashed = True

        await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        tally.seconds = time.monotonic() - started

    async def run_grpc(self, address: str) -> None:
        tally = self.grpc
        async with aio.insecure_channel(address) as channel:
            calls = {
                method.name: getattr(channel, method.shape)(method.path)  # no serializers: bytes in, bytes out
                for method in GRPC_METHODS
            }

            async def one(index: int) -> None:
                item = grpc_input(self.seed, index)
                tally.by_kind[item.kind] += 1
                shape = GRPC_BY_NAME[item.method].shape
                responses: list[bytes] = []
                code, details = "OK", ""
                try:
                    if shape == "unary_unary":
                        responses.append(await calls[item.method](item.payloads[0], timeout=self.call_timeout_s))
                    elif shape == "unary_stream":
                        call = calls[item.method](item.payloads[0], timeout=self.call_timeout_s)
                        responses.extend([message async for message in call])
                    else:
                        call = calls[item.method](iter(item.payloads), timeout=self.call_timeout_s)
                        responses.extend([message async for message in call])
                except aio.AioRpcError as error:
                    code, details = error.code().name, error.details() or ""
                tally.statuses[code] += 1
                if item.method != "ModelStreamInfer":  # the server counts unary and server-streaming calls
                    tally.counted[(item.method, code)] += 1
                problem = check_grpc(item, code, details, responses)
                if problem is not None:
                    tally.hangs += problem.startswith("hang")
                    self._found(tally, Finding("grpc", index, item.method, problem))

            await self._workers(tally, self.grpc_inputs, one)

    async def run_http(self, base_url: str) -> None:
        tally = self.http
        timeout = aiohttp.ClientTimeout(total=self.call_timeout_s)
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        async with aiohttp.ClientSession(base_url, timeout=timeout, connector=connector) as session:

            async def one(index: int) -> None:
                item = http_input(self.seed, index)
                tally.by_kind[item.kind] += 1
                try:
                    async with session.request(
                        item.verb,
                        item.path,
                        data=item.body if item.verb == "POST" else None,
                        headers=item.headers,
                        skip_auto_headers=("Content-Type",),
                    ) as response:
                        status = response.status
                        headers = {key.lower(): value for key, value in response.headers.items()}
                        body = await response.read()
                except TimeoutError:
                    tally.statuses["no answer"] += 1
                    tally.hangs += 1
                    self._found(tally, Finding("http", index, item.method, "hang: no answer before the timeout"))
                    return
                except aiohttp.ClientError as error:
                    tally.statuses["connection failed"] += 1
                    self._found(tally, Finding("http", index, item.method, f"the connection failed: {error!r}"))
                    return
                tally.statuses[str(status)] += 1
                problem, counted = check_http(item, status, headers, body)
                if counted is not None:
                    tally.counted[(item.method, counted)] += 1
                if problem is not None:
                    self._found(tally, Finding("http", index, item.method, problem))

            await self._workers(tally, self.http_inputs, one)

    async def run(self, grpc_address: str, http_url: str) -> None:
        runs = []
        if self.grpc_inputs > 0:
            runs.append(self.run_grpc(grpc_address))
        if self.http_inputs > 0 and http_url:
            runs.append(self.run_http(http_url))
        await asyncio.gather(*runs)


def server_counts(samples: dict, protocol: str) -> Counter[tuple[str, str]]:
    """attnserve_requests_total by (method, code) for one protocol."""
    counts: Counter[tuple[str, str]] = Counter()
    for (name, labels), value in samples.items():
        if name != "attnserve_requests_total":
            continue
        label = dict(labels)
        if label.get("protocol") == protocol and value:
            counts[(label["method"], label["code"])] += int(value)
    return counts


def accounting(before: dict, after: dict, tally: Tally) -> list[str]:
    """Where the server's count of calls differs from the client's, per (method, status)."""
    counted = server_counts(after, tally.protocol)
    counted.subtract(server_counts(before, tally.protocol))
    differences = []
    for key in sorted(set(counted) | set(tally.counted)):
        if counted.get(key, 0) != tally.counted.get(key, 0):
            differences.append(f"{key[0]} {key[1]}: the server counted {counted.get(key, 0)}, the client saw "
                               f"{tally.counted.get(key, 0)}")  # fmt: skip
    return differences


# ----- the server and the program -----------------------------------------------------------------------------


def start_fuzz_server(repository: Path, out: Path, frontends: int = 0) -> ServerProcess:
    """`attnserve serve` on loopback ports (gRPC, HTTP and metrics), its log in `out`."""
    extra = ("--frontends", str(frontends))
    out.mkdir(parents=True, exist_ok=True)
    return attnserve_server(
        repository, batching="continuous", threads=1, provider="cpu", log_dir=out, extra=extra, label="fuzz-server",
        http=True,
    ).start()  # fmt: skip


def unexpected_errors(log_path: Path | None) -> list[str]:
    """The lines of the server's log that report a bug (an unexpected error, a traceback)."""
    if log_path is None or not log_path.exists():
        return []
    lines = log_path.read_text(errors="replace").splitlines()
    return [line for line in lines if "unexpected error" in line or line.startswith("Traceback")]


def healthy(server: ServerProcess) -> str | None:
    """None when the server still serves a good request on both ports; otherwise why not."""
    if server.process is None or server.process.poll() is not None:
        return "the server process exited"
    try:
        with grpc.insecure_channel(server.address) as channel:
            call = channel.unary_unary(
                "/attnserve.v1.Translator/Translate",
                request_serializer=pb.TranslateRequest.SerializeToString,
                response_deserializer=pb.TranslateResponse.FromString,
            )
            reply = call(pb.TranslateRequest(texts=["3 mars 1999"]), timeout=30)
            if not reply.translations[0].hypotheses[0].text:
                return "an empty translation over gRPC"
    except grpc.RpcError as error:
        return f"a good gRPC call failed: {error.code().name} {error.details()}"
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        connection.request("POST", "/v1/translate", body=b'{"texts": ["3 mars 1999"]}',
                           headers={"Content-Type": "application/json"})  # fmt: skip
        response = connection.getresponse()
        if response.status != 200:
            return f"a good HTTP call got {response.status}: {response.read()[:200]!r}"
    finally:
        connection.close()
    return None


@dataclass
class Result:
    """A campaign's outcome: the tallies, and every problem found (findings, accounting, health, the log)."""

    campaign: Campaign
    problems: list[str]
    accounting: list[str]
    log_errors: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def run_campaign(server: ServerProcess, campaign: Campaign, *, settle_s: float = 30.0) -> Result:
    """Run `campaign` against `server` and check everything the module docstring lists."""
    assert server.metrics_url is not None
    before = scrape(server.metrics_url)
    asyncio.run(campaign.run(server.address, f"http://{server.http_address}"))
    problems = [f"{finding.protocol} input {finding.index} ({finding.method}): {finding.what}"
                for finding in campaign.grpc.findings + campaign.http.findings]  # fmt: skip
    # The server counts a call as it answers it, so the last counts can land a moment after the last answer.
    differences: list[str] = []
    give_up = time.monotonic() + settle_s
    while not campaign.crashed:
        after = scrape(server.metrics_url)
        differences = accounting(before, after, campaign.grpc) + accounting(before, after, campaign.http)
        if not differences or time.monotonic() > give_up:
            break
        time.sleep(0.2)
    problems.extend(f"accounting: {line}" for line in differences)
    health = healthy(server)  # after the accounting: its own calls are counted too
    if health is not None:
        problems.append(f"after the campaign: {health}")
    log_errors = unexpected_errors(server.log_path)
    problems.extend(f"server log: {line}" for line in log_errors[:20])
    return Result(campaign, problems, differences, log_errors)


def print_figures(result: Result, repository: Path, frontends: int, load: str) -> None:
    campaign = result.campaign
    rows = []
    for tally in (campaign.grpc, campaign.http):
        if not tally.inputs:
            continue
        statuses = ", ".join(f"{name} {count:,}" for name, count in tally.statuses.most_common())
        kinds = ", ".join(f"{name} {count:,}" for name, count in sorted(tally.by_kind.items()))
        internal = sum(count for name, count in tally.statuses.items() if name in ("INTERNAL", "UNKNOWN", "500"))
        rows.append([
            tally.protocol, f"{tally.inputs:,}", kinds, f"{tally.inputs / max(tally.seconds, 1e-9):.0f}/s",
            statuses, len(tally.findings), tally.hangs, internal,
        ])  # fmt: skip
    print_table(
        f"fuzz campaign (seed {campaign.seed}, {repository}, "
        f"{'one process' if not frontends else f'{frontends} front-ends + engine'}; {load})",
        ["protocol", "inputs", "by kind", "rate", "statuses", "findings", "hangs", "INTERNAL/UNKNOWN/500"],
        rows,
    )
    if campaign.crashed:
        alive = "crashed"
    elif any(problem.startswith("after the campaign") for problem in result.problems):
        alive = "not serving"
    else:
        alive = "alive and serving"
    agreed = "yes" if not result.accounting else "NO"
    print(
        f"\n  server: {alive}; calls counted by the server = calls the client saw: {agreed}; unexpected errors in "
        f"its log: {len(result.log_errors)}"
    )
    for problem in result.problems[:50]:
        print(f"FINDING: {problem}")
    if len(result.problems) > 50:
        print(f"... and {len(result.problems) - 50} more (all in findings.jsonl)")


def _load_average() -> str:
    try:
        return "load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "load average unknown"


def replay(spec: str, seed: int, server: ServerProcess | None) -> int:
    """Show input PROTOCOL:N of `seed` and, with a server, send it once and check the answer."""
    protocol, _, number = spec.partition(":")
    index = int(number)
    if protocol == "grpc":
        item = grpc_input(seed, index)
        print(f"gRPC input {index}: {item.method} ({item.kind})")
        for payload in item.payloads:
            parsed = _parse(GRPC_BY_NAME[item.method].request, payload)
            print(f"  {payload.hex()}\n  parses as: {parsed!r}" if parsed is not None else f"  {payload.hex()}\n"
                  "  does not parse")  # fmt: skip
    else:
        http_item = http_input(seed, index)
        print(f"HTTP input {index}: {http_item.verb} {http_item.path} {http_item.headers}\n  {http_item.body[:2000]!r}")
    if server is None:
        return 0
    campaign = Campaign(seed, 0, 0, 0.0, 1, 60.0, lambda: True, first_index=index)

    async def once() -> None:
        if protocol == "grpc":
            campaign.grpc_inputs = index + 1
            await campaign.run_grpc(server.address)
        else:
            campaign.http_inputs = index + 1
            await campaign.run_http(f"http://{server.http_address}")

    asyncio.run(once())
    findings = campaign.grpc.findings + campaign.http.findings
    print("answer: " + ("; ".join(finding.what for finding in findings) if findings else "as expected"))
    return 1 if findings else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtests.reliability.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--out", type=Path, default=Path("reports/fuzz"), help="the server log and findings.jsonl")
    parser.add_argument("--seed", type=int, default=23)
    parser.add_argument("--grpc-inputs", type=int, default=100_000, help="inputs over gRPC (0: none)")
    parser.add_argument("--http-inputs", type=int, default=50_000, help="inputs over HTTP (0: none)")
    parser.add_argument("--seconds", type=float, default=0.0, help="stop after this long, whatever the counts (0: no)")
    parser.add_argument("--concurrency", type=int, default=8, help="calls in flight per protocol")
    parser.add_argument("--call-timeout", type=float, default=60.0, help="each call's deadline, seconds")
    parser.add_argument("--frontends", type=int, default=0, help="the server's --frontends")
    parser.add_argument("--replay", default="", help="PROTOCOL:N (grpc:12, http:7): show that input and send it")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.replay and args.grpc_inputs == 0 and args.http_inputs == 0:
        return replay(args.replay, args.seed, None)
    repository = repository_or_smoke(args.repository)
    server = start_fuzz_server(repository, args.out, args.frontends)
    try:
        if args.replay:
            return replay(args.replay, args.seed, server)
        findings_file = (args.out / "findings.jsonl").open("w")

        def alive() -> bool:
            return server.process is not None and server.process.poll() is None

        def record(finding: Finding) -> None:
            findings_file.write(finding.to_json(args.seed) + "\n")
            findings_file.flush()

        campaign = Campaign(
            args.seed, args.grpc_inputs, args.http_inputs, args.seconds, args.concurrency, args.call_timeout, alive,
            record,
        )  # fmt: skip
        print(f"fuzzing {server.address} (gRPC) and {server.http_address} (HTTP), seed {args.seed}")
        load_before = _load_average()
        result = run_campaign(server, campaign)
        findings_file.close()
    finally:
        server.stop()
    print_figures(result, repository, args.frontends, f"{load_before} at the start, {_load_average()} at the end")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
