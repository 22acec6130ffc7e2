"""Does a server that keeps up refuse calls? Fresh servers at 64 calls in flight, with and without a pause.

Admission refuses a call (RESOURCE_EXHAUSTED) when its estimate says the call could not start within
max_queue_wait_ms; an estimate built on a bad measurement refuses calls of a server that is keeping up. This drives
fresh one-process servers (`attnserve serve`, default settings, `dates`) with h2load, closed loop at `--in-flight`
calls, and counts what each server refused, by reason (`attnserve_shed_calls_total`):

- a warm-up of `--warmup` seconds, then `--seconds` of load, all counted;
- with `--pause S`, the server process is stopped (SIGSTOP) for S seconds in the middle of the counted window and
  then continued, as a container whose CPU quota ran out, or a host that paused it, would be; a pause is the same
  to admission as a queue that did not move;
- with `--busy-loops K`, K processes spin on the same cores meanwhile, so the OS preempts the server's threads as
  it does on a busy machine.

    python -m loadtests.reliability.false_refusals                         # 10 fresh servers, no pause
    python -m loadtests.reliability.false_refusals --pause 0.6 --tree ../checkout-before

`--tree DIR` runs the same servers from another checkout (e.g. the commit before a change), alternating with this
one, so both are measured on the same machine in the same minutes.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tabulate import tabulate

from loadtests import h2load
from loadtests.call_cost import counted_errors, default_attnserve, model_text
from loadtests.servers import PROJECT_ROOT, scrape, shed_by_reason

MODEL = "dates"


@dataclass
class TreeFigures:
    """What the servers of one checkout refused: per server, and by reason over all of them."""

    label: str
    refused: list[int] = field(default_factory=list)
    by_reason: dict[str, int] = field(default_factory=dict)
    calls_per_s: list[float] = field(default_factory=list)

    def row(self) -> list[str]:
        reasons = ", ".join(f"{reason} {count:,}" for reason, count in sorted(self.by_reason.items())) or "-"
        mean = sum(self.calls_per_s) / len(self.calls_per_s) if self.calls_per_s else 0.0
        return [
            self.label,
            str(len(self.refused)),
            f"{mean:,.0f}",
            str(sum(1 for count in self.refused if count)),
            f"{sum(self.refused):,}",
            reasons,
            " ".join(str(count) for count in self.refused),
        ]


def measure_one(
    repository: Path, tree: Path, label: str, body: Path, log_dir: Path, args: argparse.Namespace
) -> tuple[int, dict[str, int], float]:
    """One fresh server of `tree`: (calls it refused with a status other than OK or CANCELLED, its refusals for
    overload by reason, calls/s h2load got answered) over the counted window."""
    server = default_attnserve(repository, label, log_dir, tree=tree)
    connections, streams = h2load.closed_loop_shape(args.in_flight)
    with server:
        assert server.process is not None
        pid = server.process.pid
        h2load.run(server.address, body, connections=connections, streams=streams, seconds=args.warmup, warmup_s=0.0)
        before = scrape(server.metrics_url) if server.metrics_url else {}
        resumed = threading.Event()
        if args.pause > 0:

            def pause_in_the_middle() -> None:
                # The counted window's middle, give or take h2load's start; the pause is what matters, not when.
                time.sleep(args.seconds / 2)
                os.kill(pid, signal.SIGSTOP)
                try:
                    time.sleep(args.pause)
                finally:
                    os.kill(pid, signal.SIGCONT)
                    resumed.set()

            threading.Thread(target=pause_in_the_middle, daemon=True).start()
        else:
            resumed.set()
        run = h2load.run(
            server.address, body, connections=connections, streams=streams, seconds=args.seconds, warmup_s=0.0
        )
        resumed.wait(args.seconds + args.pause + 10)
        after = scrape(server.metrics_url) if server.metrics_url else {}
    errors = counted_errors(before, after)
    return sum(errors.values()), dict(shed_by_reason(after) - shed_by_reason(before)), run.calls_per_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.reliability.false_refusals", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--repository", type=Path, default=Path("models"), help="holds the dates model")
    parser.add_argument("--servers", type=int, default=10, help="fresh servers per checkout (default 10)")
    parser.add_argument("--in-flight", type=int, default=64, help="calls h2load keeps in flight (default 64)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before the counted window")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds of the counted window (default 4)")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds the server is stopped mid-window (0: none)")
    parser.add_argument("--busy-loops", type=int, default=0, help="processes spinning on the same cores meanwhile")
    parser.add_argument(
        "--tree", type=Path, action="append", default=[], help="another checkout whose servers to measure as well"
    )
    args = parser.parse_args(argv)
    if not h2load.available():
        parser.error(h2load.MISSING)
    if not (args.repository / MODEL).is_dir():
        parser.error(f"{args.repository} has no {MODEL} model (make models, or --repository)")
    repository = args.repository.resolve()  # the servers of another checkout run from there
    trees = [("this checkout", PROJECT_ROOT), *((str(tree), tree.resolve()) for tree in args.tree)]
    figures = {label: TreeFigures(label) for label, _ in trees}
    from service.gen.attnserve.v1 import translator_pb2 as pb

    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(max(0, args.busy_loops))]
    try:
        with tempfile.TemporaryDirectory(prefix="false-refusals-") as scratch:
            log_dir = Path(scratch)
            body = log_dir / "body.bin"
            body.write_bytes(h2load.grpc_body(pb.TranslateRequest(model=MODEL, texts=[model_text(MODEL)])))
            for index in range(args.servers):
                # Alternate which checkout goes first, so neither always meets the machine as the other left it.
                order = trees[index % len(trees) :] + trees[: index % len(trees)]
                for label, tree in order:
                    refused, by_reason, calls_per_s = measure_one(
                        repository, tree, f"server-{index}", body, log_dir, args
                    )
                    tally = figures[label]
                    tally.refused.append(refused)
                    tally.calls_per_s.append(calls_per_s)
                    for reason, count in by_reason.items():
                        tally.by_reason[reason] = tally.by_reason.get(reason, 0) + count
                    print(f"  {label}: server {index + 1}, {calls_per_s:,.0f} calls/s, refused {refused} {by_reason}")
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    pause = f"paused {args.pause:g} s mid-window" if args.pause > 0 else "no pause"
    print(
        f"\nfresh servers, {args.in_flight} calls in flight, {args.warmup:g} s warm-up + {args.seconds:g} s counted, "
        f"{pause}, {args.busy_loops} busy loops"
    )
    headers = ["checkout", "servers", "calls/s", "servers that refused", "refused", "by reason", "per server"]
    print(
        tabulate([tally.row() for tally in figures.values()], headers=headers, tablefmt="pipe", disable_numparse=True)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
