"""The inputs of the fuzz campaign (loadtests/reliability/fuzz.py): request messages and HTTP bodies, generated and
mutated from a seed so that every input can be made again from its seed and index alone.

Three ways to make an input, as structure-aware fuzzers do:
- generate: walk the message's protobuf descriptor (every field, nested messages, repeated fields, maps, oneofs,
  enums with unknown values too) and fill what it chooses with values that break servers: the extremes of each
  integer type, NaN and infinities, -0.0, odd Unicode (controls, bidirectional overrides, combining marks, astral
  characters, texts over the size limits), and the words the server knows (model names, input and parameter
  names), so that inputs reach past the first check;
- mutate: take a valid request (a seed) and change one to three of its fields in the same way;
- bytes: serialize either of the above and mutate the wire bytes (bit flips, insertions, deletions, truncation,
  splices, varint and length tampering, unknown fields).
HTTP bodies are the same messages in their JSON form (protobuf's JSON mapping for /v1, the v2 REST document for
/v2), mutated as JSON trees (types changed, keys added and removed, deep nesting, huge numbers, lone surrogate
escapes) or as bytes.
"""

from __future__ import annotations

import copy
import json
import math
import random
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from service.gen.attnserve.v1 import translator_pb2 as pb
from service.gen.inference import grpc_service_pb2 as kserve_pb

# ----- values that break servers -------------------------------------------------------------------------

GOOD_TEXTS = (
    "3 mars 1999",
    "samedi 21 novembre 2026",
    "12 Φεβ 1925",
    "vierundachtzig",
    "quarante-deux",
    "siebenhundertdreiundvierzig",
    "2 января 1960",
)
"""Texts the default models and the tiny test models translate."""

ODD_TEXTS = (
    "",
    " ",
    "\t\n  ",
    "\u3000\u2003",
    "\x00",
    "\x00\x01\x07 3 mars 1999\x1b[31m\x7f",
    "3 mars\u202e 1999\u200b\ufeff",
    "\u202e\u202d\u2066\u2069",
    "東京 3 mars 1999 Москва مرحبا",
    "3\u0301 ma\u0308rs 1999",
    "e" + "\u0301" * 300,
    "🦄" * 40,
    "\U0010ffff\U000e0001",
    "ﬀ ﬁ ﬂ Å Ω ｆｕｌｌｗｉｄｔｈ",
    "..\\..\\etc/passwd",
    "%s%n%x{0}${jndi:x}",
    "</s>",
    "<unk>",
    "<pad>",
    "1" * 49,
    "1" * 50,
    "1" * 60,
    "\ud7ff\ue000\ufffd\ufffe",
)
"""Texts at and past the edges: empty, whitespace, controls, bidi, combining, astral, over the token limit."""

MODEL_NAMES = ("", "dates", "numbers", "dates", "numbers", "nope", "../dates", "DATES", "dates\x00", "x" * 65, "é")
VERSIONS = ("", "", "1", "2", "0", "-1", "01", "1.0", "latest", "9" * 20, " 1")
REQUEST_PARAMETERS = (
    "beam_size",
    "num_hypotheses",
    "max_length",
    "length_penalty",
    "replace_unknowns",
    "timeout",
    "priority",
    "stream",
    "triton_enable_empty_final_response",
    "binary_data_output",
    "sequence_id",
    "shared_memory_region",
    "",
)
INPUT_NAMES = ("TEXT", "TEXT", "TEXT", "text", "INPUT0", "")
DATATYPES = ("BYTES", "BYTES", "BYTES", "FP32", "INT64", "", "bytes", "STRING")
OUTPUT_NAMES = ("TRANSLATION", "SCORE", "TRANSLATION", "SCORE", "OUTPUT0", "")

INT32_EDGES = (0, 1, -1, 2, 4, 8, 9, 16, 17, 64, 65, 2**31 - 1, -(2**31), 2**15)
UINT32_EDGES = (0, 1, 2, 3, 4, 8, 9, 16, 17, 64, 65, 2**31 - 1, 2**31, 2**32 - 1)
INT64_EDGES = (0, 1, -1, 2, 3, 8, 9, 16, 17, 1000, 2**31, 2**32, 2**53 + 1, 2**63 - 1, -(2**63))
UINT64_EDGES = (0, 1, 2, 8, 9, 16, 17, 2**31, 2**32, 2**53 + 1, 2**63, 2**64 - 1)
FLOAT_EDGES = (0.0, -0.0, 0.5, 1.0, 2.0, -0.5, math.nan, math.inf, -math.inf, 1e-45, 3.4e38, -3.4e38, 1e308)


