"""Admission by expected wait on a real server: a call that could not start within max_queue_wait_ms is answered
RESOURCE_EXHAUSTED at once, with the retry hint, over gRPC (the `grpc-retry-pushback-ms` trailer) and HTTP (429
with `Retry-After`), and counted by reason; the calls admitted before it are answered as usual.

Driven without timing: the real gRPC and HTTP servers on free loopback ports, over the real tiny `dates` model whose
decoder steps are held at a gate, so the engine takes nothing from its queue while the test's clock moves on a
quarter of a second at each call. Once those intervals are enough for a rate (TRUSTED_AFTER_INTERVALS), the queue's
drain rate is measured as 0 texts/s: a stalled queue, which no call can expect to start in, so the hint is the
longest one (LONGEST_RETRY_HINT_S). The front-end side (the same decision from the
engine process's reports) is tested in the same way below, over a real Unix socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import numpy as np
import pytest
from grpc import aio

from service.dataplane import Dataplane
from service.engine.records import EncoderOutput
from service.engine_client.admission import LONGEST_RETRY_HINT_S, MAX_INTERVAL_S, TRUSTED_AFTER_INTERVALS
from service.engine_client.gate import NARROW_AT_S, UNREPORTED_AFTER_S
from service.engine_client.in_process import InProcessClient
from service.engine_client.socket_client import SocketClient
from service.errors import QUEUE_WAIT, Overloaded
from service.gen.attnserve.v1 import translator_pb2 as pb
from service.gen.attnserve.v1 import translator_pb2_grpc as pb_grpc
from service.grpc_api.server import GrpcServer
from service.http_api.server import HttpServer
from service.ipc.engine_server import EngineServer
from service.metrics import ServerMetrics
from service.models import ModelManager
from service.runtime.model import LoadedModel, load_model
from service.runtime.step import StepOutput
from service.runtime.tokenizers import EOS
from service.settings import Settings
from tests.engine.fakes import StepGate, make_request, source
from tests.service.http_client import call
from tests.service.server_harness import make_settings

pytestmark = pytest.mark.slow  # starts servers on trained models

DATES = {"model": "dates", "version": "1"}


class HeldStepModel:
    """The real onnxruntime step model of a version, whose decoder steps wait at `gate` while one is set."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self.gate: StepGate | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def encode(self, source_ids: np.ndarray, source_lengths: np.ndarray) -> EncoderOutput:
        return self._model.encode(source_ids, source_lengths)

    def step(self, *args: Any, **kwargs: Any) -> StepOutput:
        if self.gate is not None:
            self.gate.pass_through()
        return self._model.step(*args, **kwargs)


class Clock:
    """The admission's clock: moved by the test only."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def dates_only(tiny_repository: Path, tmp_path: Path) -> Path:
    repository = tmp_path / "repository"
    shutil.copytree(tiny_repository / "dates", repository / "dates")
    return repository


@pytest.fixture
def held() -> Iterator[HeldStepModel]:
    models: list[HeldStepModel] = []
    yield models  # type: ignore[misc]
    for model in models:  # never leave a worker thread waiting at a gate
        if model.gate is not None:
            model.gate.open()


def held_loader(models: list[HeldStepModel], held_type: type[HeldStepModel] = HeldStepModel):  # type: ignore[no-untyped-def]
    """A model loader that wraps each version's step model in `held_type`, appended to `models`."""

    def load(directory: Path) -> LoadedModel:
        loaded = load_model(directory, provider="cpu", intra_op_threads=1)
        model = held_type(loaded.step_model)
        models.append(model)
        return dataclasses.replace(loaded, step_model=model)  # type: ignore[arg-type]

    return load


