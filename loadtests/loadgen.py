"""The benchmark's load generators: closed-loop gRPC (or HTTP) clients in their own processes, or h2load.

A *cell* is one contender at one concurrency level on one workload: `concurrency` virtual clients each send
a Translate call, wait for the answer, and send the next (closed loop), for a warm-up and then a
measurement window. Calls that finish inside the window are measured; calls still in flight when it closes
are cancelled and counted as `cut`.

The clients run in `processes` worker processes (asyncio + grpc.aio, one channel each; or aiohttp, one
keep-alive connection per client, JSON to POST /v1/translate, for protocol "http"), started once and
reused for every cell, so that neither the server nor the client shares an interpreter with the other and
one Python client process is not the bottleneck. The window is given in `time.monotonic()` seconds, which
on Linux is one clock for every process, so all workers measure the same window.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import multiprocessing.connection
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from loadtests.h2load import H2loadProcess
    from service.gen.attnserve.v1 import translator_pb2 as pb


@dataclass(frozen=True)
class CellPlan:
    """What the clients of one cell do.

    `texts`: the workload's texts, sent round robin (each client starts at its own offset);
    `beam_size`: 0 = greedy; `max_length`: 0 = the server's default; `concurrency`: virtual clients;
    `warmup_s` then `duration_s`: seconds of load before and during the measurement window;
    `max_requests`: the window closes early once this many calls finished in it (all processes together);
    `timeout_s`: deadline of each call; `protocol`: "grpc" (Translate) or "http" (POST /v1/translate, JSON), with
    `address` the host:port of that protocol's port.
    """

    address: str
    model: str
    texts: tuple[str, ...]
    beam_size: int
    concurrency: int
    warmup_s: float
    duration_s: float
    max_requests: int
    max_length: int = 0
    timeout_s: float = 300.0
    protocol: str = "grpc"

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if not self.texts:
            raise ValueError("a cell needs at least one text")
        if self.duration_s <= 0 or self.warmup_s < 0:
            raise ValueError(f"need duration_s > 0 and warmup_s >= 0, got {self.duration_s}, {self.warmup_s}")
        if self.max_requests < 1:
            raise ValueError(f"max_requests must be >= 1, got {self.max_requests}")
        if self.protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be grpc or http, got {self.protocol!r}")


@dataclass(frozen=True)
class _Share:
    """One worker process's part of a cell: its clients and the shared window (monotonic seconds)."""

    plan: CellPlan
    first_client: int
    clients: int
    load_starts: float
    window_starts: float
    window_ends: float
    max_requests: int


@dataclass
class WorkerReport:
    """What one worker measured: per call finished in the window, its latency (s), status code name and
    generated tokens of the best hypothesis; `window_ends` is when its window closed (early when the
    request cap was reached); `cut`: calls cancelled at the end; `cpu_s`: the worker's CPU seconds;
    `messages`: the first message the server gave with each failing status, so a report says why."""

    latencies: list[float] = field(default_factory=list)
    codes: list[str] = field(default_factory=list)
    messages: dict[str, str] = field(default_factory=dict)
    tokens: list[int] = field(default_factory=list)
    window_starts: float = 0.0
    window_ends: float = 0.0
    cut: int = 0
    cpu_s: float = 0.0
    error: str = ""


@dataclass(frozen=True)
class CellMeasurement:
    """The clients' view of one cell, all processes together.

    `requests_per_s` and `tokens_per_s` count calls that finished OK in the window; latencies (seconds) are
    of those calls; `failures` maps non-OK status names to counts, `failure_messages` to one message the
    server gave with each; `cut`: calls cancelled at the window's end; `client_cpu_s`: CPU seconds the client
    processes used for the whole cell (warm-up included).
    """

    ok: int
    failures: dict[str, int]
    window_s: float
    requests_per_s: float
    tokens_per_s: float
    mean_tokens: float
    latency_p50_s: float
    latency_p90_s: float
    latency_p99_s: float
    latency_mean_s: float
    cut: int
    client_cpu_s: float
    window_starts: float
    window_ends: float
    failure_messages: dict[str, str] = field(default_factory=dict)

    @property
    def completed(self) -> int:
        return self.ok + sum(self.failures.values())


