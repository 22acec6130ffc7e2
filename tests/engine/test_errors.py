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
    error_from_status,
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
def test_each_error_names_its_status_and_is_raised_again_from_it(error, code):
    instance = error("beam_size 9 exceeds the maximum 8 for model dates")
    assert isinstance(instance, AttnServeError)
    assert instance.code == code
    assert instance.message == "beam_size 9 exceeds the maximum 8 for model dates"
    # How an error raised in the engine process reaches a front-end process: as its status and message.
    again = error_from_status(instance.code, instance.message)
    assert type(again) is error and again.message == instance.message


def test_every_code_is_a_real_grpc_status_and_an_unknown_one_is_internal():
    assert {error.code for error in ALL_ERRORS} <= GRPC_STATUS_NAMES
    assert type(error_from_status("DATA_LOSS", "?")) is EngineFailure
    assert AttnServeError().message == "AttnServeError"
