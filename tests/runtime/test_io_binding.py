"""The IO-binding step path (the one CUDA uses) gives the same outputs as plain runs, uploading memory rarely."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.engine import AsyncEngine
from service.runtime.model import load_model
from tests.engine.fakes import RecordingRecorder, engine_limits, make_request

pytestmark = pytest.mark.slow  # trains models or starts servers


def decode_all(step_model, sources: list[list[int]], recorder: RecordingRecorder | None = None) -> list[list[int]]:
    import asyncio

    async def run() -> list[list[int]]:
        engine = AsyncEngine(step_model, limits=engine_limits(), recorder=recorder)
        await engine.start()
        try:
            handles = [engine.submit(make_request(np.array(s), beam=2, max_length=16)) for s in sources]
            return [(await h.result()).hypotheses[0].token_ids for h in handles]
        finally:
            await engine.stop(5.0)

    return asyncio.run(run())


def test_io_binding_matches_plain_runs(tiny_repository: Path) -> None:
    directory = tiny_repository / "numbers" / "1"
    plain = load_model(directory, provider="cpu", intra_op_threads=1)
    bound = load_model(directory, provider="cpu", intra_op_threads=1, io_binding=True)
    assert bound.step_model.io_binding and not plain.step_model.io_binding
    texts = ["vierundachtzig", "quatre-vingt-dix-sept", "dreihundertzwölf", "mille"]
    sources = [plain.source_tokenizer.encode(t) + [2] for t in texts]
    recorder = RecordingRecorder()
    assert decode_all(bound.step_model, sources, recorder) == decode_all(plain.step_model, sources)
    # Memory goes to the device when the batch's memory changes (a new version), not at every step.
    versions = [step.memory_generation for step in recorder.steps if step.rows]
    changes = sum(1 for before, after in zip([None, *versions], versions, strict=False) if before != after)
    assert len(versions) > changes  # some steps reused the memory on the device
    assert bound.step_model.memory_uploads == changes
