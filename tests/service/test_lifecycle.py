"""onnxruntime's telemetry: off unless the onnxruntime_telemetry setting turns it on. That a server starts quietly
with a home it cannot write (as on a read-only root) is tests/deploy/test_images.py's and `make image-check`'s.
The garbage collector settled before a server process starts."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

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


def test_a_settled_collector_skips_what_the_process_held_and_still_frees_the_cycles_it_makes_later() -> None:
    # In a process of its own: frozen objects are never collected, which this test process must not get.
    script = textwrap.dedent(
        """
        import gc, weakref
        from service.lifecycle import settle_garbage_collector

        class Node:
            pass

        def cycle():
            node = Node()
            node.self = node
            return weakref.ref(node)

        before = cycle()  # already garbage: the collection before the freeze frees it
        settle_garbage_collector()
        assert before() is None
        assert gc.get_freeze_count() > 10_000  # the modules' objects, from the import of service.lifecycle
        assert gc.get_objects() == []  # collections traverse none of them
        after = cycle()
        gc.collect()
        assert after() is None
        print("settled")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout.strip()) == (0, "settled"), done.stderr
