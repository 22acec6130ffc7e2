"""A gRPC client that knows nothing of the API it calls: it asks the server (gRPC server reflection) for the
services and message types, and builds requests and reads replies from those descriptors, the way grpcurl does.

    with grpc.insecure_channel("127.0.0.1:50051") as channel:
        client = ReflectionClient(channel)
        client.services()        # ['attnserve.v1.Translator', 'grpc.health.v1.Health', ...]
        client.call("attnserve.v1.Translator/Translate", {"model": "dates", "texts": ["3 mars 1999"]})

`make image-check` drives the serving image with it, so what is checked is what reflection serves, not the stubs
generated in service/gen.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


class ReflectionClient:
    """Calls unary methods named `package.Service/Method` with requests and replies as JSON-like dicts."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._channel = channel
        self._database = ProtoReflectionDescriptorDatabase(channel)
        # A pool of its own, filled only from the server's answers (never from descriptors imported here).
        self._pool = DescriptorPool(self._database)

    def services(self) -> list[str]:
        """The services the server lists through reflection."""
        return sorted(self._database.get_services())

    def method(self, name: str) -> tuple[grpc.UnaryUnaryMultiCallable, type[Any]]:
        """The callable of the unary method `package.Service/Method` and its request message class."""
        service_name, _, method_name = name.partition("/")
        method = self._pool.FindServiceByName(service_name).methods_by_name[method_name]
        if method.client_streaming or method.server_streaming:
            raise ValueError(f"{name} is a streaming method; this client calls unary methods only")
        request_class = message_factory.GetMessageClass(method.input_type)
        reply_class = message_factory.GetMessageClass(method.output_type)
        callable_ = self._channel.unary_unary(
            f"/{service_name}/{method_name}",
            request_serializer=request_class.SerializeToString,
            response_deserializer=reply_class.FromString,
        )
        return callable_, request_class

    def request(self, name: str, fields: dict[str, Any]) -> Any:
        """The request message of `name` with `fields` (proto JSON names or field names)."""
        _, request_class = self.method(name)
        return json_format.ParseDict(fields, request_class())

    def call(self, name: str, fields: dict[str, Any], timeout_s: float = 30.0) -> dict[str, Any]:
        """Call `name` with a request built from `fields`; the reply as a dict (field names as in the .proto,
        fields at their default value included)."""
        callable_, _ = self.method(name)
        return as_dict(callable_(self.request(name, fields), timeout=timeout_s))


def as_dict(message: Any) -> dict[str, Any]:
    """A reply message as a dict, with the .proto's field names and every field, defaults included."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