def first_messages(reports: Sequence[WorkerReport]) -> dict[str, str]:
    """For each failing status, the message of the first worker (in order) that kept one."""
    messages: dict[str, str] = {}
    for report in reports:
        for code, message in report.messages.items():
            messages.setdefault(code, message)
    return messages


def summarize(reports: Sequence[WorkerReport]) -> CellMeasurement:
    """Combine the workers' reports; throughput is each worker's count over its own window, summed."""
    errors = [report.error for report in reports if report.error]
    if errors:
        raise RuntimeError("load generator failed: " + "; ".join(errors))
    latencies: list[float] = []
    failures: dict[str, int] = {}
    ok = tokens = 0
    requests_per_s = tokens_per_s = 0.0
    for report in reports:
        window = max(report.window_ends - report.window_starts, 1e-9)
        worker_ok = worker_tokens = 0
        for latency, code, generated in zip(report.latencies, report.codes, report.tokens, strict=False):
            if code == "OK":
                latencies.append(latency)
                worker_ok += 1
                worker_tokens += generated
            else:
                failures[code] = failures.get(code, 0) + 1
        ok += worker_ok
        tokens += worker_tokens
        requests_per_s += worker_ok / window
        tokens_per_s += worker_tokens / window
    values = np.asarray(latencies, dtype=np.float64)

    def percentile(q: float) -> float:
        return float(np.percentile(values, q)) if values.size else math.nan

    starts = min(report.window_starts for report in reports)
    ends = max(report.window_ends for report in reports)
    return CellMeasurement(
        ok=ok,
        failures=failures,
        window_s=ends - starts,
        requests_per_s=requests_per_s,
        tokens_per_s=tokens_per_s,
        mean_tokens=tokens / ok if ok else math.nan,
        latency_p50_s=percentile(50),
        latency_p90_s=percentile(90),
        latency_p99_s=percentile(99),
        latency_mean_s=float(values.mean()) if values.size else math.nan,
        cut=sum(report.cut for report in reports),
        client_cpu_s=sum(report.cpu_s for report in reports),
        window_starts=starts,
        window_ends=ends,
        failure_messages=first_messages(reports),
    )


# ----- the worker process ---------------------------------------------------------------------------------


def _worker_main(connection: multiprocessing.connection.Connection) -> None:
    """Serve cell shares from the parent until it sends None."""
    while True:
        share = connection.recv()
        if share is None:
            return
        started_cpu = time.process_time()
        try:
            report = asyncio.run(_run_share(share))
        except Exception as error:  # reported to the parent, which raises with it
            report = WorkerReport(error=f"{type(error).__name__}: {error}")
        report.cpu_s = time.process_time() - started_cpu
        connection.send(report)


Send = Callable[[int], Awaitable[tuple[str, int]]]
"""Sends the workload's text number i and returns (status code name, generated tokens of the best hypothesis)."""


