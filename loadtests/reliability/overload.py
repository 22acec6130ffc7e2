"""`make overload`: offer a real server far more load than it can take, and print what happened.

    python -m loadtests.reliability.overload                        # models/ (or the tiny smoke models), 10x
    python -m loadtests.reliability.overload --factor 10 --spike-seconds 60 --queue 64

The run starts `attnserve serve` on a loopback port and drives it from client processes (asyncio gRPC):
1. warm-up, then baseline: closed loop, `--concurrency` callers: the capacity (calls/s) and latency;
2. spike: open loop at `--factor` x capacity: calls beyond the queue limit must fail fast with
   RESOURCE_EXHAUSTED, admitted calls keep a bounded latency, memory stays flat;
3. recovery: open loop at half the capacity: latency back to the baseline's.

It prints a table per phase, the server's memory, and how long recovery took, and exits 1 when a call
was lost (ended with anything but OK or RESOURCE_EXHAUSTED) or the server's RSS grew 10% or more.
Figures taken while other work runs on the machine are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing
import multiprocessing.pool
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from loadtests.reliability.common import (
    MemorySampler,
    mib,
    ms,
    percentile,
    print_table,
    repository_or_smoke,
    start_server,
    workload_texts,
)

SHED = "RESOURCE_EXHAUSTED"
ACCEPTABLE = {"OK", SHED}


@dataclass(frozen=True)
class Call:
    """One call: when it started (time.monotonic()), how long it took (s) and its status name."""

    started: float
    seconds: float
    code: str


@dataclass(frozen=True)
class Load:
    """What one client process does: `mode` 'closed' (`concurrency` callers, each calling back to back)
    or 'open' (calls started at `rate` per second whatever happens to earlier ones), from monotonic time
    `start` for `duration_s`."""

    address: str
    texts: dict[str, list[str]]
    mode: str
    start: float
    duration_s: float
    concurrency: int = 0
    rate: float = 0.0
    beam_share: float = 0.25
    texts_per_call: int = 1
    timeout_s: float = 30.0
    seed: int = 0


async def _drive(load: Load) -> list[Call]:
    import grpc
    from grpc import aio

    from service.gen.attnserve.v1 import translator_pb2 as pb
    from service.gen.attnserve.v1 import translator_pb2_grpc as pb_grpc

    rng = random.Random(load.seed)
    models = sorted(load.texts)
    calls: list[Call] = []
    async with aio.insecure_channel(load.address) as channel:
        stub = pb_grpc.TranslatorStub(channel)

        async def one() -> None:
            model = rng.choice(models)
            beam = 4 if rng.random() < load.beam_share else 0
            texts = [rng.choice(load.texts[model]) for _ in range(load.texts_per_call)]
            request = pb.TranslateRequest(model=model, texts=texts, options=pb.DecodeOptions(beam_size=beam))
            started = time.monotonic()
            try:
                await stub.Translate(request, timeout=load.timeout_s)
                code = "OK"
            except aio.AioRpcError as error:
                code = error.code().name
            except grpc.RpcError as error:  # pragma: no cover - aio raises AioRpcError
                code = getattr(error, "code", lambda: None)() or "UNKNOWN"
            calls.append(Call(started, time.monotonic() - started, code))

        await asyncio.sleep(max(0.0, load.start - time.monotonic()))
        end = load.start + load.duration_s
        if load.mode == "closed":

            async def caller() -> None:
                while time.monotonic() < end:
                    await one()

            await asyncio.gather(*(caller() for _ in range(load.concurrency)))
        else:
            pending: set[asyncio.Task[None]] = set()
            index = 0
            while True:
                due = load.start + index / load.rate
                if due >= end:
                    break
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(one())
                pending.add(task)
                task.add_done_callback(pending.discard)
                index += 1
            if pending:
                await asyncio.gather(*pending)
    return calls


def _run_in_process(load: Load) -> list[Call]:
    return asyncio.run(_drive(load))


def run_phase(pool: multiprocessing.pool.Pool, processes: int, template: Load) -> list[Call]:
    """Split one phase's load over the client processes and gather every call."""
    loads = []
    for index in range(processes):
        share = dict(template.__dict__)
        share["seed"] = template.seed * 1000 + index
        if template.mode == "closed":
            share["concurrency"] = max(
                1, template.concurrency // processes + (index < template.concurrency % processes)
            )
        else:
            share["rate"] = template.rate / processes
            share["start"] = template.start + index / template.rate  # interleave the processes' schedules
        loads.append(Load(**share))
    calls: list[Call] = []
    for part in pool.map(_run_in_process, loads):
        calls.extend(part)
    return calls


