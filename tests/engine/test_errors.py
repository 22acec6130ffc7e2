"""The error hierarchy: one status code name per error, decided in service/errors.py only."""

from __future__ import annotations

import pytest

from service.errors import (
    ALL_ERRORS,
    AttnServeError,
    DeadlineExceeded,
    EngineFailure,
    InvalidRequest,
    ModelLoadError,
    ModelNotFound,
    Overloaded,
    RequestCancelled,
    Unauthenticated,
    Unavailable,
    status_code_name,
)

GRPC_STATUS_NAMES = {
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
}


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidRequest, "INVALID_ARGUMENT"),
        (ModelNotFound, "NOT_FOUND"),
        (Overloaded, "RESOURCE_EXHAUSTED"),
        (DeadlineExceeded, "DEADLINE_EXCEEDED"),
        (RequestCancelled, "CANCELLED"),
        (Unavailable, "UNAVAILABLE"),
        (Unauthenticated, "UNAUTHENTICATED"),
        (EngineFailure, "INTERNAL"),
        (ModelLoadError, "FAILED_PRECONDITION"),
    ],
)
def test_each_error_names_its_status(error, code):
    instance = error("beam_size 9 exceeds the maximum 8 for model dates")
    assert isinstance(instance, AttnServeError)
    assert instance.code == code == status_code_name(instance)
    assert instance.message == "beam_size 9 exceeds the maximum 8 for model dates"


def test_every_code_is_a_real_grpc_status_and_everything_else_is_internal():
    assert {error.code for error in ALL_ERRORS} <= GRPC_STATUS_NAMES
    assert status_code_name(ValueError("a bug")) == "INTERNAL"
    assert AttnServeError().message == "AttnServeError"
