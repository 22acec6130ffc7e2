"""The GPU check's preflight: on a machine without a registry, a missing wheel is named before anything runs."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from loadtests import gpu_check

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PROJECT_PACKAGES = {"service", "loadtests", "export", "client", "tests"}
# numpy is on the GPU machine already (docs/gpu.md); pydantic_core comes with pydantic, which the check names;
# uvloop may be missing there: the server then runs on asyncio's own loop (event_loop auto, service/event_loop.py).
PRESENT_OR_INSIDE = {"numpy", "pydantic_core", "uvloop"}


def third_party_imports(files: list[Path], *, module_level_only: bool = False) -> dict[str, set[str]]:
    """Top-level modules imported in `files` (in functions too, unless `module_level_only`) that are neither the
    standard library's nor this project's, each with the files that import it."""
    found: dict[str, set[str]] = {}
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body if module_level_only else ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in PROJECT_PACKAGES:
                    found.setdefault(top, set()).add(str(path.relative_to(PROJECT_ROOT)))
    return found


def unnamed(found: dict[str, set[str]], modules: dict[str, str]) -> dict[str, list[str]]:
    named = {module.split(".")[0] for module in modules} | PRESENT_OR_INSIDE
    return {module: sorted(where) for module, where in found.items() if module not in named}


def test_every_package_the_check_imports_is_installed_in_the_project_environment() -> None:
    assert gpu_check.missing_packages() == []
    assert gpu_check.missing_packages(gpu_check.PHRASEBOOK_MODULES) == []


def test_the_check_names_every_package_the_server_the_device_tests_and_its_own_modules_import() -> None:
    # The server runs on the GPU machine from the project's tree and the wheels brought along: a module that
    # NEEDED_MODULES does not name is a wheel nobody brings (aiohttp, msgspec and tabulate were).
    loadtests = PROJECT_ROOT / "loadtests"
    everything_imported = [
        *(PROJECT_ROOT / "service").rglob("*.py"),
        *(PROJECT_ROOT / "tests" / "device").rglob("*.py"),
        PROJECT_ROOT / "tests" / "conftest.py",
        PROJECT_ROOT / "tests" / "service" / "server_harness.py",
        *(loadtests / f"{name}.py" for name in ("gpu_check", "ceiling", "flops", "loadgen", "servers", "workload")),
        PROJECT_ROOT / "export" / "host.py",  # the machine's description
    ]
    # The check imports these for a name or two; their other imports (charts) run only in other tools.
    module_level = [loadtests / "bench.py", loadtests / "report.py"]
    assert unnamed(third_party_imports(everything_imported), gpu_check.NEEDED_MODULES) == {}
    assert unnamed(third_party_imports(module_level, module_level_only=True), gpu_check.NEEDED_MODULES) == {}


def test_with_the_phrasebook_the_check_names_every_package_training_and_export_import() -> None:
    files = [*(PROJECT_ROOT / "export").rglob("*.py"), PROJECT_ROOT / "loadtests" / "phrasebook.py"]
    files.append(PROJECT_ROOT / "loadtests" / "corpus.py")
    modules = {**gpu_check.NEEDED_MODULES, **gpu_check.PHRASEBOOK_MODULES}
    assert unnamed(third_party_imports(files), modules) == {}


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