async def until(condition: Callable[[], bool], turns: int = 100_000) -> None:
    """Let the event loop run until `condition()` holds (a call reaches the engine in a few turns), else fail."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


def shed(metrics: ServerMetrics, reason: str, protocol: str) -> float:
    labels = {"model": "", "version": "", "reason": reason, "protocol": protocol}
    return metrics.collectors.get_sample_value("attnserve_shed_calls_total", labels) or 0.0


def test_a_call_that_could_not_start_in_time_is_refused_at_once_with_a_retry_hint(
    dates_only: Path, held: list[HeldStepModel]
) -> None:
    settings = make_settings(dates_only, max_queue_wait_ms=500.0, repository_poll_seconds=0)

    async def scenario() -> None:
        clock = Clock()
        metrics = ServerMetrics()
        client = InProcessClient(settings, metrics, loader=held_loader(held), clock=clock)
        dataplane = Dataplane(client, settings, clock=clock)
        grpc_server = GrpcServer(settings, client, dataplane, metrics)
        http_server = HttpServer(settings, dataplane, metrics)
        await client.start()
        await grpc_server.start()
        await http_server.start()
        (model,) = held
        gate = model.gate = StepGate()
        try:
            async with aio.insecure_channel(f"127.0.0.1:{settings.port}") as channel:
                stub = pb_grpc.TranslatorStub(channel)
                request = pb.TranslateRequest(model="dates", texts=["3 mars 1999"])
                # The first call's first decoder step is held: it is in the batch, and nothing leaves the queue.
                first = asyncio.ensure_future(stub.Translate(request))
                assert await asyncio.to_thread(gate.wait_blocked)
                # Two more wait in the queue. However their checks interleaved, their samples were all at this instant.
                queued = [asyncio.ensure_future(stub.Translate(request)) for _ in range(2)]
                engine = client.manager.engine("dates", 1)
                assert engine is not None
                await until(lambda: engine.queue_progress() == (2, 1))
                # Past the longest interval, the next call's sample starts a new one from the queue as it stands: no
                # rate yet, so it is admitted and queued too. So are the calls a quarter of a second apart after it:
                # each ends an interval in which nothing left, but they are too few yet for a rate.
                clock.now += 2 * MAX_INTERVAL_S
                for waiting in range(3, 3 + TRUSTED_AFTER_INTERVALS):
                    queued.append(asyncio.ensure_future(stub.Translate(request)))
                    await until(lambda waiting=waiting: engine.queue_progress() == (waiting, 1))
                    clock.now += 0.25
                # One interval more: the queue has not moved, drain rate 0, so no call can start within the bound.
                with pytest.raises(aio.AioRpcError) as refused:
                    await stub.Translate(request)
                error = refused.value
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "cannot start this call within 0.500 s (max_queue_wait_ms)" in (error.details() or "")
                assert "has not moved lately" in (error.details() or "")
                trailers = dict(error.trailing_metadata() or ())
                assert trailers["grpc-retry-pushback-ms"] == str(round(LONGEST_RETRY_HINT_S * 1000))
                assert shed(metrics, QUEUE_WAIT, "grpc") == 1
                with pytest.raises(aio.AioRpcError) as refused_stream:  # a stream is refused the same way
                    async for _ in stub.TranslateStream(request):
                        pass
                assert refused_stream.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert dict(refused_stream.value.trailing_metadata() or ())["grpc-retry-pushback-ms"] == "30000"
                assert shed(metrics, QUEUE_WAIT, "grpc") == 2

                reply = await asyncio.to_thread(
                    call, "POST", f"http://127.0.0.1:{http_server.port}/v1/translate", {"texts": ["3 mars 1999"]}
                )
                assert reply.status == 429
                assert reply.headers["retry-after"] == str(round(LONGEST_RETRY_HINT_S))
                assert reply.json()["code"] == "RESOURCE_EXHAUSTED"
                assert shed(metrics, QUEUE_WAIT, "http") == 1
                # The refused calls left nothing in the queue.
                assert engine.queue_progress() == (2 + TRUSTED_AFTER_INTERVALS, 1)

                # The calls admitted before are answered as usual once the engine moves again.
                gate.open()
                answers = await asyncio.gather(first, *queued)
                clock.now += 2 * MAX_INTERVAL_S  # later, with nothing waiting
                alone = await stub.Translate(request)  # what the model answers with nothing else going on
                assert answers == [alone] * (3 + TRUSTED_AFTER_INTERVALS)
        finally:
            gate.open()
            await grpc_server.drain(5.0, [http_server.stop])

    asyncio.run(scenario())


def test_a_frontend_refuses_from_the_engine_processes_reports(
    dates_only: Path, tmp_path: Path, held: list[HeldStepModel]
) -> None:
    """The same decision in a front-end process: its SocketClient measures the drain rate from the engine's queue
    reports (and its own clock), and refuses without asking the engine."""
    settings = make_settings(dates_only, max_queue_wait_ms=500.0, repository_poll_seconds=0)

    async def scenario() -> None:
        clock = Clock()
        engine_server = EngineServer(settings, ServerMetrics(), loader=held_loader(held))
        socket_path = tmp_path / "engine.sock"
        await engine_server.start(socket_path)
        (model,) = held
        gate = model.gate = StepGate()
        client = SocketClient(settings, socket_path, clock=clock)
        await client.start()
        try:
            served = client.registry.resolve("dates", "")
            text = source(*served.model.source_tokenizer.encode("3 mars 1999"))
            (first,) = client.submit(served, [make_request(text)])
            assert await asyncio.to_thread(gate.wait_blocked)
            client.submit(served, [make_request(text), make_request(text)])
            engine = engine_server.manager.engine("dates", 1)
            assert engine is not None
            # Until the engine has taken both in and its report has reached the front-end.
            await until(lambda: engine.queue_progress() == (2, 1) and client.reported_queue(served) == (2, 1))
            # The reports on the way were sampled at this same instant; past the longest interval, a sample starts a
            # new one from the queue as it stands (nothing to refuse yet: no rate).
            clock.now += 2 * MAX_INTERVAL_S
            for _ in range(TRUSTED_AFTER_INTERVALS):  # intervals in which nothing left, too few yet for a rate
                client.check_room(served, 1)
                clock.now += 0.25
            with pytest.raises(Overloaded) as refused:
                client.check_room(served, 1)
            assert refused.value.reason == QUEUE_WAIT
            assert refused.value.retry_after_s == LONGEST_RETRY_HINT_S
            assert "2 texts are ahead of it and the queue has not moved lately" in refused.value.message
            gate.open()
            assert (await first.result()).hypotheses
        finally:
            gate.open()
            await client.stop(5.0)
            await engine_server.stop(5.0)

    asyncio.run(scenario())


@contextlib.asynccontextmanager
async def two_connections(address: str) -> AsyncIterator[tuple[pb_grpc.TranslatorStub, pb_grpc.TranslatorStub]]:
    """Two clients on connections of their own (channels to one address share their connection unless each keeps
    its own subchannels), as the dataplane's turns tell clients apart."""
    own = [("grpc.use_local_subchannel_pool", 1)]
    async with (
        aio.insecure_channel(address, options=own) as first,
        aio.insecure_channel(address, options=own) as second,
    ):
        yield pb_grpc.TranslatorStub(first), pb_grpc.TranslatorStub(second)


