"""Returning memory a process holds but no longer uses: glibc's heap trimmed, onnxruntime's arenas shrunk at a run."""

from __future__ import annotations

import asyncio
import platform
from pathlib import Path

import numpy as np
import pytest

from service.runtime.memory import OWN_MAPPING_BYTES, MemoryReturner, trim_heap, zeros_mapped_apart
from service.runtime.model import OnnxStepModel, load_model

GLIBC = platform.libc_ver()[0] == "glibc"


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_trimming_gives_back_freed_heap_memory_that_glibc_keeps() -> None:
    # 64 MiB in 1 KiB blocks: below glibc's mmap threshold, so they come from the heap. The last one stays
    # allocated, so the heap's top cannot shrink on its own and the freed blocks stay resident until trimmed.
    block, count = 1024, 64 * 1024
    blocks = [bytearray(b"x" * block) for _ in range(count)]
    kept = blocks[-1]
    del blocks
    before = resident_bytes()
    assert trim_heap()
    after = resident_bytes()
    assert before - after >= 32 * 1024 * 1024, (before, after)
    assert kept[0] == ord("x")


@pytest.mark.skipif(not GLIBC, reason="the threshold that moves is glibc's")
def test_a_large_zeroed_array_gives_its_memory_back_as_soon_as_it_is_freed() -> None:
    # A 24 MiB block freed first moves glibc's own mmap threshold up to its size (it follows freed blocks up to 32 MiB):
    # from then on a 16 MiB np.zeros comes from the heap and stays resident once freed.
    np.ones(24 << 20, dtype=np.uint8)
    array = zeros_mapped_apart((4, 4 << 20), np.uint8)
    assert array.shape == (4, 4 << 20) and array.dtype == np.uint8 and not array.any()
    array[:] = 1  # every page resident
    view = array[1:]
    before = resident_bytes()
    del array
    assert resident_bytes() >= before - (1 << 20)  # a view keeps it
    assert view.all()
    del view
    assert before - resident_bytes() >= 15 << 20


def test_small_zeroed_arrays_are_plain_ones() -> None:
    small = zeros_mapped_apart((3, OWN_MAPPING_BYTES // 16), np.float32)  # 3/4 of the size that gets a mapping
    assert small.base is None and small.shape == (3, OWN_MAPPING_BYTES // 16) and not small.any()
    assert zeros_mapped_apart((0, 7), np.float32).shape == (0, 7)


def encode_and_step(model: OnnxStepModel, source_ids: np.ndarray) -> list[np.ndarray]:
    lengths = np.full((source_ids.shape[0],), source_ids.shape[1], dtype=np.int64)
    encoded = model.encode(source_ids, lengths)
    tokens = np.full((source_ids.shape[0],), model.bos_id, dtype=np.int64)
    out = model.step(tokens, lengths, encoded.memory, encoded.state)
    return [*encoded.memory.values(), out.topk_log_probs, out.topk_ids, out.attention, *out.state.values()]


@pytest.mark.slow  # trains models
def test_a_run_that_shrinks_its_arena_answers_as_any_run_and_only_the_next_run_shrinks(tiny_repository: Path) -> None:
    model = load_model(tiny_repository / "dates" / "1", provider="cpu", intra_op_threads=1).step_model
    source_ids = np.array([[7, 8, 9, 10, 2], [11, 12, 13, 14, 2]], dtype=np.int64)
    plain = encode_and_step(model, source_ids)
    model.shrink_arenas_at_next_run()
    shrunk = encode_and_step(model, source_ids)
    assert model.arena_shrinks == 2  # the encoder's run and the decoder's
    again = encode_and_step(model, source_ids)
    assert model.arena_shrinks == 2
    for expected, got, after in zip(plain, shrunk, again, strict=True):
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(after, expected)


@pytest.mark.slow  # trains models
def test_each_round_trims_and_has_the_model_shrink_its_arenas_at_its_next_run(tiny_repository: Path) -> None:
    model = load_model(tiny_repository / "dates" / "1", provider="cpu", intra_op_threads=1).step_model
    source_ids = np.array([[7, 8, 9, 2]], dtype=np.int64)

    async def scenario() -> None:
        ticks: asyncio.Queue[None] = asyncio.Queue()
        waiting = asyncio.Condition()
        waits = 0

        async def sleep(_seconds: float) -> None:  # the returner's wait between rounds, ended by the test
            nonlocal waits
            async with waiting:
                waits += 1
                waiting.notify_all()
            await ticks.get()

        async def until_waiting(count: int) -> None:
            async with waiting:
                await waiting.wait_for(lambda: waits >= count)

        returner = MemoryReturner(10.0, model.shrink_arenas_at_next_run, sleep=sleep)
        returner.start()
        await until_waiting(1)
        encode_and_step(model, source_ids)
        assert (returner.rounds, model.arena_shrinks) == (0, 0)  # nothing before the first interval ends
        for round_ in (1, 2):
            ticks.put_nowait(None)
            await until_waiting(round_ + 1)
            assert returner.rounds == round_
            encode_and_step(model, source_ids)
            assert model.arena_shrinks == 2 * round_
        await returner.stop()

    asyncio.run(scenario())


def test_an_interval_of_zero_starts_no_rounds() -> None:
    async def scenario() -> None:
        returner = MemoryReturner(0.0)
        returner.start()
        await asyncio.sleep(0)
        assert returner.rounds == 0
        await returner.stop()

    asyncio.run(scenario())