async def _closed_loop(share: _Share, send: Send, messages: dict[str, str]) -> WorkerReport:
    """The share's clients, each sending its next call as soon as the previous one is answered, measured over
    the share's window; calls still in flight when it closes are cancelled (the server drops their requests).
    `messages`: where `send` keeps the first message of each failing status; the report holds it."""
    plan = share.plan
    report = WorkerReport(window_starts=share.window_starts, window_ends=share.window_ends, messages=messages)
    window_closed = asyncio.Event()
    in_window = 0

    async def client(index: int) -> None:
        nonlocal in_window
        position = (index * 7919) % len(plan.texts)  # spread the clients' starting points over the workload
        while not window_closed.is_set():
            started = time.monotonic()
            code, generated = await send(position)
            position = (position + 1) % len(plan.texts)
            finished = time.monotonic()
            if window_closed.is_set():
                return
            if started >= share.load_starts and share.window_starts <= finished <= share.window_ends:
                report.latencies.append(finished - started)
                report.codes.append(code)
                report.tokens.append(generated)
                in_window += 1
                if in_window >= share.max_requests:
                    report.window_ends = finished
                    window_closed.set()
            if code not in ("OK", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"):
                await asyncio.sleep(0.01)  # a broken server must not turn the loop into a busy spin

    await asyncio.sleep(max(0.0, share.load_starts - time.monotonic()))
    tasks = [asyncio.ensure_future(client(share.first_client + i)) for i in range(share.clients)]
    try:
        await asyncio.wait_for(window_closed.wait(), timeout=max(0.0, share.window_ends - time.monotonic()))
    except TimeoutError:
        pass
    window_closed.set()
    pending = [task for task in tasks if not task.done()]
    report.cut = len(pending)
    for task in pending:
        task.cancel()
    for result in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(result, Exception):
            raise result
    return report


def grpc_request(plan: CellPlan, text: str) -> pb.TranslateRequest:
    """The Translate request of one of the plan's texts."""
    from service.gen.attnserve.v1 import translator_pb2 as pb

    return pb.TranslateRequest(
        model=plan.model, texts=[text], options=pb.DecodeOptions(beam_size=plan.beam_size, max_length=plan.max_length)
    )


def http_body(plan: CellPlan, text: str) -> str:
    """The JSON body of POST /v1/translate for one of the plan's texts (the TranslateRequest's JSON mapping)."""
    import json

    return json.dumps(
        {"model": plan.model, "texts": [text], "options": {"beamSize": plan.beam_size, "maxLength": plan.max_length}}
    )


async def _run_share(share: _Share) -> WorkerReport:
    if share.plan.protocol == "http":
        return await _run_http_share(share)
    from grpc import aio

    from service.gen.attnserve.v1 import translator_pb2_grpc as pb_grpc

    plan = share.plan
    requests = [grpc_request(plan, text) for text in plan.texts]
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    messages: dict[str, str] = {}
    async with aio.insecure_channel(plan.address, options=options) as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout=30.0)
        stub = pb_grpc.TranslatorStub(channel)

        async def send(position: int) -> tuple[str, int]:
            try:
                response = await stub.Translate(requests[position], timeout=plan.timeout_s)
            except aio.AioRpcError as error:
                code = error.code().name
                messages.setdefault(code, error.details() or "")
                return code, 0
            return "OK", len(response.translations[0].hypotheses[0].target_tokens)

        return await _closed_loop(share, send, messages)


async def _run_http_share(share: _Share) -> WorkerReport:
    """HTTP/1.1 clients: each POSTs a TranslateRequest as JSON to /v1/translate on a keep-alive connection; the
    status code name is the error body's `code` (UNAVAILABLE when the connection fails)."""
    import aiohttp

    plan = share.plan
    bodies = [http_body(plan, text) for text in plan.texts]
    url = f"http://{plan.address}/v1/translate"
    headers = {"Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=plan.timeout_s)
    messages: dict[str, str] = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:

        async def send(position: int) -> tuple[str, int]:
            try:
                async with session.post(url, data=bodies[position], headers=headers) as response:
                    document = await response.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError) as error:
                messages.setdefault("UNAVAILABLE", f"{type(error).__name__}: {error}")
                return "UNAVAILABLE", 0
            if response.status != 200:
                code = str(document.get("code", f"HTTP_{response.status}"))
                messages.setdefault(code, str(document.get("error", "")))
                return code, 0
            return "OK", len(document["translations"][0]["hypotheses"][0]["targetTokens"])

        return await _closed_loop(share, send, messages)


