"""The decode batch: every active request's decoding state, in arrays (the engine's equivalent of an input batch).

Two index spaces:
- **rows**: decoder hypotheses, packed in positions [0, rows) of every row array, so the next step's inputs
  are leading-axis slices (contiguous views, no copy). A request owns `beam` rows, anywhere in that range.
- **slots**: requests. A slot is stable for a request's life and reused after it leaves; per-request arrays
  (steps, limits, outputs, beam history) are indexed by slot and never move.

Memory stays in place: admissions write their rows at the end, retirements fill their holes with the last
rows (swap-with-last: the cost is the rows that move, not the batch), and the source axis is padded to a
length bucket, so it is re-laid only when the bucket of the longest active source changes. Beam reordering
within a request never touches memory: a request's rows share one source. Counters (rows, the longest
source) are updated on admission and retirement; nothing here scans the batch per step.

Only the engine's worker thread touches a DecodeBatch.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class NewRequest:
    """What admission needs of a request: its key, beam width, limits and the flags that cost extra work."""

    key: int
    beam: int
    source_length: int
    max_length: int
    num_hypotheses: int
    length_penalty: float
    return_attention: bool
    stream: bool
    admitted_at: float


def bucketed(length: int, bucket: int) -> int:
    """`length` rounded up to a multiple of `bucket` (at least one bucket)."""
    return max(bucket, -(-length // bucket) * bucket)


class DecodeBatch:
    """Active requests' rows, decoder state, memory and per-request decoding records.

    Capacities start small and double when needed, up to `max_rows` rows (each request has at least one,
    so `max_rows` slots suffice) and the longest `max_length` seen.
    """

    def __init__(self, *, max_rows: int, memory_names: Sequence[str], state_names: Sequence[str],
                 bos_id: int, source_bucket: int = 8) -> None:
        if max_rows < 1 or source_bucket < 1:
            raise ValueError(f"max_rows and source_bucket must be >= 1, got {max_rows}, {source_bucket}")
        self.max_rows = max_rows
        self.memory_names = tuple(memory_names)
        self.state_names = tuple(state_names)
        self.bos_id = bos_id
        self.source_bucket = source_bucket
        self.rows = 0
        self.requests = 0
        # Bumped whenever the memory arrays' contents or layout change (admission, retirement, re-layout);
        # a device copy of the memory is current while its generation matches.
        self.memory_generation = 0
        self._capacity = 0
        self._length_capacity = 0
        self._beam_capacity = 1
        self._source_lengths: Counter[int] = Counter()  # active requests per source length
        self.longest_source = 0
        self.padded_source_len = 0  # the memory arrays' source axis: bucketed(longest_source)
        self.memory: dict[str, np.ndarray] = {}  # [capacity, padded_source_len, ...]
        self.state: dict[str, np.ndarray] = {}  # [rows, ...]
        self._free_slots: list[int] = []
        self.beam_rows = 0  # rows of requests with beam > 1
        self.any_attention = 0  # active requests that keep their attention rows
        self.widths: Counter[int] = Counter()  # active requests per beam width > 1
        self._grow(min(max_rows, 16), 16)

    # ----- storage -----------------------------------------------------------------------------------

    def _grow(self, capacity: int, length: int) -> None:
        """Reallocate to `capacity` rows/slots and `length` output positions, keeping what is there."""
        capacity = min(max(capacity, self._capacity), self.max_rows)
        length = max(length, self._length_capacity)
        old_capacity = self._capacity

        def resized(array: np.ndarray | None, shape: tuple[int, ...], dtype: type, fill: float = 0) -> np.ndarray:
            new = np.full(shape, fill, dtype=dtype)
            if array is not None:
                new[tuple(slice(0, n) for n in array.shape)] = array
            return new

        def row_array(name: str, dtype: type, fill: float = 0) -> None:
            setattr(self, name, resized(getattr(self, name, None), (capacity,), dtype, fill))

        # Per row: the token fed next, the source length, the owning slot, the index in that slot's beam,
        # and (beam rows) the cumulative log probability, ranked in float64 to avoid extra rounding.
        row_array("row_token", np.int64)
        row_array("row_source_length", np.int64)
        row_array("row_slot", np.int64)
        row_array("row_beam_index", np.int64)
        row_array("row_score", np.float64)
        # Per slot.
        row_array("slot_key", np.int64)
        row_array("slot_beam", np.int64)
        row_array("slot_steps", np.int64)
        row_array("slot_max_length", np.int64)
        row_array("slot_wanted", np.int64)
        row_array("slot_alpha", np.float64)
        row_array("slot_source_length", np.int64)
        row_array("slot_log_prob", np.float64)  # greedy: summed log probability
        row_array("slot_threshold", np.float64, -math.inf)  # beam: the wanted-th best finished score
        row_array("slot_finished_count", np.int64)
        row_array("slot_admitted_at", np.float64)
        row_array("slot_first_step_at", np.float64)
        row_array("slot_last_step_at", np.float64)
        beam = self._beam_capacity
        self.slot_rows = resized(getattr(self, "slot_rows", None), (capacity, beam), np.int64)
        # Greedy outputs per slot and position; beam history per slot, position and beam row.
        self.out_token = resized(getattr(self, "out_token", None), (capacity, length), np.int64)
        self.out_log_prob = resized(getattr(self, "out_log_prob", None), (capacity, length), np.float32)
        self.out_alignment = resized(getattr(self, "out_alignment", None), (capacity, length), np.int64)
        self.history_token = resized(getattr(self, "history_token", None), (capacity, length, beam), np.int64)
        self.history_parent = resized(getattr(self, "history_parent", None), (capacity, length, beam), np.int64)
        self.history_alignment = resized(getattr(self, "history_alignment", None), (capacity, length, beam), np.int64)
        for name, array in self.memory.items():
            self.memory[name] = resized(array, (capacity, *array.shape[1:]), array.dtype)
        # Python-side per-slot records, only for what cannot be an array: attention rows (when asked for),
        # finished beam candidates (a bounded n-best), and the stream flag.
        self.slot_attention: list[list[np.ndarray] | None] = (
            getattr(self, "slot_attention", []) + [None] * (capacity - old_capacity))
        self.slot_finished: list[list[tuple]] = getattr(self, "slot_finished", []) + [
            [] for _ in range(capacity - old_capacity)]
        self.slot_stream = resized(getattr(self, "slot_stream", None), (capacity,), np.bool_)
        self.slot_wants_attention = resized(getattr(self, "slot_wants_attention", None), (capacity,), np.bool_)
        self._free_slots.extend(range(capacity - 1, old_capacity - 1, -1))
        self._capacity, self._length_capacity = capacity, length

    def _ensure_beam(self, beam: int) -> None:
        if beam > self._beam_capacity:
            self._beam_capacity = beam
            for name in ("slot_rows",):
                old = getattr(self, name)
                new = np.zeros((self._capacity, beam), dtype=old.dtype)
                new[:, : old.shape[1]] = old
                setattr(self, name, new)
            for name in ("history_token", "history_parent", "history_alignment"):
                old = getattr(self, name)
                new = np.zeros((self._capacity, self._length_capacity, beam), dtype=old.dtype)
                new[:, :, : old.shape[2]] = old
                setattr(self, name, new)

    def _relayout_memory(self, padded: int) -> None:
        """Give the memory arrays a source axis of `padded` positions (zero beyond each row's length)."""
        if padded == self.padded_source_len:
            return
        keep = min(padded, self.padded_source_len)
        for name, array in self.memory.items():
            new = np.zeros((self._capacity, padded, *array.shape[2:]), dtype=array.dtype)
            new[: self.rows, :keep] = array[: self.rows, :keep]
            self.memory[name] = new
        self.padded_source_len = padded

    # ----- admission and retirement ------------------------------------------------------------------

    def admit(self, requests: Sequence[NewRequest], memory: dict[str, np.ndarray],
              state: dict[str, np.ndarray]) -> list[int]:
        """Append the rows of `requests`, encoded together (`memory` [B, S, ...], `state` [B, ...] in request
        order); each request's rows start from bos with copies of its initial state. Returns their slots."""
        if not requests:
            return []
        widths = np.array([request.beam for request in requests], dtype=np.int64)
        new_rows = int(widths.sum())
        if self.rows + new_rows > self._capacity or len(self._free_slots) < len(requests):
            self._grow(max(2 * self._capacity, self.rows + new_rows), self._length_capacity)
        longest_length = max(request.max_length for request in requests)
        if longest_length > self._length_capacity:
            self._grow(self._capacity, max(2 * self._length_capacity, longest_length))
        self._ensure_beam(int(widths.max()))
        lengths = np.array([request.source_length for request in requests], dtype=np.int64)
        self._source_lengths.update(lengths.tolist())
        self.longest_source = max(self.longest_source, int(lengths.max()))
        if not self.memory:
            self.memory = {name: np.zeros((self._capacity, 0, *memory[name].shape[2:]), dtype=memory[name].dtype)
                           for name in self.memory_names}
        self._relayout_memory(bucketed(self.longest_source, self.source_bucket))

        start, end = self.rows, self.rows + new_rows
        owner = np.repeat(np.arange(len(requests)), widths)  # request index of each new row
        padded = self.padded_source_len
        source_positions = np.arange(padded)
        for name in self.memory_names:
            encoded = memory[name]
            target = self.memory[name]
            span = min(encoded.shape[1], padded)
            target[start:end] = 0
            target[start:end, :span] = encoded[owner, :span]
            # Zero beyond each row's own length (the encoder pads to its batch's longest source).
            beyond = source_positions[None, :] >= lengths[owner][:, None]
            target[start:end][beyond] = 0
        new_state = {name: state[name][owner] for name in self.state_names}
        if self.rows:
            self.state = {name: np.concatenate([self.state[name][: self.rows], new_state[name]])
                          for name in self.state_names}
        else:
            self.state = new_state

        slots = [self._free_slots.pop() for _ in requests]
        slot_index = np.array(slots, dtype=np.int64)
        self.row_token[start:end] = self.bos_id
        self.row_source_length[start:end] = lengths[owner]
        self.row_slot[start:end] = slot_index[owner]
        first_row = start + np.concatenate([[0], np.cumsum(widths)[:-1]])
        beam_index = np.arange(new_rows) - np.repeat(first_row - start, widths)
        self.row_beam_index[start:end] = beam_index
        # Only each beam's first row is live at first: the copies start at -inf, so the first step's
        # candidates all come from one row and identical hypotheses never fill the beam.
        self.row_score[start:end] = np.where(beam_index == 0, 0.0, -math.inf)
        self.slot_rows[slot_index[owner], beam_index] = np.arange(start, end)
        for slot, request in zip(slots, requests):
            self.slot_key[slot] = request.key
            self.slot_beam[slot] = request.beam
            self.slot_steps[slot] = 0
            self.slot_max_length[slot] = request.max_length
            self.slot_wanted[slot] = request.num_hypotheses
            self.slot_alpha[slot] = request.length_penalty
            self.slot_source_length[slot] = request.source_length
            self.slot_log_prob[slot] = 0.0
            self.slot_threshold[slot] = -math.inf
            self.slot_finished_count[slot] = 0
            self.slot_admitted_at[slot] = request.admitted_at
            self.slot_first_step_at[slot] = math.nan
            self.slot_last_step_at[slot] = math.nan
            self.slot_attention[slot] = [] if request.return_attention else None
            self.slot_finished[slot] = []
            self.slot_stream[slot] = request.stream
            self.slot_wants_attention[slot] = request.return_attention
            self.any_attention += request.return_attention
            if request.beam > 1:
                self.widths[request.beam] += 1
                self.beam_rows += request.beam
        self.rows = end
        self.requests += len(requests)
        self.memory_generation += 1
        return slots

    def retire(self, slots: Sequence[int]) -> None:
        """Remove the rows of these slots and free the slots. Rows past the new end move into the holes."""
        if not len(slots):
            return
        slot_index = np.asarray(slots, dtype=np.int64)
        rows = self.rows
        dead = np.zeros(rows, dtype=bool)
        for slot in slots:
            dead[self.slot_rows[slot, : self.slot_beam[slot]]] = True
            length = int(self.slot_source_length[slot])
            self._source_lengths[length] -= 1
            if not self._source_lengths[length]:
                del self._source_lengths[length]
            beam = int(self.slot_beam[slot])
            if beam > 1:
                self.widths[beam] -= 1
                if not self.widths[beam]:
                    del self.widths[beam]
                self.beam_rows -= beam
            self.any_attention -= bool(self.slot_wants_attention[slot])
            self.slot_wants_attention[slot] = False
            self.slot_stream[slot] = False
            self.slot_attention[slot] = None
            self.slot_finished[slot] = []
        kept = rows - int(dead.sum())
        holes = np.flatnonzero(dead[:kept])
        movers = kept + np.flatnonzero(~dead[kept:])
        if holes.size:
            for array in (self.row_token, self.row_source_length, self.row_slot, self.row_beam_index, self.row_score):
                array[holes] = array[movers]
            for name in self.memory_names:
                self.memory[name][holes] = self.memory[name][movers]
            for name in self.state_names:
                self.state[name][holes] = self.state[name][movers]
            self.slot_rows[self.row_slot[holes], self.row_beam_index[holes]] = holes
        self.state = {name: array[:kept] for name, array in self.state.items()}
        self.rows = kept
        self.requests -= len(slots)
        self._free_slots.extend(slot_index.tolist())
        if self._source_lengths:
            self.longest_source = max(self._source_lengths) if self.longest_source not in self._source_lengths \
                else self.longest_source
        else:
            self.longest_source = 0
        # The source axis shrinks with the longest source (a long request leaving makes every step cheaper).
        self._relayout_memory(bucketed(self.longest_source, self.source_bucket) if self.rows else self.padded_source_len)
        self.memory_generation += 1

    def rows_of(self, slot: int) -> np.ndarray:
        """The rows of a slot, in beam order."""
        return self.slot_rows[slot, : self.slot_beam[slot]]

    def active_slots(self) -> np.ndarray:
        """Slots in the batch (one entry per request); for rare paths, not the per-step loop."""
        first_rows = self.row_beam_index[: self.rows] == 0
        return self.row_slot[: self.rows][first_rows]
