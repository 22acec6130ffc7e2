"""What a call costs beyond its work: servers driven by h2load against the engine alone and a no-op gRPC server.

The measuring behind `python -m loadtests.rpc_cost` and the `cpu-per-call` section of `attnserve bench`. h2load
(loadtests/h2load.py) sends the same `Translate` call (one text of the model's workload, the one of median
length) over and over. For each model and server:

- calls/s at 64 in flight: a closed loop of 64 streams (8 connections x 8) for a window after a warm-up;
- p50 latency at 1 in flight: one stream, every answered call of the window (h2load's per-request log);
- server CPU per call at a fixed offered rate below every server's capacity (lowered to half the slowest
  server's calls/s at 64 where that is lower): user + system CPU seconds of every process of the server (its
  front-end processes included) over an open-loop h2load run, divided by the calls it answered. Microseconds
  per call are milliseconds per 1,000 calls.

Against two references measured in the same run: the no-op gRPC server (loadtests/noop_server.py: parses the
request and answers a fixed translation), and the engine alone (loadtests/ceiling.py: the encoder and decoder
steps on pre-batched input, no RPC and no scheduler, one intra-op thread; its single-request latency and its
calls/s at 64 rows). The ratios a server is judged by (issue 21, "Done when"):

- at 64 in flight: calls/s / the composed ceiling 1 / (1 / engine calls/s + 1 / no-op calls/s), >= 0.5;
- at 1 in flight: p50 / (engine single-request latency + no-op p50), <= 1.15;
- CPU per call / the no-op's CPU per call, <= 2.5;

for the near-free and dates models; the phrasebook model, whose calls are the engine's work, at 64 in flight
>= 0.9 of the engine's calls/s at 64 rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loadtests import h2load
from loadtests.procfs import cpu_seconds
from loadtests.servers import PROJECT_ROOT, ServerProcess, free_ports, scrape, serve_command
from service.gen.attnserve.v1 import translator_pb2 as pb

IN_FLIGHT = 64
CONNECTIONS = 8
MODELS = ("near-free", "dates", "numbers", "phrasebook")
#: The models the bench's cpu-per-call section measures (issue 21: with the no-op server as the reference).
SECTION_MODELS = ("near-free", "dates", "phrasebook")
#: The models whose calls cost almost nothing beside the RPC path: judged against the composed ceiling.
LIGHT_MODELS = ("near-free", "dates")
HEAVY_MODELS = ("phrasebook",)
NOOP = "no-op"
COMPOSED_CEILING_BAR = 0.5
LATENCY_FLOOR_BAR = 1.15
CPU_RATIO_BAR = 2.5
ENGINE_CEILING_BAR = 0.9
DEFAULT_RATE = 800


@dataclass
class ServerFigures:
    """One server on one model. `errors`: calls the server counted with a status other than OK or CANCELLED
    (servers with metrics only: h2load counts a gRPC error as an answer)."""

    server: str
    calls_per_s_64: float
    p50_ms_1: float
    cpu_us_per_call: float = math.nan
    cpu_calls: int = 0
    errors: int = 0


@dataclass(frozen=True)
class EngineFigures:
    single_ms: float
    calls_per_s_64: float


@dataclass
class ModelCallCost:
    """Every server on one model, the engine alone on the same text, and the CPU window's offered rate."""

    model: str
    text: str
    engine: EngineFigures
    rate: int
    servers: list[ServerFigures] = field(default_factory=list)

    @property
    def noop(self) -> ServerFigures | None:
        return next((figures for figures in self.servers if figures.server == NOOP), None)

    @property
    def composed_ceiling(self) -> float:
        """1 / (1 / engine calls/s + 1 / no-op calls/s) at 64 in flight: what the two costs allow together."""
        noop = self.noop
        if noop is None or not noop.calls_per_s_64 > 0 or not self.engine.calls_per_s_64 > 0:
            return math.nan
        return 1.0 / (1.0 / self.engine.calls_per_s_64 + 1.0 / noop.calls_per_s_64)

    @property
    def latency_floor_ms(self) -> float:
        noop = self.noop
        return self.engine.single_ms + noop.p50_ms_1 if noop is not None else math.nan

    def throughput_ratio(self, figures: ServerFigures) -> float:
        return _ratio(figures.calls_per_s_64, self.composed_ceiling)

    def latency_ratio(self, figures: ServerFigures) -> float:
        return _ratio(figures.p50_ms_1, self.latency_floor_ms)

    def cpu_ratio(self, figures: ServerFigures) -> float:
        noop = self.noop
        return _ratio(figures.cpu_us_per_call, noop.cpu_us_per_call if noop is not None else math.nan)

    def engine_ratio(self, figures: ServerFigures) -> float:
        return _ratio(figures.calls_per_s_64, self.engine.calls_per_s_64)

    def to_json(self) -> dict:
        """Every figure, and the derived references, with NaN as None (JSON has no NaN)."""
        document = asdict(self) | {
            "composed_ceiling": self.composed_ceiling,
            "latency_floor_ms": self.latency_floor_ms,
        }
        finite = _finite(document)
        assert isinstance(finite, dict)
        return finite

    @classmethod
    def from_json(cls, document: dict) -> ModelCallCost:
        def number(value: object) -> float:
            return math.nan if value is None else float(value)  # type: ignore[arg-type]

        servers = [
            ServerFigures(
                server=entry["server"],
                calls_per_s_64=number(entry["calls_per_s_64"]),
                p50_ms_1=number(entry["p50_ms_1"]),
                cpu_us_per_call=number(entry["cpu_us_per_call"]),
                cpu_calls=int(entry.get("cpu_calls", 0)),
                errors=int(entry.get("errors", 0)),
            )
            for entry in document["servers"]
        ]
        engine = EngineFigures(number(document["engine"]["single_ms"]), number(document["engine"]["calls_per_s_64"]))
        return cls(document["model"], document["text"], engine, int(document["rate"]), servers)


