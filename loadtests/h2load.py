"""h2load (Debian's nghttp2-client), a C HTTP/2 and HTTP/1.1 load generator, driving unary calls at a server.

A Python client process spends more CPU per call than a lean server does, so on a small machine it, not the
server, sets the figure; h2load does not. It sends one request body over and over: a gRPC call
(`grpc_body`, HTTP/2) or a JSON POST (HTTP/1.1). What it reports, and what is read from it here:

- its summary line, `requests: T total, S started, D done, OK succeeded, F failed, E errored, 0 timeout`:
  `succeeded` counts every answer with an HTTP 2xx or 3xx status, whatever its grpc-status (a gRPC error is an
  HTTP 200 with the status in the trailers); `errored` counts streams reset without an answer;
- its per-request log (`--log-file`): start time, HTTP status and microseconds to the end of the answer, one
  line per request of the measurement window (the warm-up's requests are not logged).

Closed loop: `connections` x `streams` calls in flight, a new call as soon as one ends. Open loop: each
connection starts `rate_per_connection` calls per second, whatever the server does (at most `streams` in
flight on it). Loopback only: the callers pass the server's 127.0.0.1 address.
"""

from __future__ import annotations

import resource
import shutil
import statistics
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from service.gen.attnserve.v1 import translator_pb2 as pb

GRPC_PATH = "/attnserve.v1.Translator/Translate"
HTTP_PATH = "/v1/translate"
#: Connections at most for a closed loop: enough that one connection's flow control never limits it.
MOST_CONNECTIONS = 8
MISSING = "h2load is missing: install Debian's nghttp2-client (`make h2load-tools`, or apt-get install nghttp2-client)"


def available() -> bool:
    return shutil.which("h2load") is not None


def grpc_body(request: pb.TranslateRequest) -> bytes:
    """The HTTP/2 DATA of a unary gRPC call: an uncompressed length-prefixed message."""
    message = request.SerializeToString()
    return b"\x00" + struct.pack(">I", len(message)) + message


def closed_loop_shape(in_flight: int, most_connections: int = MOST_CONNECTIONS) -> tuple[int, int]:
    """(connections, streams per connection) that keep exactly `in_flight` calls in flight: the most
    connections up to `most_connections` that divide it evenly."""
    if in_flight < 1:
        raise ValueError(f"in_flight must be >= 1, got {in_flight}")
    connections = max(count for count in range(1, min(in_flight, most_connections) + 1) if in_flight % count == 0)
    return connections, in_flight // connections


@dataclass(frozen=True)
class H2loadSummary:
    """h2load's `requests:` line."""

    done: int
    succeeded: int
    failed: int
    errored: int


def parse_summary(output: str) -> H2loadSummary:
    """The `requests:` line of h2load's output; raises ValueError when there is none (h2load did not run)."""
    line = next((line for line in output.splitlines() if line.startswith("requests:")), None)
    if line is None:
        raise ValueError(f"no 'requests:' line in h2load's output:\n{output[-2000:]}")
    fields = line.replace(",", "").split()
    counts = {name: int(value) for value, name in zip(fields[1::2], fields[2::2], strict=False)}
    return H2loadSummary(counts["done"], counts["succeeded"], counts["failed"], counts["errored"])


def answered_latencies(log_text: str) -> tuple[float, ...]:
    """Seconds of each answered request (HTTP 2xx) of h2load's per-request log."""
    latencies = []
    for line in log_text.splitlines():
        fields = line.split("\t")
        if len(fields) >= 3 and fields[1].startswith("2"):
            latencies.append(int(fields[2]) / 1e6)
    return tuple(latencies)


@dataclass(frozen=True)
class H2loadRun:
    """What one h2load run saw in its measurement window: calls answered (HTTP 2xx, whatever the grpc-status),
    calls that failed or were reset, the window's seconds, each answered call's time, and the CPU seconds h2load
    itself used (warm-up included)."""

    answered: int
    failed: int
    errored: int
    seconds: float
    latencies_s: tuple[float, ...]
    client_cpu_s: float = 0.0

    @property
    def calls_per_s(self) -> float:
        return self.answered / self.seconds if self.seconds > 0 else 0.0

    @property
    def p50_ms(self) -> float:
        return 1e3 * statistics.median(self.latencies_s) if self.latencies_s else float("nan")


