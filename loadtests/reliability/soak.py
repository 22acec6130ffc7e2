"""`make soak`: run a real server for a long time (default 10 minutes) at about 80% of its measured capacity
with Locust, and print its figures: calls, failures (there must be none), latency minute by minute, and
the server's memory.

    python -m loadtests.reliability.soak                            # models/ (or the tiny smoke models), 10 minutes
    python -m loadtests.reliability.soak --minutes 60 --load 0.8 --users 16

The run starts `attnserve serve` on a loopback port, measures the capacity with the project's Locust
users running flat out (loadtests/locustfile.py), then soaks at `--load` x that rate with the same users
paced (loadtests/reliability/soak_locustfile.py). It exits 1 when a call failed, the server's RSS grew 10% or more
from the first minute to the last, or the last minute's p99 latency is over twice the first's.
Figures taken while other work runs on the machine are noisy.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from loadtests.reliability.common import (
    PROJECT_ROOT,
    MemorySampler,
    mib,
    print_table,
    repository_or_smoke,
    start_server,
)


@dataclass(frozen=True)
class LocustTotals:
    """The Aggregated row of a Locust stats CSV; times in milliseconds."""

    requests: int
    failures: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float


def locust(
    host: str, out: Path, name: str, users: int, seconds: float, workload: Path, calls_per_second: float = 0.0
) -> int:
    """Run Locust headless; its CSVs go to out/NAME_*.csv. Returns its exit status."""
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(PROJECT_ROOT / "loadtests" / "reliability" / "soak_locustfile.py"),
        "--headless",
        "--host",
        host,
        "--users",
        str(users),
        "--spawn-rate",
        str(max(users / 4, 1)),
        "--run-time",
        f"{int(math.ceil(seconds))}s",
        "--stop-timeout",
        "30",
        "--csv",
        str(out / name),
        "--csv-full-history",
        "--only-summary",
        "--loglevel",
        "WARNING",
        "--workload",
        str(workload),
        "--max-fail-ratio",
        "0",
        "--calls-per-second",
        str(calls_per_second),
    ]
    return subprocess.run(command, cwd=PROJECT_ROOT).returncode


def totals(stats_csv: Path) -> LocustTotals:
    with stats_csv.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["Name"] == "Aggregated":
                return LocustTotals(
                    int(row["Request Count"]),
                    int(row["Failure Count"]),
                    float(row["Requests/s"]),
                    float(row["50%"] or "nan"),
                    float(row["99%"] or "nan"),
                    float(row["Max Response Time"] or "nan"),
                )
    raise RuntimeError(f"{stats_csv} has no Aggregated row")


@dataclass(frozen=True)
class Minute:
    index: int
    calls: int
    failures: int
    p50_ms: float
    p99_ms: float
    rss: float


def per_minute(history_csv: Path, memory: MemorySampler, started_wall: float, started_monotonic: float) -> list[Minute]:
    """Minute-by-minute figures from Locust's full history (one Aggregated row per second: cumulative counts,
    and percentiles over its recent window) and the RSS samples. Minutes count from the first call."""
    rows = []
    with history_csv.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["Name"] == "Aggregated" and int(row["Total Request Count"] or 0) > 0:
                rows.append(row)
    if not rows:
        return []
    origin = float(rows[0]["Timestamp"])
    started_monotonic += origin - started_wall  # the same instant on the monotonic clock
    minutes: dict[int, list[dict[str, str]]] = {}
    for row in rows:
        minutes.setdefault(int((float(row["Timestamp"]) - origin) // 60), []).append(row)
    result: list[Minute] = []
    previous_calls = previous_failures = 0
    for index in sorted(minutes):
        group = minutes[index]
        calls, failures = int(group[-1]["Total Request Count"]), int(group[-1]["Total Failure Count"])
        p50 = [float(row["50%"]) for row in group if row["50%"] not in ("", "N/A")]
        p99 = [float(row["99%"]) for row in group if row["99%"] not in ("", "N/A")]
        start = started_monotonic + index * 60
        rss = memory.between(start, start + 60)
        result.append(
            Minute(
                index + 1,
                calls - previous_calls,
                failures - previous_failures,
                statistics.median(p50) if p50 else math.nan,
                max(p99) if p99 else math.nan,
                statistics.median(rss) if rss else math.nan,
            )
        )
        previous_calls, previous_failures = calls, failures
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtests.reliability.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--out", type=Path, default=Path("reports/soak"), help="Locust CSVs and the server log")
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the soak")
    parser.add_argument("--load", type=float, default=0.8, help="soak rate as a share of the measured capacity")
    parser.add_argument("--users", type=int, default=16, help="Locust users")
    parser.add_argument("--capacity-seconds", type=float, default=45.0, help="length of the capacity measurement")
    parser.add_argument("--threads", type=int, default=1, help="the server's --intra-op-threads")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    repository = repository_or_smoke(args.repository)
    args.out.mkdir(parents=True, exist_ok=True)
    workload = args.out / "workload.jsonl"
    workload.unlink(missing_ok=True)  # generated by the Locust users for the models this server serves
    server = start_server(repository, args.out, "soak-server", threads=args.threads)
    assert server.process is not None
    memory = MemorySampler(server.process.pid, interval_s=2.0).start()
    try:
        print(f"server {server.address}; measuring capacity with {args.users} users for {args.capacity_seconds:g} s")
        locust(server.address, args.out, "capacity", args.users, args.capacity_seconds, workload)
        capacity = totals(args.out / "capacity_stats.csv")
        target = args.load * capacity.requests_per_s
        print(
            f"capacity: {capacity.requests_per_s:.1f} calls/s (p99 {capacity.p99_ms:.0f} ms); soaking at "
            f"{target:.1f} calls/s ({args.load:.0%}) for {args.minutes:g} minutes"
        )
        started_wall, started_monotonic = time.time(), time.monotonic()
        status = locust(server.address, args.out, "soak", args.users, args.minutes * 60, workload, target)
        soak = totals(args.out / "soak_stats.csv")
        minutes = per_minute(args.out / "soak_stats_history.csv", memory, started_wall, started_monotonic)
    finally:
        memory.stop()
        server.stop()

    print_table(
        "soak, minute by minute",
        ["minute", "calls", "calls/s", "failed", "p50", "p99 (max of 10 s windows)", "server RSS"],
        [
            [
                m.index,
                m.calls,
                f"{m.calls / 60:.1f}",
                m.failures,
                f"{m.p50_ms:.0f} ms",
                f"{m.p99_ms:.0f} ms",
                mib(m.rss),
            ]
            for m in minutes
        ],
    )
    full = [m for m in minutes if m.calls > 0]
    first, last = (full[0], full[-1]) if full else (None, None)
    growth = (last.rss / first.rss - 1.0) if first and last else math.nan
    drift = (last.p99_ms / first.p99_ms) if first and last and first.p99_ms > 0 else math.nan
    print_table(
        "soak totals",
        ["figure", "value"],
        [
            ["calls", soak.requests],
            ["failed calls", soak.failures],
            ["rate (target)", f"{soak.requests_per_s:.1f} calls/s ({target:.1f})"],
            ["latency p50 / p99 / max", f"{soak.p50_ms:.0f} / {soak.p99_ms:.0f} / {soak.max_ms:.0f} ms"],
            [
                "server RSS first minute -> last",
                f"{mib(first.rss) if first else '-'} -> {mib(last.rss) if last else '-'} ({100.0 * growth:+.1f}%)",
            ],
            ["p99 last minute / first minute", f"{drift:.2f}x"],
        ],
    )
    problems = []
    if soak.failures or status != 0:
        problems.append(f"{soak.failures} calls failed (Locust exit status {status})")
    if not growth < 0.10:
        problems.append(f"the server's RSS grew {100.0 * growth:.1f}% (limit 10%)")
    if not drift <= 2.0:
        problems.append(f"the p99 latency drifted {drift:.2f}x from the first minute to the last (limit 2x)")
    for problem in problems:
        print(f"FAILED: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
