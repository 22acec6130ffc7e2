"""What a call costs beyond its work: the server contenders driven by h2load, a load generator that is not the
bottleneck, against the engine alone and a no-op gRPC server.

    python -m loadtests.rpc_cost                                   # near-free and dates, every server
    python -m loadtests.rpc_cost --models near-free,dates,phrasebook --tree ../other-checkout

h2load (Debian's nghttp2-client, a C HTTP/2 load generator) sends the same `Translate` call (one text of the
model's workload, the one of median length) over and over. For each model and server it measures:

- calls/s at 64 in flight: a closed loop of 64 streams (8 connections x 8) for `--seconds` after a warm-up;
- latency at 1 in flight: one stream, p50 of every call's time (h2load's per-request log);
- server CPU per call at a fixed offered rate below every contender's capacity (`--rate`, lowered to half the
  slowest contender's calls/s at 64 for models that cannot take it): user + system CPU seconds of every process
  of the server over the window, divided by the calls answered.

Against two references measured in the same run: the no-op gRPC server (loadtests/noop_server.py: parses the
request and answers a fixed translation), and the engine alone (loadtests/ceiling.py: the encoder and decoder
steps on pre-batched input, no RPC and no scheduler; its single-request latency and its calls/s at 64 rows).
The ratios the server is judged by:

- at 64 in flight: calls/s / the composed ceiling 1 / (1 / engine calls/s + 1 / no-op calls/s);
- at 1 in flight: p50 / (engine single-request latency + no-op p50);
- CPU per call / the no-op's CPU per call.

The attnserve servers run with their default settings (only the repository, the ports and the log level
given), one process and `--frontends 1`. `--tree DIR` runs them from another checkout of the project as well
(e.g. the commit before a change), so both are measured in one run on the same machine. Prints a Markdown
table and writes it with the raw figures as JSON to `--out`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from tabulate import tabulate

from loadtests.procfs import cpu_seconds
from loadtests.servers import PROJECT_ROOT, ServerProcess, free_port, noop_server, scrape, serve_command
from service.gen.attnserve.v1 import translator_pb2 as pb

IN_FLIGHT = 64
CONNECTIONS = 8
MODELS = ("near-free", "dates", "numbers", "phrasebook")


def grpc_body(request: pb.TranslateRequest) -> bytes:
    """The HTTP/2 DATA of a unary gRPC call: an uncompressed length-prefixed message."""
    message = request.SerializeToString()
    return b"\x00" + struct.pack(">I", len(message)) + message


@dataclass(frozen=True)
class H2loadRun:
    """What one h2load run saw: calls answered (HTTP 200, whatever the grpc-status), seconds, per-call times."""

    answered: int
    failed: int
    seconds: float
    latencies_s: tuple[float, ...]

    @property
    def calls_per_s(self) -> float:
        return self.answered / self.seconds if self.seconds > 0 else 0.0

    @property
    def p50_ms(self) -> float:
        return 1e3 * statistics.median(self.latencies_s) if self.latencies_s else float("nan")


def h2load(
    address: str,
    body: Path,
    *,
    connections: int,
    streams: int,
    seconds: float,
    warmup_s: float = 1.0,
    rate_per_connection: int | None = None,
) -> H2loadRun:
    """Run h2load against `address` for `seconds` (after `warmup_s`): `connections` x `streams` calls in flight
    at most, each connection sending `rate_per_connection` calls/s when given (an open loop), else a new call
    as soon as one ends (a closed loop)."""
    with tempfile.TemporaryDirectory(prefix="h2load-") as scratch:
        log_file = Path(scratch) / "requests.tsv"
        command = [
            "h2load",
            f"http://{address}/attnserve.v1.Translator/Translate",
            "-d",
            str(body),
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "-c",
            str(connections),
            "-m",
            str(streams),
            "-D",
            f"{seconds:g}",
            f"--warm-up-time={warmup_s:g}",
            f"--log-file={log_file}",
        ]
        if rate_per_connection is not None:
            command.append(f"--rps={rate_per_connection}")
        output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=seconds + warmup_s + 60)
        latencies = []
        for line in log_file.read_text().splitlines():
            fields = line.split("\t")
            if len(fields) >= 3 and fields[1] == "200":
                latencies.append(int(fields[2]) / 1e6)
    summary = next(line for line in output.stdout.splitlines() if line.startswith("requests:"))
    # "requests: T total, S started, D done, OK succeeded, F failed, E errored, 0 timeout"
    fields = summary.split()
    return H2loadRun(answered=int(fields[7]), failed=int(fields[9]), seconds=seconds, latencies_s=tuple(latencies))


@dataclass
class ServerFigures:
    """One server on one model."""

    server: str
    model: str
    calls_per_s_64: float
    p50_ms_1: float
    cpu_us_per_call: float
    cpu_rate: int
    errors: int  # calls the server counted with a status other than OK or CANCELLED (attnserve servers only)


def measure_server(
    server: ServerProcess, name: str, model: str, body: Path, seconds: float, cpu_rate: int | None
) -> ServerFigures:
    with server:
        assert server.process is not None
        before = scrape(server.metrics_url) if server.metrics_url else {}
        h2load(server.address, body, connections=CONNECTIONS, streams=IN_FLIGHT // CONNECTIONS, seconds=1.0)  # warm
        loaded = h2load(
            server.address, body, connections=CONNECTIONS, streams=IN_FLIGHT // CONNECTIONS, seconds=seconds
        )
        alone = h2load(server.address, body, connections=1, streams=1, seconds=seconds)
        cpu = float("nan")
        if cpu_rate:
            rate = max(1, cpu_rate // CONNECTIONS)
            started = cpu_seconds(server.process.pid)
            offered = h2load(
                server.address,
                body,
                connections=CONNECTIONS,
                streams=IN_FLIGHT,
                seconds=seconds,
                warmup_s=0.0,
                rate_per_connection=rate,
            )
            # The CPU window is the whole h2load run; its warm-up is 0 so the calls it counts are all of them.
            cpu = (cpu_seconds(server.process.pid) - started) / max(offered.answered, 1) * 1e6
        errors = 0
        if server.metrics_url:
            for key, value in scrape(server.metrics_url).items():
                sample, labels = key
                # CANCELLED: the calls in flight when an h2load run ends, which it resets.
                if sample == "attnserve_requests_total" and dict(labels).get("code") not in ("OK", "CANCELLED"):
                    errors += int(value - before.get(key, 0.0))
    return ServerFigures(name, model, loaded.calls_per_s, alone.p50_ms, cpu, cpu_rate or 0, errors)


@dataclass
class EngineFigures:
    model: str
    single_ms: float
    calls_per_s_64: float


def measure_engine(repository: Path, model: str, text: str) -> EngineFigures:
    """The engine alone (loadtests/ceiling.py), with onnxruntime at one intra-op thread: the model's own cost."""
    from loadtests.ceiling import measure_ceiling, tokenize_sources
    from service.runtime.model import load_model

    loaded = load_model(repository / model / "1", provider="cpu", intra_op_threads=1)
    sources = tokenize_sources(loaded, [text])
    single = measure_ceiling(loaded, sources, 1, min_seconds=2.0, max_waves=2000)
    full = measure_ceiling(loaded, sources, IN_FLIGHT, min_seconds=2.0)
    return EngineFigures(model, 1e3 * single.latency_s, full.requests_per_s)


