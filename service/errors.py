"""The errors attnserve raises, and the one place that decides which status each one gets.

Every failure a caller can see is an `AttnServeError` subclass whose class attribute `code` names a gRPC
status code as a string ('INVALID_ARGUMENT', ...). The transport layer turns it into
`grpc.StatusCode[error.code]` with one table; nothing below the transport imports grpc, and nothing
else decides statuses. Anything that is not an `AttnServeError` is a bug and becomes INTERNAL there.

Messages are for the client: they say what was wrong and, where there is one, the limit, e.g.
"beam_size 9 exceeds the maximum 8 for model dates".
"""

from __future__ import annotations

from typing import ClassVar


class AttnServeError(Exception):
    """Base of every error attnserve reports to a client; `code` is the gRPC status code's name."""

    code: ClassVar[str] = "INTERNAL"

    @property
    def message(self) -> str:
        """The text for the client (the exception's first argument, or the class name when there is none)."""
        return str(self.args[0]) if self.args else type(self).__name__


class InvalidRequest(AttnServeError):
    """The request can never succeed as sent: a bad value, an empty text, a beam wider than allowed, ..."""

    code = "INVALID_ARGUMENT"


class ModelNotFound(AttnServeError):
    """The request names a model or version the server does not serve."""

    code = "NOT_FOUND"


QUEUE_FULL = "queue_full"
"""Overloaded because the model version's queue holds max_waiting_requests texts."""
QUEUE_WAIT = "queue_wait"
"""Overloaded because the call could not start within max_queue_wait_ms: the texts ahead of it in its model version's
queue (service/engine_client/admission.py)."""
BACKLOG_WAIT = "backlog_wait"
"""Overloaded because the call could not start within max_queue_wait_ms, judged as soon as it was picked up: the
calls picked up before it, still on their way to a model's queue, and the shortest queue (service/dataplane.py)."""
OVERLOAD_REASONS = (QUEUE_FULL, QUEUE_WAIT, BACKLOG_WAIT)


class Overloaded(AttnServeError):
    """The call cannot be taken now; the client may retry later (fail fast rather than queue without bound).

    `reason`: why, one of OVERLOAD_REASONS (a metric label). `retry_after_s`: how long the server expects it takes
    until such a call would be admitted, None when it cannot say; the transports send it as the retry hint (gRPC's
    `grpc-retry-pushback-ms` trailer, HTTP's `Retry-After`).
    """

    code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, *, reason: str = QUEUE_FULL, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s


class DeadlineExceeded(AttnServeError):
    """The request's deadline passed before it finished; it was removed from the batch."""

    code = "DEADLINE_EXCEEDED"


class RequestCancelled(AttnServeError):
    """The request was cancelled (by the client or by its caller) before it finished."""

    code = "CANCELLED"


class Unavailable(AttnServeError):
    """The server or the model is not accepting work now: starting, draining or stopped."""

    code = "UNAVAILABLE"


class Unauthenticated(AttnServeError):
    """The call lacks valid credentials."""

    code = "UNAUTHENTICATED"


class EngineFailure(AttnServeError):
    """The model raised while encoding or decoding this request (the message carries the cause)."""

    code = "INTERNAL"


class ModelLoadError(AttnServeError):
    """A model version in the repository cannot be loaded: missing or malformed files, wrong format.

    FAILED_PRECONDITION rather than INTERNAL: the server works, but the repository is not in the state
    the operation needs, and retrying will not help until someone fixes the files.
    """

    code = "FAILED_PRECONDITION"


ALL_ERRORS: tuple[type[AttnServeError], ...] = (
    AttnServeError,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    DeadlineExceeded,
    RequestCancelled,
    Unavailable,
    Unauthenticated,
    EngineFailure,
    ModelLoadError,
)
"""Every error class, so the transport can check at start-up that its status table covers each `code`."""


_ERROR_BY_CODE: dict[str, type[AttnServeError]] = {
    error.code: error for error in ALL_ERRORS if error is not AttnServeError
}
assert len(_ERROR_BY_CODE) == len(ALL_ERRORS) - 1, "every concrete error class has a status code of its own"


def error_from_status(code: str, message: str) -> AttnServeError:
    """The error that `code` (an AttnServeError.code) and `message` stand for: how an error raised in the engine
    process is raised again in a front-end process. An unknown code is an INTERNAL error."""
    return _ERROR_BY_CODE.get(code, EngineFailure)(message)
