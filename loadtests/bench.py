"""`attnserve bench`: every contender on the same workloads, side by side, in one bounded run.

Contenders (see docs/benchmarks.md):

    pytorch-eager    the trained checkpoint's own eager decode loop, one request at a time, behind gRPC
    none             attnserve serve --batching none        (onnxruntime, one request at a time)
    request          attnserve serve --batching request     (whole requests batched; tuned per level)
    continuous       attnserve serve --batching continuous  (iteration-level batching)
    http             the same server, called with JSON over HTTP/1.1 (POST /v1/translate) instead of gRPC
    rpc-ceiling      a no-op server with the same gRPC API (returns a fixed translation)
    engine-ceiling   the bare encoder + decoder-step loop on pre-batched input, no gRPC, no scheduler
    roofline         FLOPs per generated token x tokens/s against the measured matrix-multiply peak
    cpu-per-call     h2load against the no-op server and attnserve with its default settings (one process and
                     --frontends 1) on near-free, dates and phrasebook: calls/s at 64 in flight, p50 at 1, server
                     CPU per 1,000 calls at a fixed offered rate, and issue 21's ratios (loadtests/call_cost.py)

Every server runs in its own process; the clients run in their own processes (closed loop, loopback gRPC), or
with `--load-generator h2load` a C load generator drives the server contenders (loadgen.H2loadGenerator).
Each cell (contender x workload x concurrency) has a warm-up and a measurement window bounded in time and
in requests, so the whole run is bounded. Output: bench.json, bench.md and PNG plots in --out.

    attnserve bench                      # the full run (about 25 minutes on 2 cores)
    attnserve bench --quick              # the smoke run (about 2 minutes; no phrasebook training)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from loadtests.phrasebook import PhrasebookRecipe
from loadtests.report import CONTENDER_ORDER

# The report's contenders (its tables and plots, in their order), and the `cpu-per-call` section, which the
# report renders apart.
CONTENDERS = (*CONTENDER_ORDER, "cpu-per-call")
SERVER_CONTENDERS = ("rpc-ceiling", "continuous", "http", "none", "request", "pytorch-eager")


@dataclass(frozen=True)
class WorkloadSpec:
    """One workload: which model, greedy or beam, and which texts (`source` names the text generator)."""

    name: str
    model: str
    beam_size: int
    source: str
    description: str


WORKLOADS: dict[str, WorkloadSpec] = {
    spec.name: spec
    for spec in (
        WorkloadSpec("dates", "dates", 1, "dates", "dates model, greedy"),
        WorkloadSpec("dates-beam4", "dates", 4, "dates", "dates model, beam 4"),
        WorkloadSpec("numbers", "numbers", 1, "numbers", "numbers model, greedy"),
        WorkloadSpec("numbers-beam4", "numbers", 4, "numbers", "numbers model, beam 4"),
        WorkloadSpec("phrasebook", "phrasebook", 1, "phrasebook", "phrasebook model (hidden 512, ~8k vocab), greedy"),
        WorkloadSpec("phrasebook-beam4", "phrasebook", 4, "phrasebook", "phrasebook model, beam 4"),
        WorkloadSpec(
            "phrasebook-mixed",
            "phrasebook",
            1,
            "mixed",
            "phrasebook model, greedy, mixed lengths (40% bare names, 20% one clause, 40% three clauses)",
        ),
        WorkloadSpec(
            "near-free",
            "near-free",
            1,
            "dates",
            "near-free model (dates at hidden 16: calls cost almost nothing, as on a GPU), greedy",
        ),
    )
}
#: Rows and beam widths of the engine-overhead table (the core over a model whose calls cost nothing).
OVERHEAD_ROWS = (16, 64, 256)
OVERHEAD_BEAMS = (1, 4)
QUICK_WORKLOADS = ("dates", "numbers")


@dataclass(frozen=True)
class BenchConfig:
    """Everything one run does; `from_args` builds it from the command line (times in seconds)."""

    repository: Path
    runs: Path
    cache_dir: Path
    out: Path
    workloads: tuple[str, ...]
    contenders: tuple[str, ...]
    levels: tuple[int, ...]
    warmup_s: float
    duration_s: float
    max_requests: int
    texts_per_workload: int
    threads: int
    provider: str
    client_processes: int
    request_batch_sizes: tuple[int, ...]
    request_batch_delays_ms: tuple[float, ...]
    tune_duration_s: float
    phrasebook: bool
    phrasebook_steps: int
    max_active_hypotheses: int
    ceiling_seconds: float
    quick: bool = False
    frontends: str = "0"
    load_generator: str = "python"
    cpu_rate: int = 800


@dataclass
class CellResult:
    """One contender at one concurrency level on one workload.

    Throughput counts calls that finished OK inside the window; `tokens_per_s` counts the generated tokens
    of the best hypothesis (eos included). Latencies are client-side, in milliseconds. `mean_decoder_rows`:
    hypotheses per decoder step (server metrics; exact rows for the ceiling; the beam for eager).
    `steady`: at least as many calls finished in the window as there are clients (otherwise latencies are
    understated: the queue had not filled). `details`: the contender's own figures (tuning, profile).
    """

    workload: str
    contender: str
    level: int
    tokens_per_s: float
    requests_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_decoder_rows: float = math.nan
    percent_of_peak: float = math.nan
    ok: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    cut: int = 0
    steady: bool = True
    details: dict = field(default_factory=dict)


# ----- configuration -------------------------------------------------------------------------------------


def _numbers(text: str, kind: Callable[[str], float | int]) -> tuple:
    try:
        values = tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of numbers, got {text!r}") from None
    if not values or any(value < 0 for value in values):
        raise argparse.ArgumentTypeError(f"expected non-negative numbers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnserve bench",
        description="Benchmark every contender on the same workloads, side by side (see docs/benchmarks.md).",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: dates and numbers only, levels 1 and 8, short windows, a 2-point tuning grid",
    )
    parser.add_argument(
        "--repository",
        type=Path,
        default=Path("models"),
        help="model repository with the default models (default: models, built by make models)",
    )
    parser.add_argument(
        "--runs",
        type=Path,
        default=Path("runs"),
        help="training runs of those models, for the PyTorch eager contender (default: runs)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path("build/bench"),
        help="phrasebook corpus, run and export, logs (default: build/bench)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("reports/bench"), help="report folder (default: reports/bench)"
    )
    parser.add_argument("--workloads", default=None, help=f"comma-separated, from: {', '.join(WORKLOADS)}")
    parser.add_argument(
        "--contenders", default=",".join(CONTENDERS), help=f"comma-separated, from: {', '.join(CONTENDERS)}"
    )
    parser.add_argument(
        "--levels",
        type=lambda text: _numbers(text, int),
        default=None,
        help="concurrency levels (default 1,8,32,64,128; quick: 1,8)",
    )
    parser.add_argument(
        "--warmup", type=float, default=None, help="seconds of load before each window (default 1; quick 0.3)"
    )
    parser.add_argument(
        "--duration", type=float, default=None, help="seconds of each measurement window (default 4; quick 1)"
    )
    parser.add_argument("--max-requests", type=int, default=20000, help="a window closes early after this many calls")
    parser.add_argument("--texts", type=int, default=400, help="texts per workload (default 400)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads of every contender's runtime (onnxruntime, torch) (default 1)",
    )
    parser.add_argument("--provider", default="cpu", choices=("cpu", "cuda"), help="onnxruntime provider (default cpu)")
    parser.add_argument("--client-processes", type=int, default=2, help="client processes at most (default 2)")
    parser.add_argument(
        "--request-batch-sizes",
        type=lambda text: _numbers(text, int),
        default=None,
        help="--batching request tuning grid: batch sizes (default 8,32,128; quick 32)",
    )
    parser.add_argument(
        "--request-batch-delays-ms",
        type=lambda text: _numbers(text, float),
        default=None,
        help="--batching request tuning grid: queue delays in ms (default 0,5; quick 0,5)",
    )
    parser.add_argument(
        "--tune-duration",
        type=float,
        default=None,
        help="seconds of each tuning window (default 1; quick: the duration, and tuning is the measurement)",
    )
    parser.add_argument("--no-phrasebook", action="store_true", help="do not build the phrasebook model")
    parser.add_argument(
        "--phrasebook-steps",
        type=int,
        default=PhrasebookRecipe.train_steps,
        help=f"training steps of the phrasebook model (default {PhrasebookRecipe.train_steps})",
    )
    parser.add_argument(
        "--max-active-hypotheses",
        type=int,
        default=512,
        help="decoder rows per step for every attnserve contender (default 512: 128 clients x beam 4)",
    )
    parser.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="BENCH_JSON",
        help="measure nothing: write the report of an earlier run's bench.json into --out",
    )
    parser.add_argument(
        "--frontends",
        default="0",
        help="`attnserve serve --frontends` of every attnserve contender (default 0: one process)",
    )
    parser.add_argument(
        "--ceiling-seconds", type=float, default=None, help="seconds per engine-ceiling point (default 1.5)"
    )
    parser.add_argument(
        "--load-generator",
        choices=("python", "h2load"),
        default="python",
        help="what drives the server contenders: Python gRPC/HTTP clients in processes of their own (default), or "
        "h2load, a C load generator that is not the bottleneck (one text per workload; needs nghttp2-client)",
    )
    parser.add_argument(
        "--cpu-rate",
        type=int,
        default=800,
        help="cpu-per-call: offered calls/s of the CPU window (default 800; lowered to half the slowest server's "
        "calls/s at 64 in flight)",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    quick = bool(args.quick)
    workloads = tuple(args.workloads.split(",")) if args.workloads else (QUICK_WORKLOADS if quick else tuple(WORKLOADS))
    unknown = [name for name in workloads if name not in WORKLOADS]
    contenders = tuple(args.contenders.split(","))
    unknown += [name for name in contenders if name not in CONTENDERS]
    if unknown:
        raise SystemExit(f"attnserve bench: unknown workload or contender: {', '.join(unknown)}")
    if args.load_generator == "h2load" and args.report is None:
        from loadtests import h2load

        if not h2load.available():
            raise SystemExit(f"attnserve bench --load-generator h2load: {h2load.MISSING}")
    duration = args.duration if args.duration is not None else (1.0 if quick else 4.0)
    return BenchConfig(
        repository=args.repository,
        runs=args.runs,
        cache_dir=args.cache_dir,
        out=args.out,
        workloads=workloads,
        contenders=contenders,
        levels=tuple(sorted(set(args.levels or ((1, 8) if quick else (1, 8, 32, 64, 128))))),
        warmup_s=args.warmup if args.warmup is not None else (0.3 if quick else 1.0),
        duration_s=duration,
        max_requests=args.max_requests,
        texts_per_workload=args.texts,
        threads=args.threads,
        provider=args.provider,
        client_processes=args.client_processes,
        request_batch_sizes=tuple(args.request_batch_sizes or ((32,) if quick else (8, 32, 128))),
        request_batch_delays_ms=tuple(args.request_batch_delays_ms or (0.0, 5.0)),
        tune_duration_s=args.tune_duration if args.tune_duration is not None else (duration if quick else 1.0),
        phrasebook=not args.no_phrasebook and any(WORKLOADS[name].model == "phrasebook" for name in workloads),
        phrasebook_steps=args.phrasebook_steps,
        max_active_hypotheses=args.max_active_hypotheses,
        ceiling_seconds=args.ceiling_seconds if args.ceiling_seconds is not None else (0.5 if quick else 1.5),
        quick=quick,
        frontends=args.frontends,
        load_generator=args.load_generator,
        cpu_rate=args.cpu_rate,
    )


# ----- preparation ---------------------------------------------------------------------------------------


def machine_description(provider: str, threads: int) -> dict:
    """The machine the figures come from: CPU model, cores, load, library versions."""
    import grpc
    import onnxruntime

    from export.host import cpu_model

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "grpcio": grpc.__version__,
        "provider": provider,
        "threads": threads,
    }


def link_repository(
    repository: Path,
    cache_dir: Path,
    models: set[str],
    *,
    phrasebook: bool = True,
    phrasebook_steps: int = PhrasebookRecipe.train_steps,
    log: Callable[[str], None] = print,
) -> tuple[Path, dict[str, Path]]:
    """The benchmark's repository `cache_dir/repository` holding `models`: the default models linked in from
    `repository`, near-free and phrasebook built (once, cached in `cache_dir`); and the training run of the
    phrasebook model when it is one of them."""
    from loadtests.phrasebook import ensure_near_free, ensure_phrasebook
    from service.runtime.repository import discover

    bench_repository = cache_dir / "repository"
    bench_repository.mkdir(parents=True, exist_ok=True)
    for name in sorted(models - {"phrasebook", "near-free"}):
        link = bench_repository / name
        if link.is_symlink() or link.exists():
            link.unlink() if link.is_symlink() else shutil.rmtree(link)
        if discover(repository).get(name):
            link.symlink_to((repository / name).resolve(), target_is_directory=True)
        else:
            log(f"{name}: not in {repository} (run 'make models'); its workloads are skipped")
    if "near-free" in models:
        ensure_near_free(cache_dir, bench_repository, log=log)
    built: dict[str, Path] = {}
    if "phrasebook" in models:
        if phrasebook:
            recipe = PhrasebookRecipe(train_steps=phrasebook_steps)
            built["phrasebook"] = ensure_phrasebook(cache_dir, bench_repository, recipe, log=log).run_dir
        elif not (bench_repository / "phrasebook" / "1" / "model.json").is_file():
            log("phrasebook: not built (--no-phrasebook); its workloads are skipped")
    return bench_repository, built


def prepare_repository(config: BenchConfig, log: Callable[[str], None]) -> tuple[Path, dict[str, Path]]:
    """The benchmark's repository (link_repository) and the training run of each model for the eager
    contender."""
    wanted = {WORKLOADS[name].model for name in config.workloads}
    bench_repository, runs = link_repository(
        config.repository,
        config.cache_dir,
        wanted,
        phrasebook=config.phrasebook,
        phrasebook_steps=config.phrasebook_steps,
        log=log,
    )
    for name in sorted(wanted - {"phrasebook", "near-free"}):
        if (config.runs / name / "best.pt").is_file() and (bench_repository / name).exists():
            runs[name] = config.runs / name
    return bench_repository, runs


def workload_texts(spec: WorkloadSpec, count: int) -> tuple[str, ...]:
    from loadtests.workload import mixed_length_texts, task_texts

    if spec.source == "mixed":
        return tuple(mixed_length_texts(count))
    return tuple(task_texts(spec.source, count))


# ----- measuring -----------------------------------------------------------------------------------------


class Bench:
    """One benchmark run: prepares, measures every contender, and returns the results."""

    def __init__(self, config: BenchConfig, log: Callable[[str], None] = print, argv: Sequence[str] = ()) -> None:
        self.config = config
        self.log = log
        self.argv = list(argv)
        self.results: list[CellResult] = []
        self.texts: dict[str, tuple[str, ...]] = {}
        self.specs: list[WorkloadSpec] = []
        self.models: dict[str, dict] = {}
        self.peak: dict = {}
        self.ceilings: dict[str, list] = {}
        self.tuning: list[dict] = []
        self.engine_overhead: list[dict] = []
        self.call_cost: list[dict] = []
        self.call_cost_skipped = ""
        self.log_dir = config.cache_dir / "logs"

    # -- setup
    def prepare(self) -> None:
        from service.runtime.repository import discover

        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.repository, self.runs = prepare_repository(self.config, self.log)
        served = discover(self.repository)
        for name in self.config.workloads:
            spec = WORKLOADS[name]
            if spec.model not in served:
                continue
            self.specs.append(spec)
            self.texts[name] = workload_texts(spec, self.config.texts_per_workload)
        if not self.specs:
            raise SystemExit("attnserve bench: no workload has its model; run 'make models' first")
        self.log("workloads: " + ", ".join(spec.name for spec in self.specs))

    # -- the engine's own cost per step (no model, no server)
    def measure_engine_overhead(self) -> None:
        from loadtests.engine_overhead import measure_overhead

        steps = 150 if self.config.quick else 600
        for beam in OVERHEAD_BEAMS:
            for rows in OVERHEAD_ROWS:
                point = measure_overhead(rows, beam, steps=steps)
                self.engine_overhead.append(asdict(point))
                self.log(
                    f"engine overhead: beam {beam}, {rows} rows: {point.median_us:.0f} us per step "
                    f"(p90 {point.p90_us:.0f} us)"
                )

    # -- engine ceiling and roofline (no server running)
    def measure_offline(self) -> None:
        from loadtests.ceiling import measure_ceiling, tokenize_sources
        from loadtests.flops import measure_matmul_peak, measure_model_flops
        from service.runtime.model import load_model

        peak = measure_matmul_peak(self.config.threads, self.config.provider)
        self.peak = asdict(peak)
        self.log(
            f"matrix-multiply peak: {peak.flops_per_s / 1e9:.1f} GFLOP/s "
            f"({peak.size}^3 float32, {peak.threads} thread(s), {peak.provider})"
        )
        loaded = {}
        for spec in self.specs:
            if spec.model not in loaded:
                version = max(
                    int(path.name) for path in (self.repository / spec.model).iterdir() if path.name.isdigit()
                )
                loaded[spec.model] = load_model(
                    self.repository / spec.model / str(version),
                    provider=self.config.provider,
                    intra_op_threads=self.config.threads,
                    inter_op_threads=1,
                )
                loaded[spec.model].warm_up()
            model = loaded[spec.model]
            sources = tokenize_sources(model, self.texts[spec.name])
            points = []
            for level in self.config.levels:
                point = measure_ceiling(
                    model, sources, level, beam_size=spec.beam_size, min_seconds=self.config.ceiling_seconds
                )
                points.append(point)
            self.ceilings[spec.name] = points
            flops = measure_model_flops(
                model, round(points[0].mean_source_tokens), self.config.provider, self.config.threads
            )
            per_token = flops.per_generated_token(points[0].mean_tokens, spec.beam_size)
            self.models[spec.name] = {
                "model": spec.model,
                "architecture": {
                    key: value
                    for key, value in model.document.architecture.items()
                    if key in ("hidden", "embedding", "attention", "encoder", "decoder", "source_vocab", "target_vocab")
                },
                "mean_source_tokens": points[0].mean_source_tokens,
                "mean_generated_tokens": points[0].mean_tokens,
                "encoder_flops_per_source": flops.encoder_flops,
                "step_flops_per_row": flops.step_flops,
                "flops_per_generated_token": per_token,
            }
            for point in points:
                self.results.append(
                    CellResult(
                        workload=spec.name,
                        contender="engine-ceiling",
                        level=point.batch,
                        tokens_per_s=point.tokens_per_s,
                        requests_per_s=point.requests_per_s,
                        p50_ms=point.latency_s * 1e3,
                        p90_ms=math.nan,
                        p99_ms=math.nan,
                        mean_decoder_rows=point.rows,
                        ok=point.waves * point.batch,
                        details={
                            "encode_ms": point.encode_s * 1e3,
                            "step_ms": point.step_s * 1e3,
                            "mean_tokens": point.mean_tokens,
                            "waves": point.waves,
                        },
                    )
                )
            if "roofline" in self.config.contenders:
                bound = peak.flops_per_s / per_token
                for level in self.config.levels:
                    self.results.append(
                        CellResult(
                            workload=spec.name,
                            contender="roofline",
                            level=level,
                            tokens_per_s=bound,
                            requests_per_s=bound / max(points[0].mean_tokens, 1.0),
                            p50_ms=math.nan,
                            p90_ms=math.nan,
                            p99_ms=math.nan,
                            percent_of_peak=100.0,
                            details={"flops_per_token": per_token, "peak_flops_per_s": peak.flops_per_s},
                        )
                    )
            self.log(
                f"{spec.name}: {per_token / 1e6:.2f} MFLOP per generated token; engine ceiling "
                + ", ".join(f"B={p.batch}: {p.tokens_per_s:.0f} tok/s" for p in points)
            )
        del loaded

    # -- one server, every workload and level
    def measure_server(
        self,
        contender: str,
        server,
        generator,
        *,
        workloads: Sequence[WorkloadSpec] | None = None,
        levels_for: Callable[[WorkloadSpec], Sequence[int]] | None = None,
        duration_s: float | None = None,
        details: dict | None = None,
    ) -> list[CellResult]:
        from loadtests.call_cost import counted_errors
        from loadtests.loadgen import CellPlan, H2loadGenerator, count_server_errors
        from loadtests.servers import engine_window, scrape, wait_until_idle

        cells = []
        for spec in workloads or self.specs:
            for level in levels_for(spec) if levels_for else self.config.levels:
                plan = CellPlan(
                    address=server.http_address if contender == "http" else server.address,
                    protocol="http" if contender == "http" else "grpc",
                    model=spec.model,
                    texts=self.texts[spec.name],
                    beam_size=spec.beam_size,
                    concurrency=level,
                    warmup_s=self.config.warmup_s,
                    duration_s=duration_s or self.config.duration_s,
                    max_requests=self.config.max_requests,
                )
                _, window_starts, window_ends = generator.schedule(plan)
                _sleep_until(window_starts)
                before = scrape(server.metrics_url) if server.metrics_url else None
                cpu_before = server.cpu_seconds()
                _sleep_until(window_ends)
                after = scrape(server.metrics_url) if server.metrics_url else None
                cpu_after = server.cpu_seconds()
                measured = generator.collect()
                if isinstance(generator, H2loadGenerator) and before is not None and after is not None:
                    measured = count_server_errors(measured, counted_errors(before, after))
                wait_until_idle(server.metrics_url)
                cell = CellResult(
                    workload=spec.name,
                    contender=contender,
                    level=level,
                    tokens_per_s=measured.tokens_per_s if contender != "rpc-ceiling" else math.nan,
                    requests_per_s=measured.requests_per_s,
                    p50_ms=measured.latency_p50_s * 1e3,
                    p90_ms=measured.latency_p90_s * 1e3,
                    p99_ms=measured.latency_p99_s * 1e3,
                    ok=measured.ok,
                    failures=measured.failures,
                    cut=measured.cut,
                    steady=measured.completed >= level,
                    details={
                        "window_s": measured.window_s,
                        "mean_tokens": measured.mean_tokens,
                        "server_cpu_share": (cpu_after - cpu_before) / (window_ends - window_starts),
                        "client_cpu_s": measured.client_cpu_s,
                        **(details or {}),
                    },
                )
                if before is not None and after is not None:
                    window = engine_window(before, after, spec.model, window_ends - window_starts)
                    cell.mean_decoder_rows = window.mean_decoder_rows
                    cell.details.update(
                        {key: value for key, value in asdict(window).items() if key != "mean_decoder_rows"}
                    )
                elif contender == "pytorch-eager":
                    cell.mean_decoder_rows = float(spec.beam_size)
                cells.append(cell)
                self.log(
                    f"  {contender:<14} {spec.name:<17} c={level:<4} {measured.requests_per_s:8.1f} req/s "
                    f"{measured.tokens_per_s:9.1f} tok/s p50 {cell.p50_ms:8.2f} ms p99 {cell.p99_ms:8.2f} ms "
                    f"rows {cell.mean_decoder_rows:6.1f}"
                    + (f" failures {measured.failures}" if measured.failures else "")
                    + ("" if cell.steady else " (not steady)")
                )
        return cells

    def run_contenders(self) -> None:
        from loadtests.loadgen import H2loadGenerator, LoadGenerator
        from loadtests.servers import attnserve_server, eager_server, noop_server

        config = self.config
        common = ("--max-active-hypotheses", str(config.max_active_hypotheses), "--frontends", config.frontends)
        if not any(contender in config.contenders for contender in SERVER_CONTENDERS):
            return
        generator: LoadGenerator | H2loadGenerator = (
            H2loadGenerator(config.cache_dir / "h2load")
            if config.load_generator == "h2load"
            else LoadGenerator(config.client_processes)
        )
        with generator:
            for contender in SERVER_CONTENDERS:
                if contender not in config.contenders:
                    continue
                started = time.monotonic()
                self.log(f"{contender}:")
                if contender == "rpc-ceiling":
                    with noop_server(self.log_dir) as server:
                        self.results += self.measure_server(contender, server, generator)
                elif contender in ("continuous", "none", "http"):
                    with attnserve_server(
                        self.repository,
                        batching="continuous" if contender == "http" else contender,
                        threads=config.threads,
                        provider=config.provider,
                        log_dir=self.log_dir,
                        extra=common,
                        http=contender == "http",
                        label=f"attnserve-{contender}",
                    ) as server:
                        self.results += self.measure_server(contender, server, generator)
                elif contender == "request":
                    self.results += self.run_request_level(generator, common)
                elif contender == "pytorch-eager":
                    specs = [spec for spec in self.specs if spec.model in self.runs]
                    missing = sorted({spec.model for spec in self.specs} - set(self.runs))
                    if missing:
                        self.log(f"  no training run for {', '.join(missing)} in {config.runs}: eager skipped for them")
                    if specs:
                        runs = {spec.model: self.runs[spec.model] for spec in specs}
                        device = "cuda" if config.provider == "cuda" else "cpu"
                        with eager_server(runs, threads=config.threads, log_dir=self.log_dir, device=device) as server:
                            self.results += self.measure_server(contender, server, generator, workloads=specs)
                self.log(f"  ({time.monotonic() - started:.0f} s)")

    def run_request_level(self, generator, common: tuple[str, ...]) -> list[CellResult]:
        """Tune `--batching request` fairly: every (batch size, delay) of the grid on every workload and
        level with a short window, keep the best per (workload, level) by tokens/s (within 3%: lower p99),
        then measure each kept configuration with the full window."""
        from loadtests.servers import attnserve_server

        config = self.config
        trials: dict[tuple[str, int], list[CellResult]] = {}
        for batch_size in config.request_batch_sizes:
            for delay in config.request_batch_delays_ms:
                label = f"request-b{batch_size}-d{delay:g}"
                extra = (*common, "--batch-size", str(batch_size), "--batch-delay-ms", f"{delay:g}")
                with attnserve_server(
                    self.repository,
                    batching="request",
                    threads=config.threads,
                    provider=config.provider,
                    log_dir=self.log_dir,
                    extra=extra,
                    label=label,
                ) as server:
                    for cell in self.measure_server(
                        f"request b={batch_size} d={delay:g}ms", server, generator, duration_s=config.tune_duration_s
                    ):
                        cell.details.update({"batch_size": batch_size, "batch_delay_ms": delay})
                        trials.setdefault((cell.workload, cell.level), []).append(cell)
        chosen: dict[tuple[str, int], CellResult] = {key: pick_best(cells) for key, cells in trials.items()}
        for (workload, level), cells in sorted(trials.items()):
            best = chosen[(workload, level)]
            self.tuning.append(
                {
                    "workload": workload,
                    "level": level,
                    "chosen": {
                        "batch_size": best.details["batch_size"],
                        "batch_delay_ms": best.details["batch_delay_ms"],
                    },
                    "trials": [
                        {
                            "batch_size": cell.details["batch_size"],
                            "batch_delay_ms": cell.details["batch_delay_ms"],
                            "tokens_per_s": cell.tokens_per_s,
                            "p99_ms": cell.p99_ms,
                        }
                        for cell in cells
                    ],
                }
            )
        if config.tune_duration_s >= config.duration_s:
            retuned = [replace(cell, contender="request") for cell in chosen.values()]
            return sorted(retuned, key=lambda cell: (cell.workload, cell.level))
        final: list[CellResult] = []
        by_config: dict[tuple[int, float], list[tuple[str, int]]] = {}
        for (workload, level), cell in chosen.items():
            by_config.setdefault((cell.details["batch_size"], cell.details["batch_delay_ms"]), []).append(
                (workload, level)
            )
        self.log("  measuring the tuned configurations:")
        for (batch_size, delay), keys in sorted(by_config.items()):
            extra = (*common, "--batch-size", str(batch_size), "--batch-delay-ms", f"{delay:g}")
            wanted = set(keys)
            specs = [spec for spec in self.specs if any(spec.name == workload for workload, _ in keys)]
            with attnserve_server(
                self.repository,
                batching="request",
                threads=config.threads,
                provider=config.provider,
                log_dir=self.log_dir,
                extra=extra,
                label=f"request-b{batch_size}-d{delay:g}",
            ) as server:

                def levels_for(spec: WorkloadSpec, wanted: set[tuple[str, int]] = wanted) -> list[int]:
                    return [level for level in config.levels if (spec.name, level) in wanted]

                final += self.measure_server(
                    "request",
                    server,
                    generator,
                    workloads=specs,
                    levels_for=levels_for,
                    details={"batch_size": batch_size, "batch_delay_ms": delay},
                )
        return final

    # -- what a call costs (h2load, default settings)
    def measure_call_cost(self) -> None:
        """The cpu-per-call section: for near-free, dates and phrasebook (those of this run's workloads), the
        no-op server and `attnserve serve` with its default settings, one process and `--frontends 1`, driven by
        h2load (loadtests/call_cost.py), each window `--duration` after `--warmup`."""
        from tabulate import tabulate

        from loadtests import call_cost, h2load

        config = self.config
        models = [model for model in call_cost.SECTION_MODELS if any(spec.model == model for spec in self.specs)]
        if not models:
            self.call_cost_skipped = f"none of {', '.join(call_cost.SECTION_MODELS)} among this run's workloads"
        elif not h2load.available():
            self.call_cost_skipped = h2load.MISSING
        if self.call_cost_skipped:
            self.log(f"cpu-per-call: skipped: {self.call_cost_skipped}")
            return
        started = time.monotonic()
        self.log("cpu-per-call (h2load; attnserve with its default settings):")
        repository = self.repository.resolve()
        entries = []
        for model in models:
            servers = [
                call_cost.noop(self.log_dir),
                call_cost.default_attnserve(repository, "attnserve", self.log_dir, provider=config.provider),
                call_cost.default_attnserve(
                    repository, "attnserve --frontends 1", self.log_dir, frontends=1, provider=config.provider
                ),
            ]
            entry = call_cost.measure_model(
                repository,
                model,
                servers,
                self.log_dir,
                seconds=config.duration_s,
                warmup_s=config.warmup_s,
                rate=config.cpu_rate,
                provider=config.provider,
                engine_seconds=config.ceiling_seconds,
                log=self.log,
            )
            entries.append(entry)
            self.call_cost.append(entry.to_json())
        self.log(tabulate(call_cost.table_rows(entries), headers=call_cost.TABLE_HEADERS, disable_numparse=True))
        self.log(f"  ({time.monotonic() - started:.0f} s)")

    # -- derived figures
    def finish(self) -> None:
        peak = self.peak.get("flops_per_s", math.nan)
        for cell in self.results:
            model = self.models.get(cell.workload)
            if model and cell.contender != "roofline" and math.isfinite(cell.tokens_per_s):
                cell.percent_of_peak = 100.0 * cell.tokens_per_s * model["flops_per_generated_token"] / peak

    def run(self) -> dict:
        started = time.monotonic()
        self.prepare()
        machine = machine_description(self.config.provider, self.config.threads)
        self.measure_engine_overhead()
        self.measure_offline()  # always: the ceiling and the FLOPs feed the targets and the % of peak column
        self.run_contenders()
        if "cpu-per-call" in self.config.contenders:
            self.measure_call_cost()
        self.finish()
        machine["load_average_at_end"] = list(os.getloadavg())
        results = [cell for cell in self.results if cell.contender in self.config.contenders]
        return {
            "command": " ".join(["attnserve bench", *self.argv]),
            "config": _jsonable(asdict(self.config)),
            "machine": machine,
            "peak": self.peak,
            "models": self.models,
            "workloads": {spec.name: asdict(spec) | {"texts": len(self.texts[spec.name])} for spec in self.specs},
            "results": [_jsonable(asdict(cell)) for cell in results],
            "request_tuning": _jsonable(self.tuning),
            "engine_overhead": _jsonable(self.engine_overhead),
            "call_cost": self.call_cost,
            "call_cost_skipped": self.call_cost_skipped,
            "seconds": time.monotonic() - started,
        }


def pick_best(cells: Sequence[CellResult]) -> CellResult:
    """The highest tokens/s (requests/s when tokens are not counted); among those within 3% of it, the
    lowest p99 latency."""

    def throughput(cell: CellResult) -> float:
        value = cell.tokens_per_s if math.isfinite(cell.tokens_per_s) else cell.requests_per_s
        return value if math.isfinite(value) else 0.0

    top = max(throughput(cell) for cell in cells)
    close = [cell for cell in cells if throughput(cell) >= 0.97 * top]
    return min(close, key=lambda cell: cell.p99_ms if math.isfinite(cell.p99_ms) else math.inf)


def _sleep_until(moment: float) -> None:
    remaining = moment - time.monotonic()
    if remaining > 0:
        time.sleep(remaining)


def _jsonable(value):
    """NaN and infinity become None (JSON has neither); paths become text."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


def main(argv: list[str] | None = None) -> int:
    """`attnserve bench [options]`; returns the exit status (0 when the report was written: missed targets
    are findings, reported in bench.md, not failures)."""
    from loadtests.report import write_report

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    if args.report is not None:  # re-render an earlier run's report (after a change to the report only)
        report = json.loads(args.report.read_text(encoding="utf-8"))
    else:
        report = Bench(config, argv=argv).run()
    paths = write_report(report, config.out)
    targets = json.loads(paths[0].read_text(encoding="utf-8"))["targets"]
    if targets:
        print("\ntargets:")
        for target in targets:
            verdict = {True: "met", False: "MISSED", None: "n/a"}[target["met"]]
            print(f"  [{verdict:>6}] {target['target']}: {target['figure']}")
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