def attnserve(repository: Path, label: str, tree: Path, frontends: int, log_dir: Path) -> ServerProcess:
    """`attnserve serve` from the checkout `tree` with its default settings but the repository, ports, log level
    and front-end processes."""
    port, metrics_port = free_port(), free_port()
    command = [*serve_command(repository, port, metrics_port, "cpu"), "--log-level", "WARNING"]
    command += ["--frontends", str(frontends)]
    process = ServerProcess(label, command, port, metrics_port, log_dir / f"{label}.log")
    process.cwd = tree
    return process


def model_text(model: str) -> str:
    """The model's workload text of median length (of 200)."""
    from loadtests.bench import WORKLOADS, workload_texts

    texts = sorted(workload_texts(WORKLOADS[model], 200), key=len)
    return texts[len(texts) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.rpc_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="near-free,dates", help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--repository", type=Path, default=Path("models"), help="the default models (dates, numbers)")
    parser.add_argument("--cache-dir", type=Path, default=Path("build/bench"), help="near-free and phrasebook builds")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds of each h2load window (default 5)")
    parser.add_argument(
        "--rate", type=int, default=800, help="offered calls/s of the CPU-per-call window (default 800)"
    )
    parser.add_argument(
        "--tree", type=Path, action="append", default=[], help="another checkout whose servers to measure as well"
    )
    parser.add_argument("--no-frontends", action="store_true", help="leave out the --frontends 1 servers")
    parser.add_argument("--out", type=Path, default=Path("reports/rpc-cost"))
    args = parser.parse_args(argv)
    if shutil.which("h2load") is None:
        parser.error("h2load is missing: install Debian's nghttp2-client")
    models = [name for name in args.models.split(",") if name]
    unknown = [name for name in models if name not in MODELS]
    if unknown:
        parser.error(f"unknown models: {', '.join(unknown)}")
    from loadtests.bench import link_repository

    repository, _ = link_repository(args.repository, args.cache_dir, set(models), log=print)
    args.out.mkdir(parents=True, exist_ok=True)
    trees = [("", PROJECT_ROOT), *((f" [{tree.name}]", tree.resolve()) for tree in args.tree)]
    results: list[dict[str, object]] = []
    rows = []
    for model in models:
        text = model_text(model)
        body = args.out / f"{model}.bin"
        body.write_bytes(grpc_body(pb.TranslateRequest(model=model, texts=[text])))
        engine = measure_engine(repository, model, text)
        print(f"{model}: {text!r}; engine alone {engine.single_ms:.2f} ms, {engine.calls_per_s_64:,.0f} calls/s @64")
        servers: list[tuple[str, ServerProcess]] = [("no-op", noop_server(args.out))]
        for suffix, tree in trees:
            servers.append((f"attnserve{suffix}", attnserve(repository, f"attnserve{suffix}", tree, 0, args.out)))
            if not args.no_frontends:
                label = f"attnserve --frontends 1{suffix}"
                servers.append((label, attnserve(repository, label.replace(" ", "_"), tree, 1, args.out)))
        # The CPU window's rate: below every contender's capacity.
        figures = []
        rate = args.rate
        for name, server in servers:
            measured = measure_server(server, name, model, body, args.seconds, None)
            rate = min(rate, int(0.5 * measured.calls_per_s_64)) if name != "no-op" else rate
            figures.append(measured)
        for index, (name, server) in enumerate(servers):
            cpu = measure_server(server, name, model, body, args.seconds, rate)
            figures[index].cpu_us_per_call, figures[index].cpu_rate = cpu.cpu_us_per_call, rate
            figures[index].errors += cpu.errors
        noop = figures[0]
        composed = 1.0 / (1.0 / engine.calls_per_s_64 + 1.0 / noop.calls_per_s_64)
        floor_ms = engine.single_ms + noop.p50_ms_1
        for figure in figures:
            rows.append(
                [
                    model,
                    figure.server,
                    f"{figure.calls_per_s_64:,.0f}",
                    "" if figure is noop else f"{figure.calls_per_s_64 / composed:.2f}",
                    f"{figure.p50_ms_1:.2f}",
                    "" if figure is noop else f"{figure.p50_ms_1 / floor_ms:.2f}",
                    f"{figure.cpu_us_per_call:,.0f}",
                    f"{figure.cpu_us_per_call / noop.cpu_us_per_call:.1f}",
                    f"{figure.cpu_rate:,}",
                    f"{figure.errors}",
                ]
            )
            results.append({**asdict(figure), "composed_ceiling": composed, "latency_floor_ms": floor_ms})
        results.append({"engine": asdict(engine), "text": text})
        print(tabulate(rows[-len(figures) :], tablefmt="plain"), flush=True)
    headers = [
        "model",
        "server",
        "calls/s @64",
        "/ composed",
        "p50 ms @1",
        "/ floor",
        "CPU us/call",
        "/ no-op",
        "at calls/s",
        "errors",
    ]
    table = tabulate(rows, headers=headers, tablefmt="pipe", colalign=("left", "left", *("right",) * 8))
    print()
    print(table)
    (args.out / "rpc-cost.md").write_text(table + "\n")
    (args.out / "rpc-cost.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
