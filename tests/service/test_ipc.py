"""The boundary between front-end and engine processes, on its own: a real EngineEndpoint and EngineClient over a
real Unix socket, a real Scheduler decoding with the engine tests' gated fake step model. What crosses must
arrive exactly as an in-process scheduler would give it (results, streamed tokens, errors), cancellations and
deadlines must reach the engine, and a lost engine must fail the calls in flight at once.

Both ends run on one event loop here; tests/reliability/test_frontends.py runs them as real processes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from service.ipc.engine_side import EngineEndpoint
from service.ipc.frontend_side import EngineClient, RemoteScheduler, TextSide

from service.engine import EngineLimits, FinishReason, Scheduler, TranslationRequest
from service.errors import DeadlineExceeded, Overloaded, RequestCancelled, Unavailable
from service.ipc.messages import FrameReader, Models, QueueDepth, encode_frame
from service.models import ModelEvent
from service.registry import ModelEntry, ModelRegistry, ServedVersion
from service.runtime.model import read_text_side
from service.settings import Settings
from tests.engine.fakes import NO_EOS, FakeStepModel, RecordingRecorder, StepGate, make_request, outcome, source

NAME = "dates"


@dataclass
class OneModel:
    """The engine side's model source: one version whose scheduler decodes with the fake step model (the
    ModelManager's part, loading from disk, is what the real-process tests cover)."""

    registry: ModelRegistry
    listeners: list[Callable[[ModelEvent], None]] = field(default_factory=list)

    def add_listener(self, listener: Callable[[ModelEvent], None]) -> None:
        self.listeners.append(listener)

    def begin_draining(self) -> None:
        self.registry.draining = True

    async def stop(self, grace_s: float) -> None:
        self.begin_draining()
        for served in self.registry.served_versions():
            await served.scheduler.stop(grace_s)


@dataclass
class Pair:
    endpoint: EngineEndpoint
    client: EngineClient
    engine_scheduler: Scheduler
    recorder: RecordingRecorder
    availability: list[bool]
    availability_changed: asyncio.Event

    @property
    def remote(self) -> RemoteScheduler:
        scheduler = self.client.registry.entries[NAME].served[1].scheduler
        assert isinstance(scheduler, RemoteScheduler)
        return scheduler


@asynccontextmanager
async def connected(
    tmp_path: Path, version_dir: Path, model: FakeStepModel, *, waiting: int = 64
) -> AsyncIterator[Pair]:
    recorder = RecordingRecorder()
    scheduler = Scheduler(
        model,
        limits=EngineLimits(source_bucket=1, max_waiting_requests=waiting),
        recorder=recorder,
        name=NAME,
        version="1",
    )
    await scheduler.start()
    document, source_tokenizer, target_tokenizer = read_text_side(version_dir)
    registry = ModelRegistry(loaded_versions=1)
    text_side = TextSide(document, version_dir, source_tokenizer, target_tokenizer, "fake", 0.0)
    registry.entries[NAME] = ModelEntry(versions_on_disk=(1,), served={1: ServedVersion(NAME, 1, text_side, scheduler)})
    registry.default_model = NAME
    endpoint = EngineEndpoint(OneModel(registry))
    socket_path = tmp_path / "engine.sock"
    await endpoint.start(socket_path)
    client = EngineClient(Settings(max_waiting_requests=waiting), socket_path)
    availability: list[bool] = []
    changed = asyncio.Event()

    def follow(available: bool) -> None:
        availability.append(available)
        changed.set()

    client.on_availability = follow
    await client.start()
    try:
        yield Pair(endpoint, client, scheduler, recorder, availability, changed)
    finally:
        if model.gate is not None:
            model.gate.open()
        await client.stop(5.0)
        await endpoint.stop(5.0)


@pytest.fixture
def version_dir(tiny_repository: Path) -> Path:
    return tiny_repository / NAME / "1"


def test_frames_split_anywhere_decode_to_the_same_messages() -> None:
    messages = [Models(NAME, False, []), QueueDepth(NAME, 1, 3)]
    frame = encode_frame(messages) + encode_frame(messages[1:])
    for cut in range(len(frame) + 1):
        received: list[object] = []
        reader = FrameReader(received.extend)
        reader.feed(frame[:cut])
        reader.feed(frame[cut:])
        assert received == [*messages, messages[1]]


def test_results_and_streams_cross_unchanged(tmp_path: Path, version_dir: Path) -> None:
    """Greedy, beam with attention, and streamed tokens: what the front-end gets is what the engine's own
    scheduler gives for the same request."""

    requests = [
        make_request(source(3, 4, 5)),
        make_request(source(6, 7), beam=4, hypotheses=3, attention=True),
        make_request(source(5, 9, 11, 4), stream=True, attention=True),
    ]

    async def main() -> None:
        async with connected(tmp_path, version_dir, FakeStepModel(vocab_size=12, top_k=8)) as pair:
            for request in requests:
                [remote] = pair.remote.submit_all([request])
                [local] = pair.engine_scheduler.submit_all([request])
                if request.stream:
                    remote_tokens = [event async for event in remote.tokens()]
                    local_tokens = [event async for event in local.tokens()]
                    assert [(e.token_id, e.position, e.log_prob, e.alignment) for e in remote_tokens] == [
                        (e.token_id, e.position, e.log_prob, e.alignment) for e in local_tokens
                    ]
                    for a, b in zip(remote_tokens, local_tokens, strict=True):
                        assert np.array_equal(a.attention, b.attention)
                got, expected = await remote.result(), await local.result()
                assert len(got.hypotheses) == len(expected.hypotheses) >= 1
                for a, b in zip(got.hypotheses, expected.hypotheses, strict=True):
                    assert (a.token_ids, a.score, a.log_prob, a.finish_reason, a.alignment) == (
                        b.token_ids,
                        b.score,
                        b.log_prob,
                        b.finish_reason,
                        b.alignment,
                    )
                    assert (a.attention is None) == (b.attention is None)
                    if a.attention is not None:
                        assert np.array_equal(a.attention, b.attention)

    asyncio.run(main())


