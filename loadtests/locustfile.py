"""Locust load test of attnserve's native gRPC API (attnserve.v1.Translator).

Each simulated user sends a mix of calls, drawn by weight: unary greedy Translate, unary beam-search
Translate, and greedy TranslateStream (whose time to first token is reported as an entry of its own).
Every call is reported to Locust with its latency, its response size and, for failures, its gRPC status
code. Texts come from a workload file of realistic, mixed-length texts (see loadtests/workload.py); when
the file is missing, one is generated for the models the server serves.

    locust -f loadtests/locustfile.py --headless --host 127.0.0.1:50051 -u 16 -r 4 -t 30s \\
        --workload build/loadtest/workload.jsonl --max-fail-ratio 0.01 --max-p99-ms 2000

`make loadtest` wraps this (and can start a server); see docs/benchmarks.md. The process exits with
status 1 when the failure ratio or the p99 latency of all calls is over its threshold.
"""

from __future__ import annotations

# gRPC's C core must cooperate with gevent's event loop before any channel exists.
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import logging  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import grpc  # noqa: E402
from locust import User, between, events, task  # noqa: E402
from locust.env import Environment  # noqa: E402

from loadtests.workload import WorkloadItem, build_workload, read_workload, write_workload  # noqa: E402
from service.gen.attnserve.v1 import translator_pb2 as pb  # noqa: E402
from service.gen.attnserve.v1 import translator_pb2_grpc as pb_grpc  # noqa: E402

log = logging.getLogger("attnserve.locust")

DEFAULT_WORKLOAD = Path("build/loadtest/workload.jsonl")
CALL_KINDS = ("greedy", "beam", "stream")


class GrpcCallFailed(Exception):
    """A call that ended with a non-OK status; Locust groups failures by this message (the status code first)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code

    def __repr__(self) -> str:  # Locust files failures under repr(error): keep the status code first
        return str(self)


@events.init_command_line_parser.add_listener
def _arguments(parser) -> None:
    group = parser.add_argument_group("attnserve")
    group.add_argument(
        "--workload",
        type=str,
        default=str(DEFAULT_WORKLOAD),
        help="JSON Lines workload file; generated for the served models when missing",
    )
    group.add_argument("--greedy-weight", type=float, default=6.0, help="weight of unary greedy Translate calls")
    group.add_argument("--beam-weight", type=float, default=2.0, help="weight of unary beam-search Translate calls")
    group.add_argument("--stream-weight", type=float, default=2.0, help="weight of greedy TranslateStream calls")
    group.add_argument("--beam-size", type=int, default=4, help="beam width of the beam calls")
    group.add_argument("--call-timeout", type=float, default=30.0, help="deadline of each call, seconds")
    group.add_argument(
        "--max-fail-ratio",
        type=float,
        default=0.01,
        help="exit with status 1 when the share of failed calls is above this (0 = none allowed)",
    )
    group.add_argument(
        "--max-p99-ms",
        type=float,
        default=0.0,
        help="exit with status 1 when the p99 latency of all calls is above this (0 = no check)",
    )


def grpc_target(host: str) -> str:
    """Locust's --host as a gRPC target: 'grpc://h:p', 'http://h:p' and 'h:p' all become 'h:p'."""
    for scheme in ("grpc://", "http://", "https://"):
        if host.startswith(scheme):
            return host[len(scheme) :].rstrip("/")
    return host.rstrip("/")


def served_models(target: str, timeout_s: float = 30.0) -> dict[str, str]:
    """Model name -> task kind, from the server's ListModels."""
    with grpc.insecure_channel(target) as channel:
        reply = pb_grpc.TranslatorStub(channel).ListModels(pb.ListModelsRequest(), timeout=timeout_s)
    return {model.name: model.task.kind for model in reply.models}


def load_items(path: Path, models: dict[str, str]) -> list[WorkloadItem]:
    """The workload items for the served models: read from `path`, or generated and written there."""
    if path.is_file():
        items = [item for item in read_workload(path) if item.model in models]
        if not items:
            raise ValueError(f"{path} has no text for the served models {sorted(models)}")
        return items
    items = build_workload(models)
    if not items:
        raise ValueError(f"cannot generate texts for the served models {models}; give --workload FILE")
    write_workload(path, items)
    log.info("wrote a workload of %d texts for %s to %s", len(items), ", ".join(sorted(models)), path)
    return items


