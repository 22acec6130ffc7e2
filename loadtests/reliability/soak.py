"""`make soak`: a real server under a mixed load at about 70% of its capacity for a long time (default 10 minutes),
with faults: a hot reload every minute, and with front-end processes, a front-end and the engine process killed
in turn every two minutes. It prints its figures minute by minute and fails when a call was lost, a process's
memory grew, or its open files did.

    python -m loadtests.reliability.soak                               # models/, 2 front-ends, 10 minutes
    python -m loadtests.reliability.soak --minutes 3 --frontends 0     # one process: reloads only
    python -m loadtests.reliability.soak --load 0.7 --kill-every 2 --reload-every 1

The run copies the model repository into OUT/repository, starts `attnserve serve` on it (gRPC, HTTP and metrics on
loopback ports), and measures its capacity first: closed-loop clients sending the same mix flat out. Then it offers
`--load` times that rate, open loop (Poisson arrivals, at most --max-in-flight calls), of this mix:
- gRPC Translate greedy, beam 4, n-best (beam 4, 4 hypotheses); TranslateStream; KServe ModelInfer and
  ModelStreamInfer (token streaming);
- HTTP /v1/translate, /v1/translate:stream (server-sent events), /v2/models/NAME/infer;
- calls the client cancels after a few milliseconds, and calls with deadlines of 2 to 50 ms.
Every call has a deadline (30 s unless it is a short-deadline call). Faults, from the start of the soak:
- every --reload-every minutes (at half past), a new version of a model is published the way `attnserve export`
  does (written under a hidden name, renamed into place), the server gets SIGHUP, and the run waits for the new
  version to be served; versions older than the two newest are removed;
- every --kill-every minutes, with --frontends N > 0, a front-end process and the engine process in turn get
  SIGKILL; the supervisor starts them again. A fault's window runs from the kill until the server is healthy again;
- every --pause-every seconds (none by default), the engine process (the server itself with --frontends 0) is
  stopped for --pause-for seconds (SIGSTOP, then SIGCONT), as a long collector pause or a starved CPU would stop
  it. Not a fault: calls queue up meanwhile, and each must still end as it would without the pause.

How each call may end: OK; RESOURCE_EXHAUSTED (refused, truthfully); CANCELLED for the calls the client cancelled;
DEADLINE_EXCEEDED for the short-deadline calls; UNAVAILABLE (or a lost HTTP connection) only for calls that overlap
a fault's window. Anything else, a hang above all (a 30 s deadline that fires), is a lost call.

Figures per minute: calls by status, p50/p99 of the OK calls, the RSS and open file descriptors of every process
(the supervisor, each front-end, the engine). Fails (exit 1) when a call was lost, when a process's RSS grew more
than --max-rss-growth MB per minute after its own first minute (judged over processes that lived two more minutes),
when a process's open files other than sockets grew by more than --max-fd-growth from its second minute to its last,
or when the sockets of all the server's processes together, beyond the load's own sockets, grew by more than
--max-socket-growth (sockets follow the clients: they reconnect to the other front-ends when one is killed, and
the HTTP client's connection pool grows with the most HTTP calls it has had in flight).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import os
import random
import shutil
import signal
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loadtests.procfs import child_processes, rss_bytes
from loadtests.reliability.common import percentile, print_table, repository_or_smoke, workload_texts
from loadtests.servers import ServerProcess, attnserve_server, scrape, shed_by_reason
from service.gen.attnserve.v1 import translator_pb2 as pb
from service.gen.attnserve.v1 import translator_pb2_grpc as pb_grpc
from service.gen.inference import grpc_service_pb2 as kserve_pb
from service.gen.inference import grpc_service_pb2_grpc as kserve_grpc

CALL_TIMEOUT_S = 30.0
KINDS: dict[str, float] = {
    "greedy": 24,
    "beam": 8,
    "n-best": 6,
    "stream": 10,
    "kserve": 8,
    "kserve-stream": 4,
    "http": 10,
    "http-stream": 6,
    "http-v2": 6,
    "cancelled": 5,
    "short-deadline": 5,
}
"""The mix: each call's kind, drawn by these weights."""


