"""The GPU check's preflight: on a machine without a registry, a missing wheel is named before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtests import gpu_check


def test_every_package_the_check_imports_is_installed_in_the_project_environment() -> None:
    assert gpu_check.missing_packages() == []


def test_a_missing_package_stops_the_check_with_its_name_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(gpu_check.NEEDED_MODULES, "attnserve_no_such_module", "no-such-wheel")
    monkeypatch.setitem(gpu_check.NEEDED_MODULES, "no_such_namespace.inner", "no-such-namespace")
    out = tmp_path / "report"
    assert gpu_check.main(["--provider", "cpu", "--out", str(out)]) == 2
    message = capsys.readouterr().err
    assert "missing Python packages: no-such-wheel; no-such-namespace" in message and "docs/gpu.md" in message
    assert not out.exists()
