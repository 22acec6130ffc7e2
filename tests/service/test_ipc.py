"""The boundary between front-end and engine processes, on its own: a real EngineServer and SocketClient over a
real Unix socket, the engine's real ModelManager and AsyncEngine decoding with the engine tests' gated fake step
model. What crosses must arrive exactly as an in-process engine would give it (results, streamed tokens,
errors), cancellations and deadlines must reach the engine, a reload must never refuse a call on its way, and a
lost engine must fail the calls in flight at once.

Both ends run on one event loop here; tests/reliability/test_frontends.py runs them as real processes.
"""

from __future__ import annotations

import asyncio
import errno
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.engine import AsyncEngine, EngineRequest
from service.engine_client.socket_client import SocketClient
from service.errors import DeadlineExceeded, Overloaded, RequestCancelled, Unavailable
from service.ipc.engine_server import EngineServer
from service.ipc.messages import READ_SPACE, RESTING_BUFFER, FrameReader, QueueDepth, Registry, Submit, encode_frame
from service.metrics import ServerMetrics
from service.registry import ModelEvent, ModelEventKind, RegistryReport, ServedVersion
from service.runtime.model import LoadedModel, read_text_side
from service.settings import Settings
from tests.engine.fakes import NO_EOS, FakeStepModel, StepGate, collector_off, make_request, outcome, source

pytestmark = pytest.mark.slow  # trains models or starts servers

NAME = "dates"
HANG_S = 60.0
"""A generous bound on a wait that would otherwise hang when what the test proves is broken."""


@dataclass
class Pair:
    server: EngineServer
    client: SocketClient
    metrics: ServerMetrics
    availability: list[bool]
    availability_changed: asyncio.Event

    @property
    def served(self) -> ServedVersion:
        """The front-end's view of the served version (what the dataplane resolves)."""
        return self.client.registry.resolve(NAME, "")

    @property
    def engine(self) -> AsyncEngine:
        """The engine process's engine of that version."""
        engine = self.server.manager.engine(NAME, 1)
        assert engine is not None
        return engine

    def submit(self, *requests: EngineRequest) -> list:  # type: ignore[type-arg]
        return self.client.submit(self.served, requests)

    def finished(self, reason: str) -> float:
        """The engine's attnserve_finished_requests_total for `reason`."""
        value = self.metrics.collectors.get_sample_value(
            "attnserve_finished_requests_total", {"model": NAME, "version": "1", "reason": reason}
        )
        return value or 0.0


def fake_loader(model: FakeStepModel):  # type: ignore[no-untyped-def]
    """A ModelManager loader: the version's real model.json and tokenizers, the fake step model."""

    def load(directory: Path) -> LoadedModel:
        document, source_tokenizer, target_tokenizer = read_text_side(directory)
        return LoadedModel(document, directory, source_tokenizer, target_tokenizer, model)  # type: ignore[arg-type]

    return load


@asynccontextmanager
async def connected(
    tmp_path: Path, version_dir: Path, model: FakeStepModel, *, waiting: int = 64, gate: StepGate | None = None
) -> AsyncIterator[Pair]:
    """An engine server on a repository holding `version_dir` alone, and a socket client connected to it. The
    fake's `gate` is set once the version has loaded (its warm-up steps pass freely)."""
    repository = tmp_path / "repository"
    (repository / NAME).mkdir(parents=True)
    (repository / NAME / "1").symlink_to(version_dir, target_is_directory=True)
    settings = Settings(
        model_repository=repository,
        metrics_port=0,
        max_waiting_requests=waiting,
        source_bucket_tokens=1,
        repository_poll_seconds=0,
        # A held step would hold the loop itself (both ends share it here): with a gate, the engine steps on a
        # thread; without, on the loop, so both drivers cross the socket.
        engine_steps_on_loop=gate is None,
    )
    metrics = ServerMetrics()
    server = EngineServer(settings, metrics, loader=fake_loader(model))
    socket_path = tmp_path / "engine.sock"
    await server.start(socket_path)
    model.gate = gate
    client = SocketClient(settings, socket_path)
    availability: list[bool] = []
    changed = asyncio.Event()

    def follow(available: bool) -> None:
        availability.append(available)
        changed.set()

    client.on_availability = follow
    await client.start()
    try:
        yield Pair(server, client, metrics, availability, changed)
    finally:
        if gate is not None:
            gate.open()
        await client.stop(5.0)
        await server.stop(5.0)