class LoadGenerator:
    """A pool of client processes; `run(plan)` measures one cell. Use as a context manager."""

    def __init__(self, processes: int = 2, clients_per_process: int = 16) -> None:
        if processes < 1 or clients_per_process < 1:
            raise ValueError(f"processes and clients_per_process must be >= 1, got {processes}, {clients_per_process}")
        self.processes = processes
        self.clients_per_process = clients_per_process
        self._pending: list[tuple[multiprocessing.process.BaseProcess, multiprocessing.connection.Connection]] = []
        self._workers: list[tuple[multiprocessing.process.BaseProcess, multiprocessing.connection.Connection]] = []

    def __enter__(self) -> LoadGenerator:
        context = multiprocessing.get_context("spawn")  # no inherited threads, locks or onnxruntime sessions
        for index in range(self.processes):
            parent_end, child_end = context.Pipe()
            process = context.Process(target=_worker_main, args=(child_end,), name=f"loadgen-{index}", daemon=True)
            process.start()
            child_end.close()
            self._workers.append((process, parent_end))
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        for _, connection in self._workers:
            try:
                connection.send(None)
            except (BrokenPipeError, OSError):
                pass
        for process, connection in self._workers:
            process.join(timeout=10.0)
            if process.is_alive():
                process.terminate()  # only our own child, by its handle
                process.join(timeout=5.0)
            connection.close()
        self._workers.clear()

    def schedule(self, plan: CellPlan, setup_s: float = 0.5) -> tuple[float, float, float]:
        """Send one cell to the workers; returns (load_starts, window_starts, window_ends) in monotonic s.
        Call `collect()` for the result."""
        if not self._workers:
            raise RuntimeError("LoadGenerator is not started (use it as a context manager)")
        # Few clients fit in one process; more processes would only add context switches on a small machine.
        wanted = math.ceil(plan.concurrency / self.clients_per_process)
        used = self._workers[: max(1, min(len(self._workers), wanted))]
        load_starts = time.monotonic() + setup_s
        window_starts = load_starts + plan.warmup_s
        window_ends = window_starts + plan.duration_s
        base, extra = divmod(plan.concurrency, len(used))
        first = 0
        for index, (_, connection) in enumerate(used):
            clients = base + (1 if index < extra else 0)
            cap = max(1, math.ceil(plan.max_requests * clients / plan.concurrency))
            connection.send(_Share(plan, first, clients, load_starts, window_starts, window_ends, cap))
            first += clients
        self._pending = used
        return load_starts, window_starts, window_ends

    def collect(self, timeout_s: float = 600.0) -> CellMeasurement:
        """Wait for the workers' reports of the scheduled cell and combine them."""
        reports = []
        for process, connection in self._pending:
            if not connection.poll(timeout_s):
                raise RuntimeError(f"client process {process.name} gave no report within {timeout_s} s")
            reports.append(connection.recv())
        self._pending = []
        return summarize(reports)

    def run(self, plan: CellPlan) -> CellMeasurement:
        """Measure one cell (blocks for setup + warm-up + window + drain)."""
        self.schedule(plan)
        return self.collect()


# ----- h2load ----------------------------------------------------------------------------------------------


