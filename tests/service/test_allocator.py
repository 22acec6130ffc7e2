"""The malloc of the server's processes (service/runtime/allocator.py, the `memory_allocator` setting): jemalloc
where it is installed, by `attnserve serve` starting itself again with it preloaded, in place; the C library's on
request or where jemalloc is missing; the same answers on both."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from loadtests.procfs import child_processes
from service import settings as settings_module
from service.runtime import allocator
from service.runtime.allocator import EXEC_MARK, JEMALLOC_CONF, environment_for
from service.settings import Settings, SettingsError
from tests.service.server_harness import PROJECT_ROOT, serve_once

needs_jemalloc = pytest.mark.skipif(
    allocator.jemalloc_library() is None, reason="jemalloc is not installed (Debian: libjemalloc2)"
)


LIBRARY = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"


def test_jemalloc_goes_last_in_the_preload_and_the_users_own_options_stay() -> None:
    assert environment_for("auto", {"PATH": "/bin"}, LIBRARY) == {
        "PATH": "/bin",
        "LD_PRELOAD": LIBRARY,
        "MALLOC_CONF": JEMALLOC_CONF,
        EXEC_MARK: "1",
    }
    # What the user preloads comes first (a memory profiler sees every call and passes it on to jemalloc).
    theirs = {"LD_PRELOAD": "/opt/profiler.so other.so", "MALLOC_CONF": "narenas:2"}
    assert environment_for("jemalloc", theirs, LIBRARY) == {
        "LD_PRELOAD": f"/opt/profiler.so:other.so:{LIBRARY}",
        "MALLOC_CONF": "narenas:2",
        EXEC_MARK: "1",
    }


def test_nothing_changes_on_the_system_malloc_or_where_jemalloc_is_preloaded_already() -> None:
    assert environment_for("system", {}, LIBRARY) is None
    assert environment_for("auto", {"LD_PRELOAD": "/x.so:libjemalloc.so.2"}, LIBRARY) is None
    assert environment_for("jemalloc", {"LD_PRELOAD": "/elsewhere/libjemalloc.so.2"}, LIBRARY) is None


def test_without_jemalloc_auto_keeps_the_system_malloc_and_jemalloc_by_name_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert environment_for("auto", {}, None) is None
    with pytest.raises(RuntimeError, match="jemalloc is not installed"):
        environment_for("jemalloc", {}, None)
    # The settings say so before anything starts (a machine without the library).
    monkeypatch.setattr(settings_module, "jemalloc_library", lambda: None)
    with pytest.raises(SettingsError, match=r"memory_allocator=jemalloc, but jemalloc is not installed"):
        Settings(memory_allocator="jemalloc")
    assert Settings(memory_allocator="auto").memory_allocator == "auto"


def test_the_setting_takes_the_three_choices_and_nothing_else() -> None:
    assert Settings().memory_allocator == "auto"
    assert Settings.from_sources(["--memory-allocator", "SYSTEM"], environ={}).memory_allocator == "system"
    assert Settings.from_sources([], environ={"ATTNSERVE_MEMORY_ALLOCATOR": "system"}).memory_allocator == "system"
    with pytest.raises(SettingsError, match="memory_allocator must be one of auto, jemalloc, system"):
        Settings(memory_allocator="tcmalloc")


class _Exec:
    """Stands in for os.execve (which would replace the test's process): records what it was asked, or fails."""

    def __init__(self, error: OSError | None = None) -> None:
        self.calls: list[tuple[str, list[str], dict[str, str]]] = []
        self.error = error

    def __call__(self, path: str, args: list[str], env: dict[str, str]) -> None:
        self.calls.append((path, args, env))
        if self.error is not None:
            raise self.error


@pytest.fixture
def on_the_system_malloc(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    if allocator.jemalloc_active():
        pytest.skip("this test process already runs on jemalloc")
    monkeypatch.setattr(allocator, "jemalloc_library", lambda: LIBRARY)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("MALLOC_CONF", raising=False)
    monkeypatch.delenv(EXEC_MARK, raising=False)
    return monkeypatch


def test_the_command_starts_again_with_its_own_arguments_and_jemalloc_preloaded(
    on_the_system_malloc: pytest.MonkeyPatch,
) -> None:
    execve = _Exec()
    on_the_system_malloc.setattr(os, "execve", execve)
    on_the_system_malloc.setattr(
        sys, "orig_argv", ["python3", "-X", "dev", "/venv/bin/attnserve", "serve", "--port", "1"]
    )
    allocator.exec_with_allocator("auto")
    [(path, args, env)] = execve.calls
    assert path == sys.executable
    assert args == [sys.executable, "-X", "dev", "/venv/bin/attnserve", "serve", "--port", "1"]
    assert (env["LD_PRELOAD"], env["MALLOC_CONF"], env[EXEC_MARK]) == (LIBRARY, JEMALLOC_CONF, "1")
    allocator.exec_with_allocator("system")
    assert len(execve.calls) == 1


def test_a_preload_that_did_not_take_is_said_and_never_tried_twice(
    on_the_system_malloc: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    execve = _Exec()
    on_the_system_malloc.setattr(os, "execve", execve)
    on_the_system_malloc.setenv(EXEC_MARK, "1")  # as the process finds it after starting itself again
    with caplog.at_level(logging.WARNING, logger=allocator.__name__):
        allocator.exec_with_allocator("auto")
    assert execve.calls == []
    assert EXEC_MARK not in os.environ  # taken out, so that nothing this process starts inherits it
    assert "is not this process's malloc: serving on the malloc the process has" in caplog.text
    on_the_system_malloc.setenv(EXEC_MARK, "1")
    with pytest.raises(allocator.AllocatorError, match="is not this process's malloc"):
        allocator.exec_with_allocator("jemalloc")


def test_an_exec_that_fails_leaves_auto_on_the_system_malloc_and_fails_jemalloc_by_name(
    on_the_system_malloc: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    on_the_system_malloc.setattr(os, "execve", _Exec(PermissionError(13, "Permission denied")))
    with caplog.at_level(logging.WARNING, logger=allocator.__name__):
        allocator.exec_with_allocator("auto")
    assert "could not start the server again with jemalloc preloaded" in caplog.text
    with pytest.raises(allocator.AllocatorError, match="Permission denied"):
        allocator.exec_with_allocator("jemalloc")


SYSTEM_PYTHON = Path("/usr/bin/python3")
"""Debian's interpreter, where there is one: a program that is not position-independent, in which `malloc`
resolves to the program's own stub (so an address comparison would say jemalloc is not active)."""


@needs_jemalloc
@pytest.mark.parametrize(
    "interpreter",
    [
        pytest.param(sys.executable, id="this-interpreter"),
        pytest.param(
            str(SYSTEM_PYTHON),
            id="debian-python3",
            marks=pytest.mark.skipif(not SYSTEM_PYTHON.is_file(), reason="no /usr/bin/python3"),
        ),
    ],
)
def test_jemalloc_is_told_active_only_where_it_is_the_processs_malloc(interpreter: str) -> None:
    library = allocator.jemalloc_library()
    assert library is not None
    # Imports only the standard library, so any Python 3.11+ runs it from the project's root.
    probe = [interpreter, "-c", "from service.runtime.allocator import jemalloc_active; print(jemalloc_active())"]
    environment = {key: value for key, value in os.environ.items() if key != "LD_PRELOAD"}
    plain = subprocess.run(probe, env=environment, capture_output=True, text=True, check=True, cwd=PROJECT_ROOT)
    preloaded = subprocess.run(
        probe, env={**environment, "LD_PRELOAD": library}, capture_output=True, text=True, check=True, cwd=PROJECT_ROOT
    )
    assert (plain.stdout.strip(), preloaded.stdout.strip()) == ("False", "True")


AUTO = ("--memory-allocator", "auto")
"""Said outright, so that an ATTNSERVE_MEMORY_ALLOCATOR in the test run's environment does not decide."""


def _maps_jemalloc(pid: int) -> bool:
    return "libjemalloc" in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.slow
@needs_jemalloc
def test_one_process_starts_itself_again_on_jemalloc_in_place_and_answers_as_on_the_system_malloc(
    tiny_repository: Path,
) -> None:
    mapped: dict[str, bool] = {}

    def look(choice: str) -> Callable[[subprocess.Popen[bytes]], None]:
        def inspect(process: subprocess.Popen[bytes]) -> None:
            # The pid the test started is the server's: it started itself again in place (execve).
            mapped[choice] = _maps_jemalloc(process.pid)

        return inspect

    on_jemalloc, output = serve_once(tiny_repository, *AUTO, "--frontends", "0", while_serving=look("auto"))
    assert "and jemalloc's malloc" in output, output
    flags = ("--frontends", "0", "--memory-allocator", "system")
    on_system, system_output = serve_once(tiny_repository, *flags, while_serving=look("system"))
    assert "and the C library's malloc" in system_output, system_output
    assert mapped == {"auto": True, "system": False}
    assert on_jemalloc == on_system
    assert all(on_jemalloc)


@pytest.mark.slow
@needs_jemalloc
def test_the_supervisor_front_ends_and_engine_process_all_run_on_jemalloc(tiny_repository: Path) -> None:
    processes: dict[str, bool] = {}

    def inspect(process: subprocess.Popen[bytes]) -> None:
        processes["supervisor"] = _maps_jemalloc(process.pid)
        for child in child_processes(process.pid):
            role = "engine" if "service.processes engine" in " ".join(_command_line(child)) else "front-end"
            processes[role] = _maps_jemalloc(child)

    texts, output = serve_once(tiny_repository, *AUTO, "--frontends", "1", while_serving=inspect)
    assert processes == {"supervisor": True, "front-end": True, "engine": True}
    assert re.search(r"front-end process \d+ on \w+'s event loop and jemalloc's malloc", output), output
    assert re.search(r"engine process \d+ on \w+'s event loop and jemalloc's malloc", output), output
    assert all(texts)


def _command_line(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
