"""The decode batch: rows and slots on admission, swap-with-last retirement, memory in place and its buckets."""

from __future__ import annotations

import math

import numpy as np

from service.engine.batch import DecodeBatch, NewRequest, bucketed

from .fakes import BOS


def new_request(key: int, beam: int, length: int, *, attention: bool = False) -> NewRequest:
    return NewRequest(key=key, beam=beam, source_length=length, max_length=4, num_hypotheses=1, length_penalty=0.0,
                      return_attention=attention, stream=False, admitted_at=float(key))


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
    batch = DecodeBatch(max_rows=64, memory_names=("memory",), state_names=("hidden",), bos_id=BOS,
                        source_bucket=bucket)
    memory, state = encoded((1, 5, 1.0), (2, 2, 2.0))
    batch.admit([new_request(1, beam=1, length=5), new_request(2, beam=3, length=2)], memory, state)
    return batch


def test_admission_appends_rows_with_zero_padded_memory_and_state_copies():
    batch = filled_batch()
    assert batch.rows == 4 and batch.requests == 2 and batch.padded_source_len == 5 and batch.beam_rows == 3
    assert batch.row_token[:4].tolist() == [BOS] * 4
    assert batch.row_source_length[:4].tolist() == [5, 2, 2, 2]
    assert batch.row_slot[:4].tolist() == [0, 1, 1, 1] and batch.row_beam_index[:4].tolist() == [0, 0, 1, 2]
    assert batch.row_score[:4].tolist() == [0.0, 0.0, -math.inf, -math.inf]  # one live row per beam at first
    assert batch.state["hidden"][:, 0].tolist() == [1.0, 2.0, 2.0, 2.0]  # beam copies share the initial state
    memory = batch.memory["memory"][:4]
    assert memory.shape == (4, 5, 2) and memory.flags.c_contiguous
    assert (memory[0] == 1.0).all()
    assert (memory[1:, :2] == 2.0).all() and not memory[1:, 2:].any()  # zero beyond each row's length
    assert batch.rows_of(1).tolist() == [1, 2, 3] and batch.memory_generation == 1


def test_retiring_moves_the_last_rows_into_the_holes_and_trims_the_padding():
    batch = filled_batch()
    batch.state["hidden"][:, 0] = [10.0, 20.0, 21.0, 22.0]
    batch.retire([0])  # the greedy request with the longest source leaves
    assert batch.rows == 3 and batch.requests == 1 and batch.longest_source == 2
    # Row 0 is a hole; the last row (beam row 2 of slot 1) moves into it, the others stay.
    assert batch.rows_of(1).tolist() == [1, 2, 0]
    assert batch.state["hidden"][:, 0].tolist() == [22.0, 20.0, 21.0]
    assert batch.row_beam_index[:3].tolist() == [2, 0, 1]
    assert batch.memory["memory"][:3].shape == (3, 2, 2)  # the source axis follows the longest source
    assert (batch.memory["memory"][:3] == 2.0).all()
    assert batch.memory_generation == 2


def test_slots_are_reused_and_rows_stay_consistent_after_admitting_again():
    batch = filled_batch()
    batch.retire([1])
    assert batch.rows == 1 and batch.state["hidden"][:, 0].tolist() == [1.0]
    memory, state = encoded((3, 3, 3.0))
    [slot] = batch.admit([new_request(3, beam=2, length=3)], memory, state)
    assert slot == 1  # the freed slot
    assert batch.rows_of(slot).tolist() == [1, 2]
    assert batch.state["hidden"][:, 0].tolist() == [1.0, 3.0, 3.0]
    assert batch.row_source_length[:3].tolist() == [5, 3, 3]
    assert (batch.memory["memory"][1:3, :3] == 3.0).all() and not batch.memory["memory"][1:3, 3:].any()
    assert batch.active_slots().tolist() == [0, 1]


def test_the_source_axis_is_padded_to_buckets_and_relaid_only_across_them():
    batch = filled_batch(bucket=8)
    assert batch.longest_source == 5 and batch.padded_source_len == 8
    memory_before = batch.memory["memory"]
    memory, state = encoded((3, 7, 3.0))
    batch.admit([new_request(3, beam=1, length=7)], memory, state)
    assert batch.padded_source_len == 8 and batch.memory["memory"] is memory_before  # same bucket: in place
    memory, state = encoded((4, 11, 4.0))
    batch.admit([new_request(4, beam=1, length=11)], memory, state)
    assert batch.padded_source_len == 16 and not batch.memory["memory"][:, 11:].any()
    batch.retire([3])  # slot 3 is the 11-token source
    assert batch.longest_source == 7 and batch.padded_source_len == 8
    assert bucketed(1, 8) == 8 and bucketed(8, 8) == 8 and bucketed(9, 8) == 16 and bucketed(3, 1) == 3


def test_capacity_grows_past_its_first_allocation_up_to_the_budget():
    batch = DecodeBatch(max_rows=100, memory_names=("memory",), state_names=("hidden",), bos_id=BOS, source_bucket=1)
    keys = range(1, 41)
    memory, state = encoded(*[(key, 1 + key % 4, float(key)) for key in keys])
    slots = batch.admit([new_request(key, beam=2, length=1 + key % 4) for key in keys], memory, state)
    assert batch.rows == 80 and len(set(slots)) == 40
    for key, slot in zip(keys, slots):
        rows = batch.rows_of(slot)
        assert batch.state["hidden"][rows, 0].tolist() == [float(key)] * 2
        assert (batch.memory["memory"][rows, : 1 + key % 4] == float(key)).all()
