"""The model repository on disk: ``ROOT/NAME/VERSION/model.json`` (docs/model-format.md).

Names come from clients, so they are checked against a strict pattern *before* any path is built:
a name with a path separator, ``..`` or anything else unusual never reaches the filesystem.
"""

from __future__ import annotations

import re
from pathlib import Path

MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
VERSION_PATTERN = re.compile(r"[1-9][0-9]{0,8}")


def is_valid_model_name(name: str) -> bool:
    """True for names like ``dates`` or ``en-de.v2``; false for ``..``, ``a/b``, empty or over 64 characters."""
    return bool(MODEL_NAME_PATTERN.fullmatch(name)) and ".." not in name


def is_valid_version(version: str) -> bool:
    return bool(VERSION_PATTERN.fullmatch(version))


def version_directory(root: Path, name: str, version: int) -> Path:
    """``root/name/version`` for an already validated name; raises ValueError otherwise."""
    if not is_valid_model_name(name) or version < 1:
        raise ValueError(f"invalid model name {name!r} or version {version}")
    return Path(root) / name / str(version)


def discover(root: Path) -> dict[str, list[int]]:
    """Every ``NAME -> [versions, ascending]`` in the repository that has a ``model.json``.

    Directories with other names (hidden ones such as an export in progress, ``tmp-*``) are ignored;
    a missing repository is an empty one.
    """
    root = Path(root)
    found: dict[str, list[int]] = {}
    if not root.is_dir():
        return found
    for model_dir in sorted(root.iterdir()):
        if not model_dir.is_dir() or not is_valid_model_name(model_dir.name):
            continue
        versions = sorted(
            int(v.name)
            for v in model_dir.iterdir()
            if v.is_dir() and is_valid_version(v.name) and (v / "model.json").is_file()
        )
        if versions:
            found[model_dir.name] = versions
    return found


def next_version(root: Path, name: str) -> int:
    """The version number a new export of ``name`` gets: one past the highest on disk."""
    model_dir = Path(root) / name
    if not model_dir.is_dir():
        return 1
    versions = [int(v.name) for v in model_dir.iterdir() if v.is_dir() and is_valid_version(v.name)]
    return max(versions, default=0) + 1