# ----- one call --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    kind: str
    started: float  # time.monotonic()
    ended: float
    status: str  # a gRPC status name; HTTP calls: the status in the error body, or CONNECTION_LOST
    message: str = ""  # what the server (or the client's transport) said of a call that did not end OK


@dataclass
class Clients:
    channels: list[aio.Channel]
    session: aiohttp.ClientSession
    texts: dict[str, list[str]]
    rng: random.Random

    def stub(self) -> pb_grpc.TranslatorStub:
        return pb_grpc.TranslatorStub(self.rng.choice(self.channels))

    def kserve(self) -> kserve_grpc.GRPCInferenceServiceStub:
        return kserve_grpc.GRPCInferenceServiceStub(self.rng.choice(self.channels))

    def text(self) -> tuple[str, str]:
        model = self.rng.choice(sorted(self.texts))
        return model, self.rng.choice(self.texts[model])


def _infer_request(model: str, text: str, **parameters: bool | int) -> kserve_pb.ModelInferRequest:
    request = kserve_pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[1]).contents.bytes_contents.append(text.encode())
    for name, value in parameters.items():
        if isinstance(value, bool):
            request.parameters[name].bool_param = value
        else:
            request.parameters[name].int64_param = value
    return request


Ending = tuple[str, str]
"""How a call ended: a status name, and what was said with it (empty for OK)."""

OK: Ending = ("OK", "")


async def _http(clients: Clients, path: str, body: dict) -> Ending:
    async with clients.session.post(path, json=body) as response:
        data = await response.read()
        if response.status != 200:
            error = json.loads(data)
            return str(error.get("code", f"HTTP {response.status}")), str(error.get("error", ""))
        if path.endswith(":stream"):
            events = [block for block in data.decode().split("\n\n") if block.strip()]
            if not events:
                return "EMPTY_STREAM", ""
            if events[-1].startswith("event: error"):
                error = json.loads(events[-1].split("data: ", 1)[1])
                return str(error["code"]), str(error.get("error", ""))
        return OK


async def one_call(kind: str, clients: Clients) -> Ending:
    """Make one call of `kind`; returns how it ended."""
    model, text = clients.text()
    rng = clients.rng
    try:
        if kind in ("greedy", "beam", "n-best"):
            beam, best = {"greedy": (0, 1), "beam": (4, 1), "n-best": (4, 4)}[kind]
            options = pb.DecodeOptions(beam_size=beam, num_hypotheses=best)
            request = pb.TranslateRequest(model=model, texts=[text], options=options)
            await clients.stub().Translate(request, timeout=CALL_TIMEOUT_S)
        elif kind == "stream":
            call = clients.stub().TranslateStream(
                pb.TranslateRequest(model=model, texts=[text]), timeout=CALL_TIMEOUT_S
            )
            async for _ in call:
                pass
        elif kind == "kserve":
            await clients.kserve().ModelInfer(_infer_request(model, text, beam_size=2), timeout=CALL_TIMEOUT_S)
        elif kind == "kserve-stream":
            responses = clients.kserve().ModelStreamInfer(iter([_infer_request(model, text, stream=True)]),
                                                          timeout=CALL_TIMEOUT_S)  # fmt: skip
            async for response in responses:
                if response.error_message:
                    return response.error_message.split(":", 1)[0], response.error_message
        elif kind == "http":
            return await _http(clients, "/v1/translate", {"model": model, "texts": [text]})
        elif kind == "http-stream":
            return await _http(clients, "/v1/translate:stream", {"model": model, "texts": [text]})
        elif kind == "http-v2":
            body = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": [text]}]}
            return await _http(clients, f"/v2/models/{model}/infer", body)
        elif kind == "cancelled":
            stub = clients.stub()
            if rng.random() < 0.5:
                pending = stub.Translate(pb.TranslateRequest(model=model, texts=[text]), timeout=CALL_TIMEOUT_S)
            else:
                pending = stub.TranslateStream(pb.TranslateRequest(model=model, texts=[text]), timeout=CALL_TIMEOUT_S)
            await asyncio.sleep(rng.uniform(0.0, 0.02))
            if not pending.done():
                pending.cancel()
            try:
                if isinstance(pending, aio.UnaryUnaryCall):
                    await pending
                else:
                    async for _ in pending:
                        pass
            except asyncio.CancelledError:
                return "CANCELLED", ""
        elif kind == "short-deadline":
            request = pb.TranslateRequest(model=model, texts=[text], options=pb.DecodeOptions(beam_size=4))
            await clients.stub().Translate(request, timeout=rng.uniform(0.002, 0.05))
        else:
            raise ValueError(kind)
    except aio.AioRpcError as error:
        details = error.details() or ""
        if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and kind != "short-deadline":
            return ("HANG" if not details.startswith("the deadline passed") else "DEADLINE_EXCEEDED"), details
        return error.code().name, details
    except TimeoutError:
        return "HANG", "the client's own timeout fired"
    except aiohttp.ClientError as error:
        return "CONNECTION_LOST", repr(error)
    return OK


