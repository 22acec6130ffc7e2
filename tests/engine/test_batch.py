"""The decode batch: rows and slots on admission, holes on retirement filled by admissions or compaction,
memory in place and its buckets."""

from __future__ import annotations

import math

import numpy as np

from service.engine import EngineRequest
from service.engine.batch import DecodeBatch, bucketed

from .fakes import BOS, make_request


def admissions(*requests: tuple[int, int, int], attention: bool = False) -> list[tuple[int, EngineRequest]]:
    """New (key, request) pairs from (key, beam, source length), each wanting 4 tokens and 1 hypothesis."""
    return [
        (key, make_request(np.arange(4, 4 + length), beam=beam, max_length=4, attention=attention))
        for key, beam, length in requests
    ]


def encoded(*requests: tuple[int, int, float]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Encoder outputs for (key, length, fill) requests: memory `fill` within each length and 9.0 (padding the
    batch must not keep) beyond it, shape [B, longest, 2]; state [[key]]."""
    longest = max(length for _, length, _ in requests)
    memory = np.full((len(requests), longest, 2), 9.0, dtype=np.float32)
    for row, (_, length, fill) in enumerate(requests):
        memory[row, :length] = fill
    state = np.array([[float(key)] for key, _, _ in requests], dtype=np.float32)
    return {"memory": memory}, {"hidden": state}


def filled_batch(bucket: int = 1) -> DecodeBatch:
    batch = DecodeBatch(
        max_rows=64, memory_names=("memory",), state_names=("hidden",), bos_id=BOS, source_bucket=bucket
    )
    memory, state = encoded((1, 5, 1.0), (2, 2, 2.0))
    batch.admit(admissions((1, 1, 5), (2, 3, 2)), 0.0, memory, state)
    return batch


def test_admission_appends_rows_with_zero_padded_memory_and_state_copies():
    batch = filled_batch()
    assert batch.rows == 4 and batch.requests == 2 and batch.padded_source_len == 5 and batch.beam_rows == 3
    assert batch.row_token[:4].tolist() == [BOS] * 4
    assert batch.row_source_length[:4].tolist() == [5, 2, 2, 2]
    assert batch.row_slot[:4].tolist() == [0, 1, 1, 1] and batch.row_beam_index[:4].tolist() == [0, 0, 1, 2]
    assert batch.row_score[:4].tolist() == [0.0, 0.0, -math.inf, -math.inf]  # one live row per beam at first
    assert batch.state["hidden"][:4, 0].tolist() == [1.0, 2.0, 2.0, 2.0]  # beam copies share the initial state
    memory = batch.memory["memory"][:4]
    assert memory.shape == (4, 5, 2) and memory.flags.c_contiguous
    assert (memory[0] == 1.0).all()
    assert (memory[1:, :2] == 2.0).all() and not memory[1:, 2:].any()  # zero beyond each row's length
    assert batch.rows_of(1).tolist() == [1, 2, 3] and batch.memory_generation == 1


def test_retiring_leaves_holes_that_compaction_fills_with_the_last_rows():
    batch = filled_batch()
    batch.state["hidden"][:4, 0] = [10.0, 20.0, 21.0, 22.0]
    generation = batch.memory_generation
    batch.retire([0])  # the greedy request with the longest source leaves
    assert batch.holes == [0] and batch.requests == 1 and batch.longest_source == 2
    assert batch.memory_generation == generation  # nothing moved yet
    batch.compact()
    assert batch.rows == 3 and batch.holes == []
    # Row 0 was a hole; the last row (beam row 2 of slot 1) moved into it, the others stayed.
    assert batch.rows_of(1).tolist() == [1, 2, 0]
    assert batch.state["hidden"][:3, 0].tolist() == [22.0, 20.0, 21.0]
    assert batch.row_beam_index[:3].tolist() == [2, 0, 1]
    assert batch.memory["memory"][:3].shape == (3, 2, 2)  # the source axis follows the longest source
    assert (batch.memory["memory"][:3] == 2.0).all()
    assert batch.memory_generation == generation + 1


def test_an_admission_fills_the_holes_before_it_appends():
    batch = filled_batch()
    batch.retire([1])  # the beam of 3 leaves rows 1, 2, 3
    memory, state = encoded((3, 3, 3.0), (4, 2, 4.0))
    slots = batch.admit(admissions((3, 1, 3), (4, 3, 2)), 0.0, memory, state)
    assert batch.rows == 5 and batch.holes == []  # 4 new rows: the 3 holes, then one more
    assert batch.rows_of(slots[0]).tolist() == [1] and batch.rows_of(slots[1]).tolist() == [2, 3, 4]
    assert batch.state["hidden"][:5, 0].tolist() == [1.0, 3.0, 4.0, 4.0, 4.0]
    assert (batch.memory["memory"][1, :3] == 3.0).all() and not batch.memory["memory"][1, 3:].any()
    assert (batch.memory["memory"][2:5, :2] == 4.0).all() and not batch.memory["memory"][2:5, 2:].any()


def test_slots_are_reused_and_rows_stay_consistent_after_admitting_again():
    batch = filled_batch()
    batch.retire([1])
    batch.compact()
    assert batch.rows == 1 and batch.state["hidden"][:1, 0].tolist() == [1.0]
    memory, state = encoded((3, 3, 3.0))
    [slot] = batch.admit(admissions((3, 2, 3)), 0.0, memory, state)
    assert slot == 1  # the freed slot
    assert batch.rows_of(slot).tolist() == [1, 2]
    assert batch.state["hidden"][:3, 0].tolist() == [1.0, 3.0, 3.0]
    assert batch.row_source_length[:3].tolist() == [5, 3, 3]
    assert (batch.memory["memory"][1:3, :3] == 3.0).all() and not batch.memory["memory"][1:3, 3:].any()
    assert batch.active_slots() == [0, 1]


def test_the_source_axis_is_padded_to_buckets_and_relaid_only_across_them():
    batch = filled_batch(bucket=8)
    assert batch.longest_source == 5 and batch.padded_source_len == 8
    memory_before = batch.memory["memory"]
    memory, state = encoded((3, 7, 3.0))
    batch.admit(admissions((3, 1, 7)), 0.0, memory, state)
    assert batch.padded_source_len == 8 and batch.memory["memory"] is memory_before  # same bucket: in place
    memory, state = encoded((4, 11, 4.0))
    batch.admit(admissions((4, 1, 11)), 0.0, memory, state)
    assert batch.padded_source_len == 16 and not batch.memory["memory"][:, 11:].any()
    batch.retire([3])  # slot 3 is the 11-token source
    batch.compact()
    assert batch.longest_source == 7 and batch.padded_source_len == 8
    assert bucketed(1, 8) == 8 and bucketed(8, 8) == 8 and bucketed(9, 8) == 16 and bucketed(3, 1) == 3


def test_capacity_grows_past_its_first_allocation_up_to_the_budget():
    batch = DecodeBatch(max_rows=100, memory_names=("memory",), state_names=("hidden",), bos_id=BOS, source_bucket=1)
    keys = range(1, 41)
    memory, state = encoded(*[(key, 1 + key % 4, float(key)) for key in keys])
    slots = batch.admit(admissions(*[(key, 2, 1 + key % 4) for key in keys]), 0.0, memory, state)
    assert batch.rows == 80 and len(set(slots)) == 40
    for key, slot in zip(keys, slots, strict=False):
        rows = batch.rows_of(slot)
        assert batch.state["hidden"][rows, 0].tolist() == [float(key)] * 2
        assert (batch.memory["memory"][rows, : 1 + key % 4] == float(key)).all()