@dataclass(frozen=True)
class PhaseFigures:
    name: str
    seconds: float
    offered_per_s: float
    ok: int
    shed: int
    lost: int
    ok_p50: float
    ok_p99: float
    ok_max: float
    shed_p50: float
    shed_p99: float

    @property
    def ok_per_s(self) -> float:
        return self.ok / self.seconds


def figures(name: str, calls: list[Call], seconds: float) -> PhaseFigures:
    ok = [call.seconds for call in calls if call.code == "OK"]
    shed = [call.seconds for call in calls if call.code == SHED]
    return PhaseFigures(
        name,
        seconds,
        len(calls) / seconds,
        len(ok),
        len(shed),
        sum(1 for call in calls if call.code not in ACCEPTABLE),
        percentile(ok, 50),
        percentile(ok, 99),
        max(ok, default=math.nan),
        percentile(shed, 50),
        percentile(shed, 99),
    )


def recovery_seconds(calls: list[Call], start: float, target_p99: float) -> float:
    """Seconds from `start` to the end of the first one-second window whose OK p99 is within `target_p99`."""
    windows: dict[int, list[float]] = {}
    for call in calls:
        if call.code == "OK":
            windows.setdefault(int(call.started - start), []).append(call.seconds)
    for second in sorted(windows):
        if percentile(windows[second], 99) <= target_p99:
            return second + 1.0
    return math.nan


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.reliability.overload", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--out", type=Path, default=Path("reports/overload"), help="server log folder")
    parser.add_argument("--factor", type=float, default=10.0, help="spike load as a multiple of the capacity")
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop callers measuring the capacity")
    parser.add_argument("--baseline-seconds", type=float, default=20.0)
    parser.add_argument("--spike-seconds", type=float, default=30.0)
    parser.add_argument("--recovery-seconds", type=float, default=20.0)
    parser.add_argument("--queue", type=int, default=64, help="the server's --max-waiting-requests")
    parser.add_argument("--texts-per-call", type=int, default=8, help="texts in each Translate call")
    parser.add_argument("--beam-share", type=float, default=1.0, help="share of calls that use a beam of 4")
    parser.add_argument("--processes", type=int, default=2, help="client processes")
    parser.add_argument("--threads", type=int, default=1, help="the server's --intra-op-threads")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    repository = repository_or_smoke(args.repository)
    extra = ["--max-waiting-requests", str(args.queue)]
    server = start_server(repository, args.out, "overload-server", extra=extra, threads=args.threads)
    assert server.process is not None
    memory = MemorySampler(server.process.pid, interval_s=0.5).start()
    context = multiprocessing.get_context("spawn")  # no grpc state inherited across fork
    try:
        texts = workload_texts(server.address)
        print(
            f"server {server.address}, models {', '.join(sorted(texts))}, queue limit {args.queue} texts per "
            f"model version, {args.processes} client processes"
        )
        with context.Pool(args.processes) as pool:

            def phase(
                mode: str, seconds: float, seed: int, *, concurrency: int = 0, rate: float = 0.0
            ) -> tuple[list[Call], float]:
                start = time.monotonic() + 1.0  # every process starts on the same clock tick
                template = Load(
                    server.address,
                    texts,
                    mode,
                    start,
                    seconds,
                    seed=seed,
                    texts_per_call=args.texts_per_call,
                    beam_share=args.beam_share,
                    concurrency=concurrency,
                    rate=rate,
                )
                return run_phase(pool, args.processes, template), start

            phase("closed", 10.0, 1, concurrency=args.concurrency)  # warm-up: not measured
            baseline_calls, baseline_start = phase("closed", args.baseline_seconds, 2, concurrency=args.concurrency)
            baseline = figures("baseline (closed loop)", baseline_calls, args.baseline_seconds)
            capacity = baseline.ok_per_s
            memory_before = memory.between(baseline_start, baseline_start + args.baseline_seconds + 1.0)
            print(
                f"capacity: {capacity:.1f} calls/s; spike: {args.factor:g}x = {capacity * args.factor:.0f} calls/s "
                f"for {args.spike_seconds:g} s"
            )
            spike_calls, spike_start = phase("open", args.spike_seconds, 3, rate=capacity * args.factor)
            spike = figures(f"spike ({args.factor:g}x, open loop)", spike_calls, args.spike_seconds)
            recovery_calls, recovery_start = phase("open", args.recovery_seconds, 4, rate=capacity * 0.5)
            recovery = figures("recovery (0.5x, open loop)", recovery_calls, args.recovery_seconds)
            memory_spike = memory.between(spike_start, spike_start + args.spike_seconds + 1.0)
            memory_after = memory.between(recovery_start, recovery_start + args.recovery_seconds + 1.0)
    finally:
        memory.stop()
        server.stop()

    rows = [
        [
            p.name,
            f"{p.offered_per_s:.0f}/s",
            f"{p.ok_per_s:.0f}/s",
            p.ok,
            p.shed,
            f"{100.0 * p.shed / max(p.ok + p.shed, 1):.1f}%",
            p.lost,
            ms(p.ok_p50),
            ms(p.ok_p99),
            ms(p.ok_max),
            ms(p.shed_p50),
            ms(p.shed_p99),
        ]
        for p in (baseline, spike, recovery)
    ]
    print_table(
        "calls by phase",
        [
            "phase",
            "offered",
            "served",
            "ok",
            "shed",
            "shed %",
            "lost",
            "ok p50",
            "ok p99",
            "ok max",
            "shed p50",
            "shed p99",
        ],
        rows,
    )
    timeline = [(at - spike_start, value) for at, value in memory.samples if at >= baseline_start]
    print_table(
        "server memory over time (seconds from the start of the spike)",
        ["second", "RSS"],
        [[f"{at:+.0f}", mib(value)] for at, value in timeline[:: max(1, len(timeline) // 12)]],
    )
    baseline_rss = statistics.median(memory_before) if memory_before else math.nan
    sustained = memory_spike[len(memory_spike) // 2 :]
    sustained_rss = statistics.median(sustained) if sustained else math.nan
    final_rss = memory_after[-1] if memory_after else math.nan
    peak_rss = max(memory_spike + memory_after) if memory_spike or memory_after else math.nan
    growth = max(sustained_rss, final_rss) / baseline_rss - 1.0
    print_table(
        "server memory (RSS)",
        ["when", "RSS", "vs baseline"],
        [
            ["baseline (median)", mib(baseline_rss), ""],
            [
                "second half of the spike (median)",
                mib(sustained_rss),
                f"{100.0 * (sustained_rss / baseline_rss - 1):+.1f}%",
            ],
            ["end of the run", mib(final_rss), f"{100.0 * (final_rss / baseline_rss - 1):+.1f}%"],
            ["peak (one sample)", mib(peak_rss), f"{100.0 * (peak_rss / baseline_rss - 1):+.1f}%"],
        ],
    )
    others = Counter(call.code for call in baseline_calls + spike_calls + recovery_calls if call.code not in ACCEPTABLE)
    if others:
        print("\nlost calls by status: " + ", ".join(f"{code} {count}" for code, count in others.most_common()))
        if others.get("CANCELLED"):
            print(
                "  (CANCELLED: gRPC's own backlog protection dropped calls the server's event loop could not even\n"
                "  pick up, before they reached attnserve; the offered rate is beyond what this machine can refuse)"
            )
    recovered = recovery_seconds(recovery_calls, recovery_start, max(baseline.ok_p99 * 1.5, 0.005))
    lost = baseline.lost + spike.lost + recovery.lost
    print(
        f"\nrecovered to within 1.5x the baseline p99 after: "
        f"{'never' if math.isnan(recovered) else f'{recovered:.0f} s'} of the recovery phase"
    )
    print(
        f"load held: {spike.offered_per_s:.0f} calls/s offered against a capacity of {capacity:.0f} calls/s; "
        f"requests lost: {lost}"
    )
    failed = []
    if lost:
        failed.append(f"{lost} calls ended with a status other than OK or RESOURCE_EXHAUSTED")
    if not growth < 0.10:
        failed.append(f"the server's RSS grew {100.0 * growth:.1f}% under sustained overload or by the end (limit 10%)")
    if spike.shed == 0:
        failed.append("the spike was not beyond capacity: nothing was shed")
    for problem in failed:
        print(f"FAILED: {problem}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
