"""The IO-binding step path (the one CUDA uses) gives the same outputs as plain runs, uploading memory rarely."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.engine import DecodeOptions, EngineLimits, Scheduler, TranslationRequest
from service.runtime.model import load_model


def decode_all(step_model, sources: list[list[int]]) -> list[list[int]]:
    import asyncio

    async def run() -> list[list[int]]:
        scheduler = Scheduler(step_model, limits=EngineLimits())
        await scheduler.start()
        try:
            handles = [
                scheduler.submit(
                    TranslationRequest(np.array(s, dtype=np.int64), DecodeOptions(beam_size=2, max_length=16))
                )
                for s in sources
            ]
            return [(await h.result()).hypotheses[0].token_ids for h in handles]
        finally:
            await scheduler.stop(5.0)

    return asyncio.run(run())


def test_io_binding_matches_plain_runs(tiny_repository: Path) -> None:
    directory = tiny_repository / "numbers" / "1"
    plain = load_model(directory, provider="cpu", intra_op_threads=1)
    bound = load_model(directory, provider="cpu", intra_op_threads=1, io_binding=True)
    assert bound.step_model.io_binding and not plain.step_model.io_binding
    texts = ["vierundachtzig", "quatre-vingt-dix-sept", "dreihundertzwölf", "mille"]
    sources = [plain.source_tokenizer.encode(t) + [2] for t in texts]
    assert decode_all(bound.step_model, sources) == decode_all(plain.step_model, sources)
    # Memory goes to the device when the batch composition changes, not at every step.
    steps = 16
    assert 1 <= bound.step_model.memory_uploads < steps