async def until(condition, changed: asyncio.Event | None = None, turns: int = 10_000) -> None:  # type: ignore[no-untyped-def]
    """Let the event loop run until `condition()` holds: at most `turns` turns (a message crossing the socket
    takes a few), then fail."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


@pytest.fixture
def version_dir(tiny_repository: Path) -> Path:
    return tiny_repository / NAME / "1"


def test_frames_split_anywhere_decode_to_the_same_messages() -> None:
    messages = [Registry(3, RegistryReport(NAME, False, [])), QueueDepth(NAME, 1, 3, 41)]
    frame = encode_frame(messages) + encode_frame(messages[1:])
    for cut in range(len(frame) + 1):
        received: list[object] = []
        reader = FrameReader(received.extend)
        reader.feed(frame[:cut])
        reader.feed(frame[cut:])
        assert received == [*messages, messages[1]]


def test_reads_into_the_readers_buffer_decode_every_frame_and_a_large_frame_leaves_no_large_buffer() -> None:
    """As asyncio's BufferedProtocol drives it: each read fills part of the room get_buffer() offers. Frames of every
    size arrive whole and in order; a frame that has begun to arrive is offered room for all of its rest; once a frame
    larger than the buffer is decoded, the room offered is back to the resting buffer's."""
    large = [QueueDepth("x" * (3 * RESTING_BUFFER), 1, 2, 3)]
    batches = [[QueueDepth(NAME, n, n + 1, 41)] for n in range(40)] + [large] + [[QueueDepth(NAME, 5, 6, 7)] * 3]
    stream = b"".join(encode_frame(batch) for batch in batches)
    large_starts = sum(len(encode_frame(batch)) for batch in batches[:40])
    received: list[object] = []
    reader = FrameReader(received.extend)
    read_sizes = [1, 3, 7, 4096, 70_000, 1 << 20]  # short reads, and reads longer than the room
    position = turn = 0
    while position < len(stream):
        room = reader.get_buffer(-1)
        if large_starts + 8 <= position < large_starts + len(encode_frame(large)):
            assert len(room) >= large_starts + len(encode_frame(large)) - position
        count = min(len(room), read_sizes[turn % len(read_sizes)], len(stream) - position)
        room[:count] = stream[position : position + count]
        room.release()
        reader.buffer_updated(count)
        position, turn = position + count, turn + 1
    assert received == [message for batch in batches for message in batch]
    assert len(reader.get_buffer(-1)) == RESTING_BUFFER >= 2 * READ_SPACE


def test_engine_records_cross_as_they_are() -> None:
    """Token ids and attention are numpy arrays inside the records; they arrive with their dtype and shape."""
    request = make_request(source(3, 4), beam=2, hypotheses=2, attention=True, arrival=1.5)
    received: list[object] = []
    FrameReader(received.extend).feed(encode_frame([Submit([7], NAME, 1, [request])]))
    [submit] = received
    assert isinstance(submit, Submit) and (submit.ids, submit.name, submit.version) == ([7], NAME, 1)
    [got] = submit.requests
    assert got.source_ids.dtype == np.int64 and got.source_ids.tolist() == request.source_ids.tolist()
    assert (got.options, got.deadline, got.stream, got.arrival) == (request.options, None, False, 1.5)


def test_results_and_streams_cross_unchanged(tmp_path: Path, version_dir: Path) -> None:
    """Greedy, beam with attention, and streamed tokens: what the front-end gets is what the engine's own
    AsyncEngine gives for the same request."""

    requests = [
        make_request(source(3, 4, 5)),
        make_request(source(6, 7), beam=4, hypotheses=3, attention=True),
        make_request(source(5, 9, 11, 4), stream=True, attention=True),
    ]

    async def main() -> None:
        async with connected(tmp_path, version_dir, FakeStepModel(vocab_size=12, top_k=8)) as pair:
            for request in requests:
                [remote] = pair.submit(request)
                local = pair.engine.submit(request)
                if request.stream:
                    remote_tokens = [event async for event in remote.tokens()]
                    local_tokens = [event async for event in local.tokens()]
                    assert [(e.token_id, e.position, e.log_prob, e.alignment) for e in remote_tokens] == [
                        (e.token_id, e.position, e.log_prob, e.alignment) for e in local_tokens
                    ]
                    for a, b in zip(remote_tokens, local_tokens, strict=True):
                        assert np.array_equal(a.attention, b.attention)
                got, expected = await remote.result(), await local.result()
                assert len(got.hypotheses) == len(expected.hypotheses) == request.options.num_hypotheses
                for a, b in zip(got.hypotheses, expected.hypotheses, strict=True):
                    assert (a.token_ids, a.score, a.log_prob, a.finish_reason, a.alignment) == (
                        b.token_ids,
                        b.score,
                        b.log_prob,
                        b.finish_reason,
                        b.alignment,
                    )
                    assert (a.attention is None) == (b.attention is None) == (not request.options.return_attention)
                    if a.attention is not None:
                        assert np.array_equal(a.attention, b.attention)

    asyncio.run(main())


