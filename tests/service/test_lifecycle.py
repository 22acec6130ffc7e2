"""onnxruntime's telemetry: off unless the onnxruntime_telemetry setting turns it on. That a server starts quietly
with a home it cannot write (as on a read-only root) is tests/deploy/test_images.py's and `make image-check`'s."""

from __future__ import annotations

import os

import pytest

from service.lifecycle import configure_onnxruntime_telemetry
from service.settings import Settings


def test_the_setting_is_off_unless_turned_on() -> None:
    assert Settings.from_sources([], {}).onnxruntime_telemetry is False
    assert Settings.from_sources([], {"ATTNSERVE_ONNXRUNTIME_TELEMETRY": "true"}).onnxruntime_telemetry is True
    assert Settings.from_sources(["--onnxruntime-telemetry", "true"], {}).onnxruntime_telemetry is True


def test_off_sets_onnxruntimes_variable_for_this_process_and_its_children(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORT_DISABLE_TELEMETRY", raising=False)
    configure_onnxruntime_telemetry(True)
    assert "ORT_DISABLE_TELEMETRY" not in os.environ  # on: onnxruntime's own default
    configure_onnxruntime_telemetry(False)
    assert os.environ["ORT_DISABLE_TELEMETRY"] == "1"