class HeldAndWaiting(NamedTuple):
    a: pb_grpc.TranslatorStub
    b: pb_grpc.TranslatorStub
    held: asyncio.Future[pb.TranslateResponse]  # A's call, in the engine, its decoder held
    waiting: asyncio.Future[pb.TranslateResponse]  # B's call, waiting its turn


LATEST_DATES = pb.TranslateRequest(model="dates", texts=["3 mars 1999"])


@contextlib.asynccontextmanager
async def a_call_held_and_one_waiting(
    address: str, steps: StepGate, dataplane: Dataplane, waiting_request: pb.TranslateRequest = LATEST_DATES
) -> AsyncIterator[HeldAndWaiting]:
    """With max_active_calls 1: connection A's call (LATEST_DATES) in the engine, held at `steps`, and connection B's
    call (`waiting_request`) waiting its turn behind it. Calls still going on the way out are cancelled."""
    async with two_connections(address) as (a, b):
        calls = [asyncio.ensure_future(a.Translate(LATEST_DATES))]
        try:
            await steps.until_blocked()  # only then B's call: it must not overtake A's
            calls.append(asyncio.ensure_future(b.Translate(waiting_request)))
            await until(lambda: dataplane.gate.waiting == 1)
            yield HeldAndWaiting(a, b, *calls)
        finally:
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)


class EncodeRecorder(HeldStepModel):
    """A held step model that also writes down the sources it encodes, in order."""

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        self.encoded: list[tuple[int, ...]] = []

    def encode(self, source_ids: np.ndarray, source_lengths: np.ndarray) -> EncoderOutput:
        for row, length in zip(source_ids, source_lengths, strict=True):
            self.encoded.append(tuple(int(token) for token in row[:length]))
        return super().encode(source_ids, source_lengths)


