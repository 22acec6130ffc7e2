"""A missing prometheus/promtool skips a test on a developer's machine but fails it in CI (CI=true)."""

from __future__ import annotations

import pytest

from tests.deploy import binaries


def test_missing_binary_skips_outside_ci_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(binaries, "find_tool", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="promtool is not installed .*make prometheus-tools"):
        binaries.require_binary("promtool")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        binaries.require_binary("promtool")


def test_present_binary_is_returned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(binaries, "find_tool", lambda name: f"/opt/bin/{name}")
    monkeypatch.setenv("CI", "true")
    assert binaries.require_binary("prometheus") == "/opt/bin/prometheus"
