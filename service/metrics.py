"""Prometheus metrics of the server, on their own registry and their own HTTP port (`/metrics`).

Two producers feed them, neither of which touches prometheus-client in its hot path:
- each model version's AsyncEngine hands plain `StepStats` / `RequestStats` records to a `ModelStatsRecorder`
  (one per model version), which adds them to plain numbers;
- the transport reports every finished RPC through `ServerMetrics.observe_rpc`, which does the same.
Those numbers become metric families only when /metrics is scraped (`_CountsCollector`): a call then costs a
dictionary lookup and a few additions, not prometheus-client's locked children.
Queue depths are read from the engines at scrape time, so they are exact even when idle.

Labels come only from a bounded set: model, version, method, code, protocol, reason. Never a request id or
any other client-chosen text (an unknown model name is reported as model="").
"""

from __future__ import annotations

import logging
import threading
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Info, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from service.engine.async_engine import AsyncEngine
from service.engine.records import FinishReason
from service.engine.stats import RequestStats, StepStats
from service.runtime.model import RuntimeThreads

log = logging.getLogger(__name__)

# Whole requests: from sub-millisecond (cached tiny models) to a minute (long beams under load).
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# One encoder call / decoder step, or the gap between two tokens: 100 microseconds to a second.
STEP_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# Batch sizes (sources or hypotheses): powers of two up to well past the default budgets.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)

MODEL_LABELS = ("model", "version")


@dataclass(frozen=True)
class _QueueSource:
    model: str
    version: str
    engine: AsyncEngine


