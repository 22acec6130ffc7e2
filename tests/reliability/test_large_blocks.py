"""Front-end processes map their large blocks apart (service/processes/child.py: map_large_blocks), so memory their
connections' buffers free goes back to the system instead of staying resident in the heap."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# A fresh interpreter per case: the allocator's thresholds are process-wide and only ever move one way.
PROGRAM = textwrap.dedent(
    """
    import ctypes, sys
    from service.processes.child import map_large_blocks

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallinfo2.restype = MallInfo2
    mapped = bool(int(sys.argv[1])) and map_large_blocks()
    libc.free(libc.malloc(4 << 20))  # freeing a 4 MiB block raises glibc's own threshold to 4 MiB
    before = libc.mallinfo2().hblks
    block = libc.malloc(256 << 10)  # a connection buffer's size
    print(mapped, libc.mallinfo2().hblks - before)
    libc.free(block)
    """
)


def run(map_first: bool) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, "1" if map_first else "0"], capture_output=True, text=True, check=False
    )
    if done.returncode != 0 and "mallinfo2" in done.stderr:
        pytest.skip("not glibc 2.33 or later")
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_after_a_large_block_is_freed_a_smaller_large_one_comes_from_the_heap_unless_large_blocks_are_mapped() -> None:
    assert run(map_first=False) == ["False", "0"]
    assert run(map_first=True) == ["True", "1"]