def odd_text(rng: random.Random) -> str:
    """A text from the odd catalogue, a good one, random code points, or one over the byte limit (16384)."""
    roll = rng.random()
    if roll < 0.35:
        return rng.choice(ODD_TEXTS)
    if roll < 0.7:
        return rng.choice(GOOD_TEXTS)
    if roll < 0.95:
        return "".join(_code_point(rng) for _ in range(rng.randint(1, 40)))
    return rng.choice(GOOD_TEXTS) * rng.choice((1500, 3000))  # 16 KB and more: past max_text_bytes


def _code_point(rng: random.Random) -> str:
    while True:
        point = rng.choice((rng.randint(0, 0x7F), rng.randint(0x80, 0xFFFF), rng.randint(0x10000, 0x10FFFF)))
        if not 0xD800 <= point <= 0xDFFF:  # protobuf strings are UTF-8: no lone surrogates here (bytes do that)
            return chr(point)


def random_bytes(rng: random.Random, longest: int = 24) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, longest)))


def raw_bytes_tensor(elements: Sequence[bytes]) -> bytes:
    """KServe raw BYTES data: each element as a 4-byte little-endian length and its bytes."""
    return b"".join(struct.pack("<I", len(element)) + element for element in elements)


# ----- messages from their descriptors -------------------------------------------------------------------

Dictionary = dict[str, Callable[[random.Random], Any]]
"""Field full name -> a maker of values the server knows for it (the fuzzer's dictionary)."""


def _one_of(values: Sequence[Any]) -> Callable[[random.Random], Any]:
    return lambda rng: rng.choice(values)


def _texts(rng: random.Random) -> str:
    return rng.choice(GOOD_TEXTS) if rng.random() < 0.5 else odd_text(rng)