def test_calls_beyond_max_active_calls_take_turns_one_connection_after_another(dates_only: Path) -> None:
    """One call in the engines at a time (max_active_calls 1), its decoder held: connection A queues three more calls,
    then connection B one. They go into the engine in the order a1, b1, a2, a3 (B waits behind one call of A, not
    three), as the order in which the engine encoded their sources shows; the gauges show the turns meanwhile."""
    settings = make_settings(dates_only, max_active_calls=1, repository_poll_seconds=0)
    recorders: list[HeldStepModel] = []

    texts = {"first": "1 mars 1999", "a1": "2 mars 1999", "a2": "3 mars 1999", "a3": "4 mars 1999", "b1": "5 mai 2001"}

    async def scenario() -> None:
        metrics = ServerMetrics()
        client = InProcessClient(settings, metrics, loader=held_loader(recorders, EncodeRecorder))
        dataplane = Dataplane(client, settings)
        metrics.watch_turns(dataplane.gate)
        server = GrpcServer(settings, client, dataplane, metrics)
        await client.start()
        await server.start()
        (model,) = recorders
        assert isinstance(model, EncodeRecorder)
        steps = model.gate = StepGate()
        model.encoded.clear()  # the warm-up's
        gauge = metrics.collectors.get_sample_value
        sources = {source_ids(client, text): name for name, text in texts.items()}
        try:
            async with two_connections(f"127.0.0.1:{settings.port}") as (a, b):

                def translate(stub: pb_grpc.TranslatorStub, name: str) -> asyncio.Future[pb.TranslateResponse]:
                    return asyncio.ensure_future(stub.Translate(pb.TranslateRequest(texts=[texts[name]])))

                calls = {"first": translate(a, "first")}
                await steps.until_blocked()
                for name in ("a1", "a2", "a3"):
                    calls[name] = translate(a, name)
                    await until(lambda name=name: dataplane.gate.waiting == int(name[1]))
                calls["b1"] = translate(b, "b1")
                await until(lambda: dataplane.gate.waiting == 4)
                assert gauge("attnserve_calls_active") == 1
                assert gauge("attnserve_calls_active_limit") == 1
                assert gauge("attnserve_calls_waiting_turn") == 4
                assert gauge("attnserve_clients_waiting_turn") == 2
                steps.open()
                answers = {name: await call for name, call in calls.items()}
                alone = {name: await translate(a, name) for name in texts}  # each with nothing else going on
                assert answers == alone
        finally:
            steps.open()
            await server.drain(5.0)
        # The first five encodes are the calls above, in the order they went in; then the ones alone.
        assert [sources.get(source) for source in model.encoded[:5]] == ["first", "a1", "b1", "a2", "a3"]
        assert (gauge("attnserve_calls_active"), gauge("attnserve_calls_waiting_turn")) == (0, 0)

    asyncio.run(scenario())


def test_a_call_that_waited_its_turn_is_judged_against_the_queue_as_it_goes_in(
    dates_only: Path, held: list[HeldStepModel]
) -> None:
    """One call in the engines at a time, its decoder held. Connection B's call waits its turn, admitted by a queue
    with no rate yet. Token streams (which take no turns) then fill the queue while the clock moves on, until the
    queue has measurably not moved. When the call in the engine is cancelled, B's call goes in and is judged against
    the queue as it is now: RESOURCE_EXHAUSTED, and its place is free again."""
    settings = make_settings(dates_only, max_active_calls=1, max_queue_wait_ms=500.0, repository_poll_seconds=0)

    async def scenario() -> None:
        clock = Clock()
        metrics = ServerMetrics()
        client = InProcessClient(settings, metrics, loader=held_loader(held), clock=clock)
        dataplane = Dataplane(client, settings, clock=clock)
        server = GrpcServer(settings, client, dataplane, metrics)
        await client.start()
        await server.start()
        (model,) = held
        steps = model.gate = StepGate()
        streams: list[asyncio.Task[list[pb.TranslateStreamResponse]]] = []
        try:
            async with a_call_held_and_one_waiting(f"127.0.0.1:{settings.port}", steps, dataplane) as calls:
                a, request, first, waiting = calls.a, LATEST_DATES, calls.held, calls.waiting
                engine = client.manager.engine("dates", 1)
                assert engine is not None

                async def stream() -> list[pb.TranslateStreamResponse]:
                    return [update async for update in a.TranslateStream(request)]

                clock.now += 2 * MAX_INTERVAL_S
                for queued in range(1, 2 + TRUSTED_AFTER_INTERVALS):
                    streams.append(asyncio.ensure_future(stream()))
                    await until(lambda queued=queued: engine.queue_progress() == (queued, 1))
                    clock.now += 0.25
                first.cancel()  # its place frees: B's call goes in, and meets the queue as it stands
                with pytest.raises(aio.AioRpcError) as refused:
                    await waiting
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "has not moved lately" in (refused.value.details() or "")
                assert (dataplane.gate.inside, dataplane.gate.waiting) == (0, 0)
                steps.open()
                for answered in await asyncio.gather(*streams):
                    assert answered[-1].final
        finally:
            steps.open()
            await server.drain(5.0)

    asyncio.run(scenario())


