"""The event loop a server process runs on (service/event_loop.py, the `event_loop` setting): by default uvloop's
where RPCs are served and asyncio's own in the engine process, either everywhere on request, and the same answers
on every choice."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from service import event_loop
from service.settings import Settings, SettingsError
from tests.service.server_harness import serve_once

needs_uvloop = pytest.mark.skipif(not event_loop.uvloop_installed(), reason="uvloop is not installed (Windows)")


async def _loop_name() -> str:
    return event_loop.running_loop_name()


@needs_uvloop
def test_each_choice_runs_its_loop() -> None:
    import uvloop

    async def loop_type() -> type:
        return type(asyncio.get_running_loop())

    assert event_loop.run(_loop_name(), "uvloop") == "uvloop"
    assert event_loop.run(_loop_name(), "auto") == "uvloop"
    assert event_loop.run(_loop_name(), "asyncio") == "asyncio"
    # The engine process and the supervisor: auto is asyncio's loop there (uvloop measured slower).
    assert event_loop.run(_loop_name(), "auto", serves_rpcs=False) == "asyncio"
    assert event_loop.run(_loop_name(), "uvloop", serves_rpcs=False) == "uvloop"
    assert issubclass(event_loop.run(loop_type(), "uvloop"), uvloop.Loop)
    assert not issubclass(event_loop.run(loop_type(), "asyncio"), uvloop.Loop)


@needs_uvloop
def test_a_run_leaves_the_process_event_loop_policy_alone() -> None:
    policy = asyncio.get_event_loop_policy()
    event_loop.run(_loop_name(), "uvloop")
    assert asyncio.get_event_loop_policy() is policy
    assert asyncio.run(_loop_name()) == "asyncio"


def test_without_uvloop_auto_falls_back_and_uvloop_by_name_is_a_settings_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(event_loop.importlib.util, "find_spec", lambda name, *rest: None)
    assert event_loop.resolved("auto") == "asyncio"
    assert event_loop.run(_loop_name(), "auto") == "asyncio"
    assert Settings(event_loop="auto").event_loop == "auto"
    with pytest.raises(SettingsError, match="event_loop=uvloop, but uvloop is not installed"):
        Settings(event_loop="uvloop")
    with pytest.raises(RuntimeError, match="uvloop is not installed"):
        event_loop.resolved("uvloop")


def test_the_setting_takes_the_three_loops_and_nothing_else() -> None:
    assert Settings().event_loop == "auto"
    assert Settings.from_sources(["--event-loop", "ASYNCIO"], environ={}).event_loop == "asyncio"
    assert Settings.from_sources([], environ={"ATTNSERVE_EVENT_LOOP": "asyncio"}).event_loop == "asyncio"
    with pytest.raises(SettingsError, match="event_loop must be one of auto, uvloop, asyncio"):
        Settings(event_loop="tokio")


@pytest.mark.slow
def test_one_process_says_its_loop_and_answers_the_same_on_both(tiny_repository: Path) -> None:
    on_asyncio, asyncio_output = serve_once(tiny_repository, "--frontends", "0", "--event-loop", "asyncio")
    assert "on asyncio's event loop" in asyncio_output, asyncio_output
    if not event_loop.uvloop_installed():
        return
    on_uvloop, uvloop_output = serve_once(tiny_repository, "--frontends", "0")  # the default: auto
    assert "on uvloop's event loop" in uvloop_output, uvloop_output
    assert on_uvloop == on_asyncio
    assert all(on_asyncio)


@pytest.mark.slow
@needs_uvloop
def test_with_a_front_end_auto_puts_it_on_uvloop_and_the_engine_process_on_asyncio(tiny_repository: Path) -> None:
    # The front-end and the engine process exchange their messages over a Unix socket through each loop's
    # transports: on mixed loops, on one loop, and on the other.
    answers = {}
    for choice, front_end, engine in [("auto", "uvloop", "asyncio"), ("uvloop", "uvloop", "uvloop"), ("asyncio",) * 3]:
        answers[choice], output = serve_once(tiny_repository, "--frontends", "1", "--event-loop", choice)
        assert re.search(rf"front-end process \d+ on {front_end}'s event loop", output), output
        assert re.search(rf"engine process \d+ on {engine}'s event loop", output), output
        assert f"front-ends on {front_end}'s event loop, the engine process on {engine}'s" in output, output
    assert answers["auto"] == answers["uvloop"] == answers["asyncio"]
    assert all(answers["auto"])
