"""Prometheus metrics of the server, on their own registry and their own HTTP port (`/metrics`).

Two producers feed them, neither of which touches prometheus-client in its hot path:
- each model version's AsyncEngine hands plain `StepStats` / `RequestStats` records to a `ModelStatsRecorder`
  (one per model version, its label children resolved once), which turns them into metrics;
- the transport reports every finished RPC through `ServerMetrics.observe_rpc`.
Queue depths are read from the engines at scrape time, so they are exact even when idle.

Labels come only from a bounded set: model, version, method, code, protocol, reason. Never a request id or
any other client-chosen text (an unknown model name is reported as model="").
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

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
            "attnserve_requests_running", "Texts being decoded in a model version's batch.", labels=MODEL_LABELS
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
        # Transport: one observation per finished RPC.
        self.requests = Counter(
            "attnserve_requests",
            "Calls finished, by method, gRPC status code (HTTP calls: the gRPC status of the same outcome) and "
            "protocol (grpc or http).",
            ("model", "version", "method", "code", "protocol"),
            registry=r,
        )
        self.request_duration = Histogram(
            "attnserve_request_duration_seconds",
            "Wall time of a call, from the handler's start to its last message, by protocol (grpc or http).",
            ("model", "version", "method", "protocol"),
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.shed_calls = Counter(
            "attnserve_shed_calls",
            "Calls refused at once for overload (RESOURCE_EXHAUSTED, counted in attnserve_requests_total too), by "
            "reason: queue_full (the model version's queue holds max_waiting_requests texts) or queue_wait (the call "
            "could not start within max_queue_wait_ms), and protocol (grpc or http).",
            ("model", "version", "reason", "protocol"),
            registry=r,
        )
        # Engine, per text (one engine request).
        self.queue_wait = Histogram(
            "attnserve_queue_wait_seconds",
            "Seconds a text waited in the queue before joining the batch.",
            MODEL_LABELS,
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "attnserve_time_to_first_token_seconds",
            "Seconds from a text's arrival to its first decoded token.",
            MODEL_LABELS,
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "attnserve_inter_token_latency_seconds",
            "Mean seconds between consecutive decoder steps of one text (one observation per text of 2+ tokens).",
            MODEL_LABELS,
            buckets=STEP_BUCKETS_S,
            registry=r,
        )
        self.engine_request_duration = Histogram(
            "attnserve_engine_request_duration_seconds",
            "Seconds from a text's arrival to its result (queue included).",
            MODEL_LABELS,
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.generated_tokens = Counter(
            "attnserve_generated_tokens",
            "Decoder steps run for finished texts (tokens of the longest hypothesis).",
            MODEL_LABELS,
            registry=r,
        )
        self.source_tokens = Counter(
            "attnserve_source_tokens",
            "Source tokens (</s> included) of finished texts.",
            MODEL_LABELS,
            registry=r,
        )
        self.finished = Counter(
            "attnserve_finished_requests",
            "Texts that left the engine, by reason: eos or length (the best hypothesis' reason), or cancelled, "
            "deadline, error.",
            ("model", "version", "reason"),
            registry=r,
        )
        # Engine, per iteration.
        self.decoder_batch = Histogram(
            "attnserve_decoder_batch_hypotheses",
            "Hypotheses (decoder rows) in one decoder step.",
            MODEL_LABELS,
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.decoder_step_duration = Histogram(
            "attnserve_decoder_step_duration_seconds",
            "Wall time of one decoder step call.",
            MODEL_LABELS,
            buckets=STEP_BUCKETS_S,
            registry=r,
        )
        self.encoder_batch = Histogram(
            "attnserve_encoder_batch_sources",
            "Sources encoded in one encoder call.",
            MODEL_LABELS,
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.encoder_duration = Histogram(
            "attnserve_encoder_duration_seconds",
            "Wall time of one encoder call.",
            MODEL_LABELS,
            buckets=STEP_BUCKETS_S,
            registry=r,
        )
        self.decoder_steps = Counter(
            "attnserve_decoder_steps",
            "Decoder steps run.",
            MODEL_LABELS,
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
        self._rpc_children: dict[tuple[str, int | None, str, str, str], tuple[Any, Any]] = {}
        self._queues = _QueueCollector()
        r.register(self._queues)
        self._http_server: object | None = None

    # ----- producers --------------------------------------------------------------------------------

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
        children = self._rpc_children.get(key)
        if children is None:  # once per label set, a bounded one: prometheus-client's lookup is not free per call
            version_label = "" if version is None else str(version)
            children = self._rpc_children[key] = (
                self.requests.labels(model, version_label, method, code, protocol),
                self.request_duration.labels(model, version_label, method, protocol),
            )
        children[0].inc()
        children[1].observe(seconds)

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
            info |= {"intra_op_threads": str(threads.intra_op), "spinning": "true" if threads.spinning else "false"}
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
        """The StatsRecorder for one model version's engine."""
        return ModelStatsRecorder(self, model, str(version))

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


class ModelStatsRecorder:
    """The engine's StatsRecorder for one model version: plain stats in, Prometheus metrics out.

    Label children are resolved once here, so each callback is a handful of float additions.
    Called by the engine (see StatsRecorder for which thread calls what).
    """

    def __init__(self, metrics: ServerMetrics, model: str, version: str) -> None:
        labels = (model, version)
        self._queue_wait = metrics.queue_wait.labels(*labels)
        self._first_token = metrics.time_to_first_token.labels(*labels)
        self._inter_token = metrics.inter_token_latency.labels(*labels)
        self._duration = metrics.engine_request_duration.labels(*labels)
        self._generated = metrics.generated_tokens.labels(*labels)
        self._source = metrics.source_tokens.labels(*labels)
        self._finished = {reason: metrics.finished.labels(model, version, reason.value) for reason in FinishReason}
        self._decoder_batch = metrics.decoder_batch.labels(*labels)
        self._decoder_step = metrics.decoder_step_duration.labels(*labels)
        self._decoder_steps = metrics.decoder_steps.labels(*labels)
        self._encoder_batch = metrics.encoder_batch.labels(*labels)
        self._encoder_duration = metrics.encoder_duration.labels(*labels)

    def on_step(self, stats: StepStats) -> None:
        if stats.encoder_batch > 0:
            self._encoder_batch.observe(stats.encoder_batch)
            self._encoder_duration.observe(stats.encode_seconds)
        if stats.rows > 0:
            self._decoder_batch.observe(stats.rows)
            self._decoder_step.observe(stats.step_seconds)
            self._decoder_steps.inc()

    def on_request_done(self, stats: RequestStats) -> None:
        self._queue_wait.observe(stats.queue_wait_s)
        self._first_token.observe(stats.first_token_s)
        if stats.mean_inter_token_s is not None:
            self._inter_token.observe(stats.mean_inter_token_s)
        self._duration.observe(stats.total_s)
        self._generated.inc(stats.generated_tokens)
        self._source.inc(stats.source_tokens)
        self._finished[stats.finish_reason].inc()

    def on_request_failed(self, reason: FinishReason) -> None:
        self._finished[reason].inc()
