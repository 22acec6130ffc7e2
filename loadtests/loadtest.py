"""`make loadtest`: run Locust headless against an attnserve server, write its CSV stats and HTML report, and
fail on thresholds.

    python -m loadtests.loadtest --host 127.0.0.1:50051 --users 32 --spawn-rate 8 --run-time 60s
    python -m loadtests.loadtest --repository models ...          # starts a server on a free port first
    python -m loadtests.loadtest --smoke                           # CI: tiny models, 8 users, 20 s, no failures

With --host, the server must already be running. Without it, `attnserve serve` is started on the
repository (on a loopback port of its own) and stopped afterwards. The workload file is generated for
the served models unless --workload names one. Exit status: Locust's (1 when a threshold is exceeded or
a call failed beyond the allowed ratio), 2 for bad arguments or a server that does not start.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from loadtests.servers import PROJECT_ROOT, attnserve_server, wait_until_serving
from loadtests.smoke import SMOKE_ROOT, build_smoke_repository


def locust_command(args: argparse.Namespace, host: str, workload: Path) -> list[str]:
    out: Path = args.out
    return [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(PROJECT_ROOT / "loadtests" / "locustfile.py"),
        "--headless",
        "--host",
        host,
        "--users",
        str(args.users),
        "--spawn-rate",
        str(args.spawn_rate),
        "--run-time",
        args.run_time,
        "--stop-timeout",
        "10",
        "--csv",
        str(out / "locust"),
        "--csv-full-history",
        "--html",
        str(out / "report.html"),
        "--only-summary",
        "--loglevel",
        "WARNING",
        "--workload",
        str(workload),
        "--greedy-weight",
        str(args.greedy_weight),
        "--beam-weight",
        str(args.beam_weight),
        "--stream-weight",
        str(args.stream_weight),
        "--max-fail-ratio",
        str(args.max_fail_ratio),
        "--max-p99-ms",
        str(args.max_p99_ms),
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtests.loadtest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="", help="address of a running server (host:port); default: start one")
    parser.add_argument("--repository", type=Path, default=Path("models"), help="model repository for a started server")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="CI smoke: tiny models built into build/smoke, 8 users for 20 s, no failure allowed",
    )
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--spawn-rate", type=float, default=4.0, help="users started per second")
    parser.add_argument("--run-time", default="30s", help="Locust duration, e.g. 30s, 2m")
    parser.add_argument(
        "--workload", type=Path, default=None, help="workload file (default: OUT/workload.jsonl, generated)"
    )
    parser.add_argument("--out", type=Path, default=Path("reports/loadtest"), help="CSV stats and HTML report folder")
    parser.add_argument("--greedy-weight", type=float, default=6.0)
    parser.add_argument("--beam-weight", type=float, default=2.0)
    parser.add_argument("--stream-weight", type=float, default=2.0)
    parser.add_argument("--max-fail-ratio", type=float, default=0.01, help="fail when more calls failed (0 = none)")
    parser.add_argument(
        "--max-p99-ms", type=float, default=0.0, help="fail when the p99 latency is above (0 = no check)"
    )
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of a started server (default 1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.smoke:
        args.users, args.spawn_rate, args.run_time, args.max_fail_ratio = 8, 4.0, "20s", 0.0
        args.max_p99_ms = args.max_p99_ms or 10000.0
        args.repository = build_smoke_repository(SMOKE_ROOT)
    args.out.mkdir(parents=True, exist_ok=True)
    workload = args.workload or args.out / "workload.jsonl"
    if args.workload is None and workload.exists():
        workload.unlink()  # regenerated for the models this server serves
    server = None
    host = args.host
    try:
        if host:
            wait_until_serving(host, timeout_s=30.0)
        else:
            server = attnserve_server(
                args.repository,
                batching="continuous",
                threads=args.threads,
                provider="cpu",
                log_dir=args.out,
                label="server",
            ).start()
            host = server.address
            print(f"started attnserve serve on {host} (log: {server.log_path})")
    except RuntimeError as error:
        print(f"loadtest: {error}", file=sys.stderr)
        if server is not None:
            server.stop()
        return 2
    try:
        completed = subprocess.run(locust_command(args, host, workload), cwd=PROJECT_ROOT)
    finally:
        if server is not None:
            server.stop()
    print(f"Locust stats: {args.out}/locust_stats.csv, report: {args.out}/report.html (exit {completed.returncode})")
    return completed.returncode


if __name__ == "__main__":
    sys.exit(main())