def test_a_cancellation_reaches_the_engine(tmp_path: Path, version_dir: Path) -> None:
    gate = StepGate()

    async def main() -> None:
        model = FakeStepModel(vocab_size=12, support=NO_EOS)
        async with connected(tmp_path, version_dir, model, gate=gate) as pair:
            [handle] = pair.submit(make_request(source(3, 4), max_length=8))
            await gate.until_blocked()  # the request is decoding in the engine
            handle.cancel()
            assert isinstance(await outcome(handle), RequestCancelled)
            # The decoder step is still held: only the Cancel message can end the request in the engine.
            await until(lambda: pair.finished("cancelled") == 1)
            assert pair.engine.outstanding == 0 and pair.finished("eos") + pair.finished("length") == 0

    asyncio.run(main())


def test_a_deadline_set_in_the_front_end_is_kept_by_the_engine(tmp_path: Path, version_dir: Path) -> None:
    async def main() -> None:
        async with connected(tmp_path, version_dir, FakeStepModel(vocab_size=12)) as pair:
            passed = asyncio.get_running_loop().time() - 1.0  # the loop's clock is time.monotonic()
            [handle] = pair.submit(make_request(source(3, 4), deadline=passed))
            error = await outcome(handle)
            assert isinstance(error, DeadlineExceeded), error
            assert pair.finished("deadline") == 1

    asyncio.run(main())


def test_the_engine_queue_limit_holds_for_all_front_ends(tmp_path: Path, version_dir: Path) -> None:
    gate = StepGate()

    async def main() -> None:
        model = FakeStepModel(vocab_size=12, support=NO_EOS)
        async with connected(tmp_path, version_dir, model, waiting=2, gate=gate) as pair:
            first = pair.submit(make_request(source(3, 4)))
            await gate.until_blocked()  # the first request is in the batch; the queue is empty
            # The front-end's last view of the queue says it is empty, so it sends all of these; the engine refuses
            # what does not fit, each call whole, with the limit in the message.
            calls = [pair.submit(make_request(source(3, 4 + index))) for index in range(4)]
            endings = [await outcome(handles[0]) for handles in calls[2:]]
            assert all(isinstance(ending, Overloaded) for ending in endings), endings
            assert all(str(ending).endswith("the limit is 2; retry later") for ending in endings)
            # The engine told the front-end, which now refuses at once, without a round trip.

            def refuses_at_once() -> bool:
                try:
                    pair.client.check_room(pair.served, 1)
                except Overloaded:
                    return True
                return False

            await until(refuses_at_once)
            gate.open()
            for handles in [first, *calls[:2]]:
                assert (await handles[0].result()).hypotheses

    asyncio.run(main())


def test_a_reload_never_refuses_a_call_on_its_way(tmp_path: Path, version_dir: Path) -> None:
    """A front-end resolved the latest version from its last report; the engine retires that version before the
    call arrives. The retired version keeps taking calls until the front-end acknowledged the report that
    retired it, so the call decodes there; afterwards the version drains and stops."""

    async def main() -> None:
        async with connected(tmp_path, version_dir, FakeStepModel(vocab_size=12)) as pair:
            version_one = pair.served
            on_its_way = []

            def submit_when_retired(event: ModelEvent) -> None:
                # The engine has just retired version 1 and queued its report; the front-end has not read it, and
                # sends a call for version 1 now: the engine reads the call after the retirement.
                if event.kind is ModelEventKind.RETIRED:
                    on_its_way.extend(pair.client.submit(version_one, [make_request(source(3, 4))]))

            pair.server.manager.add_listener(submit_when_retired)
            (pair.server.settings.model_repository / NAME / "2").symlink_to(version_dir, target_is_directory=True)
            await pair.server.manager.refresh()
            assert pair.server.manager.registry.resolve(NAME, "").version == 2
            [handle] = on_its_way
            assert (await handle.result()).hypotheses  # decoded by version 1, after its retirement
            await until(lambda: pair.client.registry.resolve(NAME, "").version == 2)
            await until(lambda: pair.server.manager.engine(NAME, 1) is None)  # drained and stopped

    asyncio.run(main())


