"""A small Dockerfile reader for the image tests (hadolint checks the syntax itself)."""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any


def parse_dockerfile(path: Path) -> list[dict[str, Any]]:
    """Stages of a Dockerfile: {"name", "base", "instructions": [(INSTRUCTION, arguments)]}, continuation lines
    joined and comments dropped (enough for the checks below; hadolint checks the syntax)."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):  # comments may also sit between continuation lines
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[dict[str, Any]] = []
    for line in logical:
        instruction, _, arguments = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            parts = arguments.split()
            stages.append({"base": parts[0], "name": parts[2] if len(parts) > 2 else None, "instructions": []})
        elif stages:
            stages[-1]["instructions"].append((instruction, arguments.strip()))
    return stages


def dockerignore_patterns(path: Path) -> list[str]:
    """The patterns of a .dockerignore file (comments and blank lines dropped)."""
    return [
        line.strip() for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]


def is_ignored(relative: str, patterns: list[str]) -> bool:
    """Whether a context path is excluded by .dockerignore patterns (the forms this project uses: plain paths,
    globs, and `**/` prefixes matching at any depth; an excluded folder excludes everything under it)."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        if pattern.startswith("**/"):
            tail = pattern[3:]
            if any(fnmatch.fnmatchcase(part, tail) for part in parts):
                return True
        elif any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
            return True
    return False
