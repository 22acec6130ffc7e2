"""The benchmark's load generator: closed-loop gRPC (or HTTP) clients in their own processes.

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
from dataclasses import dataclass, field

import numpy as np


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
    request cap was reached); `cut`: calls cancelled at the end; `cpu_s`: the worker's CPU seconds."""

    latencies: list[float] = field(default_factory=list)
    codes: list[str] = field(default_factory=list)
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
    of those calls; `failures` maps non-OK status names to counts; `cut`: calls cancelled at the window's
    end; `client_cpu_s`: CPU seconds the client processes used for the whole cell (warm-up included).
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

    @property
    def completed(self) -> int:
        return self.ok + sum(self.failures.values())


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


async def _closed_loop(share: _Share, send: Send) -> WorkerReport:
    """The share's clients, each sending its next call as soon as the previous one is answered, measured over
    the share's window; calls still in flight when it closes are cancelled (the server drops their requests)."""
    plan = share.plan
    report = WorkerReport(window_starts=share.window_starts, window_ends=share.window_ends)
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


async def _run_share(share: _Share) -> WorkerReport:
    if share.plan.protocol == "http":
        return await _run_http_share(share)
    from grpc import aio

    from service.gen.attnserve.v1 import translator_pb2 as pb
    from service.gen.attnserve.v1 import translator_pb2_grpc as pb_grpc

    plan = share.plan
    requests = [
        pb.TranslateRequest(
            model=plan.model,
            texts=[text],
            options=pb.DecodeOptions(beam_size=plan.beam_size, max_length=plan.max_length),
        )
        for text in plan.texts
    ]
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    async with aio.insecure_channel(plan.address, options=options) as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout=30.0)
        stub = pb_grpc.TranslatorStub(channel)

        async def send(position: int) -> tuple[str, int]:
            try:
                response = await stub.Translate(requests[position], timeout=plan.timeout_s)
            except aio.AioRpcError as error:
                return error.code().name, 0
            return "OK", len(response.translations[0].hypotheses[0].target_tokens)

        return await _closed_loop(share, send)


async def _run_http_share(share: _Share) -> WorkerReport:
    """HTTP/1.1 clients: each POSTs a TranslateRequest as JSON to /v1/translate on a keep-alive connection; the
    status code name is the error body's `code` (UNAVAILABLE when the connection fails)."""
    import json

    import aiohttp

    plan = share.plan
    bodies = [
        json.dumps(
            {
                "model": plan.model,
                "texts": [text],
                "options": {"beamSize": plan.beam_size, "maxLength": plan.max_length},
            }
        )
        for text in plan.texts
    ]
    url = f"http://{plan.address}/v1/translate"
    headers = {"Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=plan.timeout_s)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:

        async def send(position: int) -> tuple[str, int]:
            try:
                async with session.post(url, data=bodies[position], headers=headers) as response:
                    document = await response.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError):
                return "UNAVAILABLE", 0
            if response.status != 200:
                return str(document.get("code", f"HTTP_{response.status}")), 0
            return "OK", len(document["translations"][0]["hypotheses"][0]["targetTokens"])

        return await _closed_loop(share, send)


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
