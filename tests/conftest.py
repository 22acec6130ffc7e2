"""Shared fixtures: tiny but really trained models, exported to a real model repository once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtests.smoke import build_smoke_repository


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with tiny trained ``dates`` and ``numbers`` models (version 1 each).

    The same recipe as the smoke runs' models; the training runs sit beside it in ``../runs/NAME``.
    """
    return build_smoke_repository(tmp_path_factory.mktemp("tiny"), log=lambda *_: None)