@pytest.mark.parametrize("layout", ["one process", "front-end"])
def test_a_call_that_waited_its_turn_through_a_hot_reload_goes_to_the_version_serving_now(
    dates_only: Path, tmp_path: Path, held: list[HeldStepModel], layout: str
) -> None:
    """One call in the engines at a time, its decoder held. Connection B's call for the latest `dates` waits its
    turn, resolved to version 1. Version 2 is published and loaded: version 1 is retired and stops taking requests
    while the held call drains. When the held call is cancelled, B's call goes in, is encoded by version 2 and
    answered as a call sent alone now is (before, it went to the stopping version 1 and was answered UNAVAILABLE:
    lost). In one process, and in a front-end whose engine runs behind a real Unix socket (there the retired
    version stops once the front-end has acknowledged the report that retired it)."""
    settings = make_settings(dates_only, max_active_calls=1, repository_poll_seconds=0)

    async def scenario() -> None:
        async with serving(settings, tmp_path, held, layout) as (client, manager, dataplane, server):
            first_version = held[0]
            assert isinstance(first_version, EncodeRecorder)
            steps = first_version.gate = StepGate()
            (text,) = LATEST_DATES.texts
            source = source_ids(client, text)
            async with a_call_held_and_one_waiting(f"127.0.0.1:{settings.port}", steps, dataplane) as calls:
                shutil.copytree(dates_only / "dates" / "1", dates_only / "dates" / "2")
                await manager.refresh()
                await until(lambda: sorted(client.registry.entry("dates").served) == [2])  # type: ignore[union-attr]
                retired = manager.engine("dates", 1)
                assert retired is not None and retired.outstanding == 1  # draining the held call
                second_version = held[1]
                assert isinstance(second_version, EncodeRecorder)
                second_version.encoded.clear()  # its warm-up's
                calls.held.cancel()
                answer = await calls.waiting
                assert (answer.model, answer.version) == ("dates", "2")
                assert answer == await calls.b.Translate(LATEST_DATES)
                assert (first_version.encoded.count(source), second_version.encoded) == (1, [source, source])
                assert (dataplane.gate.inside, dataplane.gate.waiting) == (0, 0)

    asyncio.run(scenario())


def test_a_call_that_waited_its_turn_for_a_version_a_reload_retired_is_told_so_and_frees_its_place(
    dates_only: Path, tmp_path: Path, held: list[HeldStepModel]
) -> None:
    """As above, but B's call names version 1. Retired while it waited, that version is not served when its turn
    comes: NOT_FOUND, as a new call naming it gets, and its place in the gate is free again."""
    settings = make_settings(dates_only, max_active_calls=1, repository_poll_seconds=0)
    version_1 = pb.TranslateRequest(model="dates", version="1", texts=["3 mars 1999"])

    async def scenario() -> None:
        async with serving(settings, tmp_path, held, "one process") as (client, manager, dataplane, server):
            steps = held[0].gate = StepGate()
            address = f"127.0.0.1:{settings.port}"
            async with a_call_held_and_one_waiting(address, steps, dataplane, version_1) as calls:
                shutil.copytree(dates_only / "dates" / "1", dates_only / "dates" / "2")
                await manager.refresh()
                calls.held.cancel()
                with pytest.raises(aio.AioRpcError) as refused:
                    await calls.waiting
                with pytest.raises(aio.AioRpcError) as new_call:
                    await calls.b.Translate(version_1)
                assert refused.value.code() == new_call.value.code() == grpc.StatusCode.NOT_FOUND
                assert refused.value.details() == new_call.value.details()
                assert (dataplane.gate.inside, dataplane.gate.waiting) == (0, 0)

    asyncio.run(scenario())