class _QueueCollector(Collector):
    """Reports each engine's waiting and running requests and its queue limit when /metrics is scraped.

    Runs on the HTTP server's thread and only reads (AsyncEngine.queue_counts: counters each written by one
    other thread), so a scrape never changes what the queue limit uses.
    """

    def __init__(self) -> None:
        self._sources: dict[tuple[str, str], _QueueSource] = {}
        self._lock = threading.Lock()

    def add(self, model: str, version: str, engine: AsyncEngine) -> None:
        with self._lock:
            self._sources[(model, version)] = _QueueSource(model, version, engine)

    def remove(self, model: str, version: str) -> None:
        with self._lock:
            self._sources.pop((model, version), None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        waiting = GaugeMetricFamily(
            "attnserve_requests_waiting", "Texts queued for a model version, not yet in its batch.", labels=MODEL_LABELS
        )
        running = GaugeMetricFamily(
            "attnserve_requests_running",
            "Texts being decoded in a model version's batch, or encoded to join it.",
            labels=MODEL_LABELS,
        )
        waiting_limit = GaugeMetricFamily(
            "attnserve_requests_waiting_limit",
            "Most texts that may wait for a model version; beyond it new ones are refused (RESOURCE_EXHAUSTED).",
            labels=MODEL_LABELS,
        )
        with self._lock:
            sources = list(self._sources.values())
        for source in sources:
            labels = [source.model, source.version]
            queued, decoding = source.engine.queue_counts()  # one snapshot: a request is counted once
            waiting.add_metric(labels, queued)
            running.add_metric(labels, decoding)
            waiting_limit.add_metric(labels, source.engine.limits.max_waiting_requests)
        yield waiting
        yield running
        yield waiting_limit

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Names only, so registering does not call collect() before any engine exists.
        yield GaugeMetricFamily("attnserve_requests_waiting", "", labels=MODEL_LABELS)
        yield GaugeMetricFamily("attnserve_requests_running", "", labels=MODEL_LABELS)
        yield GaugeMetricFamily("attnserve_requests_waiting_limit", "", labels=MODEL_LABELS)


class Turns(Protocol):
    """What the metrics read of the dataplane's turns (service.engine_client.gate.FairGate)."""

    @property
    def inside(self) -> int: ...
    @property
    def waiting(self) -> int: ...
    @property
    def clients_waiting(self) -> int: ...
    @property
    def limit(self) -> int: ...


class _TurnsCollector(Collector):
    """Reports the dataplane's turns (service.engine_client.gate.FairGate) when /metrics is scraped: the calls in
    the engines and those waiting their turn. Runs on the HTTP server's thread and only reads counters."""

    def __init__(self, gate: Turns) -> None:
        self._gate = gate

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gate = self._gate
        yield GaugeMetricFamily(
            "attnserve_calls_active",
            "Translation calls in the engines (token streams not counted); at max_active_calls the next ones wait "
            "their turn.",
            value=gate.inside,
        )
        yield GaugeMetricFamily(
            "attnserve_calls_active_limit",
            "The most translation calls let into the engines at once now (0 = no limit): max_active_calls, or a "
            "quarter of it in a front-end process while calls wait in gRPC core to be picked up.",
            value=gate.limit,
        )
        yield GaugeMetricFamily(
            "attnserve_calls_waiting_turn",
            "Translation calls waiting their turn to enter the engines, in one line per client connection.",
            value=gate.waiting,
        )
        yield GaugeMetricFamily(
            "attnserve_clients_waiting_turn",
            "Client connections with calls waiting their turn.",
            value=gate.clients_waiting,
        )


class ServerMetrics:
    """Every metric family of one server process, on a private CollectorRegistry.

    Create one per process (tests create several; each has its own registry, so they never clash).
    """

    def __init__(self, collectors: CollectorRegistry | None = None) -> None:
        self.collectors = collectors if collectors is not None else CollectorRegistry(auto_describe=True)
        r = self.collectors
        # The process's memory, CPU seconds and open files (process_*): memory staying flat under overload is
        # one of the things an operator checks.
        ProcessCollector(registry=r)
        # Calls and engines: counted in plain numbers by their producers, turned into families at scrape time.
        self._calls: dict[tuple[str, int | None, str, str, str], _CallStats] = {}
        self._recorders: dict[tuple[str, str], list[ModelStatsRecorder]] = {}
        r.register(_CountsCollector(self._calls, self._recorders))
        # Overload: a prometheus-client counter's few microseconds are small next to what a refusal costs anyway.
        self.shed_calls = Counter(
            "attnserve_shed_calls",
            "Calls refused at once for overload (RESOURCE_EXHAUSTED, counted in attnserve_requests_total too), by "
            "reason: queue_full (the model version's queue holds max_waiting_requests texts), queue_wait (the call "
            "could not start within max_queue_wait_ms, judged from its model's queue) or backlog_wait (the same, "
            "judged when it was picked up, from the calls ahead of it), and protocol (grpc or http).",
            ("model", "version", "reason", "protocol"),
            registry=r,
        )
        # Models.
        self.model_load = Gauge(
            "attnserve_model_load_seconds",
            "Seconds it took to load a model version (before warm-up).",
            MODEL_LABELS,
            registry=r,
        )
        self.model_info = Info(
            "attnserve_model",
            "A loaded model version, the onnxruntime execution provider it runs on, its intra-op threads and "
            "whether they spin between runs.",
            MODEL_LABELS,
            registry=r,
        )
        self.model_load_failures = Counter(
            "attnserve_model_load_failures",
            "Attempts to load a model version that failed (corrupt or missing files, mismatched tokenizer, "
            "failed warm-up); such a version is never served.",
            MODEL_LABELS,
            registry=r,
        )
        self.model_retirements = Counter(
            "attnserve_model_version_retirements",
            "Model versions taken out of service while the server runs (replaced by a newer version, or "
            "removed from the repository); each drains its requests first.",
            ("model",),
            registry=r,
        )
        self._queues = _QueueCollector()
        r.register(self._queues)
        self._http_server: object | None = None

    # ----- producers --------------------------------------------------------------------------------

    def watch_turns(self, gate: Turns) -> None:
        """Report `gate`'s calls in the engines and waiting their turn (once per process: the dataplane's)."""
        self.collectors.register(_TurnsCollector(gate))

    def observe_rpc(
        self,
        method: str,
        code: str,
        seconds: float,
        model: str = "",
        version: int | None = None,
        protocol: str = "grpc",
    ) -> None:
        """One finished call: `method` e.g. 'Translate' (an HTTP endpoint is named after the RPC it mirrors),
        `code` a gRPC status name ('OK', 'NOT_FOUND'), `seconds` its wall time; model/version as resolved by the
        server ('' / None when it never resolved one); `protocol` 'grpc' or 'http'."""
        key = (model, version, method, code, protocol)
        stats = self._calls.get(key)
        if stats is None:
            stats = self._calls[key] = _CallStats()
        stats.count += 1
        stats.duration.observe(seconds)

    def observe_shed(self, reason: str, model: str, version: int | None, protocol: str = "grpc") -> None:
        """A call refused for overload, for `reason` (service.errors.OVERLOAD_REASONS)."""
        self.shed_calls.labels(model, "" if version is None else str(version), reason, protocol).inc()

    def model_loaded(
        self, model: str, version: int, provider: str, load_seconds: float, threads: RuntimeThreads | None = None
    ) -> None:
        """A model version finished loading on `provider` (e.g. 'CPUExecutionProvider') in `load_seconds`, its
        onnxruntime sessions running with `threads`."""
        self.model_load.labels(model, str(version)).set(load_seconds)
        info = {"provider": provider}
        if threads is not None:
            info |= {
                "intra_op_threads": str(threads.intra_op),
                "spinning": "true" if threads.spinning else "false",
                "encoder_overlap": "true" if threads.encoder_overlap else "false",
            }
        self.model_info.labels(model, str(version)).info(info)

    def model_load_failed(self, model: str, version: int) -> None:
        """An attempt to load a model version failed (the version is not served)."""
        self.model_load_failures.labels(model, str(version)).inc()

    def model_unloaded(self, model: str, version: int) -> None:
        """A model version was retired: it no longer appears as loaded."""
        self.model_retirements.labels(model).inc()
        for family in (self.model_load, self.model_info):
            try:
                family.remove(model, str(version))
            except KeyError:  # never reported as loaded
                pass

    def recorder(self, model: str, version: int) -> ModelStatsRecorder:
        """A StatsRecorder for a new engine of one model version. Each engine gets its own (a version loaded
        again while its old engine drains has two engines at once, and each recorder must have one writer);
        a scrape adds up the recorders of one version, so its counts go on across reloads."""
        recorder = ModelStatsRecorder()
        self._recorders.setdefault((model, str(version)), []).append(recorder)
        return recorder

    def watch_queue(self, model: str, version: int, engine: AsyncEngine) -> None:
        """Report `engine.waiting` / `.running` under these labels at every scrape, with its queue limit
        (max_waiting_requests), so alerts can compare the two."""
        self._queues.add(model, str(version), engine)

    def unwatch_queue(self, model: str, version: int) -> None:
        self._queues.remove(model, str(version))

    # ----- exposition -------------------------------------------------------------------------------

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve /metrics over HTTP on host:port (0 = a free port) from a daemon thread (prometheus-client's
        server); returns the port."""
        server, _thread = start_http_server(port, addr=host, registry=self.collectors)
        self._http_server = server
        port = int(server.server_port)
        log.info("metrics on http://%s:%d/metrics", host, port)
        return port

    def close(self) -> None:
        """Stop the HTTP endpoint, if serving."""
        server, self._http_server = self._http_server, None
        if server is not None:
            server.shutdown()  # type: ignore[attr-defined]
            server.server_close()  # type: ignore[attr-defined]


class _Histogram:
    """One label set of a histogram as plain numbers: `observe` is a bisection and two additions (a
    prometheus-client child takes a lock and several calls per observation, a few microseconds that every call
    and every engine step would pay). Exactly one thread writes it; a scrape reads a copy of the counts."""

    __slots__ = ("upper_bounds", "counts", "total")

    def __init__(self, upper_bounds: tuple[float, ...]) -> None:
        self.upper_bounds = upper_bounds
        self.counts = [0] * (len(upper_bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        # A value equal to a bound belongs to that bound's bucket (Prometheus' `le`), which bisect_left finds.
        self.counts[bisect_left(self.upper_bounds, value)] += 1
        self.total += value

    @staticmethod
    def add_to(family: HistogramMetricFamily, labels: list[str], histograms: Sequence[_Histogram]) -> None:
        """Add the sum of `histograms` (same bounds) to `family` under `labels`. Each one's counts are copied
        before its total is read, so while its writer goes on the sum may hold one observation the count does
        not yet: harmless for a rate or a quantile, and the buckets and the count always agree."""
        counts = [0] * len(histograms[0].counts)
        total = 0.0
        for histogram in histograms:
            counts = [a + b for a, b in zip(counts, list(histogram.counts), strict=True)]
            total += histogram.total
        cumulative = list(accumulate(counts))
        bounds = histograms[0].upper_bounds
        buckets = [(floatToGoString(bound), float(n)) for bound, n in zip(bounds, cumulative, strict=False)]
        buckets.append(("+Inf", float(cumulative[-1])))
        family.add_metric(labels, buckets, total)


class _CallStats:
    """The calls of one (model, version, method, code, protocol): written on the event loop's thread."""

    __slots__ = ("count", "duration")

    def __init__(self) -> None:
        self.count = 0
        self.duration = _Histogram(LATENCY_BUCKETS_S)


class ModelStatsRecorder:
    """The engine's StatsRecorder for one model version: plain stats in, plain numbers kept.

    `on_step` runs on the engine's thread and writes only the step figures; the others run on the event loop's
    thread and write only the request figures: each number has one writer, so no lock is needed and none of
    them is lost. `_CountsCollector` turns them into metric families when /metrics is scraped.
    """

    def __init__(self) -> None:
        # Per text.
        self.queue_wait = _Histogram(LATENCY_BUCKETS_S)
        self.first_token = _Histogram(LATENCY_BUCKETS_S)
        self.inter_token = _Histogram(STEP_BUCKETS_S)
        self.duration = _Histogram(LATENCY_BUCKETS_S)
        self.generated_tokens = 0
        self.source_tokens = 0
        self.finished = dict.fromkeys(FinishReason, 0)
        # Per iteration.
        self.decoder_batch = _Histogram(BATCH_BUCKETS)
        self.decoder_step = _Histogram(STEP_BUCKETS_S)
        self.decoder_steps = 0
        self.encoder_batch = _Histogram(BATCH_BUCKETS)
        self.encoder_duration = _Histogram(STEP_BUCKETS_S)

    def on_step(self, stats: StepStats) -> None:
        if stats.encoder_batch > 0:
            self.encoder_batch.observe(stats.encoder_batch)
            self.encoder_duration.observe(stats.encode_seconds)
        if stats.rows > 0:
            self.decoder_batch.observe(stats.rows)
            self.decoder_step.observe(stats.step_seconds)
            self.decoder_steps += 1

    def on_request_done(self, stats: RequestStats) -> None:
        self.queue_wait.observe(stats.queue_wait_s)
        self.first_token.observe(stats.first_token_s)
        if stats.mean_inter_token_s is not None:
            self.inter_token.observe(stats.mean_inter_token_s)
        self.duration.observe(stats.total_s)
        self.generated_tokens += stats.generated_tokens
        self.source_tokens += stats.source_tokens
        self.finished[stats.finish_reason] += 1

    def on_request_failed(self, reason: FinishReason) -> None:
        self.finished[reason] += 1


# The engine's histograms: (family name, help, the recorder's attribute).
_ENGINE_HISTOGRAMS = (
    ("attnserve_queue_wait_seconds", "Seconds a text waited in the queue before joining the batch.", "queue_wait"),
    (
        "attnserve_time_to_first_token_seconds",
        "Seconds from a text's arrival to its first decoded token.",
        "first_token",
    ),
    (
        "attnserve_inter_token_latency_seconds",
        "Mean seconds between consecutive decoder steps of one text (one observation per text of 2+ tokens).",
        "inter_token",
    ),
    (
        "attnserve_engine_request_duration_seconds",
        "Seconds from a text's arrival to its result (queue included).",
        "duration",
    ),
    ("attnserve_decoder_batch_hypotheses", "Hypotheses (decoder rows) in one decoder step.", "decoder_batch"),
    ("attnserve_decoder_step_duration_seconds", "Wall time of one decoder step call.", "decoder_step"),
    ("attnserve_encoder_batch_sources", "Sources encoded in one encoder call.", "encoder_batch"),
    ("attnserve_encoder_duration_seconds", "Wall time of one encoder call.", "encoder_duration"),
)
_ENGINE_COUNTERS = (
    (
        "attnserve_generated_tokens",
        "Decoder steps run for finished texts (tokens of the longest hypothesis).",
        "generated_tokens",
    ),
    ("attnserve_source_tokens", "Source tokens (</s> included) of finished texts.", "source_tokens"),
    ("attnserve_decoder_steps", "Decoder steps run.", "decoder_steps"),
)


class _CountsCollector(Collector):
    """The call and engine families, built from the producers' plain numbers at scrape time."""

    def __init__(
        self,
        calls: dict[tuple[str, int | None, str, str, str], _CallStats],
        recorders: dict[tuple[str, str], list[ModelStatsRecorder]],
    ) -> None:
        self._calls = calls
        self._recorders = recorders

    def collect(self) -> Iterator[Metric]:
        # Copies first: the producers may add a label set while this runs on the metrics thread.
        calls = list(self._calls.items())
        recorders = [(labels, list(of_version)) for labels, of_version in list(self._recorders.items())]
        requests = CounterMetricFamily(
            "attnserve_requests",
            "Calls finished, by method, gRPC status code (HTTP calls: the gRPC status of the same outcome) and "
            "protocol (grpc or http).",
            labels=("model", "version", "method", "code", "protocol"),
        )
        durations = HistogramMetricFamily(
            "attnserve_request_duration_seconds",
            "Wall time of a call, from the handler's start to its last message, by protocol (grpc or http).",
            labels=("model", "version", "method", "protocol"),
        )
        for (model, version, method, code, protocol), stats in calls:
            version_label = "" if version is None else str(version)
            requests.add_metric([model, version_label, method, code, protocol], stats.count)
        # One duration series per (model, version, method, protocol), whatever the codes.
        merged: dict[tuple[str, str, str, str], list[_Histogram]] = {}
        for (model, version, method, _code, protocol), stats in calls:
            key = (model, "" if version is None else str(version), method, protocol)
            merged.setdefault(key, []).append(stats.duration)
        for key, histograms in merged.items():
            _Histogram.add_to(durations, list(key), histograms)
        yield requests
        yield durations

        for name, documentation, attribute in _ENGINE_HISTOGRAMS:
            family = HistogramMetricFamily(name, documentation, labels=MODEL_LABELS)
            for labels, of_version in recorders:
                _Histogram.add_to(family, list(labels), [getattr(recorder, attribute) for recorder in of_version])
            yield family
        for name, documentation, attribute in _ENGINE_COUNTERS:
            counter = CounterMetricFamily(name, documentation, labels=MODEL_LABELS)
            for labels, of_version in recorders:
                counter.add_metric(list(labels), sum(getattr(recorder, attribute) for recorder in of_version))
            yield counter
        finished = CounterMetricFamily(
            "attnserve_finished_requests",
            "Texts that left the engine, by reason: eos or length (the best hypothesis' reason), or cancelled, "
            "deadline, error.",
            labels=("model", "version", "reason"),
        )
        for (model_label, version_label), of_version in recorders:
            for reason in FinishReason:
                count = sum(recorder.finished[reason] for recorder in of_version)
                finished.add_metric([model_label, version_label, reason.value], count)
        yield finished
