"""What Linux's /proc says about a process: its resident memory, its CPU time, its children."""

from __future__ import annotations

import math
import os
from pathlib import Path


def rss_bytes(pid: int, *, with_children: bool = True) -> int:
    """Resident memory of a process (Linux /proc), bytes; with its child processes' added by default (a server
    with front-end processes is a supervisor and its children)."""
    total = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total = int(line.split()[1]) * 1024
            break
    else:
        raise RuntimeError(f"no VmRSS for process {pid}")
    if with_children:
        for child in child_processes(pid):
            try:
                total += rss_bytes(child, with_children=False)
            except (OSError, RuntimeError):  # it exited meanwhile
                pass
    return total


def child_processes(pid: int) -> list[int]:
    """Process ids of the processes whose parent is `pid` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def cpu_seconds(pid: int, *, with_children: bool = True) -> float:
    """User + system CPU seconds a process has used so far, its child processes' added by default (NaN when the
    process is gone or this is not Linux)."""
    total = 0.0
    for each in (pid, *(child_processes(pid) if with_children else ())):
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            if each == pid:
                return math.nan
    return total
