"""The row batch: the decoder rows of every active request and the tensors of the next step.

Rows are grouped by request, in admission order; a request keeps the same number of rows for its whole
life (see beam.py), so its rows are one contiguous block. Because rows are independent (see the
`StepModel` contract), rows can be gathered, reordered and dropped with `np.take(axis=0)` between steps.

Memory is kept once per request (its [1, S_i, ...] slice) and the batch's memory arrays [rows, S, ...]
are rebuilt only when the set of requests changes (admission, retirement), zero-padded up to the longest
source in the batch (so the padding shrinks when the longest request leaves). Beam reordering within a
request never touches memory: all of a request's rows share it.

Only the engine's worker thread touches a RowBatch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from service.engine.beam import Search, StepDecision


@dataclass(eq=False)
class BatchMember:
    """One request's place in the batch: its search, its source and its timing (time.monotonic() seconds)."""

    key: int
    search: Search
    source_length: int
    memory: dict[str, np.ndarray]  # per memory name: [1, source_length, ...]
    admitted_at: float
    first_step_at: float | None = None
    last_step_at: float | None = None

    @property
    def rows(self) -> int:
        """Decoder rows this request occupies (constant for its life)."""
        return self.search.rows


@dataclass(frozen=True)
class StepInputs:
    """The tensors of one decoder step over every row of the batch."""

    tokens: np.ndarray  # int64 [N]
    source_lengths: np.ndarray  # int64 [N]
    memory: dict[str, np.ndarray]  # [N, S, ...], zero beyond each row's length
    state: dict[str, np.ndarray]  # [N, ...]


class RowBatch:
    """Active requests' decoder rows, their next tokens and state, and the memory of the next step."""

    def __init__(self, memory_names: tuple[str, ...], state_names: tuple[str, ...]) -> None:
        self.memory_names = memory_names
        self.state_names = state_names
        self.memory_rebuilds = 0  # how many times the batch memory was rebuilt (tests check it stays rare)
        self._members: list[BatchMember] = []
        self._tokens = np.empty(0, dtype=np.int64)
        self._state: dict[str, np.ndarray] = {}
        self._source_lengths = np.empty(0, dtype=np.int64)
        self._memory: dict[str, np.ndarray] | None = None  # None: the request set changed; rebuild before stepping

    @property
    def members(self) -> Sequence[BatchMember]:
        """The active requests, in row order."""
        return self._members

    @property
    def rows(self) -> int:
        """Decoder rows in the next step."""
        return int(self._tokens.shape[0])

    @property
    def padded_source_len(self) -> int:
        """The memory length of the next step: the longest source in the batch (0 when empty)."""
        return max((member.source_length for member in self._members), default=0)

    def with_offsets(self) -> Iterator[tuple[BatchMember, int]]:
        """Each member with the index of its first row."""
        offset = 0
        for member in self._members:
            yield member, offset
            offset += member.rows

    def add(self, members: Sequence[BatchMember], initial_states: Sequence[dict[str, np.ndarray]], bos_id: int) -> None:
        """Append requests, each with `member.rows` copies of its initial state ([1, ...] per name), fed bos."""
        if not members:
            return
        copies = [member.rows for member in members]
        new_state = {
            name: np.concatenate(
                [np.repeat(state[name], count, axis=0) for state, count in zip(initial_states, copies)]
            )
            for name in self.state_names
        }
        if self._members:
            self._state = {name: np.concatenate([self._state[name], new_state[name]]) for name in self.state_names}
        else:
            self._state = new_state
        self._tokens = np.concatenate([self._tokens, np.full(sum(copies), bos_id, dtype=np.int64)])
        self._members.extend(members)
        self._request_set_changed()

    def remove(self, keys: Iterable[int]) -> list[BatchMember]:
        """Drop the rows of the requests with these keys; returns the members removed."""
        wanted = set(keys)
        if not wanted:
            return []
        keep_rows: list[np.ndarray] = []
        kept: list[BatchMember] = []
        removed: list[BatchMember] = []
        for member, offset in self.with_offsets():
            if member.key in wanted:
                removed.append(member)
            else:
                kept.append(member)
                keep_rows.append(np.arange(offset, offset + member.rows, dtype=np.int64))
        if removed:
            index = np.concatenate(keep_rows) if keep_rows else np.empty(0, dtype=np.int64)
            self._state = {name: np.take(array, index, axis=0) for name, array in self._state.items()}
            self._tokens = np.take(self._tokens, index)
            self._members = kept
            self._request_set_changed()
        return removed

    def clear(self) -> list[BatchMember]:
        """Drop every row; returns the members removed."""
        removed = self._members
        self._members = []
        self._state = {}
        self._tokens = np.empty(0, dtype=np.int64)
        self._request_set_changed()
        return removed

    def step_inputs(self) -> StepInputs:
        """The tensors for the next decoder step (rebuilding memory if the request set changed)."""
        if self._memory is None:
            self._memory = self._build_memory()
            self.memory_rebuilds += 1
        return StepInputs(
            tokens=self._tokens, source_lengths=self._source_lengths, memory=self._memory, state=self._state
        )

    def apply(self, decisions: Sequence[StepDecision], new_state: dict[str, np.ndarray]) -> list[BatchMember]:
        """Set up the next step from the decisions (one per member, in row order) and the step's state output.

        Finished members leave the batch; the others' rows are gathered from their parents. Returns the
        members that finished.
        """
        if len(decisions) != len(self._members):
            raise ValueError(f"{len(decisions)} decisions for {len(self._members)} requests")
        index_parts: list[np.ndarray] = []
        token_parts: list[np.ndarray] = []
        kept: list[BatchMember] = []
        finished: list[BatchMember] = []
        reordered = False
        for (member, offset), decision in zip(self.with_offsets(), decisions):
            if decision.done:
                finished.append(member)
                continue
            kept.append(member)
            if decision.parents is None:
                index_parts.append(np.arange(offset, offset + member.rows, dtype=np.int64))
            else:
                index_parts.append(offset + decision.parents)
                reordered = True
            token_parts.append(decision.next_tokens)
        if finished or reordered:
            index = np.concatenate(index_parts) if index_parts else np.empty(0, dtype=np.int64)
            self._state = {name: np.take(new_state[name], index, axis=0) for name in self.state_names}
        else:  # every row continues from itself: the step's output is already in row order
            self._state = {name: new_state[name] for name in self.state_names}
        self._tokens = np.concatenate(token_parts) if token_parts else np.empty(0, dtype=np.int64)
        if finished:
            self._members = kept
            self._request_set_changed()
        return finished

    def _request_set_changed(self) -> None:
        self._memory = None
        lengths = [np.full(member.rows, member.source_length, dtype=np.int64) for member in self._members]
        self._source_lengths = np.concatenate(lengths) if lengths else np.empty(0, dtype=np.int64)

    def _build_memory(self) -> dict[str, np.ndarray]:
        padded = self.padded_source_len
        memory: dict[str, np.ndarray] = {}
        for name in self.memory_names:
            if not self._members:
                memory[name] = np.empty((0, 0), dtype=np.float32)
                continue
            sample = self._members[0].memory[name]
            out = np.zeros((self.rows, padded, *sample.shape[2:]), dtype=sample.dtype)
            for member, offset in self.with_offsets():
                # [1, S_i, ...] broadcasts over the member's rows; positions >= S_i stay zero.
                out[offset : offset + member.rows, : member.source_length] = member.memory[name]
            memory[name] = out
        return memory