def test_a_retired_version_is_freed_as_it_stops_though_a_stream_of_it_ended_in_an_error(
    tmp_path: Path, version_dir: Path
) -> None:
    """A stream cancelled in the engine ends its forwarding with the error raised by `tokens()`. Its handle then
    lives on in a reference cycle (the error's traceback) until the garbage collector's next full pass, which in
    an engine process comes minutes apart; a resolved handle holds nothing of its engine, so the engine of a
    retired version (and with it the version's sessions and batch) is freed the moment it stops. The collector is
    off here: only reference counting frees anything."""
    gate = StepGate()

    async def main() -> None:
        model = FakeStepModel(vocab_size=12, support=NO_EOS)
        async with connected(tmp_path, version_dir, model, gate=gate) as pair:
            [stream] = pair.submit(make_request(source(3, 4), max_length=8, stream=True))
            await gate.until_blocked()  # decoding in the engine, on its worker thread
            stream.cancel()
            await until(lambda: pair.finished("cancelled") == 1)
            version_one = weakref.ref(pair.engine)
            gate.open()
            (pair.server.settings.model_repository / NAME / "2").symlink_to(version_dir, target_is_directory=True)
            await pair.server.manager.refresh()
            await until(lambda: pair.server.manager.engine(NAME, 1) is None)  # drained and stopped
            assert version_one() is None

    with collector_off():
        asyncio.run(main())


def test_a_lost_engine_fails_the_calls_in_flight_with_unavailable(tmp_path: Path, version_dir: Path) -> None:
    gate = StepGate()

    async def main() -> None:
        model = FakeStepModel(vocab_size=12, support=NO_EOS)
        async with connected(tmp_path, version_dir, model, gate=gate) as pair:
            served = pair.served
            [handle] = pair.submit(make_request(source(3, 4)))
            await gate.until_blocked()
            for connection in list(pair.server.connections):  # as when the engine process dies
                connection.channel.abort()
            error = await outcome(handle)
            assert isinstance(error, Unavailable) and "engine process stopped" in str(error)
            assert pair.availability == [True, False]  # up at the start, then down
            with pytest.raises(Unavailable, match="engine process"):
                pair.client.registry.resolve(NAME, "")
            with pytest.raises(Unavailable):
                pair.client.submit(served, [make_request(source(3, 4))])
            while pair.availability != [True, False, True]:  # it reconnects on its own (the server still listens)
                pair.availability_changed.clear()
                await pair.availability_changed.wait()
            assert pair.client.registry.resolve(NAME, "").version == 1
            gate.open()
            [again] = pair.submit(make_request(source(3, 4)))
            assert (await again.result()).hypotheses

    asyncio.run(main())


@pytest.mark.parametrize("refusal", [ConnectionResetError, BlockingIOError], ids=["reset", "backlog full"])
def test_a_front_end_keeps_reconnecting_through_any_error_of_the_socket(
    tmp_path: Path, version_dir: Path, refusal: type[OSError]
) -> None:
    """An engine process that dies while it accepts resets the front-end's connection attempt; one that is swamped
    may have a full backlog. Either passes, so the front-end tries again, as it does while the socket is missing
    or refuses. (A soak lost a front-end to the reset: its reconnection ended there.) The loop's connect fails
    with `refusal` for the first two attempts after the engine is lost, then goes through."""

    async def main() -> None:
        async with connected(tmp_path, version_dir, FakeStepModel(vocab_size=12)) as pair:
            loop = asyncio.get_running_loop()
            connect = loop.create_unix_connection
            attempts: list[str] = []

            async def failing_twice(*args: Any, **kwargs: Any) -> Any:
                attempts.append(refusal.__name__ if len(attempts) < 2 else "connected")
                if len(attempts) <= 2:
                    raise refusal(errno.ECONNRESET if refusal is ConnectionResetError else errno.EAGAIN, "refused")
                return await connect(*args, **kwargs)

            loop.create_unix_connection = failing_twice  # type: ignore[method-assign]
            for connection in list(pair.server.connections):  # as when the engine process dies
                connection.channel.abort()

            async def reconnected() -> None:
                while pair.availability != [True, False, True]:
                    pair.availability_changed.clear()
                    await pair.availability_changed.wait()

            # A bound on a hang, not a measurement: before, the reconnection ended at the first error.
            await asyncio.wait_for(reconnected(), HANG_S)
            assert attempts == [refusal.__name__, refusal.__name__, "connected"]
            [handle] = pair.submit(make_request(source(3, 4), max_length=3))
            assert (await handle.result()).hypotheses

    asyncio.run(main())


def test_requests_record_their_arrival_in_the_front_end(tmp_path: Path, version_dir: Path) -> None:
    """Queue wait and totals are measured from the front-end's arrival time, which crosses unchanged."""

    async def main() -> None:
        async with connected(tmp_path, version_dir, FakeStepModel(vocab_size=12)) as pair:
            arrival = asyncio.get_running_loop().time() - 5.0
            [handle] = pair.submit(make_request(source(3, 4), arrival=arrival))
            result = await handle.result()
            assert result.queue_wait_s >= 5.0 and result.total_s >= result.queue_wait_s

    asyncio.run(main())