class H2loadGenerator:
    """The same cells driven by h2load (loadtests/h2load.py), a C load generator that is not the bottleneck.

    h2load sends one request body over and over, so a cell sends one text of the workload: the one of median
    length. Before h2load starts, one call from a Python client checks that the server answers it OK and counts
    the generated tokens of its best hypothesis (the same text always decodes to the same tokens, so tokens/s is
    calls/s times that count). gRPC cells keep `concurrency` calls in flight over up to 8 HTTP/2 connections;
    HTTP cells (JSON to POST /v1/translate) open one keep-alive HTTP/1.1 connection per client, as the Python
    clients do. The window is h2load's own measurement window after its warm-up, bounded in time (h2load's count
    limit does not combine with a duration); the calls in flight when it ends are reset (`cut`). h2load counts
    an HTTP 200 as answered whatever its grpc-status: `count_server_errors` corrects a cell with a server's own
    counters. Use as a context manager, like LoadGenerator.
    """

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self._pending: tuple[CellPlan, H2loadProcess | None, str, int, tuple[float, float]] | None = None

    def __enter__(self) -> H2loadGenerator:
        self.scratch.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._pending = None

    def schedule(self, plan: CellPlan) -> tuple[float, float, float]:
        """Probe the server, then start h2load on the cell; returns (load_starts, window_starts, window_ends) in
        monotonic seconds. Call `collect()` for the result."""
        from loadtests import h2load

        text = sorted(plan.texts, key=len)[len(plan.texts) // 2]
        http = plan.protocol == "http"
        code, tokens = probe_call(plan, text)
        process = None
        load_starts = time.monotonic()
        if code == "OK":
            body = self.scratch / f"{plan.protocol}-{plan.model}-{plan.beam_size}.body"
            body.write_bytes(http_body(plan, text).encode() if http else h2load.grpc_body(grpc_request(plan, text)))
            shape = (plan.concurrency, 1) if http else h2load.closed_loop_shape(plan.concurrency)
            process = h2load.start(
                plan.address,
                body,
                connections=shape[0],
                streams=shape[1],
                seconds=plan.duration_s,
                warmup_s=plan.warmup_s,
                http1=http,
            )
        window = (load_starts + plan.warmup_s, load_starts + plan.warmup_s + plan.duration_s)
        self._pending = (plan, process, code, tokens, window)
        return load_starts, *window

    def collect(self, timeout_s: float = 600.0) -> CellMeasurement:
        """Wait for h2load's figures of the scheduled cell (a cell whose probe failed: that failure alone)."""
        if self._pending is None:
            raise RuntimeError("no cell scheduled")
        plan, process, code, tokens, (starts, ends) = self._pending
        self._pending = None
        if process is None:
            return summarize(
                [WorkerReport(latencies=[0.0], codes=[code], tokens=[0], window_starts=starts, window_ends=ends)]
            )
        measured = process.wait(timeout_s)
        values = np.asarray(measured.latencies_s, dtype=np.float64)

        def percentile(q: float) -> float:
            return float(np.percentile(values, q)) if values.size else math.nan

        failures = {"HTTP_ERROR": measured.failed - measured.errored, "STREAM_RESET": measured.errored}
        return CellMeasurement(
            ok=measured.answered,
            failures={name: count for name, count in failures.items() if count > 0},
            window_s=measured.seconds,
            requests_per_s=measured.calls_per_s,
            tokens_per_s=measured.calls_per_s * tokens,
            mean_tokens=float(tokens) if measured.answered else math.nan,
            latency_p50_s=percentile(50),
            latency_p90_s=percentile(90),
            latency_p99_s=percentile(99),
            latency_mean_s=float(values.mean()) if values.size else math.nan,
            cut=plan.concurrency,
            client_cpu_s=measured.client_cpu_s,
            window_starts=starts,
            window_ends=ends,
        )


def count_server_errors(measured: CellMeasurement, errors: dict[str, int]) -> CellMeasurement:
    """A cell whose load generator counted every HTTP answer as OK, corrected by the calls the server's own
    counters saw fail in the window (`errors`, by status): they leave the OK count and its rates."""
    failed = min(sum(errors.values()), measured.ok)
    if not failed:
        return measured
    kept = (measured.ok - failed) / measured.ok
    return replace(
        measured,
        ok=measured.ok - failed,
        failures={**measured.failures, **errors},
        requests_per_s=measured.requests_per_s * kept,
        tokens_per_s=measured.tokens_per_s * kept,
    )


def probe_call(plan: CellPlan, text: str) -> tuple[str, int]:
    """One call of `text` from a Python client: (status code name, generated tokens of the best hypothesis)."""
    if plan.protocol == "http":
        import json
        import urllib.error
        import urllib.request

        request = urllib.request.Request(
            f"http://{plan.address}/v1/translate",
            data=http_body(plan, text).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=plan.timeout_s) as response:
                document = json.loads(response.read())
        except urllib.error.HTTPError as error:
            return str(json.loads(error.read() or b"{}").get("code", f"HTTP_{error.code}")), 0
        except OSError:
            return "UNAVAILABLE", 0
        return "OK", len(document["translations"][0]["hypotheses"][0]["targetTokens"])
    import grpc

    from service.gen.attnserve.v1 import translator_pb2_grpc as pb_grpc

    with grpc.insecure_channel(plan.address) as channel:
        try:
            response = pb_grpc.TranslatorStub(channel).Translate(grpc_request(plan, text), timeout=plan.timeout_s)
        except grpc.RpcError as error:
            return error.code().name, 0
    return "OK", len(response.translations[0].hypotheses[0].target_tokens)
