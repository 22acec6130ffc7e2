"""The row batch: rows per request, gather/compact of state, memory padding and when it is rebuilt."""

from __future__ import annotations

import numpy as np

from service.engine import DecodeOptions
from service.engine.batch import BatchMember, RowBatch
from service.engine.beam import StepDecision, new_search

from .fakes import BOS, EOS


def member(key: int, beam: int, length: int, fill: float) -> tuple[BatchMember, dict[str, np.ndarray]]:
    """A member whose memory is `fill` everywhere (shape [1, length, 2]) and whose state row is [key]."""
    options = DecodeOptions(beam_size=beam, num_hypotheses=1, max_length=4)
    memory = {"memory": np.full((1, length, 2), fill, dtype=np.float32)}
    state = {"hidden": np.array([[float(key)]], dtype=np.float32)}
    return BatchMember(key, new_search(options, eos_id=EOS), length, memory, admitted_at=0.0), state


def filled_batch() -> RowBatch:
    batch = RowBatch(("memory",), ("hidden",))
    greedy, greedy_state = member(1, beam=1, length=5, fill=1.0)
    beam, beam_state = member(2, beam=3, length=2, fill=2.0)
    batch.add([greedy, beam], [greedy_state, beam_state], BOS)
    return batch


def test_rows_are_grouped_per_request_with_zero_padded_memory():
    batch = filled_batch()
    inputs = batch.step_inputs()
    assert batch.rows == 4 and batch.padded_source_len == 5
    assert inputs.tokens.tolist() == [BOS] * 4
    assert inputs.source_lengths.tolist() == [5, 2, 2, 2]
    assert inputs.state["hidden"][:, 0].tolist() == [1.0, 2.0, 2.0, 2.0]  # beam copies share the initial state
    memory = inputs.memory["memory"]
    assert memory.shape == (4, 5, 2)
    assert (memory[0] == 1.0).all()
    assert (memory[1:, :2] == 2.0).all() and not memory[1:, 2:].any()  # zero beyond each row's length


def test_beam_reordering_gathers_state_but_keeps_memory():
    batch = filled_batch()
    first = batch.step_inputs()
    step_state = {"hidden": np.array([[10.0], [20.0], [21.0], [22.0]], dtype=np.float32)}
    decisions = [
        StepDecision(parents=None, next_tokens=np.array([7]), done=False),
        StepDecision(parents=np.array([2, 2, 0]), next_tokens=np.array([4, 5, 6]), done=False),
    ]
    assert batch.apply(decisions, step_state) == []
    second = batch.step_inputs()
    assert second.tokens.tolist() == [7, 4, 5, 6]
    assert second.state["hidden"][:, 0].tolist() == [10.0, 22.0, 22.0, 20.0]
    assert second.memory["memory"] is first.memory["memory"]  # same request set: not rebuilt
    assert batch.memory_rebuilds == 1


def test_retiring_the_longest_request_compacts_rows_and_trims_padding():
    batch = filled_batch()
    batch.step_inputs()
    step_state = {"hidden": np.array([[10.0], [20.0], [21.0], [22.0]], dtype=np.float32)}
    decisions = [
        StepDecision(parents=None, next_tokens=np.array([EOS]), done=True),
        StepDecision(parents=np.array([1, 0, 2]), next_tokens=np.array([4, 5, 6]), done=False),
    ]
    finished = batch.apply(decisions, step_state)
    assert [m.key for m in finished] == [1]
    inputs = batch.step_inputs()
    assert batch.rows == 3 and [m.key for m in batch.members] == [2]
    assert inputs.state["hidden"][:, 0].tolist() == [21.0, 20.0, 22.0]
    assert inputs.memory["memory"].shape == (3, 2, 2)  # padded to the remaining longest source
    assert inputs.source_lengths.tolist() == [2, 2, 2]
    assert batch.memory_rebuilds == 2


def test_remove_and_add_keep_the_row_mapping_consistent():
    batch = filled_batch()
    removed = batch.remove([2])
    assert [m.key for m in removed] == [2]
    assert batch.rows == 1 and batch.step_inputs().state["hidden"][:, 0].tolist() == [1.0]
    late, late_state = member(3, beam=2, length=3, fill=3.0)
    batch.add([late], [late_state], BOS)
    inputs = batch.step_inputs()
    assert [m.key for m in batch.members] == [1, 3]
    assert inputs.state["hidden"][:, 0].tolist() == [1.0, 3.0, 3.0]
    assert inputs.source_lengths.tolist() == [5, 3, 3]
    assert (inputs.memory["memory"][1:, :3] == 3.0).all() and not inputs.memory["memory"][1:, 3:].any()
    assert batch.remove([99]) == []
    assert [m.key for m in batch.clear()] == [1, 3] and batch.rows == 0
