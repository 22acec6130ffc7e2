"""The malloc of the server's processes (service/runtime/allocator.py, the `memory_allocator` setting): jemalloc
where it is installed, by `attnserve serve` starting itself again with it preloaded, in place; the C library's on
request or where jemalloc is missing; the same answers on both."""

from __future__ import annotations

import ctypes.util
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from service.runtime import allocator
from service.runtime.allocator import EXEC_MARK, JEMALLOC_CONF, environment_for
from service.settings import Settings, SettingsError
from tests.service.server_harness import serve_once

LIBRARY = "libjemalloc.so.2"

needs_jemalloc = pytest.mark.skipif(
    allocator.jemalloc_library() is None, reason="jemalloc is not installed (Debian: libjemalloc2)"
)


def test_jemalloc_goes_first_in_the_preload_and_the_users_own_options_stay() -> None:
    assert environment_for("auto", {"PATH": "/bin"}, LIBRARY) == {
        "PATH": "/bin",
        "LD_PRELOAD": LIBRARY,
        "MALLOC_CONF": JEMALLOC_CONF,
        EXEC_MARK: "1",
    }
    theirs = {"LD_PRELOAD": "/opt/their.so other.so", "MALLOC_CONF": "narenas:2"}
    assert environment_for("jemalloc", theirs, LIBRARY) == {
        "LD_PRELOAD": f"{LIBRARY}:/opt/their.so:other.so",
        "MALLOC_CONF": "narenas:2",
        EXEC_MARK: "1",
    }


def test_nothing_changes_on_the_system_malloc_once_preloaded_or_once_tried() -> None:
    assert environment_for("system", {}, LIBRARY) is None
    assert environment_for("auto", {"LD_PRELOAD": f"/x.so:{LIBRARY}"}, LIBRARY) is None
    # A server that started itself again never does so twice, even if the loader refused the preload.
    assert environment_for("jemalloc", {EXEC_MARK: "1"}, LIBRARY) is None


def test_without_jemalloc_auto_keeps_the_system_malloc_and_jemalloc_by_name_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert environment_for("auto", {}, None) is None
    with pytest.raises(RuntimeError, match="jemalloc is not installed"):
        environment_for("jemalloc", {}, None)
    # The settings say so before anything starts.
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    with pytest.raises(SettingsError, match=r"memory_allocator=jemalloc, but jemalloc is not installed"):
        Settings(memory_allocator="jemalloc")
    assert Settings(memory_allocator="auto").memory_allocator == "auto"


def test_the_setting_takes_the_three_choices_and_nothing_else() -> None:
    assert Settings().memory_allocator == "auto"
    assert Settings.from_sources(["--memory-allocator", "SYSTEM"], environ={}).memory_allocator == "system"
    assert Settings.from_sources([], environ={"ATTNSERVE_MEMORY_ALLOCATOR": "system"}).memory_allocator == "system"
    with pytest.raises(SettingsError, match="memory_allocator must be one of auto, jemalloc, system"):
        Settings(memory_allocator="tcmalloc")


def _maps_jemalloc(pid: int) -> bool:
    return "libjemalloc" in Path(f"/proc/{pid}/maps").read_text()


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()]


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

    on_jemalloc, output = serve_once(tiny_repository, "--frontends", "0", while_serving=look("auto"))
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
        for child in _children(process.pid):
            role = "engine" if "service.processes engine" in " ".join(_command_line(child)) else "front-end"
            processes[role] = _maps_jemalloc(child)

    texts, output = serve_once(tiny_repository, "--frontends", "1", while_serving=inspect)
    assert processes == {"supervisor": True, "front-end": True, "engine": True}
    assert re.search(r"front-end process \d+ on \w+'s event loop and jemalloc's malloc", output), output
    assert re.search(r"engine process \d+ on \w+'s event loop and jemalloc's malloc", output), output
    assert all(texts)


def _command_line(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
