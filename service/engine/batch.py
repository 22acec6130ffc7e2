"""The decode batch: every active request's decoding state, in arrays (the engine's equivalent of an input batch).

Two index spaces:
- **rows**: decoder hypotheses. A step runs rows [0, rows); the step's inputs are leading slices of
  preallocated arrays (contiguous views, no copy). A request owns `beam` rows, anywhere in that range.
- **slots**: requests. A slot is stable for a request's life and reused after it leaves; per-request records
  (outputs, beam history, the finished n-best) are indexed by slot and never move.

What the hot loop reads and writes per row is packed field-major in one int64 matrix (`row_token`,
`row_steps`, ... are its rows) plus `row_score`, so each field is a contiguous array and moving a row is one
numpy operation for all of them: on small batches the engine's cost is the number of numpy calls, not their
size. Per-request facts the loop never touches (key, stream flag, clock readings) are plain Python lists.

Memory and state stay in place. A request that finishes leaves holes in the rows; the next admission writes
its rows into the holes (in a loaded server as many join as leave, so nothing moves), and only holes left
over are filled by moving the last rows into them before the step (`compact`). The source axis is padded
to a length bucket, so memory is re-laid only when the bucket of the longest active source changes. Beam
reordering within a request never touches memory: a request's rows share one source. The memory and state tensors,
the process's largest arrays, each live in a mapping of their own (`zeros_mapped_apart`), so one that is replaced
goes back to the OS at once. Counters (rows, the longest source) are updated on admission and retirement; nothing
here scans the batch.

Only the engine's worker thread touches a DecodeBatch.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from service.engine.records import EngineRequest, FinishReason
from service.runtime.memory import zeros_mapped_apart

#: Per-row int64 fields: the token fed next, the source length, the owning slot, the index in its beam, the
#: tokens generated so far, the most allowed, whether the row's request streams or keeps attention, and the
#: width of its beam (1: greedy).
ROW_FIELDS = (
    "row_token",
    "row_source_length",
    "row_slot",
    "row_beam_index",
    "row_steps",
    "row_max_length",
    "row_extras",
    "row_width",
)


class FinishedCandidate(NamedTuple):
    """A beam candidate that finished: an entry of its slot's n-best, kept best first. Its tokens are the path
    through the slot's history that ends at (`prefix_step`, `prefix_row`), then `last_token`."""

    score: float
    """The ranking score (log_prob over the length penalty)."""
    order: int
    """How many candidates of the slot finished before it (ties keep the earlier one first)."""
    log_prob: float
    prefix_step: int
    prefix_row: int
    last_token: int
    last_alignment: int
    last_attention: np.ndarray | None
    reason: FinishReason


GATHER_FROM = 6
"""From this many rows or requests, the batch's tables are read and written with one numpy call each; below, a few
scalar reads and writes per row cost less than those calls' fixed cost (a request decoded alone pays it at every
step)."""


