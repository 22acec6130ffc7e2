"""Open-loop overload with h2load: calls offered at a fixed rate, whatever the server does, and where each ended.

    python -m loadtests.reliability.open_loop --rate 3000 --seconds 10      # against the default models

h2load (Debian's nghttp2-client: a C HTTP/2 load generator, so the offered rate does not depend on Python)
sends the same `Translate` call at `--rate` calls/s for `--seconds` from 30 connections, while a Python
client sends `--probes` calls spread over the same window and records each call's status. Afterwards the
server's own counters (`attnserve_requests_total`) are compared with what h2load completed: a call that
h2load completed but no counter saw was failed by gRPC core before it reached the server's code. The server
must then still translate. Prints the figures, with a table when `--rate` lists several rates (the refusal
rate: up to which offered rate every call is still answered OK or RESOURCE_EXHAUSTED); exits 1 when any call
ended otherwise (CANCELLED, or unseen).

    python -m loadtests.reliability.open_loop --rate 1000,3000,6000,12000

With `--factor` the rates are multiples of the server's capacity, measured first on a fresh server (h2load closed
loop, `--capacity-in-flight` calls in flight, for `--capacity-seconds`): the goodput (OK calls/s) of each run is
compared with it, the well-behaved client's p50 and p99 are printed, and the server's CPU time gives what a served
and a refused call cost it (served: the capacity run's CPU over its calls; refused: what the overload run used
beyond its served calls, over its refusals):

    python -m loadtests.reliability.open_loop --factor 2,5 --seconds 30
    python -m loadtests.reliability.open_loop --factor 2,5 --seconds 30 -- --frontends 1
"""

from __future__ import annotations

import argparse
import collections
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from tabulate import tabulate

from loadtests import h2load
from loadtests.procfs import rss_bytes
from loadtests.reliability.common import percentile
from loadtests.servers import ServerProcess, attnserve_server, scrape, shed_by_reason
from service.gen.attnserve.v1 import translator_pb2 as pb
from service.gen.attnserve.v1 import translator_pb2_grpc as pb_grpc

CONNECTIONS = 30
SLOW_PROBE_S = 0.25
TEXT = "samedi 21 novembre 2026"


@dataclass
class OpenLoopRun:
    """What happened at one offered rate."""

    rate: int
    seconds: int
    h2load_done: int
    h2load_summary: str  # its `requests:` line: how many of those it counted succeeded, failed or errored
    refused_by_transport: int  # streams reset before any answer (REFUSED_STREAM over max_concurrent_streams)
    counted: collections.Counter[str]  # the server's Translate calls by status code
    unseen: int  # completed by a client, counted by no server counter: failed by gRPC core
    probes: collections.Counter[str]
    probe_median_ms: float
    rss_before_mb: float
    rss_after_mb: float
    after: str  # the translation of TEXT right after the load
    probe_p99_ms: float = math.nan
    probe_pushback_ms: list[int] = field(default_factory=list)  # retry hints the probes' refusals carried
    shed: collections.Counter[str] = field(default_factory=collections.Counter)  # refusals by reason
    cpu_seconds: float = math.nan  # the server's (all its processes') during the load

    @property
    def goodput(self) -> float:
        """Calls answered OK per second of the run (the load generator's and the probes')."""
        return self.counted.get("OK", 0) / self.seconds

    @property
    def refused_cleanly(self) -> bool:
        """Every call answered OK or RESOURCE_EXHAUSTED: no probe (a client that cancels nothing) got anything
        else, and no call was lost. The server's CANCELLED count is not a failure by itself: it holds the streams
        h2load resets when its run ends (at most what it had in flight)."""
        clean = {"OK", "RESOURCE_EXHAUSTED"}
        return not self.unseen and set(self.probes) <= clean


