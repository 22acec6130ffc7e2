"""The parts of deploy/images.py that decide what to build from: the Debian mirror of the stand-in base, the
stand-in's tag, the names podman pulls. (Building and running the images is `make image-check`.)"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from deploy.images import DEFAULT_DEBIAN_MIRROR, STANDIN_RECIPE, debian_mirror, qualified, standin_tag


@pytest.fixture(autouse=True)
def _no_mirror_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEBIAN_MIRROR", raising=False)


def test_the_mirror_is_the_first_apt_source_of_the_suite(tmp_path: Path) -> None:
    one_line = tmp_path / "sources.list"
    one_line.write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb http://security.example/debian-security bookworm-security main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian/ bookworm main contrib\n"
    )
    deb822 = tmp_path / "debian.sources"
    deb822.write_text(
        "Types: deb\nURIs: http://disabled.example/debian\nSuites: bookworm\nEnabled: no\n\n"
        "Types: deb-src\nURIs: http://sources.example/debian\nSuites: bookworm\n\n"
        "Types: deb\n# a comment\nURIs: http://other.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n"
    )
    assert debian_mirror("bookworm", [one_line, deb822]) == "http://mirror.example/debian"
    assert debian_mirror("bookworm", [deb822, one_line]) == "http://other.example/debian"
    assert debian_mirror("trixie", [one_line, deb822]) == DEFAULT_DEBIAN_MIRROR
    assert debian_mirror("bookworm", [tmp_path / "missing.list"]) == DEFAULT_DEBIAN_MIRROR


def test_debian_mirror_overrides_the_apt_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    listed = tmp_path / "sources.list"
    listed.write_text("deb http://mirror.example/debian bookworm main\n")
    monkeypatch.setenv("DEBIAN_MIRROR", "http://override.example/debian")
    assert debian_mirror("bookworm", [listed]) == "http://override.example/debian"


def test_the_standin_tag_changes_with_its_recipe() -> None:
    tag = standin_tag()
    assert tag.startswith("localhost/attnserve-python-standin:bookworm-") and tag == standin_tag()
    changed = copy.deepcopy(STANDIN_RECIPE)
    changed["packages"].append("tzdata")
    assert standin_tag(changed) != tag


def test_short_names_are_pulled_from_docker_hub() -> None:
    assert qualified("python:3.11-slim-bookworm") == "docker.io/library/python:3.11-slim-bookworm"
    assert (
        qualified("nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04")
        == "docker.io/nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04"
    )
    assert qualified("registry.example:5000/team/image:1") == "registry.example:5000/team/image:1"
    assert qualified("localhost/attnserve:0.1.0-cpu") == "localhost/attnserve:0.1.0-cpu"