def bucketed(length: int, bucket: int) -> int:
    """`length` rounded up to a multiple of `bucket` (at least one bucket)."""
    return max(bucket, -(-length // bucket) * bucket)


class DecodeBatch:
    """Active requests' rows, decoder state, memory and per-request decoding records.

    Capacities start small and double when needed, up to `max_rows` rows (each request has at least one,
    so `max_rows` slots suffice), the longest `max_length` and the widest beam seen.
    """

    # Views of the packed row table, rebound whenever it is reallocated.
    row_token: np.ndarray
    row_source_length: np.ndarray
    row_slot: np.ndarray
    row_beam_index: np.ndarray
    row_steps: np.ndarray
    row_max_length: np.ndarray
    row_extras: np.ndarray
    row_width: np.ndarray

    def __init__(
        self,
        *,
        max_rows: int,
        memory_names: Sequence[str],
        state_names: Sequence[str],
        bos_id: int,
        source_bucket: int = 8,
    ) -> None:
        if max_rows < 1 or source_bucket < 1:
            raise ValueError(f"max_rows and source_bucket must be >= 1, got {max_rows}, {source_bucket}")
        self.max_rows = max_rows
        self.memory_names = tuple(memory_names)
        self.state_names = tuple(state_names)
        self.bos_id = bos_id
        self.source_bucket = source_bucket
        self.rows = 0  # rows [0, rows) are live or holes; after compact() all are live
        self.holes: list[int] = []  # rows below `rows` that a finished request left
        self.requests = 0
        # Bumped whenever the memory's contents or layout change (admission, retirement); a device copy of
        # the memory is current while its generation matches.
        self.memory_generation = 0
        self.longest_source = 0
        self.padded_source_len = 0  # the memory arrays' source axis: bucketed(longest_source)
        self.memory: dict[str, np.ndarray] = {}  # [tensor rows, padded_source_len, ...]
        self.state: dict[str, np.ndarray] = {}  # [tensor rows, ...]; the step reads [:rows]
        self.beam_rows = 0  # rows of requests with beam > 1
        self.any_attention = 0  # active requests that keep their attention rows
        self.streaming = 0  # active requests that stream their tokens
        self.widths: Counter[int] = Counter()  # active requests per beam width > 1
        self._lengths: list[int] = [0] * 64  # active requests per source length
        self._free_slots: list[int] = []
        self._capacity = self._length_capacity = 0
        self._beam_capacity = 1
        # Rows the memory and state tensors hold: the capacity, or fewer after shrink_tensors() (they are the
        # batch's largest arrays: rows x padded source x hidden each).
        self._tensor_rows = 0
        self._rows = np.zeros((len(ROW_FIELDS), 0), dtype=np.int64)
        self.row_score = np.zeros(0, dtype=np.float64)  # summed log probability (greedy) or beam score
        self.slot_rows = np.zeros((0, 1), dtype=np.int64)  # the rows of each slot, in beam order
        # Beam bookkeeping per slot, read as arrays by the beam search.
        self.slot_alpha = np.zeros(0, dtype=np.float64)
        self.slot_wanted = np.zeros(0, dtype=np.int64)
        self.slot_threshold = np.zeros(0, dtype=np.float64)  # the wanted-th best finished score
        self.slot_finished_count = np.zeros(0, dtype=np.int64)
        # Greedy outputs per slot and position; beam history per slot, position and beam row.
        self.out_token = np.zeros((0, 0), dtype=np.int64)
        self.out_log_prob = np.zeros((0, 0), dtype=np.float32)
        self.out_alignment = np.zeros((0, 0), dtype=np.int64)
        self.history_token = np.zeros((0, 0, 1), dtype=np.int64)
        self.history_parent = np.zeros((0, 0, 1), dtype=np.int64)
        self.history_alignment = np.zeros((0, 0, 1), dtype=np.int64)
        # Per-slot facts the step loop never reads as arrays.
        self.slot_key: list[int] = []
        self.slot_beam: list[int] = []
        self.slot_source_length: list[int] = []
        self.slot_stream: list[bool] = []
        self.slot_admitted_at: list[float] = []
        self.slot_first_step_at: list[float] = []
        self.slot_attention: list[list[np.ndarray] | None] = []  # attention rows, when asked for
        self.slot_finished: list[list[FinishedCandidate]] = []  # finished beam candidates (a bounded n-best)
        self._grow(min(max_rows, 16), 16, 1)

    # ----- storage -----------------------------------------------------------------------------------

    def _grow(self, capacity: int, length: int, beam: int) -> None:
        """Reallocate to `capacity` rows and slots, `length` output positions and `beam` rows per slot,
        keeping what is there."""
        capacity = min(max(capacity, self._capacity), self.max_rows)
        length = max(length, self._length_capacity)
        beam = max(beam, self._beam_capacity)

        def resized(array: np.ndarray, shape: tuple[int, ...], fill: float = 0) -> np.ndarray:
            new = np.full(shape, fill, dtype=array.dtype)
            new[tuple(slice(0, n) for n in array.shape)] = array
            return new

        added = capacity - self._capacity
        self._rows = resized(self._rows, (len(ROW_FIELDS), capacity))
        for index, name in enumerate(ROW_FIELDS):
            setattr(self, name, self._rows[index])
        self.row_score = resized(self.row_score, (capacity,))
        self.slot_rows = resized(self.slot_rows, (capacity, beam))
        self.slot_alpha = resized(self.slot_alpha, (capacity,))
        self.slot_wanted = resized(self.slot_wanted, (capacity,))
        self.slot_threshold = resized(self.slot_threshold, (capacity,), -math.inf)
        self.slot_finished_count = resized(self.slot_finished_count, (capacity,))
        self.out_token = resized(self.out_token, (capacity, length))
        self.out_log_prob = resized(self.out_log_prob, (capacity, length))
        self.out_alignment = resized(self.out_alignment, (capacity, length))
        self.history_token = resized(self.history_token, (capacity, length, beam))
        self.history_parent = resized(self.history_parent, (capacity, length, beam))
        self.history_alignment = resized(self.history_alignment, (capacity, length, beam))
        self._resize_tensors(capacity)
        self.slot_key += [0] * added
        self.slot_beam += [1] * added
        self.slot_source_length += [0] * added
        self.slot_stream += [False] * added
        self.slot_admitted_at += [math.nan] * added
        self.slot_first_step_at += [math.nan] * added
        self.slot_attention += [None] * added
        self.slot_finished += [[] for _ in range(added)]
        self._free_slots[:0] = range(capacity - 1, self._capacity - 1, -1)  # used after the free ones
        self._capacity, self._length_capacity, self._beam_capacity = capacity, length, beam

    def _resize_tensors(self, rows: int) -> None:
        """Give the memory and state tensors `rows` rows (at least the live ones), keeping those in use."""
        for tensors in (self.memory, self.state):
            for name, array in tensors.items():
                new = zeros_mapped_apart((rows, *array.shape[1:]), array.dtype)
                new[: self.rows] = array[: self.rows]
                tensors[name] = new
        self._tensor_rows = rows

    def shrink_tensors(self) -> bool:
        """After a burst: give the memory and state tensors the next power of two above the rows in use (at least
        16) when that is at most half what they hold, so that their memory follows the load down while the batch
        stays busy (admission grows them again as needed). Call after compact(). Returns whether they shrank."""
        wanted = max(16, 1 << max(self.rows - 1, 0).bit_length())
        if self.holes or 2 * wanted > self._tensor_rows:
            return False
        self._resize_tensors(wanted)
        self.memory_generation += 1  # new arrays: views of the old ones (the step's inputs, device copies) are stale
        return True

    def _relayout_memory(self, padded: int) -> bool:
        """Give the memory arrays a source axis of `padded` positions (zero beyond each row's length); returns
        whether that changed anything."""
        if padded == self.padded_source_len:
            return False
        keep = min(padded, self.padded_source_len)
        for name, array in self.memory.items():
            new = zeros_mapped_apart((self._tensor_rows, padded, *array.shape[2:]), array.dtype)
            new[: self.rows, :keep] = array[: self.rows, :keep]
            self.memory[name] = new
        self.padded_source_len = padded
        return True

    # ----- admission and retirement ------------------------------------------------------------------

    def admit(
        self,
        keys: Sequence[int],
        new: Sequence[EngineRequest],
        admitted_at: float,
        memory: dict[str, np.ndarray],
        state: dict[str, np.ndarray],
    ) -> list[int]:
        """Add the rows of the `new` requests (with their `keys`), encoded together (`memory` [B, S, ...], `state`
        [B, ...] in their order), into the holes first, then at the end; each request's rows start from bos with
        copies of its initial state. Returns their slots.

        Per-request bookkeeping is plain Python over the few requests that join a step; what touches arrays
        is one numpy operation per packed table or tensor.
        """
        count = len(new)
        options = [request.options for request in new]
        widths = [option.beam_size for option in options]
        lengths = [len(request.source_ids) for request in new]
        extras = [request.stream or option.return_attention for request, option in zip(new, options, strict=True)]
        max_lengths = [option.max_length for option in options]
        new_rows, widest = sum(widths), max(widths)
        appended = max(0, new_rows - len(self.holes))
        longest_output = max(max_lengths)
        capacity, length = self._capacity, self._length_capacity
        if self.rows + appended > capacity or len(self._free_slots) < count:
            capacity = max(2 * capacity, self.rows + appended)
        if longest_output > length:
            length = max(2 * length, longest_output)
        if capacity > self._capacity or length > self._length_capacity or widest > self._beam_capacity:
            self._grow(capacity, length, widest)
        longest = max(lengths)
        counted = self._lengths
        if longest >= len(counted):
            counted += [0] * (longest + 1 - len(counted))
        for source_length in lengths:
            counted[source_length] += 1
        if longest > self.longest_source:
            self.longest_source = longest
        if not self.memory:  # the first admission tells the tensors' trailing shapes and types
            self.memory = {
                name: np.zeros((self._capacity, 0, *value.shape[2:]), dtype=value.dtype)
                for name, value in memory.items()
            }
            self.state = {
                name: zeros_mapped_apart((self._capacity, *value.shape[1:]), value.dtype)
                for name, value in state.items()
            }
            self._tensor_rows = self._capacity
        elif self.rows + appended > self._tensor_rows:  # shrunk after a burst (shrink_tensors): room again
            self._resize_tensors(self._capacity)
        self._relayout_memory(bucketed(self.longest_source, self.source_bucket))

        filled = self.holes[:new_rows]
        del self.holes[:new_rows]
        targets = filled + list(range(self.rows, self.rows + appended))
        # One index for every array write below: a slice when the rows are consecutive (no copy, no
        # conversion), else an index array converted once.
        first = targets[0]
        rows_index: slice | np.ndarray = (
            slice(first, first + new_rows) if targets == list(range(first, first + new_rows)) else np.array(targets)
        )
        self.rows += appended
        slots = self._free_slots[-count:][::-1]
        del self._free_slots[-count:]
        if widest == 1:
            owner = None
            row_slots, row_lengths, beam_index = slots, lengths, [0] * count
            row_max_length = max_lengths
            row_extras = extras
        else:  # the request of each new row, and the row's place in its beam
            owner = [index for index, width in enumerate(widths) for _ in range(width)]
            row_slots = [slots[index] for index in owner]
            row_lengths = [lengths[index] for index in owner]
            beam_index = [beam for width in widths for beam in range(width)]
            row_max_length = [max_lengths[index] for index in owner]
            row_extras = [extras[index] for index in owner]
        # The encoder pads to its batch's longest source: beyond each request's own length its memory is zeroed
        # (one mask for every tensor), as a step expects.
        padding = None
        if min(lengths) < longest:
            padding = np.arange(longest) >= np.array(lengths)[:, None]  # [B, longest]
        for name, encoded in memory.items():
            target = self.memory[name]
            span = min(encoded.shape[1], self.padded_source_len)
            if padding is not None:
                encoded = encoded.copy()  # the model's array: not ours to change
                encoded[padding[:, : encoded.shape[1]]] = 0
            target[rows_index, :span] = encoded[:, :span] if owner is None else encoded[owner, :span]
            if span < self.padded_source_len:
                target[rows_index, span:] = 0
        for name, value in state.items():
            self.state[name][rows_index] = value if owner is None else value[owner]
        # A write per row field (the fields that are the same for every new row as one value) costs less than
        # one write of an [8, new rows] array built from lists: 2.1 against 3.6 us for 16 rows in holes.
        self.row_token[rows_index] = self.bos_id
        self.row_source_length[rows_index] = row_lengths
        self.row_slot[rows_index] = row_slots
        self.row_beam_index[rows_index] = 0 if owner is None else beam_index
        self.row_steps[rows_index] = 0
        self.row_max_length[rows_index] = row_max_length
        self.row_extras[rows_index] = row_extras
        self.row_width[rows_index] = 1 if owner is None else [widths[index] for index in owner]
        # Only each beam's first row is live at first: the copies start at -inf, so the first step's
        # candidates all come from one row and identical hypotheses never fill the beam.
        self.row_score[rows_index] = 0.0 if owner is None else [0.0 if b == 0 else -math.inf for b in beam_index]
        for row, slot, beam in zip(targets, row_slots, beam_index, strict=True):
            self.slot_rows[slot, beam] = row
        slot_key, slot_beam, slot_source_length = self.slot_key, self.slot_beam, self.slot_source_length
        slot_stream, slot_admitted_at, slot_first_step_at = (
            self.slot_stream,
            self.slot_admitted_at,
            self.slot_first_step_at,
        )
        slot_alpha, slot_attention, nan = self.slot_alpha, self.slot_attention, math.nan
        streaming = attention = 0
        for slot, key, request, option, width, length in zip(slots, keys, new, options, widths, lengths, strict=True):
            slot_key[slot] = key
            slot_beam[slot] = width
            slot_source_length[slot] = length
            slot_stream[slot] = request.stream
            slot_admitted_at[slot] = admitted_at
            slot_first_step_at[slot] = nan
            slot_alpha[slot] = option.length_penalty
            streaming += request.stream
            if option.return_attention:
                slot_attention[slot] = []
                attention += 1
        self.streaming += streaming
        self.any_attention += attention
        if widest > 1:
            for slot, option, width in zip(slots, options, widths, strict=True):
                if width > 1:
                    self.slot_wanted[slot] = option.num_hypotheses
                    self.slot_threshold[slot] = -math.inf
                    self.slot_finished_count[slot] = 0
                    self.widths[width] += 1
                    self.beam_rows += width
        self.requests += count
        self.memory_generation += 1
        return slots

    def retire(self, slots: Sequence[int]) -> None:
        """Free these slots; their rows become holes (filled by the next admission, or by `compact`)."""
        if not slots:
            return
        if self.beam_rows:
            for slot in slots:
                beam = self.slot_beam[slot]
                if beam == 1:
                    self.holes.append(int(self.slot_rows[slot, 0]))
                else:
                    self.holes.extend(self.slot_rows[slot, :beam].tolist())
                    self.widths[beam] -= 1
                    if not self.widths[beam]:
                        del self.widths[beam]
                    self.beam_rows -= beam
                    self.slot_finished[slot] = []
        elif len(slots) >= GATHER_FROM:  # every request greedy, one row each: their rows in one read
            self.holes += self.slot_rows[:, 0][slots].tolist()  # a 1-D gather: cheaper than [slots, 0]
        else:
            self.holes += [int(self.slot_rows[slot, 0]) for slot in slots]
        lengths, slot_source_length = self._lengths, self.slot_source_length
        for slot in slots:
            lengths[slot_source_length[slot]] -= 1
        if self.streaming:
            self.streaming -= sum([self.slot_stream[slot] for slot in slots])
        if self.any_attention:
            slot_attention = self.slot_attention
            for slot in slots:
                if slot_attention[slot] is not None:
                    slot_attention[slot] = None
                    self.any_attention -= 1
        self._free_slots += slots
        self.requests -= len(slots)
        if self.longest_source and not lengths[self.longest_source]:
            self.longest_source = max((n for n in range(self.longest_source) if lengths[n]), default=0)

    def compact(self) -> None:
        """Make rows [0, rows) all live: the last rows move into the holes (swap-with-last), and the source
        axis shrinks with the longest source (a long request leaving makes every step cheaper)."""
        if not self.holes:
            # No request left since the last compact (every retirement leaves holes), or admissions filled every
            # hole, and admit lays the memory out for the longest source itself: nothing to do, at most steps.
            return
        kept = self.rows - len(self.holes)
        gone = set(self.holes)
        holes = [row for row in self.holes if row < kept]
        if holes:
            movers = [row for row in range(kept, self.rows) if row not in gone]
            self._rows[:, holes] = self._rows[:, movers]
            self.row_score[holes] = self.row_score[movers]
            for tensors in (self.memory, self.state):
                for array in tensors.values():
                    array[holes] = array[movers]
            for hole, slot, beam in zip(holes, *self._rows[2:4, holes].tolist(), strict=False):
                self.slot_rows[slot, beam] = hole
        self.rows = kept
        self.holes = []
        if self.rows:
            self._relayout_memory(bucketed(self.longest_source, self.source_bucket))
        self.memory_generation += 1

    @property
    def live_rows(self) -> int:
        """Rows of active requests (holes excluded)."""
        return self.rows - len(self.holes)

    def rows_of(self, slot: int) -> np.ndarray:
        """The rows of a slot, in beam order."""
        return self.slot_rows[slot, : self.slot_beam[slot]]

    def active_slots(self) -> list[int]:
        """Slots in the batch (one entry per request), after `compact`; for rare paths, not the step loop."""
        first_rows = self.row_beam_index[: self.rows] == 0
        slots: list[int] = self.row_slot[: self.rows][first_rows].tolist()
        return slots
