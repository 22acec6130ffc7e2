"""Shared fixtures: tiny but really trained models, exported to a real model repository once per session, and
a real server on them (with a channel and a Translator stub) per test module.

A module that needs other server settings overrides `server_settings`; one that needs its own kind of
server (another scope, another repository) defines `server`, and `channel` and `stub` follow it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

# onnxruntime's telemetry is off in the servers (the onnxruntime_telemetry setting); the tests that load models
# in-process turn it off too, before anything imports onnxruntime.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from loadtests.smoke import build_smoke_repository  # noqa: E402
from service.gen.attnserve.v1 import translator_pb2_grpc as pb_grpc
from service.settings import Settings
from tests.service.server_harness import ServerThread, make_settings


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with tiny trained ``dates`` and ``numbers`` models (version 1 each).

    The same recipe as the smoke runs' models; the training runs sit beside it in ``../runs/NAME``.
    """
    return build_smoke_repository(tmp_path_factory.mktemp("tiny"), log=lambda *_: None)


@pytest.fixture(scope="module")
def server_settings(tiny_repository: Path) -> Settings:
    """The settings of the module's `server`: the tiny repository on free loopback ports."""
    return make_settings(tiny_repository)


@pytest.fixture(scope="module")
def server(server_settings: Settings) -> Iterator[ServerThread]:
    """A real server (in-process, on its own event loop) for the module; it must drain cleanly."""
    running = ServerThread(server_settings).start()
    yield running
    assert running.stop() == 0


@pytest.fixture(scope="module")
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as opened:
        yield opened


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.TranslatorStub:
    return pb_grpc.TranslatorStub(channel)