# ----- measuring --------------------------------------------------------------------------------------------


def counted_errors(before: dict, after: dict) -> dict[str, int]:
    """Calls a server's counters (`attnserve_requests_total`) saw end with a status other than OK or CANCELLED
    between two scrapes, by status. CANCELLED is left out: it holds the calls h2load resets when a run ends."""
    errors: dict[str, int] = {}
    for key, value in after.items():
        sample, labels = key
        code = dict(labels).get("code", "")
        if sample == "attnserve_requests_total" and code not in ("OK", "CANCELLED"):
            grown = int(value - before.get(key, 0.0))
            if grown:
                errors[code] = errors.get(code, 0) + grown
    return errors


def measure_capacity(server: ServerProcess, body: Path, seconds: float, warmup_s: float) -> ServerFigures:
    """A fresh start of `server`: calls/s at 64 in flight, then p50 at 1 in flight."""
    with server:
        before = scrape(server.metrics_url) if server.metrics_url else {}
        connections, streams = h2load.closed_loop_shape(IN_FLIGHT, CONNECTIONS)
        loaded = h2load.run(
            server.address, body, connections=connections, streams=streams, seconds=seconds, warmup_s=warmup_s
        )
        alone = h2load.run(server.address, body, connections=1, streams=1, seconds=seconds, warmup_s=warmup_s)
        errors = counted_errors(before, scrape(server.metrics_url)) if server.metrics_url else {}
    return ServerFigures(server.name, loaded.calls_per_s, alone.p50_ms, errors=sum(errors.values()))


