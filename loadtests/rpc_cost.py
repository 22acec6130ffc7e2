"""What a call costs beyond its work: the server contenders driven by h2load, a load generator that is not the
bottleneck, against the engine alone and a no-op gRPC server (loadtests/call_cost.py measures; this is its
command line).

    python -m loadtests.rpc_cost                                   # near-free and dates, every server
    python -m loadtests.rpc_cost --models near-free,dates,phrasebook --tree ../other-checkout

For each model: calls/s at 64 in flight, p50 latency at 1 in flight and server CPU per call at a fixed offered
rate below every server's capacity (`--rate`, lowered to half the slowest server's calls/s at 64 where that is
lower), with the ratios of issue 21 against the composed ceiling, the latency floor and the no-op server's CPU
per call, each bar marked met or missed.

The attnserve servers run with their default settings (only the repository, the ports and the log level
given), one process and `--frontends 1`. `--tree DIR` runs them from another checkout of the project as well
(e.g. the commit before a change), so both are measured in one run on the same machine; `--variant 'FLAGS'`
adds a one-process server with other serve flags. Prints Markdown tables and writes them with the raw figures
as JSON to `--out`. `attnserve bench` measures the same (its cpu-per-call section) beside its contenders.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tabulate import tabulate

from loadtests import call_cost, h2load
from loadtests.servers import PROJECT_ROOT, ServerProcess


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.rpc_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", default="near-free,dates", help=f"comma-separated, from {', '.join(call_cost.MODELS)}"
    )
    parser.add_argument("--repository", type=Path, default=Path("models"), help="the default models (dates, numbers)")
    parser.add_argument("--cache-dir", type=Path, default=Path("build/bench"), help="near-free and phrasebook builds")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds of each h2load window (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each window (default 1)")
    parser.add_argument(
        "--rate",
        type=int,
        default=call_cost.DEFAULT_RATE,
        help=f"offered calls/s of the CPU-per-call window (default {call_cost.DEFAULT_RATE})",
    )
    parser.add_argument(
        "--tree", type=Path, action="append", default=[], help="another checkout whose servers to measure as well"
    )
    parser.add_argument("--no-frontends", action="store_true", help="leave out the --frontends 1 servers")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="'FLAGS'",
        help="one more one-process attnserve server with these serve flags, e.g. '--engine-driver thread'",
    )
    parser.add_argument("--out", type=Path, default=Path("reports/rpc-cost"))
    args = parser.parse_args(argv)
    if not h2load.available():
        parser.error(h2load.MISSING)
    models = [name for name in args.models.split(",") if name]
    unknown = [name for name in models if name not in call_cost.MODELS]
    if unknown:
        parser.error(f"unknown models: {', '.join(unknown)}")
    from loadtests.bench import link_repository

    repository, _ = link_repository(args.repository, args.cache_dir, set(models), log=print)
    repository = repository.resolve()  # the servers of another checkout run from there
    args.out.mkdir(parents=True, exist_ok=True)
    trees = [("", PROJECT_ROOT), *((f" [{tree.name}]", tree.resolve()) for tree in args.tree)]
    entries = []
    for model in models:
        servers: list[ServerProcess] = [call_cost.noop(args.out)]
        for suffix, tree in trees:
            servers.append(call_cost.default_attnserve(repository, f"attnserve{suffix}", args.out, tree=tree))
            if not args.no_frontends:
                label = f"attnserve --frontends 1{suffix}"
                servers.append(call_cost.default_attnserve(repository, label, args.out, frontends=1, tree=tree))
        for flags in args.variant:
            label = f"attnserve {flags}"
            servers.append(call_cost.default_attnserve(repository, label, args.out, extra=tuple(flags.split())))
        entries.append(
            call_cost.measure_model(
                repository, model, servers, args.out, seconds=args.seconds, warmup_s=args.warmup, rate=args.rate
            )
        )
    headers, align = call_cost.TABLE_HEADERS, call_cost.TABLE_ALIGN
    alignment = tuple({"l": "left", "r": "right"}[letter] for letter in align)
    table = tabulate(
        call_cost.table_rows(entries), headers=headers, tablefmt="pipe", colalign=alignment, disable_numparse=True
    )
    references = tabulate(
        call_cost.reference_rows(entries),
        headers=call_cost.REFERENCE_HEADERS,
        tablefmt="pipe",
        colalign=("left", "left", *("right",) * 4),
        disable_numparse=True,
    )
    verdicts = [verdict for entry in entries for verdict in call_cost.verdicts(entry)]
    marks = {True: "met", False: "MISSED", None: "n/a"}
    lines = [f"  [{marks[verdict.met]:>6}] {verdict.target}: {verdict.figure}" for verdict in verdicts]
    print()
    print(table)
    print()
    print(references)
    print()
    print("\n".join(lines))
    (args.out / "rpc-cost.md").write_text(f"{table}\n\n{references}\n\n" + "\n".join(lines) + "\n")
    document = [entry.to_json() for entry in entries]
    (args.out / "rpc-cost.json").write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
