"""The OpenAPI 3.1 document of the HTTP port, served at /openapi.json.

The native API's schemas are derived from the protobuf descriptors (protos/ is the source of truth), in the JSON
mapping the server writes (lowerCamelCase names; requests may use the proto names too); the KServe v2 schemas
follow the protocol's REST specification; the parameters and tensors come from service/kserve.py, so the document
cannot drift from what the server accepts.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from service.gen.attnserve.v1 import translator_pb2 as pb
from service.kserve import MODEL_INPUTS, MODEL_OUTPUTS, REQUEST_PARAMETERS, STREAM_ONLY_PARAMETERS, server_version

_SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0, "maximum": 2**32 - 1},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number", "format": "float"},
    FieldDescriptor.TYPE_DOUBLE: {"type": "number", "format": "double"},
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _field_schema(field: FieldDescriptor, schemas: dict[str, Any]) -> dict[str, Any]:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        entry = field.message_type
        if entry.GetOptions().map_entry:
            return {"type": "object", "additionalProperties": _field_schema(entry.fields_by_name["value"], schemas)}
        _message_schema(entry, schemas)
        item: dict[str, Any] = _ref(entry.name)
    else:
        item = dict(_SCALARS[field.type])
    return {"type": "array", "items": item} if field.is_repeated else item


def _message_schema(descriptor: Descriptor, schemas: dict[str, Any]) -> None:
    """Add the schema of `descriptor`, and of every message it contains, to `schemas` (once each)."""
    if descriptor.name in schemas:
        return
    schemas[descriptor.name] = {}  # placeholder: a message may refer to itself
    schemas[descriptor.name] = {
        "type": "object",
        "description": f"attnserve.v1.{descriptor.name} in protobuf's JSON mapping (protos/attnserve/v1).",
        "properties": {field.json_name: _field_schema(field, schemas) for field in descriptor.fields},
    }


def _v2_schemas() -> dict[str, Any]:
    parameter_value = {"type": ["boolean", "number", "string"]}
    parameters = {"type": "object", "additionalProperties": parameter_value}
    tensor_metadata = {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string"},
            "datatype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
        },
    }
    request_parameters = {
        "type": "object",
        "description": "Decoding options and protocol parameters; any other name is refused. "
        + "; ".join(
            f"{name}: {meaning}" for name, meaning in REQUEST_PARAMETERS.items() if name not in STREAM_ONLY_PARAMETERS
        )
        + "; binary_data_output: bool, every output in binary (Triton's binary tensor data extension).",
        "additionalProperties": parameter_value,
    }
    return {
        "ErrorResponse": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {"type": "string", "description": "What was wrong, and the limit where there is one."},
                "code": {"type": "string", "description": "The gRPC status of the same outcome, e.g. NOT_FOUND."},
            },
        },
        "ServerMetadataResponse": {
            "type": "object",
            "required": ["name", "version", "extensions"],
            "properties": {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "extensions": {"type": "array", "items": {"type": "string"}},
            },
        },
        "LiveResponse": {"type": "object", "required": ["live"], "properties": {"live": {"type": "boolean"}}},
        "ReadyResponse": {"type": "object", "required": ["ready"], "properties": {"ready": {"type": "boolean"}}},
        "ModelReadyResponse": {
            "type": "object",
            "required": ["name", "ready"],
            "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}},
        },
        "TensorMetadata": tensor_metadata,
        "ModelMetadataResponse": {
            "type": "object",
            "required": ["name", "platform", "inputs", "outputs"],
            "properties": {
                "name": {"type": "string"},
                "versions": {"type": "array", "items": {"type": "string"}},
                "platform": {"type": "string"},
                "inputs": {"type": "array", "items": _ref("TensorMetadata")},
                "outputs": {"type": "array", "items": _ref("TensorMetadata")},
            },
        },
        "InferenceRequest": {
            "type": "object",
            "required": ["inputs"],
            "additionalProperties": False,
            "properties": {
                "id": {"type": "string"},
                "parameters": request_parameters,
                "inputs": {
                    "type": "array",
                    "description": "One input: "
                    + ", ".join(spec.describe() for spec in MODEL_INPUTS)
                    + ", data: the texts as strings.",
                    "items": {
                        "type": "object",
                        "required": ["name", "shape", "datatype"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string"},
                            "shape": {"type": "array", "items": {"type": "integer"}},
                            "datatype": {"type": "string"},
                            "parameters": parameters,
                            "data": {"type": "array"},
                        },
                    },
                },
                "outputs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": False,
                        "properties": {"name": {"type": "string"}, "parameters": parameters},
                    },
                },
            },
        },
        "InferenceResponse": {
            "type": "object",
            "required": ["model_name", "outputs"],
            "properties": {
                "model_name": {"type": "string"},
                "model_version": {"type": "string"},
                "id": {"type": "string"},
                "parameters": parameters,
                "outputs": {
                    "type": "array",
                    "description": "Of "
                    + ", ".join(spec.describe() for spec in MODEL_OUTPUTS)
                    + "; [n, k] with num_hypotheses k > 1. A score of -inf (a row its beam could not fill) is null.",
                    "items": {
                        "type": "object",
                        "required": ["name", "datatype", "shape"],
                        "properties": {
                            "name": {"type": "string"},
                            "datatype": {"type": "string"},
                            "shape": {"type": "array", "items": {"type": "integer"}},
                            "parameters": parameters,
                            "data": {"type": "array", "items": {"type": ["string", "number", "null"]}},
                        },
                    },
                },
            },
        },
    }


def _json_content(schema: str) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(schema)}}


def _responses(ok: str, ok_schema: str, *errors: int) -> dict[str, Any]:
    reasons = {
        400: "Invalid request",
        401: "No valid bearer token",
        404: "Unknown model or version",
        408: "The body did not arrive in time",
        413: "Body over the size limit",
        415: "Wrong content type",
        429: "The model's queue is full; retry later",
        503: "Not ready, or draining",
        504: "The request's deadline passed",
    }
    responses: dict[str, Any] = {"200": {"description": ok, "content": _json_content(ok_schema)}}
    for status in errors:
        responses[str(status)] = {"description": reasons[status], "content": _json_content("ErrorResponse")}
    return responses


def _model_path(operation: dict[str, Any], versioned: bool) -> dict[str, Any]:
    parameters = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
    if versioned:
        parameters.append({"name": "version", "in": "path", "required": True, "schema": {"type": "string"}})
    return {**operation, "parameters": parameters}


def openapi_document() -> dict[str, Any]:
    """The document, as a JSON-ready dict."""
    schemas = _v2_schemas()
    for message in (pb.TranslateRequest, pb.TranslateResponse, pb.TranslateStreamResponse, pb.ListModelsResponse):
        _message_schema(message.DESCRIPTOR, schemas)
    _message_schema(pb.ModelInfo.DESCRIPTOR, schemas)
    call_errors = (400, 401, 404, 408, 413, 415, 429, 503, 504)

    def v2_model(suffix: str, operation: dict[str, Any]) -> dict[str, Any]:
        return {
            f"/v2/models/{{name}}{suffix}": _model_path(operation, versioned=False),
            f"/v2/models/{{name}}/versions/{{version}}{suffix}": _model_path(operation, versioned=True),
        }

    paths: dict[str, Any] = {
        "/v1/translate": {
            "post": {
                "summary": "Translate texts (attnserve.v1.Translator/Translate)",
                "requestBody": {"required": True, "content": _json_content("TranslateRequest")},
                "responses": _responses("The translations", "TranslateResponse", *call_errors),
            }
        },
        "/v1/translate:stream": {
            "post": {
                "summary": "Translate one text, streamed as server-sent events (TranslateStream)",
                "description": "Each event's data is a TranslateStreamResponse; the last one has final=true. An "
                "error after the first event comes as `event: error` with an ErrorResponse.",
                "requestBody": {"required": True, "content": _json_content("TranslateRequest")},
                "responses": {
                    "200": {
                        "description": "Server-sent events",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    **{
                        key: value
                        for key, value in _responses("", "ErrorResponse", *call_errors).items()
                        if key != "200"
                    },
                },
            }
        },
        "/v1/models": {
            "get": {
                "summary": "Every model of the repository (ListModels)",
                "responses": _responses("The models", "ListModelsResponse", 401),
            }
        },
        "/v1/models/{name}": _model_path(
            {
                "get": {
                    "summary": "One model (GetModel)",
                    "responses": _responses("The model", "ModelInfo", 400, 401, 404),
                }
            },
            versioned=False,
        ),
        "/v1/models/{name}/versions/{version}": _model_path(
            {
                "get": {
                    "summary": "One model version (GetModel)",
                    "responses": _responses("The model version", "ModelInfo", 400, 401, 404),
                }
            },
            versioned=True,
        ),
        "/v2": {
            "get": {
                "summary": "Server metadata (KServe v2)",
                "responses": _responses("The server", "ServerMetadataResponse", 401),
            }
        },
        "/v2/health/live": {
            "get": {"summary": "Liveness (no token needed)", "responses": _responses("Live", "LiveResponse")}
        },
        "/v2/health/ready": {
            "get": {
                "summary": "Readiness: every model has a loaded version and the server is not draining (no token "
                "needed)",
                "responses": {
                    "200": {"description": "Ready", "content": _json_content("ReadyResponse")},
                    "503": {"description": "Not ready", "content": _json_content("ReadyResponse")},
                },
            }
        },
        **v2_model(
            "",
            {
                "get": {
                    "summary": "Model metadata (KServe v2)",
                    "responses": _responses("The model", "ModelMetadataResponse", 400, 401, 404),
                }
            },
        ),
        **v2_model(
            "/ready",
            {
                "get": {
                    "summary": "Model readiness (KServe v2)",
                    "responses": {
                        "200": {"description": "Ready", "content": _json_content("ModelReadyResponse")},
                        "503": {"description": "Not ready", "content": _json_content("ModelReadyResponse")},
                        "400": {"description": "Malformed name", "content": _json_content("ErrorResponse")},
                        "401": {"description": "No valid bearer token", "content": _json_content("ErrorResponse")},
                    },
                }
            },
        ),
        **v2_model(
            "/infer",
            {
                "post": {
                    "summary": "Inference (KServe v2): TEXT in, TRANSLATION and SCORE out",
                    "requestBody": {
                        "required": True,
                        "content": {
                            **_json_content("InferenceRequest"),
                            "application/octet-stream": {
                                "schema": {
                                    "type": "string",
                                    "format": "binary",
                                    "description": "Triton's binary tensor data extension: the JSON request, then "
                                    "the binary data; the header Inference-Header-Content-Length gives the JSON's "
                                    "length.",
                                },
                            },
                        },
                    },
                    "responses": _responses("The outputs", "InferenceResponse", *call_errors),
                }
            },
        ),
    }
    bearer: dict[str, list[str]] = {"bearer": []}
    for path, item in paths.items():
        for key, operation in item.items():
            if key != "parameters" and not path.startswith("/v2/health/"):
                operation["security"] = [bearer, {}]  # a token when the server is configured with tokens
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "attnserve",
            "version": server_version(),
            "description": "Translate with attention-based sequence-to-sequence models: the native API as JSON "
            "(protobuf's JSON mapping of attnserve.v1) and the KServe v2 inference protocol over REST.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
