"""pydantic's validation errors in our words: shared by the settings and the model.json reader."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails


def error_text(detail: ErrorDetails) -> str:
    """The message of a ValueError raised by one of our validators, without pydantic's "Value error, " prefix;
    pydantic's own message for its own checks."""
    raised = (detail.get("ctx") or {}).get("error")
    return str(raised) if raised is not None else detail["msg"]