def test_a_cancellation_reaches_the_engine(tmp_path: Path, version_dir: Path) -> None:
    gate = StepGate()

    async def main() -> None:
        model = FakeStepModel(vocab_size=12, support=NO_EOS, gate=gate)
        async with connected(tmp_path, version_dir, model) as pair:
            [handle] = pair.remote.submit_all([make_request(source(3, 4), max_length=8)])
            await gate.until_blocked()  # the request is decoding in the engine
            handle.cancel()
            assert isinstance(await outcome(handle), RequestCancelled)
            # The decoder step is still held: only the Cancel message can end the request in the engine.
            while not pair.recorder.failed:
                await asyncio.sleep(0)  # lets the Cancel message cross and the engine handle it
            assert pair.recorder.failed == [FinishReason.CANCELLED] and pair.recorder.done == []

    asyncio.run(main())


def test_a_deadline_set_in_the_front_end_is_kept_by_the_engine(tmp_path: Path, version_dir: Path) -> None:
    async def main() -> None:
        async with connected(tmp_path, version_dir, FakeStepModel(vocab_size=12)) as pair:
            passed = asyncio.get_running_loop().time() - 1.0  # the loop's clock is time.monotonic()
            [handle] = pair.remote.submit_all([make_request(source(3, 4), deadline=passed)])
            error = await outcome(handle)
            assert isinstance(error, DeadlineExceeded), error
            assert pair.recorder.failed == [FinishReason.DEADLINE]

    asyncio.run(main())


def test_the_engine_queue_limit_holds_for_all_front_ends(tmp_path: Path, version_dir: Path) -> None:
    gate = StepGate()

    async def main() -> None:
        model = FakeStepModel(vocab_size=12, support=NO_EOS, gate=gate)
        async with connected(tmp_path, version_dir, model, waiting=2) as pair:
            first = pair.remote.submit_all([make_request(source(3, 4))])
            await gate.until_blocked()  # the first request is in the batch; the queue is empty
            # The front-end's last view of the queue says it is empty, so it sends all of these; the engine refuses
            # what does not fit, each call whole, with the limit in the message.
            calls = [pair.remote.submit_all([make_request(source(3, 4 + index))]) for index in range(4)]
            endings = [await outcome(handles[0]) for handles in calls[2:]]
            assert all(isinstance(ending, Overloaded) for ending in endings), endings
            assert all(str(ending).endswith("the limit is 2; retry later") for ending in endings)
            assert pair.remote.published_waiting == 2  # the engine told the front-end
            gate.open()
            for handles in [first, *calls[:2]]:
                assert (await handles[0].result()).hypotheses

    asyncio.run(main())


def test_a_lost_engine_fails_the_calls_in_flight_with_unavailable(tmp_path: Path, version_dir: Path) -> None:
    gate = StepGate()

    async def main() -> None:
        model = FakeStepModel(vocab_size=12, support=NO_EOS, gate=gate)
        async with connected(tmp_path, version_dir, model) as pair:
            [handle] = pair.remote.submit_all([make_request(source(3, 4))])
            await gate.until_blocked()
            for connection in list(pair.endpoint.connections):  # as when the engine process dies
                connection.channel.abort()
            error = await outcome(handle)
            assert isinstance(error, Unavailable) and "engine process stopped" in str(error)
            assert pair.availability == [True, False]  # up at the start, then down
            with pytest.raises(Unavailable, match="engine process"):
                pair.client.registry.resolve(NAME, "")
            with pytest.raises(Unavailable):
                pair.remote.submit_all([make_request(source(3, 4))])
            while pair.availability != [True, False, True]:  # it reconnects on its own (the endpoint still listens)
                pair.availability_changed.clear()
                await pair.availability_changed.wait()
            assert pair.client.registry.resolve(NAME, "").version == 1
            gate.open()
            [again] = pair.remote.submit_all([make_request(source(3, 4))])
            assert (await again.result()).hypotheses

    asyncio.run(main())


def test_requests_record_their_arrival_in_the_front_end(tmp_path: Path, version_dir: Path) -> None:
    """Queue wait and totals are measured from the front-end's arrival time, which crosses unchanged."""

    async def main() -> None:
        async with connected(tmp_path, version_dir, FakeStepModel(vocab_size=12)) as pair:
            arrival = asyncio.get_running_loop().time() - 5.0
            request = TranslationRequest(source(3, 4), make_request(source(3)).options, arrival=arrival)
            result = await pair.remote.submit_all([request])[0].result()
            assert result.queue_wait_s >= 5.0 and result.total_s >= result.queue_wait_s

    asyncio.run(main())