def run_at(
    rate: int,
    seconds: int,
    probes: int,
    repository: Path,
    work: Path,
    server_args: tuple[str, ...],
    streams: int = 100,
    texts: int = 1,
    beam: int = 1,
) -> OpenLoopRun:
    """A fresh server, `rate` calls/s offered by h2load for `seconds` (at most CONNECTIONS x `streams` calls in
    flight), each call `texts` copies of TEXT decoded with `beam`, and `probes` calls from a Python client."""
    body = _body_file(work, texts, beam)
    with _server(repository, work, server_args, f"open-loop-{rate}") as server:
        assert server.metrics_url is not None and server.process is not None
        samples = scrape(server.metrics_url)
        before, shed_before = _counted(samples), shed_by_reason(samples)
        rss_before = rss_bytes(server.process.pid)
        cpu_before = server.cpu_seconds()
        load = subprocess.Popen(
            _h2load(server.address, body, streams, seconds, rate),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        codes, latencies, pushbacks = _probe(server.address, probes, seconds)
        output, _ = load.communicate()
        cpu_after = server.cpu_seconds()
        time.sleep(2.0)  # the calls h2load reset at its end reach the counters
        samples = scrape(server.metrics_url)
        counted, shed = _counted(samples) - before, shed_by_reason(samples) - shed_before
        rss_after = rss_bytes(server.process.pid)
        after = _translate_once(server.address)
    summary = next((line for line in output.splitlines() if line.startswith("requests:")), "")
    # "requests: T total, S started, D done, OK succeeded, F failed, E errored, 0 timeout". h2load counts every
    # call answered with HTTP 200 as succeeded, whatever its grpc-status (so gRPC core's CANCELLED too); errored
    # are the streams reset without an answer: refused by the server's transport (REFUSED_STREAM).
    counts = h2load.parse_summary(summary) if summary else None
    done, answered, errored = (counts.done, counts.succeeded, counts.errored) if counts else (0, 0, 0)
    return OpenLoopRun(
        rate=rate,
        seconds=seconds,
        h2load_done=done,
        h2load_summary=summary,
        counted=counted,
        refused_by_transport=errored,
        unseen=max(0, answered + codes.total() - counted.total()),
        probes=codes,
        probe_median_ms=1e3 * percentile(latencies, 50),
        probe_p99_ms=1e3 * percentile(latencies, 99),
        probe_pushback_ms=pushbacks,
        rss_before_mb=rss_before / 2**20,
        rss_after_mb=rss_after / 2**20,
        after=after,
        shed=shed,
        cpu_seconds=cpu_after - cpu_before,
    )


@dataclass(frozen=True)
class Capacity:
    """The server unloaded: OK calls/s with `in_flight` calls kept in flight (closed loop), and its CPU seconds
    per served call."""

    calls_per_s: float
    in_flight: int
    cpu_per_call_s: float
    counted: collections.Counter[str]


def measure_capacity(
    repository: Path, work: Path, server_args: tuple[str, ...], seconds: int, in_flight: int, texts: int, beam: int
) -> Capacity:
    """A fresh server driven closed loop by h2load (`in_flight` calls at all times, spread over its connections)
    for `seconds`, after a warm-up of a few seconds."""
    body = _body_file(work, texts, beam)
    streams = max(1, in_flight // CONNECTIONS)
    with _server(repository, work, server_args, "open-loop-capacity") as server:
        assert server.metrics_url is not None
        subprocess.run(_h2load(server.address, body, streams, 3, None), capture_output=True, check=False)
        before = _counted(scrape(server.metrics_url))
        cpu_before = server.cpu_seconds()
        subprocess.run(_h2load(server.address, body, streams, seconds, None), capture_output=True, check=False)
        cpu = server.cpu_seconds() - cpu_before
        time.sleep(1.0)
        counted = _counted(scrape(server.metrics_url)) - before
    ok = counted.get("OK", 0)
    return Capacity(ok / seconds, streams * CONNECTIONS, cpu / max(ok, 1), counted)


def refused_per_cpu_second(run: OpenLoopRun, capacity: Capacity) -> float:
    """Refusals per CPU-second of the server: the CPU the run used beyond what its served calls cost at capacity,
    spread over its refusals (NaN when it refused nothing or the served calls account for all of it)."""
    refused = run.counted.get("RESOURCE_EXHAUSTED", 0)
    spare = run.cpu_seconds - run.counted.get("OK", 0) * capacity.cpu_per_call_s
    return refused / spare if refused and spare > 0 else math.nan


def factor_table(runs: list[tuple[float, OpenLoopRun]], capacity: Capacity) -> str:
    """One Markdown row per overload factor."""
    rows = [
        [
            f"{factor:g}x",
            f"{run.rate:,}",
            f"{run.goodput:,.0f} ({run.goodput / capacity.calls_per_s:.0%})",
            f"{run.counted.get('RESOURCE_EXHAUSTED', 0):,}",
            ", ".join(f"{reason} {count:,}" for reason, count in sorted(run.shed.items())) or "-",
            f"{run.counted.get('CANCELLED', 0):,}",
            f"{run.unseen:,}",
            ", ".join(f"{code} {count}" for code, count in sorted(run.probes.items())),
            f"{run.probe_median_ms:.0f} / {run.probe_p99_ms:.0f}",
            f"{refused_per_cpu_second(run, capacity):,.0f}",
            f"{run.rss_before_mb:.0f} -> {run.rss_after_mb:.0f}",
        ]
        for factor, run in runs
    ]
    headers = [
        "offered",
        "calls/s offered",
        "goodput calls/s (of capacity)",
        "RESOURCE_EXHAUSTED",
        "by reason",
        "CANCELLED",
        "unseen",
        "well-behaved client",
        "its p50 / p99 ms",
        "refused per CPU-s",
        "RSS MB",
    ]
    return tabulate(rows, headers=headers, tablefmt="pipe", colalign=("left",) + ("right",) * 10)


def table(runs: list[OpenLoopRun]) -> str:
    """One Markdown row per offered rate."""
    rows = [
        [
            f"{run.rate:,}",
            f"{run.h2load_done:,}",
            f"{run.counted.get('OK', 0):,}",
            f"{run.counted.get('RESOURCE_EXHAUSTED', 0):,}",
            f"{run.counted.get('CANCELLED', 0):,}",
            f"{run.unseen:,}",
            f"{run.refused_by_transport:,}",
            ", ".join(f"{code} {count}" for code, count in sorted(run.probes.items())),
            f"{run.probe_median_ms:.1f}",
            f"{run.rss_before_mb:.0f} -> {run.rss_after_mb:.0f}",
            "yes" if run.refused_cleanly else "**no**",
        ]
        for run in runs
    ]
    headers = [
        "offered calls/s",
        "h2load done",
        "OK",
        "RESOURCE_EXHAUSTED",
        "CANCELLED",
        "unseen",
        "refused by transport",
        "probes",
        "probe p50 ms",
        "RSS MB",
        "clean",
    ]
    return tabulate(
        rows, headers=headers, tablefmt="pipe", colalign=("right",) * 7 + ("left", "right", "right", "left")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.reliability.open_loop", description=__doc__)
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument(
        "--rate", default="3000", help="calls/s offered; a comma-separated list sweeps them, a fresh server each"
    )
    parser.add_argument("--seconds", type=int, default=10, help="how long at each rate (default 10)")
    parser.add_argument("--probes", type=int, default=300, help="calls of the Python client (default 300)")
    parser.add_argument(
        "--streams",
        type=int,
        default=100,
        help=f"most calls in flight per h2load connection ({CONNECTIONS} connections; default 100): h2load offers "
        "the rate only while calls in flight stay below this, so a truly open loop far past capacity needs more",
    )
    parser.add_argument(
        "--texts", type=int, default=1, help="texts per h2load call (default 1); more makes calls engine-bound"
    )
    parser.add_argument("--beam", type=int, default=1, help="beam size of h2load's calls (default 1: greedy)")
    parser.add_argument(
        "--factor",
        default="",
        help="offer these multiples of the measured capacity (comma-separated, e.g. 2,5) instead of --rate",
    )
    parser.add_argument("--capacity-seconds", type=int, default=10, help="closed-loop capacity run (default 10)")
    parser.add_argument(
        "--capacity-in-flight",
        type=int,
        default=240,
        help="calls in flight during the capacity run (default 240: the batch's 256 rows nearly full of greedy calls)",
    )
    parser.add_argument("--work", type=Path, default=Path("build/open-loop"), help="body file and server logs")
    parser.add_argument("server_args", nargs="*", help="extra `attnserve serve` flags (after --)")
    args = parser.parse_args(argv)
    if not h2load.available():
        parser.error(h2load.MISSING)
    args.work.mkdir(parents=True, exist_ok=True)
    server_args = tuple(args.server_args)
    if args.factor:
        try:
            factors = [float(factor) for factor in args.factor.split(",")]
        except ValueError:
            parser.error(f"--factor {args.factor!r}: give multiples of the capacity, e.g. 2 or 2,5")
        return _run_factors(args, factors, server_args)
    try:
        rates = [int(rate) for rate in args.rate.split(",")]
    except ValueError:
        parser.error(f"--rate {args.rate!r}: give calls/s as integers, e.g. 3000 or 1000,3000,9000")
    runs = []
    for rate in rates:
        run = run_at(
            rate,
            args.seconds,
            args.probes,
            args.repository,
            args.work,
            server_args,
            args.streams,
            args.texts,
            args.beam,
        )
        print(
            f"offered {rate} calls/s for {args.seconds} s: server counted {dict(run.counted)}, "
            f"unseen {run.unseen}, probes {dict(run.probes)}, after: {TEXT!r} -> {run.after!r}; h2load "
            f"{run.h2load_summary}",
            flush=True,
        )
        runs.append(run)
    print()
    print(table(runs))
    return 0 if all(run.refused_cleanly for run in runs) else 1


def _run_factors(args: argparse.Namespace, factors: list[float], server_args: tuple[str, ...]) -> int:
    capacity = measure_capacity(
        args.repository, args.work, server_args, args.capacity_seconds, args.capacity_in_flight, args.texts, args.beam
    )
    print(
        f"capacity: {capacity.calls_per_s:,.0f} calls/s OK with {capacity.in_flight} in flight (closed loop, "
        f"{args.capacity_seconds} s; server counted {dict(capacity.counted)}), {1e3 * capacity.cpu_per_call_s:.3f} "
        f"ms of server CPU per call ({1 / capacity.cpu_per_call_s:,.0f} served per CPU-second)",
        flush=True,
    )
    runs = []
    for factor in factors:
        rate = round(factor * capacity.calls_per_s)
        run = run_at(
            rate,
            args.seconds,
            args.probes,
            args.repository,
            args.work,
            server_args,
            args.streams,
            args.texts,
            args.beam,
        )
        hints = sorted(run.probe_pushback_ms)
        print(
            f"{factor:g}x = {rate} calls/s for {args.seconds} s: server counted {dict(run.counted)}, shed "
            f"{dict(run.shed)}, unseen {run.unseen}, probes {dict(run.probes)} (p50 {run.probe_median_ms:.1f} ms, "
            f"p99 {run.probe_p99_ms:.1f} ms; retry hints {hints[:1] + hints[-1:]} ms), server CPU "
            f"{run.cpu_seconds:.1f} s, after: {TEXT!r} -> {run.after!r}; h2load {run.h2load_summary}",
            flush=True,
        )
        runs.append((factor, run))
    print()
    print(factor_table(runs, capacity))
    clean = all(run.refused_cleanly for _, run in runs)
    return 0 if clean else 1


def _body_file(work: Path, texts: int, beam: int) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    body = work / "translate.bin"
    request = pb.TranslateRequest(model="dates", texts=[TEXT] * texts, options=pb.DecodeOptions(beam_size=beam))
    body.write_bytes(h2load.grpc_body(request))
    return body


def _server(repository: Path, work: Path, server_args: tuple[str, ...], label: str) -> ServerProcess:
    return attnserve_server(
        repository, batching="continuous", threads=1, provider="cpu", log_dir=work, extra=server_args, label=label
    )


def _h2load(address: str, body: Path, streams: int, seconds: int, rate: int | None) -> list[str]:
    """h2load sending Translate calls (the body file) from CONNECTIONS connections, at most `streams` in flight on
    each, for `seconds`: at `rate` calls/s in all, or as fast as answers come back (closed loop) when None."""
    return h2load.command(
        address,
        body,
        None,
        connections=CONNECTIONS,
        streams=streams,
        seconds=seconds,
        warmup_s=0.0,
        rate_per_connection=None if rate is None else max(1, rate // CONNECTIONS),
    )


def _translate_once(address: str) -> str:
    with grpc.insecure_channel(address) as channel:
        return (
            pb_grpc.TranslatorStub(channel)
            .Translate(pb.TranslateRequest(model="dates", texts=[TEXT]), timeout=30)
            .translations[0]
            .hypotheses[0]
            .text
        )


def _probe(address: str, count: int, seconds: float) -> tuple[collections.Counter[str], list[float], list[int]]:
    """A well-behaved client: at most `count` calls one at a time, spread over the run, each with a deadline of
    30 s, and none started after the load's `seconds` (the load starts as this does). A call that waits longer
    than the spacing is followed at once by the next, so under a long wait fewer than `count` are made: every one
    of them is a call made under load. Returns their statuses, their latencies (s) and the retry hints (ms) their
    refusals carried."""
    codes: collections.Counter[str] = collections.Counter()
    latencies = []
    pushbacks = []
    slow = []
    spacing = max(seconds - 2.0, 1.0) / count
    began = time.perf_counter()
    time.sleep(1.0)
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.TranslatorStub(channel)
        for _ in range(count):
            if time.perf_counter() - began >= seconds - 0.5:
                break  # the load is ending: a call now would measure an idle server
            started = time.perf_counter()
            try:
                stub.Translate(pb.TranslateRequest(model="dates", texts=["3 mars 1999"]), timeout=30)
                codes["OK"] += 1
            except grpc.RpcError as error:
                codes[error.code().name] += 1
                trailers = dict(error.trailing_metadata() or ())
                if "grpc-retry-pushback-ms" in trailers:
                    pushbacks.append(int(trailers["grpc-retry-pushback-ms"]))
            latencies.append(time.perf_counter() - started)
            if latencies[-1] > SLOW_PROBE_S:
                slow.append(f"{latencies[-1]:.2f} s at {started - began:.1f} s")
            time.sleep(max(0.0, spacing - latencies[-1]))
    if slow:
        print(f"  probes over {SLOW_PROBE_S} s (their latency, and when they started in the run): {', '.join(slow)}")
    return codes, latencies, pushbacks


def _counted(samples: dict) -> collections.Counter[str]:
    codes: collections.Counter[str] = collections.Counter()
    for (name, labels), value in samples.items():
        labels = dict(labels)
        if name == "attnserve_requests_total" and labels.get("method") == "Translate":
            codes[labels["code"]] += int(value)
    return codes


if __name__ == "__main__":
    sys.exit(main())
