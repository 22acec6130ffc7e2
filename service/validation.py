"""pydantic's validation errors in our words: shared by the settings and the model.json reader."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError
    from pydantic_core import ErrorDetails


def error_text(detail: ErrorDetails) -> str:
    """The message of a ValueError raised by one of our validators, without pydantic's "Value error, " prefix;
    pydantic's own message for its own checks."""
    raised = (detail.get("ctx") or {}).get("error")
    return str(raised) if raised is not None else detail["msg"]


def problems_text(error: ValidationError, whole: str) -> str:
    """Every problem of a document that failed validation, "field.path: what is wrong" joined by "; " (`whole`
    names the document itself, for a problem of no one field)."""
    return "; ".join(
        f"{'.'.join(str(part) for part in detail['loc']) or whole}: {error_text(detail)}" for detail in error.errors()
    )