def command(
    address: str,
    body: Path,
    log_file: Path | None,
    *,
    connections: int,
    streams: int,
    seconds: float,
    warmup_s: float,
    rate_per_connection: int | None = None,
    http1: bool = False,
) -> list[str]:
    """The h2load command line: gRPC's `Translate` over HTTP/2, or with `http1` the JSON API over HTTP/1.1; each
    request logged to `log_file` when given."""
    if http1:
        target, headers = f"http://{address}{HTTP_PATH}", ["-H", "content-type: application/json", "--h1"]
    else:
        target, headers = f"http://{address}{GRPC_PATH}", ["-H", "content-type: application/grpc", "-H", "te: trailers"]
    line = ["h2load", target, "-d", str(body), *headers, "-c", str(connections), "-m", str(streams)]
    line += ["-D", _duration(seconds)]
    if warmup_s > 0:
        line.append(f"--warm-up-time={_duration(warmup_s)}")
    if log_file is not None:
        line.append(f"--log-file={log_file}")
    if rate_per_connection is not None:
        line.append(f"--rps={rate_per_connection}")
    return line


class H2loadProcess:
    """One h2load run in the background: `start()`, then `wait()` for its figures."""

    def __init__(self, arguments: list[str], scratch: tempfile.TemporaryDirectory, log_file: Path, seconds: float):
        self._arguments = arguments
        self._scratch = scratch
        self._log_file = log_file
        self._seconds = seconds
        self._process: subprocess.Popen[str] | None = None
        self._children_cpu_before = 0.0

    def start(self) -> H2loadProcess:
        self._children_cpu_before = _children_cpu_s()
        self._process = subprocess.Popen(self._arguments, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return self

    def wait(self, timeout_s: float) -> H2loadRun:
        """h2load's figures once it ends; raises RuntimeError when it fails or overruns `timeout_s` (then it is
        killed)."""
        assert self._process is not None, "start() first"
        try:
            output, _ = self._process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.communicate()
            self._scratch.cleanup()
            raise RuntimeError(f"h2load ran past {timeout_s:.0f} s: {' '.join(self._arguments)}") from None
        # h2load is the only child reaped here, so the children's CPU grew by its CPU alone.
        client_cpu = _children_cpu_s() - self._children_cpu_before
        try:
            if self._process.returncode != 0:
                raise RuntimeError(f"h2load exited with {self._process.returncode}:\n{output[-2000:]}")
            summary = parse_summary(output)
            latencies = answered_latencies(self._log_file.read_text()) if self._log_file.exists() else ()
        finally:
            self._scratch.cleanup()
        return H2loadRun(
            answered=summary.succeeded,
            failed=summary.failed,
            errored=summary.errored,
            seconds=self._seconds,
            latencies_s=latencies,
            client_cpu_s=client_cpu,
        )


def start(
    address: str,
    body: Path,
    *,
    connections: int,
    streams: int,
    seconds: float,
    warmup_s: float = 1.0,
    rate_per_connection: int | None = None,
    http1: bool = False,
) -> H2loadProcess:
    """Start h2load against `address` for `warmup_s` + `seconds` (see `command`); `wait()` for its figures."""
    scratch = tempfile.TemporaryDirectory(prefix="h2load-")
    log_file = Path(scratch.name) / "requests.tsv"
    arguments = command(
        address,
        body,
        log_file,
        connections=connections,
        streams=streams,
        seconds=seconds,
        warmup_s=warmup_s,
        rate_per_connection=rate_per_connection,
        http1=http1,
    )
    return H2loadProcess(arguments, scratch, log_file, seconds).start()


def run(
    address: str,
    body: Path,
    *,
    connections: int,
    streams: int,
    seconds: float,
    warmup_s: float = 1.0,
    rate_per_connection: int | None = None,
    http1: bool = False,
) -> H2loadRun:
    """Run h2load to its end (see `start`)."""
    process = start(
        address,
        body,
        connections=connections,
        streams=streams,
        seconds=seconds,
        warmup_s=warmup_s,
        rate_per_connection=rate_per_connection,
        http1=http1,
    )
    return process.wait(timeout_s=warmup_s + seconds + 60)


def _duration(seconds: float) -> str:
    """h2load's duration syntax takes whole numbers with a unit: milliseconds here."""
    return f"{max(1, round(seconds * 1000))}ms"


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