def test_a_call_waiting_its_turn_when_the_server_begins_to_drain_is_answered(
    dates_only: Path, tmp_path: Path, held: list[HeldStepModel]
) -> None:
    """A call let in while the server drains is decoded: draining refuses new calls, not those already taken."""
    settings = make_settings(dates_only, max_active_calls=1, repository_poll_seconds=0)

    async def scenario() -> None:
        async with serving(settings, tmp_path, held, "one process") as (client, manager, dataplane, server):
            steps = held[0].gate = StepGate()
            async with a_call_held_and_one_waiting(f"127.0.0.1:{settings.port}", steps, dataplane) as calls:
                draining = asyncio.ensure_future(server.drain(30.0))
                await until(lambda: client.registry.draining)
                steps.open()
                alone = await calls.held
                assert await calls.waiting == alone
                await draining

    asyncio.run(scenario())


def test_a_narrowed_front_end_widens_at_an_http_call_once_no_grpc_call_has_reported_a_wait(
    dates_only: Path, tmp_path: Path, held: list[HeldStepModel]
) -> None:
    """Dataplane.admit_pickup as the transports call it: gRPC with how long the call waited in core, HTTP with None.
    A front-end's dataplane narrows at a gRPC pickup that waited NARROW_AT_S and widens at the first HTTP pickup
    UNREPORTED_AFTER_S later; one process's dataplane (narrow_when_backlogged off) never narrows."""
    settings = make_settings(dates_only, max_active_calls=8, repository_poll_seconds=0)

    async def scenario() -> None:
        clock = Clock()
        client = InProcessClient(settings, ServerMetrics(), loader=held_loader(held), clock=clock)
        await client.start()
        try:
            front_end = Dataplane(client, settings, clock=clock, narrow_when_backlogged=True)
            one_process = Dataplane(client, settings, clock=clock)
            for dataplane in (front_end, one_process):
                dataplane.admit_pickup(NARROW_AT_S)
            assert (front_end.gate.limit, one_process.gate.limit) == (2, 8)
            clock.now += UNREPORTED_AFTER_S - 0.01
            front_end.admit_pickup(None)
            assert front_end.gate.limit == 2
            clock.now += 0.01
            front_end.admit_pickup(None)
            assert front_end.gate.limit == 8
        finally:
            await client.stop(5.0)

    asyncio.run(scenario())


@contextlib.asynccontextmanager
async def serving(
    settings: Settings, tmp_path: Path, held: list[HeldStepModel], layout: str
) -> AsyncIterator[tuple[InProcessClient | SocketClient, ModelManager, Dataplane, GrpcServer]]:
    """A gRPC server on the real `dates` model, each version's step model an EncodeRecorder appended to `held`: in
    one process, or (layout "front-end") a front-end's stack with its engine behind a real Unix socket. Drained on
    the way out, with every held step let through."""
    client: InProcessClient | SocketClient
    engine_server: EngineServer | None = None
    metrics = ServerMetrics()
    if layout == "front-end":
        engine_server = EngineServer(settings, ServerMetrics(), loader=held_loader(held, EncodeRecorder))
        await engine_server.start(tmp_path / "engine.sock")
        manager = engine_server.manager
        client = SocketClient(settings, tmp_path / "engine.sock")
    else:
        client = InProcessClient(settings, metrics, loader=held_loader(held, EncodeRecorder))
        manager = client.manager
    dataplane = Dataplane(client, settings)
    server = GrpcServer(settings, client, dataplane, metrics)
    await client.start()
    await server.start()
    try:
        yield client, manager, dataplane, server
    finally:
        for model in held:
            if model.gate is not None:
                model.gate.open()
        await server.drain(5.0)
        if engine_server is not None:
            await engine_server.stop(5.0)


def source_ids(client: InProcessClient | SocketClient, text: str) -> tuple[int, ...]:
    """The source ids the engine gets for `text` sent to the latest `dates` (as EncodeRecorder writes them down)."""
    tokenizer = client.registry.resolve("dates", "").model.source_tokenizer
    return (*tokenizer.encode(text), EOS)