# ----- the load ------------------------------------------------------------------------------------------------


@dataclass
class Load:
    clients: Clients
    calls: list[Call] = field(default_factory=list)
    in_flight: int = 0
    skipped: int = 0  # arrivals not sent because --max-in-flight calls were in flight

    async def _timed(self, kind: str) -> None:
        started = time.monotonic()
        self.in_flight += 1
        try:
            status, message = await one_call(kind, self.clients)
        finally:
            self.in_flight -= 1
        self.calls.append(Call(kind, started, time.monotonic(), status, message))

    def _kind(self) -> str:
        return self.clients.rng.choices(list(KINDS), list(KINDS.values()))[0]

    async def closed_loop(self, workers: int, seconds: float) -> float:
        """Calls per second of `workers` clients calling back to back for `seconds`."""
        end = time.monotonic() + seconds
        before = len(self.calls)

        async def worker() -> None:
            while time.monotonic() < end:
                await self._timed(self._kind())

        await asyncio.gather(*(worker() for _ in range(workers)))
        return (len(self.calls) - before) / seconds

    async def open_loop(self, rate: float, seconds: float, max_in_flight: int) -> None:
        """Calls started at `rate` per second (Poisson arrivals) for `seconds`."""
        rng = self.clients.rng
        end = time.monotonic() + seconds
        tasks: set[asyncio.Task[None]] = set()
        next_start = time.monotonic()
        while next_start < end:
            await asyncio.sleep(max(next_start - time.monotonic(), 0.0))
            next_start += rng.expovariate(rate)
            if self.in_flight >= max_in_flight:
                self.skipped += 1
                continue
            task = asyncio.get_running_loop().create_task(self._timed(self._kind()))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks)


# ----- the processes -------------------------------------------------------------------------------------------


def _role(pid: int) -> str:
    try:
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    if b"service.processes" in arguments:
        index = arguments.index(b"service.processes")
        return arguments[index + 1].decode() if index + 1 < len(arguments) else "child"
    return "child"


def server_processes(server: ServerProcess) -> dict[int, str]:
    """pid -> role ('server' or 'supervisor', 'frontend', 'engine') of the server's processes now."""
    assert server.process is not None
    root = server.process.pid
    children = {pid: _role(pid) for pid in child_processes(root)}
    return {root: "supervisor" if children else "server", **children}


def open_files(pid: int) -> tuple[int, int]:
    """(sockets, other open files) of a process. Counted apart because sockets follow the clients: when one
    front-end dies, its clients reconnect to the others, whose sockets grow without any leak."""
    sockets = files = 0
    for entry in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{entry}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:"):
            sockets += 1
        else:
            files += 1
    return sockets, files


@dataclass
class Sample:
    at: float
    pid: int
    role: str
    rss: int
    sockets: int
    fds: int  # open files other than sockets