class Workload:
    """Shared by every user of this process: the texts and the weighted call mix."""

    items: list[WorkloadItem] = []
    kinds: list[str] = []
    weights: list[float] = []


@events.init.add_listener
def _load_workload(environment: Environment, **_kwargs) -> None:
    # At init, before the run's clock starts: generating a workload takes a few seconds of CPU.
    options = environment.parsed_options
    if options is None:  # used as a library without Locust's command line
        return
    target = grpc_target(environment.host or "")
    models = served_models(target)
    Workload.items = load_items(Path(options.workload), models)
    Workload.kinds = list(CALL_KINDS)
    Workload.weights = [max(0.0, options.greedy_weight), max(0.0, options.beam_weight), max(0.0, options.stream_weight)]
    if sum(Workload.weights) <= 0:
        raise ValueError("every call weight is 0: nothing to send")
    log.info(
        "%d texts for %d models; call mix greedy/beam/stream = %s",
        len(Workload.items),
        len({item.model for item in Workload.items}),
        Workload.weights,
    )


@events.quitting.add_listener
def _check_thresholds(environment: Environment, **_kwargs) -> None:
    options = environment.parsed_options
    assert options is not None  # parsed before any test starts
    total = environment.stats.total
    problems = []
    if total.num_requests == 0:
        problems.append("no call was made")
    elif total.fail_ratio > options.max_fail_ratio:
        problems.append(f"failure ratio {total.fail_ratio:.4f} > {options.max_fail_ratio}")
    if options.max_p99_ms > 0 and total.num_requests:
        p99 = total.get_response_time_percentile(0.99)
        if p99 > options.max_p99_ms:
            problems.append(f"p99 latency {p99:.0f} ms > {options.max_p99_ms:g} ms")
    if problems:
        log.error("load test failed its thresholds: %s", "; ".join(problems))
        environment.process_exit_code = 1


class TranslatorUser(User):
    """One client of the Translator service with its own channel."""

    wait_time = between(0.0, 0.05)

    def on_start(self) -> None:
        self.target = grpc_target(self.environment.host or "")
        self.channel = grpc.insecure_channel(self.target)
        self.stub = pb_grpc.TranslatorStub(self.channel)
        self.options = self.environment.parsed_options

    def on_stop(self) -> None:
        self.channel.close()

    @task
    def call(self) -> None:
        kind = random.choices(Workload.kinds, Workload.weights)[0]
        item = random.choice(Workload.items)
        if kind == "stream":
            self.translate_stream(item)
        else:
            self.translate(item, beam_size=self.options.beam_size if kind == "beam" else 0)

    def _report(self, name: str, started: float, length: int, error: Exception | None, item: WorkloadItem) -> None:
        self.environment.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - started) * 1000.0,
            response_length=length,
            exception=error,
            context={"model": item.model},
        )

    def translate(self, item: WorkloadItem, beam_size: int) -> None:
        name = f"Translate {item.model} " + (f"beam{beam_size}" if beam_size > 1 else "greedy")
        request = pb.TranslateRequest(
            model=item.model, texts=[item.text], options=pb.DecodeOptions(beam_size=beam_size)
        )
        started = time.perf_counter()
        try:
            response = self.stub.Translate(request, timeout=self.options.call_timeout)
        except grpc.RpcError as error:
            self._report(name, started, 0, GrpcCallFailed(error.code(), error.details() or ""), item)
            return
        self._report(name, started, response.ByteSize(), None, item)

    def translate_stream(self, item: WorkloadItem) -> None:
        name = f"TranslateStream {item.model}"
        request = pb.TranslateRequest(model=item.model, texts=[item.text])
        started = time.perf_counter()
        received = 0
        first_reported = False
        final_seen = False
        try:
            for message in self.stub.TranslateStream(request, timeout=self.options.call_timeout):
                received += message.ByteSize()
                if not first_reported:
                    self._report(f"{name} (first token)", started, message.ByteSize(), None, item)
                    first_reported = True
                final_seen = final_seen or message.final
        except grpc.RpcError as error:
            self._report(name, started, received, GrpcCallFailed(error.code(), error.details() or ""), item)
            return
        incomplete = (
            None if final_seen else GrpcCallFailed(grpc.StatusCode.UNKNOWN, "the stream ended without a final message")
        )
        self._report(name, started, received, incomplete, item)
