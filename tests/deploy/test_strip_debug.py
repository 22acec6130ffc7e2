"""deploy/docker/strip_debug.py, which the images' install step runs: a shared object without its debug sections
still loads and works, and files it does not handle are left as they are."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("strip_debug", PROJECT_ROOT / "deploy" / "docker" / "strip_debug.py")
assert spec is not None and spec.loader is not None
strip_debug = importlib.util.module_from_spec(spec)
spec.loader.exec_module(strip_debug)

uvloop_spec = importlib.util.find_spec("uvloop")
needs_uvloop = pytest.mark.skipif(uvloop_spec is None, reason="uvloop is not installed")


@needs_uvloop
def test_uvloop_without_its_debug_sections_is_smaller_and_still_runs_a_loop(tmp_path: Path) -> None:
    assert uvloop_spec is not None and uvloop_spec.origin is not None
    package = tmp_path / "site" / "uvloop"
    shutil.copytree(Path(uvloop_spec.origin).parent, package)
    (module,) = package.glob("loop.*.so")
    before = module.read_bytes()

    files, saved = strip_debug.strip_tree(tmp_path / "site")

    after = module.read_bytes()
    assert files == 1 and saved == len(before) - len(after) > len(before) // 2  # the wheel's is mostly DWARF
    assert strip_debug.stripped(after) is None  # no debug section left
    program = (
        "import sys; sys.path.insert(0, sys.argv[1]); import asyncio, uvloop\n"
        "async def main():\n"
        "    await asyncio.sleep(0)\n"
        "    return type(asyncio.get_running_loop()).__module__\n"
        "print(uvloop.__file__, asyncio.Runner(loop_factory=uvloop.new_event_loop).run(main()))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program, str(tmp_path / "site")], capture_output=True, text=True, check=True
    )
    where, loop_module = result.stdout.split()
    assert where.startswith(str(package)) and loop_module == "uvloop"


def test_files_it_does_not_handle_are_left_alone(tmp_path: Path) -> None:
    not_elf = tmp_path / "notes.so"
    not_elf.write_bytes(b"not an ELF file at all")
    big_endian = tmp_path / "other.so"
    big_endian.write_bytes(b"\x7fELF\x02\x02" + bytes(100))
    assert strip_debug.strip_tree(tmp_path) == (0, 0)
    assert not_elf.read_bytes() == b"not an ELF file at all"
    assert strip_debug.stripped(big_endian.read_bytes()) is None