def measure_cpu(
    server: ServerProcess, body: Path, seconds: float, warmup_s: float, rate: int
) -> tuple[float, int, int]:
    """A fresh start of `server`, `rate` calls/s offered for a warm-up and then for `seconds`: (CPU microseconds
    per answered call over the second run, calls it answered, errors the server counted). h2load offers a whole
    number of calls/s per connection: the rate is spread over up to CONNECTIONS connections (`offered_rate`)."""
    connections = max(1, min(CONNECTIONS, rate))
    per_connection = max(1, rate // connections)
    with server:
        assert server.process is not None
        before = scrape(server.metrics_url) if server.metrics_url else {}
        if warmup_s > 0:
            h2load.run(
                server.address,
                body,
                connections=connections,
                streams=IN_FLIGHT,
                seconds=warmup_s,
                warmup_s=0.0,
                rate_per_connection=per_connection,
            )
        # The CPU window is the whole h2load run, with no warm-up of its own: every call it answered is counted.
        started = cpu_seconds(server.process.pid)
        offered = h2load.run(
            server.address,
            body,
            connections=connections,
            streams=IN_FLIGHT,
            seconds=seconds,
            warmup_s=0.0,
            rate_per_connection=per_connection,
        )
        used = cpu_seconds(server.process.pid) - started
        errors = counted_errors(before, scrape(server.metrics_url)) if server.metrics_url else {}
    cpu_us = used / offered.answered * 1e6 if offered.answered else math.nan
    return cpu_us, offered.answered, sum(errors.values())


def offered_rate(rate: int) -> int:
    """The calls/s h2load offers when asked for `rate` (see measure_cpu): at least 1, and a multiple of the
    connections it is spread over."""
    rate = max(1, rate)
    return rate - rate % min(CONNECTIONS, rate)


def measure_engine(
    repository: Path, model: str, text: str, provider: str = "cpu", seconds: float = 2.0
) -> EngineFigures:
    """The engine alone (loadtests/ceiling.py) on `text`, with one intra-op thread: the model's own cost."""
    from loadtests.ceiling import measure_ceiling, tokenize_sources
    from service.runtime.model import load_model

    loaded = load_model(repository / model / "1", provider=provider, intra_op_threads=1)
    sources = tokenize_sources(loaded, [text])
    single = measure_ceiling(loaded, sources, 1, min_seconds=seconds, max_waves=2000)
    full = measure_ceiling(loaded, sources, IN_FLIGHT, min_seconds=seconds)
    return EngineFigures(1e3 * single.latency_s, full.requests_per_s)


def measure_model(
    repository: Path,
    model: str,
    servers: Sequence[ServerProcess],
    out: Path,
    *,
    seconds: float,
    warmup_s: float = 1.0,
    rate: int = DEFAULT_RATE,
    provider: str = "cpu",
    engine_seconds: float = 2.0,
    log: Callable[[str], None] = print,
) -> ModelCallCost:
    """Every server on `model` (one at a time, each started afresh for its capacity and again for its CPU
    window), and the engine alone. The CPU window's rate is `rate`, lowered to half the slowest server's calls/s
    at 64 in flight (the no-op server left out) so that no server is measured at its limit. The request body is
    written into `out`."""
    text = model_text(model)
    body = out / f"{model}.bin"
    body.write_bytes(h2load.grpc_body(pb.TranslateRequest(model=model, texts=[text])))
    engine = measure_engine(repository, model, text, provider, seconds=engine_seconds)
    log(f"{model}: {text!r}; engine alone {engine.single_ms:.2f} ms, {engine.calls_per_s_64:,.0f} calls/s @64")
    figures = [measure_capacity(server, body, seconds, warmup_s) for server in servers]
    for measured in figures:
        if measured.server != NOOP and measured.calls_per_s_64 > 0:
            rate = min(rate, int(0.5 * measured.calls_per_s_64))
    rate = offered_rate(rate)
    for server, measured in zip(servers, figures, strict=True):
        measured.cpu_us_per_call, measured.cpu_calls, errors = measure_cpu(server, body, seconds, warmup_s, rate)
        measured.errors += errors
        log(
            f"  {measured.server:<28} {measured.calls_per_s_64:8,.0f} calls/s @64  p50 @1 {measured.p50_ms_1:6.2f} ms  "
            f"CPU {measured.cpu_us_per_call:7,.0f} us/call at {rate:,} calls/s"
            + (f"  errors {measured.errors}" if measured.errors else "")
        )
    return ModelCallCost(model, text, engine, rate, figures)


def model_text(model: str) -> str:
    """The model's workload text of median length (of 200)."""
    from loadtests.bench import WORKLOADS, workload_texts

    texts = sorted(workload_texts(WORKLOADS[model], 200), key=len)
    return texts[len(texts) // 2]


def default_attnserve(
    repository: Path,
    label: str,
    log_dir: Path,
    *,
    frontends: int = 0,
    provider: str = "cpu",
    tree: Path = PROJECT_ROOT,
    extra: tuple[str, ...] = (),
) -> ServerProcess:
    """`attnserve serve` from the checkout `tree` with its default settings but the repository, ports, provider,
    log level, front-end processes and `extra` flags."""
    port, metrics_port = free_ports(2)
    command = [*serve_command(repository, port, metrics_port, provider), "--log-level", "WARNING"]
    command += ["--frontends", str(frontends), *extra]
    process = ServerProcess(label, command, port, metrics_port, log_dir / f"{label.replace(' ', '_')}.log")
    process.cwd = tree
    return process


def noop(log_dir: Path) -> ServerProcess:
    from loadtests.servers import noop_server

    server = noop_server(log_dir)
    server.name = NOOP
    return server


# ----- judging and printing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """One of the issue's bars on one server: the figure, the bar, and whether it is met (None: not measured)."""

    target: str
    figure: str
    bar: str
    met: bool | None


def verdicts(entry: ModelCallCost) -> list[Verdict]:
    """The bars every server but the no-op is judged by on this model (none for models without one)."""
    found = []
    for figures in entry.servers:
        if figures.server == NOOP:
            continue
        where = f"{entry.model}, {figures.server}"
        if entry.model in LIGHT_MODELS:
            ratio = entry.throughput_ratio(figures)
            found.append(
                Verdict(
                    f"{where}: calls/s at 64 in flight >= {COMPOSED_CEILING_BAR:g} x the composed ceiling "
                    "1/(1/engine + 1/no-op)",
                    f"{figures.calls_per_s_64:,.0f} / {entry.composed_ceiling:,.0f} = {ratio:.2f}",
                    f">= {COMPOSED_CEILING_BAR:g}",
                    _at_least(ratio, COMPOSED_CEILING_BAR),
                )
            )
            ratio = entry.latency_ratio(figures)
            found.append(
                Verdict(
                    f"{where}: p50 at 1 in flight <= {LATENCY_FLOOR_BAR:g} x (engine single-request + no-op p50)",
                    f"{figures.p50_ms_1:.2f} / {entry.latency_floor_ms:.2f} ms = {ratio:.2f}",
                    f"<= {LATENCY_FLOOR_BAR:g}",
                    _at_most(ratio, LATENCY_FLOOR_BAR),
                )
            )
            ratio = entry.cpu_ratio(figures)
            noop_cpu = entry.noop.cpu_us_per_call if entry.noop is not None else math.nan
            found.append(
                Verdict(
                    f"{where}: CPU per call at {entry.rate:,} calls/s <= {CPU_RATIO_BAR:g} x the no-op's",
                    f"{figures.cpu_us_per_call:,.0f} / {noop_cpu:,.0f} us = {ratio:.2f}x",
                    f"<= {CPU_RATIO_BAR:g}x",
                    _at_most(ratio, CPU_RATIO_BAR),
                )
            )
        elif entry.model in HEAVY_MODELS:
            ratio = entry.engine_ratio(figures)
            found.append(
                Verdict(
                    f"{where}: calls/s at 64 in flight >= {ENGINE_CEILING_BAR:g} x the engine alone at 64 rows",
                    f"{figures.calls_per_s_64:,.1f} / {entry.engine.calls_per_s_64:,.1f} = {ratio:.2f}",
                    f">= {ENGINE_CEILING_BAR:g}",
                    _at_least(ratio, ENGINE_CEILING_BAR),
                )
            )
    return found


TABLE_HEADERS = (
    "model",
    "server",
    "calls/s @64",
    "/ composed",
    "/ engine",
    "p50 ms @1",
    "/ floor",
    "CPU ms per 1,000 calls",
    "/ no-op",
    "at calls/s",
    "errors",
)
TABLE_ALIGN = "ll" + "r" * (len(TABLE_HEADERS) - 2)


def table_rows(entries: Sequence[ModelCallCost]) -> list[list[str]]:
    """One row per model and server, formatted, in TABLE_HEADERS' order (ratios left blank on the no-op's)."""
    rows = []
    for entry in entries:
        for figures in entry.servers:
            reference = figures.server == NOOP
            rows.append(
                [
                    entry.model,
                    figures.server,
                    _format(figures.calls_per_s_64, 0),
                    "" if reference else _format(entry.throughput_ratio(figures), 2),
                    "" if reference else _format(entry.engine_ratio(figures), 2),
                    _format(figures.p50_ms_1, 2),
                    "" if reference else _format(entry.latency_ratio(figures), 2),
                    _format(figures.cpu_us_per_call, 0),
                    _format(entry.cpu_ratio(figures), 2),
                    f"{entry.rate:,}",
                    str(figures.errors),
                ]
            )
    return rows


def reference_rows(entries: Sequence[ModelCallCost]) -> list[list[str]]:
    """Per model: the text, the engine alone, and the two references the ratios divide by."""
    return [
        [
            entry.model,
            repr(entry.text),
            _format(entry.engine.single_ms, 2),
            _format(entry.engine.calls_per_s_64, 0),
            _format(entry.composed_ceiling, 0),
            _format(entry.latency_floor_ms, 2),
        ]
        for entry in entries
    ]


REFERENCE_HEADERS = (
    "model",
    "text",
    "engine alone ms @1",
    "engine calls/s @64",
    "composed ceiling calls/s",
    "latency floor ms",
)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 and math.isfinite(numerator) else math.nan


def _at_least(ratio: float, bar: float) -> bool | None:
    return ratio >= bar if math.isfinite(ratio) else None


def _at_most(ratio: float, bar: float) -> bool | None:
    return ratio <= bar if math.isfinite(ratio) else None


def _format(value: float, digits: int) -> str:
    return f"{value:,.{digits}f}" if math.isfinite(value) else "–"


def _finite(value: object) -> object:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value