def _text_bytes(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.6:
        return _texts(rng).encode("utf-8")
    if roll < 0.8:
        return rng.choice(GOOD_TEXTS).encode("utf-8")[: rng.randint(0, 8)] + b"\xff\xfe\xc0"  # not UTF-8
    return random_bytes(rng)


def _raw_contents(rng: random.Random) -> bytes:
    elements = [_text_bytes(rng) for _ in range(rng.choice((0, 1, 1, 2, 3)))]
    data = raw_bytes_tensor(elements)
    if rng.random() < 0.3:  # a length that lies, or bytes left over
        data = data[: rng.randint(0, len(data))] if data and rng.random() < 0.5 else data + random_bytes(rng, 5)
    return data


DICTIONARY: Dictionary = {
    "attnserve.v1.TranslateRequest.model": _one_of(MODEL_NAMES),
    "attnserve.v1.TranslateRequest.version": _one_of(VERSIONS),
    "attnserve.v1.TranslateRequest.texts": _texts,
    "attnserve.v1.GetModelRequest.name": _one_of(MODEL_NAMES),
    "attnserve.v1.GetModelRequest.version": _one_of(VERSIONS),
    "inference.ModelInferRequest.model_name": _one_of(MODEL_NAMES),
    "inference.ModelInferRequest.model_version": _one_of(VERSIONS),
    "inference.ModelInferRequest.ParametersEntry.key": _one_of(REQUEST_PARAMETERS),
    "inference.ModelInferRequest.InferInputTensor.name": _one_of(INPUT_NAMES),
    "inference.ModelInferRequest.InferInputTensor.datatype": _one_of(DATATYPES),
    "inference.ModelInferRequest.InferRequestedOutputTensor.name": _one_of(OUTPUT_NAMES),
    "inference.ModelInferRequest.raw_input_contents": _raw_contents,
    "inference.InferTensorContents.bytes_contents": _text_bytes,
    "inference.ModelReadyRequest.name": _one_of(MODEL_NAMES),
    "inference.ModelReadyRequest.version": _one_of(VERSIONS),
    "inference.ModelMetadataRequest.name": _one_of(MODEL_NAMES),
    "inference.ModelMetadataRequest.version": _one_of(VERSIONS),
}

_EDGES: dict[int, tuple[Any, ...]] = {
    FieldDescriptor.TYPE_INT32: INT32_EDGES,
    FieldDescriptor.TYPE_SINT32: INT32_EDGES,
    FieldDescriptor.TYPE_SFIXED32: INT32_EDGES,
    FieldDescriptor.TYPE_UINT32: UINT32_EDGES,
    FieldDescriptor.TYPE_FIXED32: UINT32_EDGES,
    FieldDescriptor.TYPE_INT64: INT64_EDGES,
    FieldDescriptor.TYPE_SINT64: INT64_EDGES,
    FieldDescriptor.TYPE_SFIXED64: INT64_EDGES,
    FieldDescriptor.TYPE_UINT64: UINT64_EDGES,
    FieldDescriptor.TYPE_FIXED64: UINT64_EDGES,
    FieldDescriptor.TYPE_FLOAT: FLOAT_EDGES,
    FieldDescriptor.TYPE_DOUBLE: FLOAT_EDGES,
}


def _is_map(field: FieldDescriptor) -> bool:
    return bool(field.message_type is not None and field.message_type.GetOptions().map_entry)


@dataclass
class ProtoFuzzer:
    """Fills and mutates protobuf messages by walking their descriptors, with `rng` and a dictionary of the
    values the server knows (field full name -> maker)."""

    rng: random.Random
    dictionary: Dictionary = field(default_factory=lambda: dict(DICTIONARY))
    max_depth: int = 4

    # ----- scalars ------------------------------------------------------------------------------------

    def scalar(self, descriptor: FieldDescriptor) -> Any:
        rng = self.rng
        known = self.dictionary.get(descriptor.full_name)
        if known is not None and rng.random() < 0.8:
            return known(rng)
        kind = descriptor.type
        if kind == FieldDescriptor.TYPE_BOOL:
            return rng.random() < 0.5
        if kind == FieldDescriptor.TYPE_STRING:
            return odd_text(rng)
        if kind == FieldDescriptor.TYPE_BYTES:
            return _text_bytes(rng)
        if kind == FieldDescriptor.TYPE_ENUM:
            numbers = [value.number for value in descriptor.enum_type.values]
            # proto3 enums are open: an unknown number must be carried and refused, never crash anything.
            return rng.choice(numbers) if rng.random() < 0.7 else rng.choice(INT32_EDGES)
        edges = _EDGES[kind]
        if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
            return rng.choice(edges) if rng.random() < 0.5 else rng.uniform(-1.0, 3.0)
        return rng.choice(edges) if rng.random() < 0.6 else rng.choice(edges[:6]) + rng.randint(0, 3)

    def _count(self, descriptor: FieldDescriptor) -> int:
        roll = self.rng.random()
        if roll < 0.15:
            return 0
        if roll < 0.75:
            return 1
        if roll < 0.95:
            return self.rng.randint(2, 4)
        if descriptor.full_name == "attnserve.v1.TranslateRequest.texts":
            return self.rng.choice((64, 65))  # at and past max_texts_per_request
        return self.rng.randint(5, 12)

    # ----- messages -----------------------------------------------------------------------------------

    def fill(self, message: Message, depth: int = 0) -> Message:
        """Set a random selection of `message`'s fields (recursively); returns `message`."""
        rng = self.rng
        presence = 0.75 if depth == 0 else 0.6
        chosen_oneofs: dict[str, FieldDescriptor | None] = {}
        for oneof in message.DESCRIPTOR.oneofs:
            chosen_oneofs[oneof.name] = rng.choice([*oneof.fields, None])
        for descriptor in message.DESCRIPTOR.fields:
            oneof = descriptor.containing_oneof
            if oneof is not None:
                if chosen_oneofs[oneof.name] is not descriptor:
                    continue
            elif rng.random() > presence:
                continue
            self.set_field(message, descriptor, depth)
        return message

    def set_field(self, message: Message, descriptor: FieldDescriptor, depth: int) -> None:
        """Give one field a fresh random value (replacing what it held)."""
        message.ClearField(descriptor.name)
        if depth >= self.max_depth and descriptor.message_type is not None:
            return
        if _is_map(descriptor):
            entries = getattr(message, descriptor.name)
            key_field = descriptor.message_type.fields_by_name["key"]
            value_field = descriptor.message_type.fields_by_name["value"]
            for _ in range(self._count(descriptor)):
                key = self.scalar(key_field)
                if value_field.message_type is not None:
                    self.fill(entries[key], depth + 1)
                else:
                    entries[key] = self.scalar(value_field)
            return
        if descriptor.is_repeated:
            values = getattr(message, descriptor.name)
            for _ in range(self._count(descriptor)):
                if descriptor.message_type is not None:
                    self.fill(values.add(), depth + 1)
                else:
                    values.append(self.scalar(descriptor))
            return
        if descriptor.message_type is not None:
            self.fill(getattr(message, descriptor.name), depth + 1)
            getattr(message, descriptor.name).SetInParent()
            return
        setattr(message, descriptor.name, self.scalar(descriptor))

    def mutate(self, message: Message, times: int = 0) -> Message:
        """Change 1 to 3 (or `times`) randomly chosen fields anywhere in `message`: a new value, cleared, or a
        repeated field's entries duplicated or dropped. Returns `message`."""
        for _ in range(times or self.rng.randint(1, 3)):
            sites = list(_field_sites(message, 0, self.max_depth))
            if not sites:
                return message
            owner, descriptor, depth = self.rng.choice(sites)
            roll = self.rng.random()
            values = getattr(owner, descriptor.name) if descriptor.is_repeated else None
            if roll < 0.15:
                owner.ClearField(descriptor.name)
            elif roll < 0.3 and values is not None and len(values) and not _is_map(descriptor):
                if descriptor.message_type is not None:
                    values.add().CopyFrom(values[self.rng.randrange(len(values))])
                else:
                    values.append(values[self.rng.randrange(len(values))])
            elif roll < 0.4 and values is not None and len(values) and not _is_map(descriptor):
                del values[self.rng.randrange(len(values))]
            else:
                self.set_field(owner, descriptor, depth)
        return message


def _field_sites(message: Message, depth: int, max_depth: int):
    """(owner, field, depth) for every field of `message` and of the messages it holds, set or not."""
    for descriptor in message.DESCRIPTOR.fields:
        yield message, descriptor, depth
        if depth + 1 >= max_depth or descriptor.message_type is None:
            continue
        if _is_map(descriptor):
            value_field = descriptor.message_type.fields_by_name["value"]
            if value_field.message_type is not None:
                for value in getattr(message, descriptor.name).values():
                    yield from _field_sites(value, depth + 1, max_depth)
        elif descriptor.is_repeated:
            for value in getattr(message, descriptor.name):
                yield from _field_sites(value, depth + 1, max_depth)
        elif message.HasField(descriptor.name):
            yield from _field_sites(getattr(message, descriptor.name), depth + 1, max_depth)


# ----- valid requests: the seeds mutation starts from ------------------------------------------------------


def valid_translate_request(rng: random.Random, *, stream: bool = False) -> pb.TranslateRequest:
    beam = rng.choice((0, 0, 1, 2, 4))
    options = pb.DecodeOptions(
        beam_size=beam,
        num_hypotheses=rng.randint(0, max(beam, 1)),
        max_length=rng.choice((0, 0, 4, 16)),
        length_penalty=rng.choice((0.0, 0.0, 0.6, 1.0)),
        return_attention=rng.random() < 0.3,
        replace_unknowns=rng.random() < 0.3,
    )
    texts = [rng.choice(GOOD_TEXTS) for _ in range(1 if stream else rng.randint(1, 3))]
    return pb.TranslateRequest(model=rng.choice(("", "dates", "numbers")), texts=texts, options=options)


def _parameter(value: bool | int | float | str) -> kserve_pb.InferParameter:
    if isinstance(value, bool):
        return kserve_pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return kserve_pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return kserve_pb.InferParameter(double_param=value)
    return kserve_pb.InferParameter(string_param=value)


def valid_infer_request(rng: random.Random, *, streaming: bool = False) -> kserve_pb.ModelInferRequest:
    texts = [rng.choice(GOOD_TEXTS).encode("utf-8") for _ in range(rng.randint(1, 3))]
    beam = rng.choice((0, 1, 2, 4))
    parameters: dict[str, bool | int | float | str] = {}
    if beam:
        parameters["beam_size"] = beam
        parameters["num_hypotheses"] = rng.randint(1, beam)
    if rng.random() < 0.3:
        parameters["max_length"] = rng.choice((4, 16))
    if rng.random() < 0.2:
        parameters["length_penalty"] = 0.6
    if streaming and rng.random() < 0.5:
        texts = texts[:1]
        parameters["stream"] = True
        if rng.random() < 0.3:
            parameters["triton_enable_empty_final_response"] = True
    request = kserve_pb.ModelInferRequest(
        model_name=rng.choice(("dates", "numbers")),
        id=f"request-{rng.randrange(1000)}",
        parameters={name: _parameter(value) for name, value in parameters.items()},
    )
    tensor = request.inputs.add(name="TEXT", datatype="BYTES", shape=[len(texts)])
    if rng.random() < 0.5:
        request.raw_input_contents.append(raw_bytes_tensor(texts))
    else:
        tensor.contents.bytes_contents.extend(texts)
    for name in rng.sample(("TRANSLATION", "SCORE"), rng.randint(0, 2)):
        request.outputs.add(name=name)
    return request


# ----- wire bytes ------------------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def mutate_bytes(rng: random.Random, data: bytes, other: bytes = b"") -> bytes:
    """`data` with 1 to 4 byte-level mutations: flips, random bytes, insertions, deletions, duplicated or
    truncated ranges, a splice with `other`, lengths made to lie, unknown fields and overlong varints."""
    buffer = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(10)
        at = rng.randint(0, len(buffer))
        if kind == 0 and buffer:
            index = rng.randrange(len(buffer))
            buffer[index] ^= 1 << rng.randrange(8)
        elif kind == 1 and buffer:
            buffer[rng.randrange(len(buffer))] = rng.choice((0x00, 0xFF, 0x7F, 0x80, 0xC0, rng.getrandbits(8)))
        elif kind == 2:
            buffer[at:at] = random_bytes(rng, 8)
        elif kind == 3 and buffer:
            end = min(len(buffer), at + rng.randint(1, 8))
            del buffer[at:end]
        elif kind == 4 and buffer:
            end = min(len(buffer), at + rng.randint(1, 16))
            buffer[at:at] = buffer[at:end] * rng.randint(1, 4)
        elif kind == 5:
            del buffer[at:]
        elif kind == 6 and other:
            cut = rng.randint(0, len(other))
            buffer = buffer[:at] + bytearray(other[cut:])
        elif kind == 7:  # a length-delimited field whose length lies about what follows
            number = rng.randint(1, 8)
            buffer[at:at] = _varint(number << 3 | 2) + _varint(rng.choice((0, 1, 127, 128, 2**31, 2**63)))
        elif kind == 8:  # an unknown field, of each wire type
            number = rng.choice((9, 15, 16, 1000, 2**29 - 1))
            wire = rng.choice((0, 1, 2, 5, 3, 4, 6, 7))  # 3, 4: groups; 6, 7: no such wire type
            payload = {0: _varint(rng.getrandbits(64)), 1: random_bytes(rng, 8)[:8].ljust(8, b"\0"), 5: b"\0" * 4}
            body = payload.get(wire, _varint(3) + b"abc")
            buffer[at:at] = _varint(number << 3 | wire) + body
        else:  # an overlong varint (11 bytes of continuation)
            buffer[at:at] = b"\xff" * 10 + b"\x01"
    return bytes(buffer)


# ----- JSON bodies -----------------------------------------------------------------------------------------

JSON_EDGES: tuple[Any, ...] = (
    None,
    True,
    False,
    0,
    -1,
    1,
    2**31,
    2**53 + 1,
    2**64,
    -(2**63) - 1,
    10**400,
    0.5,
    -0.0,
    1e308,
    "",
    "NaN",
    "Infinity",
    "-Infinity",
    "1e999",
    "x",
    [],
    {},
    [[]],
    {"": None},
)


def translate_request_json(message: pb.TranslateRequest) -> dict[str, Any]:
    """A TranslateRequest in protobuf's JSON mapping (what /v1/translate reads)."""
    return json_format.MessageToDict(message, preserving_proto_field_name=False)


def _rest_parameter(value: kserve_pb.InferParameter) -> Any:
    kind = value.WhichOneof("parameter_choice")
    return None if kind is None else getattr(value, kind)


def infer_request_rest(request: kserve_pb.ModelInferRequest, rng: random.Random) -> tuple[dict[str, Any], bytes]:
    """A ModelInferRequest as the v2 REST document (and the binary data after it, with Triton's binary extension
    when the request had raw contents)."""
    document: dict[str, Any] = {}
    if request.id or rng.random() < 0.5:
        document["id"] = request.id
    if request.parameters:
        document["parameters"] = {name: _rest_parameter(value) for name, value in request.parameters.items()}
    inputs = []
    binary = b""
    for index, tensor in enumerate(request.inputs):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if tensor.parameters:
            entry["parameters"] = {name: _rest_parameter(value) for name, value in tensor.parameters.items()}
        if index < len(request.raw_input_contents):
            chunk = request.raw_input_contents[index]
            entry.setdefault("parameters", {})["binary_data_size"] = len(chunk)
            binary += chunk
        else:
            entry["data"] = [element.decode("utf-8", "replace") for element in tensor.contents.bytes_contents]
            if rng.random() < 0.2 and entry["data"]:  # the protocol allows nested arrays
                entry["data"] = [entry["data"]]
        inputs.append(entry)
    document["inputs"] = inputs
    if request.outputs:
        document["outputs"] = [
            {"name": output.name, **({"parameters": {"binary_data": rng.random() < 0.5}} if rng.random() < 0.5 else {})}
            for output in request.outputs
        ]
    return document, binary


def _json_sites(node: Any, path: tuple[Any, ...] = ()):
    """(container, key) for every value in a JSON tree."""
    if isinstance(node, dict):
        for key in list(node):
            yield node, key
            yield from _json_sites(node[key], (*path, key))
    elif isinstance(node, list):
        for index in range(len(node)):
            yield node, index
            yield from _json_sites(node[index], (*path, index))


def _json_value(rng: random.Random) -> Any:
    roll = rng.random()
    if roll < 0.5:
        return copy.deepcopy(rng.choice(JSON_EDGES))  # a copy: the tree is mutated further, the edges must not be
    if roll < 0.8:
        return odd_text(rng)
    if roll < 0.9:
        return [copy.deepcopy(rng.choice(JSON_EDGES)) for _ in range(rng.randint(1, 3))]
    depth = rng.choice((50, 500, 5000, 100_000))  # deep nesting: recursion in parsers and walkers
    return _Deep(depth, rng.choice(GOOD_TEXTS))


@dataclass(frozen=True)
class _Deep:
    """A value nested `depth` arrays deep, written directly into the JSON text (too deep to build as a tree)."""

    depth: int
    text: str


def mutate_json(rng: random.Random, document: Any) -> Any:
    """1 to 3 changes anywhere in a JSON tree: a value replaced by an edge value or an odd text, a key added or
    removed, a list grown. Returns the tree (a new root when the root itself was replaced)."""
    for _ in range(rng.randint(1, 3)):
        sites = list(_json_sites(document))
        roll = rng.random()
        if not sites or roll < 0.05:
            document = _json_value(rng)
            continue
        container, key = rng.choice(sites)
        if roll < 0.6:
            container[key] = _json_value(rng)
        elif roll < 0.75 and isinstance(container, dict):
            del container[key]
        elif roll < 0.9 and isinstance(container, dict):
            container[rng.choice(("beam_size", "beam", "input", "datatype", "data", "unknown", odd_text(rng)))] = (
                _json_value(rng)
            )
        elif isinstance(container, list):
            container.extend(container[: rng.randint(1, 3)])
        else:
            container[key] = [container[key]]
    return document


def dump_json(rng: random.Random, document: Any) -> bytes:
    """The JSON text of `document`, sometimes with ASCII escapes, a lone surrogate escape, a duplicated key or a
    deep value written out."""

    def encode(node: Any) -> str:
        if isinstance(node, _Deep):
            return "[" * node.depth + json.dumps(node.text) + "]" * node.depth
        if isinstance(node, dict):
            return "{" + ",".join(f"{json.dumps(str(key))}:{encode(value)}" for key, value in node.items()) + "}"
        if isinstance(node, list):
            return "[" + ",".join(encode(value) for value in node) + "]"
        if isinstance(node, float) and not math.isfinite(node):
            return rng.choice(("NaN", "Infinity", "-Infinity", "1e999"))
        return json.dumps(node, ensure_ascii=rng.random() < 0.3)

    text = encode(document)
    roll = rng.random()
    if roll < 0.08 and '"' in text:  # a lone surrogate escape inside some string
        at = text.index('"') + 1
        text = text[:at] + rng.choice(("\\ud800", "\\udfff", "\\u0000", "\\ud83e")) + text[at:]
    elif roll < 0.12 and text.startswith("{") and len(text) > 2:  # a key given twice
        text = '{"texts":["x"],' + text[1:]
    return text.encode("utf-8", "surrogatepass")
