"""The engine's own cost per decoder step: the core driven over a model whose calls cost nothing.

A `FreeStepModel` returns prepared arrays (no arithmetic), so what a step costs is the engine: admission,
the search over every row, retirement, and the outputs. The batch is kept full at a given number of rows
in a steady state: every request generates exactly `tokens` tokens (the free model never says eos), so
rows / beam / tokens requests finish, and as many are admitted, at every step, as under real load.
Steps are timed in the thread's CPU time, so a busy machine stretches the figures less than wall time would.

    python -m loadtests.engine_overhead            # prints the table for greedy and beam 4
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, replace

import numpy as np

from service.engine import DecodeOptions, EngineCore, EngineRequest
from service.runtime.step import EncoderOutput, StepOutput
from service.settings import Settings

HIDDEN = 64
SOURCE_TOKENS = 12


class FreeStepModel:
    """A StepModel whose encoder and decoder calls return prepared arrays: it costs (almost) nothing."""

    eos_id = 2
    bos_id = 1
    memory_names: tuple[str, ...] = ("memory",)
    state_names: tuple[str, ...] = ("hidden",)

    def __init__(self, max_rows: int, top_k: int = 8, vocab: int = 32) -> None:
        self.top_k = top_k
        rng = np.random.default_rng(0)
        # Candidates never include eos (ids 3..), in descending log-probability order.
        ids = np.argsort(-rng.random((max_rows, vocab - 3)), axis=1)[:, :top_k] + 3
        self._ids = ids.astype(np.int64)
        self._log_probs = np.sort(-rng.random((max_rows, top_k)).astype(np.float32), axis=1)[:, ::-1].copy()
        self._attention = np.zeros((max_rows, 256), dtype=np.float32)
        self._attention[:, 0] = 1.0
        self._memory = np.zeros((max_rows, 256, HIDDEN), dtype=np.float32)
        self._state = np.zeros((max_rows, HIDDEN), dtype=np.float32)

    def encode(self, source_ids: np.ndarray, source_lengths: np.ndarray) -> EncoderOutput:
        batch, length = source_ids.shape
        return EncoderOutput(memory={"memory": self._memory[:batch, :length]}, state={"hidden": self._state[:batch]})

    def step(
        self,
        tokens: np.ndarray,
        source_lengths: np.ndarray,
        memory: dict[str, np.ndarray],
        state: dict[str, np.ndarray],
        *,
        memory_version: int = -1,
    ) -> StepOutput:
        rows, padded = memory["memory"].shape[:2]
        # The state is a new array, as a real runtime's output is (the engine reorders it in place).
        return StepOutput(
            topk_log_probs=self._log_probs[:rows],
            topk_ids=self._ids[:rows],
            attention=self._attention[:rows, :padded],
            state={"hidden": self._state[:rows].copy()},
        )


@dataclass(frozen=True)
class OverheadPoint:
    """Engine cost per decoder step at `rows` rows of `beam`-wide requests: median and 90th percentile (us),
    and the cost per row."""

    rows: int
    beam: int
    median_us: float
    p90_us: float
    per_row_us: float
    requests_per_step: float


def measure_overhead(rows: int, beam: int = 1, *, tokens: int = 16, steps: int = 400) -> OverheadPoint:
    """Steady-state engine cost per step with the batch full at `rows` rows (see the module docstring)."""
    model = FreeStepModel(max_rows=rows)
    limits = replace(
        Settings().engine_limits(),
        max_active_hypotheses=rows,
        max_padded_source_tokens=rows * 64,
        max_waiting_requests=1 << 20,
    )
    core = EngineCore(model, limits)
    options = DecodeOptions(beam_size=beam, num_hypotheses=1, max_length=tokens)
    source_ids = np.arange(4, 4 + SOURCE_TOKENS, dtype=np.int64)
    added = 0
    requests = max(1, rows // beam)
    per_step = max(1, requests // tokens)  # the requests that finish, and join, at each step

    def add() -> None:
        nonlocal added
        added += 1
        core.add(added, EngineRequest(source_ids, options, deadline=None, stream=False, arrival=0.0), 0.0)

    def top_up() -> None:  # keep enough waiting that every freed row is taken at the next step
        while added - core.dequeued + core.running < requests + per_step:
            add()

    # Fill the batch a few requests per step, so that their ages spread evenly over 0..tokens-1: then as
    # many finish at every step as join, the steady state of a loaded server.
    for _ in range(tokens):
        for _ in range(per_step):
            add()
        core.step()
    for _ in range(tokens):
        top_up()
        core.step()
    times: list[float] = []
    finished = 0
    for _ in range(steps):
        top_up()
        started = time.thread_time()
        output = core.step()
        times.append(time.thread_time() - started)
        finished += len(output.finished)
    times.sort()
    median = statistics.median(times) * 1e6
    return OverheadPoint(
        rows=rows,
        beam=beam,
        median_us=median,
        p90_us=times[int(0.9 * len(times))] * 1e6,
        per_row_us=median / rows,
        requests_per_step=finished / steps,
    )


def main(argv: list[str] | None = None) -> int:
    # Rows printed by hand as each is measured (a minute or more each), not as one table at the end.
    print("| beam | rows | us per step (median) | p90 | us per row | requests finished per step |")
    print("|---:|---:|---:|---:|---:|---:|")
    for beam in (1, 4):
        for rows in (16, 64, 256):
            point = measure_overhead(rows, beam)
            print(
                f"| {beam} | {rows} | {point.median_us:.0f} | {point.p90_us:.0f} | {point.per_row_us:.2f} | "
                f"{point.requests_per_step:.1f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