@dataclass
class Watcher:
    """Samples every process's RSS and open file descriptors every `interval_s` seconds, and the sockets of this
    process (the load's clients: their HTTP connection pool grows with the most HTTP calls in flight so far, and
    the server's sockets follow it) in the same rounds."""

    server: ServerProcess
    interval_s: float = 2.0
    samples: list[Sample] = field(default_factory=list)
    first_seen: dict[int, float] = field(default_factory=dict)
    client_sockets: dict[float, int] = field(default_factory=dict)  # sampling round -> this process's sockets

    async def run(self, until: asyncio.Event) -> None:
        while not until.is_set():
            now = time.monotonic()
            self.client_sockets[now] = open_files(os.getpid())[0]
            for pid, role in server_processes(self.server).items():
                try:
                    sample = Sample(now, pid, role, rss_bytes(pid, with_children=False), *open_files(pid))
                except (OSError, RuntimeError):
                    continue  # it exited meanwhile
                self.first_seen.setdefault(pid, now)
                self.samples.append(sample)
            try:
                await asyncio.wait_for(until.wait(), self.interval_s)
            except TimeoutError:
                pass


@dataclass
class Fault:
    what: str
    started: float
    recovered: float = math.inf


async def _healthy(address: str) -> bool:
    try:
        async with aio.insecure_channel(address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    except aio.AioRpcError:
        return False


async def kill_and_wait(server: ServerProcess, role: str, turn: int, faults: list[Fault]) -> None:
    """SIGKILL one `role` process of the server (front-ends in turn); the fault lasts until the supervisor has one
    running again and the server reports SERVING three times in a row on fresh connections."""
    processes = sorted(pid for pid, each in server_processes(server).items() if each == role)
    if not processes:
        return
    victim = processes[turn % len(processes)]
    os.kill(victim, signal.SIGKILL)
    fault = Fault(f"{role} {victim} killed", time.monotonic())
    faults.append(fault)
    healthy_in_a_row = 0
    while healthy_in_a_row < 3:
        await asyncio.sleep(0.2)
        now_running = [pid for pid, each in server_processes(server).items() if each == role]
        back = len(now_running) == len(processes) and victim not in now_running
        healthy_in_a_row = healthy_in_a_row + 1 if back and await _healthy(server.address) else 0
    fault.recovered = time.monotonic()


async def pause(server: ServerProcess, seconds: float, pauses: list[str]) -> None:
    """Stop the engine process (the server itself in one process) for `seconds`, then let it go on."""
    roles = server_processes(server)
    victim = next((pid for pid, role in roles.items() if role == "engine"), None)
    if victim is None:
        victim = next(pid for pid, role in roles.items() if role == "server")
    os.kill(victim, signal.SIGSTOP)
    try:
        await asyncio.sleep(seconds)
    finally:
        os.kill(victim, signal.SIGCONT)
    pauses.append(f"{roles.get(victim)} {victim}")


def _versions(folder: Path) -> list[int]:
    return sorted(int(entry.name) for entry in folder.iterdir() if entry.name.isdigit())


async def reload_and_wait(server: ServerProcess, repository: Path, model: str, reloads: list[str]) -> None:
    """Publish a new version of `model` (a copy of its newest, renamed into place), SIGHUP the server, wait until
    it serves it; then remove all but the two newest versions."""
    folder = repository / model
    newest = _versions(folder)[-1]
    hidden = folder / f".{newest + 1}"
    shutil.copytree(folder / str(newest), hidden)
    hidden.rename(folder / str(newest + 1))
    started = time.monotonic()
    assert server.process is not None
    server.process.send_signal(signal.SIGHUP)
    async with aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.TranslatorStub(channel)
        while time.monotonic() - started < 120:
            try:
                info = await stub.GetModel(pb.GetModelRequest(name=model), timeout=5)
                if info.version == str(newest + 1):
                    break
            except aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
    waited = time.monotonic() - started
    reloads.append(f"{model} version {newest + 1} served after {waited:.1f} s" if waited < 120 else
                   f"{model} version {newest + 1} NOT served after 120 s")  # fmt: skip
    for version in _versions(folder)[:-2]:
        shutil.rmtree(folder / str(version))


# ----- the figures ---------------------------------------------------------------------------------------------

EXPECTED = {"OK", "RESOURCE_EXHAUSTED"}


def verdict(call: Call, faults: list[Fault]) -> str:
    """How a call ended, judged: 'ok', 'refused', 'cancelled', 'deadline', 'fault' (UNAVAILABLE or a lost
    connection during a fault's window) or 'LOST'."""
    if call.status == "OK":
        return "ok"
    if call.status == "RESOURCE_EXHAUSTED":
        return "refused"
    if call.kind == "cancelled" and call.status == "CANCELLED":
        return "cancelled"
    if call.kind == "short-deadline" and call.status == "DEADLINE_EXCEEDED":
        return "deadline"
    if call.status in ("UNAVAILABLE", "CONNECTION_LOST"):
        margin = 1.0  # a call's end is seen by the client a moment after the server's health turned
        if any(call.started <= fault.recovered + margin and call.ended >= fault.started for fault in faults):
            return "fault"
    return "LOST"


def slope_mb_per_minute(points: list[tuple[float, int]]) -> float:
    """Least-squares slope of (seconds, bytes) points, in MB (10^6 bytes) per minute."""
    if len(points) < 2:
        return math.nan
    xs, ys = [at for at, _ in points], [value for _, value in points]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    denominator = sum((x - mean_x) ** 2 for x in xs)
    if denominator == 0:
        return math.nan
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / denominator * 60 / 1e6


@dataclass(frozen=True)
class ProcessFigures:
    pid: int
    role: str
    lived_s: float
    rss_first_mb: float
    rss_last_mb: float
    growth_mb_per_minute: float  # after its first minute; NaN when it did not live two more
    fds_second_minute: float
    fds_last_minute: float
    judged: bool


def process_figures(watcher: Watcher, soak_start: float) -> list[ProcessFigures]:
    by_pid: dict[int, list[Sample]] = defaultdict(list)
    for sample in watcher.samples:
        if sample.at >= soak_start:
            by_pid[sample.pid].append(sample)
    figures = []
    for pid, samples in sorted(by_pid.items(), key=lambda item: (item[1][0].role, item[1][0].at)):
        born = max(watcher.first_seen[pid], soak_start)
        settled = [sample for sample in samples if sample.at >= born + 60]
        span = settled[-1].at - settled[0].at if settled else 0.0
        second = [sample.fds for sample in settled if sample.at < born + 120]
        last = [sample.fds for sample in samples if sample.at >= samples[-1].at - 60]
        figures.append(
            ProcessFigures(
                pid,
                samples[0].role,
                samples[-1].at - samples[0].at,
                samples[0].rss / 1e6,
                samples[-1].rss / 1e6,
                slope_mb_per_minute([(sample.at, sample.rss) for sample in settled]) if span >= 120 else math.nan,
                statistics.median(second) if second else math.nan,
                statistics.median(last) if last else math.nan,
                span >= 120,
            )
        )
    return figures


def total_sockets(watcher: Watcher, soak_start: float) -> tuple[float, float]:
    """The median, over the sampling rounds of the soak's second minute and of its last, of the sockets all the
    server's processes hold together (clients that reconnect after a kill land on other processes) beyond the
    load's own sockets in the same round: a socket of the server that no client holds any more is a leak; one
    that follows a client's new connection is not."""
    rounds: dict[float, int] = defaultdict(int)
    for sample in watcher.samples:
        rounds[sample.at] += sample.sockets
    for at in rounds:
        rounds[at] -= watcher.client_sockets.get(at, 0)
    if not rounds:
        return math.nan, math.nan
    last_round = max(rounds)
    second = [count for at, count in rounds.items() if soak_start + 60 <= at < soak_start + 120]
    last = [count for at, count in rounds.items() if at >= last_round - 60]
    return (statistics.median(second) if second else math.nan), statistics.median(last)


def minute_rows(calls: list[Call], faults: list[Fault], watcher: Watcher, soak_start: float) -> list[list[object]]:
    minutes: dict[int, list[Call]] = defaultdict(list)
    for call in calls:
        minutes[int((call.ended - soak_start) // 60)].append(call)
    rows: list[list[object]] = []
    for minute in sorted(minutes):
        group = minutes[minute]
        statuses = Counter(call.status for call in group)
        verdicts = Counter(verdict(call, faults) for call in group)
        latencies = [call.ended - call.started for call in group if call.status == "OK"]
        start, end = soak_start + minute * 60, soak_start + (minute + 1) * 60
        latest: dict[int, Sample] = {}
        for sample in watcher.samples:
            if start <= sample.at < end:
                latest[sample.pid] = sample
        by_process = sorted(latest.values(), key=lambda sample: (sample.role, sample.pid))
        memory = " ".join(f"{sample.role[0]}{sample.rss / 1e6:.0f}" for sample in by_process)
        files = " ".join(f"{sample.fds}/{sample.sockets}" for sample in by_process)
        events = [fault.what.split(" ")[0] for fault in faults if start <= fault.started < end]
        rows.append([
            minute + 1, len(group), ", ".join(f"{name} {count}" for name, count in statuses.most_common()),
            ", ".join(f"{name} {count}" for name, count in sorted(verdicts.items())),
            f"{1000 * percentile(latencies, 50):.0f}", f"{1000 * percentile(latencies, 99):.0f}", memory, files,
            " ".join(f"kill {event}" for event in events) or "-",
        ])  # fmt: skip
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtests.reliability.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("reports/soak"),
        help="the server log, the repository copy, every process's samples (samples.jsonl)",
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the soak")
    parser.add_argument("--load", type=float, default=0.7, help="offered rate as a share of the measured capacity")
    parser.add_argument("--frontends", type=int, default=2, help="the server's --frontends (0: one process)")
    parser.add_argument("--kill-every", type=float, default=2.0, help="minutes between kills (0: none)")
    parser.add_argument("--reload-every", type=float, default=1.0, help="minutes between hot reloads (0: none)")
    parser.add_argument("--pause-every", type=float, default=0.0, help="seconds between engine pauses (0: none)")
    parser.add_argument("--pause-for", type=float, default=0.5, help="seconds each pause lasts")
    parser.add_argument("--capacity-seconds", type=float, default=30.0, help="length of the capacity measurement")
    parser.add_argument("--capacity-clients", type=int, default=24, help="closed-loop clients measuring capacity")
    parser.add_argument("--max-in-flight", type=int, default=256, help="the most calls the load holds at once")
    parser.add_argument("--channels", type=int, default=4, help="gRPC connections (spread over the front-ends)")
    parser.add_argument("--max-rss-growth", type=float, default=1.0, help="MB per minute, per process")
    parser.add_argument("--max-fd-growth", type=int, default=4, help="open files but sockets, per process")
    parser.add_argument("--max-socket-growth", type=int, default=16, help="sockets, all processes together")
    parser.add_argument("--seed", type=int, default=23)
    return parser


SoakRun = tuple[Load, Watcher, list[Fault], list[str], list[str], float, float]
"""The load (its calls), the process samples, the faults, the reloads, the pauses, the capacity and the soak's
start."""


async def soak(args: argparse.Namespace, server: ServerProcess, repository: Path) -> SoakRun:
    texts = await asyncio.to_thread(workload_texts, server.address)
    channels = [aio.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(args.channels)]  # fmt: skip
    connector = aiohttp.TCPConnector(limit=64)
    timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
    async with aiohttp.ClientSession(f"http://{server.http_address}", connector=connector, timeout=timeout) as session:
        load = Load(Clients(channels, session, texts, random.Random(args.seed)))
        print(f"measuring capacity: {args.capacity_clients} closed-loop clients for {args.capacity_seconds:g} s")
        capacity = await load.closed_loop(args.capacity_clients, args.capacity_seconds)
        load.calls.clear()
        rate = args.load * capacity
        print(f"capacity {capacity:.1f} calls/s; soaking at {rate:.1f} calls/s ({args.load:.0%}) for "
              f"{args.minutes:g} minutes")  # fmt: skip
        watcher = Watcher(server)
        done = asyncio.Event()
        watching = asyncio.get_running_loop().create_task(watcher.run(done))
        faults: list[Fault] = []
        reloads: list[str] = []
        pauses: list[str] = []
        soak_start = time.monotonic()

        async def at(seconds: float, action: Callable[[], Awaitable[None]]) -> None:
            await asyncio.sleep(max(soak_start + seconds - time.monotonic(), 0.0))
            await action()

        async def faults_and_reloads() -> None:
            schedule: list[tuple[float, Callable[[], Awaitable[None]]]] = []
            models = sorted(texts)
            if args.reload_every > 0:
                period = args.reload_every * 60
                for number, moment in enumerate(_moments(period / 2, period, args.minutes * 60)):
                    model = models[number % len(models)]
                    schedule.append((moment, functools.partial(reload_and_wait, server, repository, model, reloads)))
            if args.kill_every > 0 and args.frontends > 0:
                period = args.kill_every * 60
                for number, moment in enumerate(_moments(period, period, args.minutes * 60 - 30)):
                    role = "frontend" if number % 2 == 0 else "engine"
                    schedule.append((moment, functools.partial(kill_and_wait, server, role, number // 2, faults)))
            if args.pause_every > 0:
                for moment in _moments(args.pause_every, args.pause_every, args.minutes * 60 - args.pause_for):
                    schedule.append((moment, functools.partial(pause, server, args.pause_for, pauses)))
            for moment, action in sorted(schedule, key=lambda item: item[0]):
                await at(moment, action)

        await asyncio.gather(load.open_loop(rate, args.minutes * 60, args.max_in_flight), faults_and_reloads())
        done.set()
        await watching
    for channel in channels:
        await channel.close()
    return load, watcher, faults, reloads, pauses, capacity, soak_start


def _moments(first: float, period: float, until: float) -> list[float]:
    moments = []
    moment = first
    while moment < until:
        moments.append(moment)
        moment += period
    return moments


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    source = repository_or_smoke(args.repository)
    args.out.mkdir(parents=True, exist_ok=True)
    repository = args.out / "repository"  # versions are published into and removed from a copy
    shutil.rmtree(repository, ignore_errors=True)
    shutil.copytree(source, repository, ignore=shutil.ignore_patterns(".*"))
    extra = ("--frontends", str(args.frontends))
    server = attnserve_server(repository, batching="continuous", threads=1, provider="cpu", log_dir=args.out,
                              extra=extra, label="soak-server", http=True).start()  # fmt: skip
    load_average = Path("/proc/loadavg").read_text().split()[:3]
    try:
        load, watcher, faults, reloads, pauses, capacity, soak_start = asyncio.run(soak(args, server, repository))
        refusals = refusals_by_reason(server)
    finally:
        server.stop()
    write_samples(args.out / "samples.jsonl", watcher, faults, reloads, soak_start)
    return report(args, load, watcher, faults, reloads, pauses, capacity, soak_start, load_average, refusals)


def write_samples(path: Path, watcher: Watcher, faults: list[Fault], reloads: list[str], soak_start: float) -> None:
    """Every process sample (seconds from the soak's start, pid, role, RSS bytes, sockets, other files) and every
    fault, one JSON object a line: a process's memory read against what happened around it."""
    with path.open("w") as out:
        for fault in faults:
            out.write(json.dumps({"fault": fault.what, "at": round(fault.started - soak_start, 1)}) + "\n")
        for reload in reloads:
            out.write(json.dumps({"reload": reload}) + "\n")
        for sample in watcher.samples:
            row = {"at": round(sample.at - soak_start, 1), "pid": sample.pid, "role": sample.role, "rss": sample.rss,
                   "sockets": sample.sockets, "files": sample.fds}  # fmt: skip
            out.write(json.dumps(row) + "\n")


def refusals_by_reason(server: ServerProcess) -> Counter[str] | str:
    """The server's refusals for overload by reason (`attnserve_shed_calls_total`), from the processes alive at the
    end: a killed process's counts went with it. Why they could not be read, instead, when the scrape failed: the
    soak's own figures are reported either way."""
    if server.metrics_url is None:
        return Counter()
    try:
        return shed_by_reason(scrape(server.metrics_url))
    except OSError as error:
        return f"not read: {error}"


def report(args: argparse.Namespace, load: Load, watcher: Watcher, faults: list[Fault], reloads: list[str],
           pauses: list[str], capacity: float, soak_start: float, load_average: list[str],
           refusals: Counter[str] | str) -> int:  # fmt: skip
    calls = load.calls
    print_table(
        f"soak, minute by minute ({'one process' if not args.frontends else f'{args.frontends} front-ends + engine'};"
        f" load average {' '.join(load_average)} at the start)",
        [
            "minute",
            "calls",
            "statuses",
            "ends",
            "p50 ms",
            "p99 ms",
            "RSS MB (s|f|e, by pid)",
            "files/sockets",
            "faults",
        ],
        minute_rows(calls, faults, watcher, soak_start),
    )
    figures = process_figures(watcher, soak_start)
    print_table(
        "processes (RSS growth: least squares after each one's first minute; judged when it lived two more)",
        ["pid", "role", "lived", "RSS first -> last MB", "growth MB/min", "files 2nd min -> last", "judged"],
        [[figure.pid, figure.role, f"{figure.lived_s / 60:.1f} min", f"{figure.rss_first_mb:.1f} -> "
          f"{figure.rss_last_mb:.1f}", f"{figure.growth_mb_per_minute:+.2f}", f"{figure.fds_second_minute:.0f} -> "
          f"{figure.fds_last_minute:.0f}", "yes" if figure.judged else "no"] for figure in figures],
    )  # fmt: skip
    verdicts = Counter(verdict(call, faults) for call in calls)
    lost = [call for call in calls if verdict(call, faults) == "LOST"]
    ok = [call.ended - call.started for call in calls if call.status == "OK"]
    span = (max(call.ended for call in calls) - soak_start) if calls else 0.0
    print_table(
        "soak totals",
        ["figure", "value"],
        [
            ["capacity (closed loop)", f"{capacity:.1f} calls/s"],
            ["calls (rate)", f"{len(calls):,} ({len(calls) / max(span, 1e-9):.1f}/s; "
             f"target {args.load * capacity:.1f})"],
            ["arrivals not sent (in-flight cap)", load.skipped],
            ["ends", ", ".join(f"{name} {count:,}" for name, count in sorted(verdicts.items()))],
            ["by kind", ", ".join(f"{kind} {count:,}" for kind, count in Counter(c.kind for c in calls).most_common())],
            ["OK latency p50 / p99", f"{1000 * percentile(ok, 50):.0f} / {1000 * percentile(ok, 99):.0f} ms"],
            ["faults", "; ".join(f"{fault.what}, healthy again after {fault.recovered - fault.started:.1f} s"
                                 for fault in faults) or "none"],
            ["reloads", "; ".join(reloads) or "none"],
            ["pauses", f"{len(pauses)} of {args.pause_for:g} s ({', '.join(sorted(set(pauses)))})" if pauses
             else "none"],
            ["refused by the server, by reason (processes alive at the end)",
             refusals if isinstance(refusals, str)
             else ", ".join(f"{reason} {count:,}" for reason, count in refusals.most_common()) or "none"],
        ],
    )  # fmt: skip
    problems = []
    if lost:
        problems.append(f"{len(lost)} calls lost: {Counter((call.kind, call.status) for call in lost).most_common(8)}")
        first_said = {(call.kind, call.status): call.message for call in reversed(lost)}
        problems += [f"  first {kind} {status}: {message[:200]!r}" for (kind, status), message in first_said.items()]
    for figure in figures:
        if figure.judged and not figure.growth_mb_per_minute <= args.max_rss_growth:
            problems.append(f"{figure.role} {figure.pid}: RSS grew {figure.growth_mb_per_minute:.2f} MB/min")
        if figure.judged and not figure.fds_last_minute - figure.fds_second_minute <= args.max_fd_growth:
            problems.append(f"{figure.role} {figure.pid}: open files {figure.fds_second_minute:.0f} -> "
                            f"{figure.fds_last_minute:.0f}")  # fmt: skip
    sockets_second, sockets_last = total_sockets(watcher, soak_start)
    print(f"\n  sockets of all the server's processes together, beyond the load's own: {sockets_second:.0f} in the "
          f"second minute, {sockets_last:.0f} in the last")  # fmt: skip
    if not sockets_last - sockets_second <= args.max_socket_growth:
        problems.append(f"the server's sockets grew from {sockets_second:.0f} to {sockets_last:.0f}")
    if any("NOT served" in line for line in reloads):
        problems.append("a reload was not served")
    for problem in problems:
        print(f"FAILED: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
