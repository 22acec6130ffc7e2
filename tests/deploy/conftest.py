"""Shared fixtures of the deployment tests: the rendered manifests."""

from __future__ import annotations

from typing import Any

import pytest

from deploy.tool import MONITORING, OVERLAYS, render


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """`kubectl kustomize` of each overlay ("cpu", "gpu", "cpu-baked", "cpu-guarded") and of deploy/monitoring
    ("monitoring")."""
    objects = {name: render(path) for name, path in OVERLAYS.items()}
    objects["monitoring"] = render(MONITORING)
    return objects
