"""Clients that misbehave, one kind at a time, while a well-behaved client measures its latency, and the server's
memory: what each costs the clients that behave.

    python -m loadtests.reliability.misbehaving                      # models/, one process
    python -m loadtests.reliability.misbehaving --seconds 10 -- --frontends 1
    python -m loadtests.reliability.misbehaving --proxy nghttpx      # the gRPC port behind nghttpx
    python -m loadtests.reliability.misbehaving --server noop        # a bare grpc.aio server: gRPC's own share
    python -m loadtests.reliability.misbehaving --phases resets      # the baseline, the resets, the after phase

Phases, each `--seconds` long (loopback only, every count bounded):
- baseline: nobody else;
- idle connections: `--idle` (2,000) connections that sent the HTTP/2 preface and their settings, then nothing;
- never-reading streams: `--silent-connections` connections with a flow-control window of 0, each opening
  `--silent-streams` Translate calls whose answers (8 texts with attention) they never read;
- trickled requests: `--trickle` connections each sending a Translate call one byte a second, and as many HTTP
  requests trickling their body the same way (the server bounds those with http_body_timeout_seconds);
- oversized metadata: calls carrying 64 KiB of metadata, one after another (gRPC core's limit is 16 KiB);
- streams opened and reset: streams opened and at once cancelled (RST_STREAM), in a loop, on one connection after
  another as the server closes them (the HTTP/2 "rapid reset" pattern), at most `--resets`.

With `--proxy nghttpx` every gRPC client, the well-behaved one too, connects through nghttpx (nghttp2's HTTP/2
proxy, Debian's nghttp2-proxy) on a loopback port in front of the server's gRPC port: the deployment
docs/reliability.md advises where clients you do not control connect. nghttp2 limits the streams a client may reset
(a burst of 1,000, then 33 a second) and closes a connection past that, which gRPC core cannot do. The HTTP
requests of the trickle phase still go to the server's HTTP port.

With `--server noop` the same clients meet the RPC ceiling (loadtests.noop_server) instead: grpc.aio with gRPC core's
limits as attnserve sets them and none of attnserve's code, answering each Translate at once (it has no HTTP port;
the trickle phase sends gRPC calls only). What a phase costs the well-behaved client there is what it costs gRPC
itself.

The well-behaved client calls Translate one call at a time (a new call 20 ms after the last answer) on its own
connection, from a process of its own. Printed per phase: what the misbehaving clients did, the well-behaved
client's statuses, p50 and p99 (and p99 against the baseline's), and the server's resident memory (all its
processes) before, at most during, and after. Exits 1 when a well-behaved call ended otherwise than OK or
RESOURCE_EXHAUSTED, or the server stopped answering.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import multiprocessing
import multiprocessing.connection
import multiprocessing.synchronize
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from loadtests.procfs import rss_bytes
from loadtests.reliability import raw_http2 as h2
from loadtests.reliability.common import MemorySampler, percentile, repository_or_smoke
from loadtests.servers import attnserve_server, free_port, noop_server
from service.gen.attnserve.v1 import translator_pb2 as pb
from service.gen.attnserve.v1 import translator_pb2_grpc as pb_grpc

TRANSLATE = "/attnserve.v1.Translator/Translate"
PROBE_TEXT = "3 mars 1999"
PROBE_GAP_S = 0.02
MISBEHAVIOURS = ("idle", "silent", "trickle", "metadata", "resets")
"""The phases' names for --phases, in the order they run."""


@dataclass
class Phase:
    """One phase's figures."""

    name: str
    did: str = ""
    codes: collections.Counter[str] = field(default_factory=collections.Counter)
    latencies: list[float] = field(default_factory=list)
    rss_before: int = 0
    rss_peak: int = 0
    rss_after: int = 0

    @property
    def p50_ms(self) -> float:
        return 1e3 * percentile(self.latencies, 50)

    @property
    def p99_ms(self) -> float:
        return 1e3 * percentile(self.latencies, 99)


class Probe:
    """The well-behaved client: one Translate call at a time, each with a 30 s deadline, until stopped.

    It runs in a process of its own, as a real client would. In this one it would share the interpreter lock with
    the misbehaving clients: a thread whose call has returned waits for the lock, up to the interpreter's switch
    interval (5 ms) while a flooding loop holds it, and that wait would be counted as the server's."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.codes: collections.Counter[str] = collections.Counter()
        self.latencies: list[float] = []
        context = multiprocessing.get_context("spawn")  # no grpc state inherited across fork
        self._stop = context.Event()
        self._ready = context.Event()
        self._results, child_end = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_probe_main, args=(address, self._ready, self._stop, child_end), name="probe", daemon=True
        )

    def __enter__(self) -> Probe:
        self._process.start()
        if not self._ready.wait(60):
            self._process.kill()
            raise RuntimeError(f"the well-behaved client could not connect to {self.address} within 60 s")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._results.poll(60):
            codes, self.latencies = self._results.recv()
            self.codes = collections.Counter(codes)
        self._process.join(10)


def _probe_main(
    address: str,
    ready: multiprocessing.synchronize.Event,
    stop: multiprocessing.synchronize.Event,
    results: multiprocessing.connection.Connection,
) -> None:
    """The probe process: connect, say so, call until told to stop, send back its statuses and latencies."""
    request = pb.TranslateRequest(model="dates", texts=[PROBE_TEXT])
    codes: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        stub = pb_grpc.TranslatorStub(channel)
        ready.set()
        while not stop.is_set():
            started = time.perf_counter()
            try:
                stub.Translate(request, timeout=30)
                codes["OK"] += 1
            except grpc.RpcError as error:
                codes[error.code().name] += 1
            latencies.append(time.perf_counter() - started)
            stop.wait(PROBE_GAP_S)
    results.send((dict(codes), latencies))


# ----- the misbehaving clients ----------------------------------------------------------------------------------


class IdleConnections:
    """`count` connections that sent the HTTP/2 preface and their settings, then nothing: opened before the phase's
    well-behaved calls begin (opening them is not what is measured), held through the phase."""

    def __init__(self, address: str, count: int) -> None:
        self.address = address
        self.count = count
        self.sockets: list[socket.socket] = []
        self.open_seconds = 0.0

    def open(self) -> None:
        started = time.perf_counter()
        self.sockets = [h2.connect(self.address) for _ in range(self.count)]
        self.open_seconds = time.perf_counter() - started

    def hold(self, seconds: float) -> str:
        try:
            time.sleep(seconds)
            alive = sum(1 for sock in self.sockets if _still_open(sock))
        finally:
            for sock in self.sockets:
                sock.close()
        return (
            f"{len(self.sockets):,} idle connections (opened in {self.open_seconds:.1f} s before the phase), "
            f"{alive:,} still open at the end"
        )


def silent_streams(address: str, connections: int, streams: int, seconds: float) -> str:
    """Connections with a receive window of 0 that open calls with large answers and never read a byte."""
    request = pb.TranslateRequest(
        model="dates",
        texts=[PROBE_TEXT] * 8,
        options=pb.DecodeOptions(beam_size=4, num_hypotheses=4, return_attention=True),
    )
    body = h2.grpc_message(request.SerializeToString())
    sockets = []
    try:
        for _ in range(connections):
            sock = h2.connect(address, initial_window=0)
            sock.sendall(
                b"".join(
                    h2.frame(h2.HEADERS, h2.END_HEADERS, stream, h2.grpc_headers(address, TRANSLATE))
                    + h2.frame(h2.DATA, h2.END_STREAM, stream, body)
                    for stream in range(1, 2 * streams, 2)
                )
            )
            sockets.append(sock)
        time.sleep(seconds)
    finally:
        for sock in sockets:
            sock.close()
    return f"{connections} connections x {streams} calls (8 texts, beam 4, attention), answers never read"


def trickled_requests(address: str, http_address: str, count: int, seconds: float) -> str:
    """gRPC calls and HTTP requests whose bytes arrive one a second."""
    request = h2.grpc_message(pb.TranslateRequest(model="dates", texts=[PROBE_TEXT]).SerializeToString())
    grpc_bytes = h2.frame(h2.HEADERS, h2.END_HEADERS, 1, h2.grpc_headers(address, TRANSLATE)) + h2.frame(
        h2.DATA, h2.END_STREAM, 1, request
    )
    body = b'{"texts": ["3 mars 1999"]}'
    http_bytes = (
        f"POST /v1/translate HTTP/1.1\r\nHost: {http_address}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    sockets = [(h2.connect(address), grpc_bytes) for _ in range(count)]
    if http_address:
        host, port = http_address.rsplit(":", 1)
        sockets += [(socket.create_connection((host, int(port))), http_bytes) for _ in range(count)]
    sent = 0
    closed_by_server = 0
    try:
        for second in range(int(seconds)):
            for sock, data in sockets:
                if second < len(data):
                    try:
                        sock.sendall(data[second : second + 1])
                        sent += 1
                    except OSError:
                        closed_by_server += 1
            time.sleep(1.0)
    finally:
        for sock, _ in sockets:
            sock.close()
    kinds = "gRPC calls and as many HTTP requests" if http_address else "gRPC calls"
    return f"{count} {kinds}, a byte a second ({sent:,} bytes sent; {closed_by_server} writes refused)"


def oversized_metadata(address: str, seconds: float) -> str:
    codes: collections.Counter[str] = collections.Counter()
    deadline = time.monotonic() + seconds
    big = ("x-padding", "x" * 65536)
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.TranslatorStub(channel)
        while time.monotonic() < deadline:
            try:
                stub.Translate(pb.TranslateRequest(texts=[PROBE_TEXT]), metadata=[big], timeout=10)
                codes["OK"] += 1
            except grpc.RpcError as error:
                codes[error.code().name] += 1
    return "calls with 64 KiB of metadata: " + ", ".join(f"{code} {n:,}" for code, n in sorted(codes.items()))


def reset_streams(address: str, most: int, seconds: float) -> str:
    """Streams opened and cancelled at once, in batches of 100 per write; a new connection whenever the server
    closes one."""
    headers = h2.grpc_headers(address, TRANSLATE)
    deadline = time.monotonic() + seconds
    resets = connections = closed = 0
    while resets < most and time.monotonic() < deadline:
        sock = h2.connect(address)
        connections += 1
        drain = _Drainer(sock)
        stream = 1
        try:
            while resets < most and time.monotonic() < deadline and stream < 2**31 - 200:
                batch = b"".join(
                    h2.frame(h2.HEADERS, h2.END_HEADERS, sid, headers)
                    + h2.frame(h2.RST_STREAM, 0, sid, h2.CANCEL.to_bytes(4, "big"))
                    for sid in range(stream, stream + 200, 2)
                )
                sock.sendall(batch)
                stream += 200
                resets += 100
                if drain.closed:
                    break
        except OSError:
            pass
        closed += drain.closed or not _still_open(sock)
        sock.close()
    return f"{resets:,} streams opened and reset on {connections} connections ({closed} closed by the server)"


PROXY_CONF = Path(__file__).resolve().parents[2] / "deploy" / "proxy" / "nghttpx.conf"
"""The proxy's configuration as shipped."""


@contextlib.contextmanager
def nghttpx_in_front(backend: str, work: Path) -> Iterator[tuple[str, int]]:
    """nghttpx with the shipped configuration (PROXY_CONF), on a free loopback port, proxying to `backend`
    (host:port), its log in `work`. Yields its address and pid once it accepts connections."""
    port = free_port()
    host, backend_port = backend.rsplit(":", 1)
    addresses = [f"--frontend=127.0.0.1,{port};no-tls", f"--backend={host},{backend_port};;proto=h2"]
    # One process to watch and stop: by default a parent process that only supervises starts the one that works.
    command = [
        "nghttpx",
        f"--conf={PROXY_CONF}",
        "--single-process",
        *addresses,
        f"--errorlog-file={work / 'nghttpx.log'}",
    ]
    output = work / "nghttpx.out"  # what it prints before its log is open (a configuration it cannot read)
    with output.open("wb") as printed:
        process = subprocess.Popen(command, stdout=printed, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 10
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"nghttpx exited with status {process.returncode}; see {output} and {work / 'nghttpx.log'}"
                )
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                if process.poll() is None:  # it, and not something else that took the port meanwhile
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"nghttpx did not listen on {address} within 10 s")
            time.sleep(0.05)
        yield address, process.pid
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class _Drainer:
    """Reads and drops whatever the server sends on a socket (so its writes never block), noting when it closes."""

    def __init__(self, sock: socket.socket) -> None:
        self.closed = False
        self._sock = sock
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        with contextlib.suppress(OSError):
            while self._sock.recv(1 << 16):
                pass
        self.closed = True


def _still_open(sock: socket.socket) -> bool:
    """True unless the server has closed its side (a pending read of 0 bytes)."""
    sock.setblocking(False)
    try:
        while True:
            if not sock.recv(1 << 16):
                return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


# ----- the run --------------------------------------------------------------------------------------------------


def run_phase(
    name: str,
    address: str,
    pids: tuple[int, ...],
    misbehave: Callable[[], str],
    prepare: Callable[[], None] | None = None,
) -> Phase:
    """`prepare()`, then `misbehave()` (which says what it did) while the well-behaved client calls. Memory: the
    RSS of `pids` together (the server, and the proxy in front of it if any); the peak adds each one's peak."""
    phase = Phase(name, rss_before=sum(rss_bytes(pid) for pid in pids))
    samplers = [MemorySampler(pid, interval_s=0.5).start() for pid in pids]
    if prepare is not None:
        prepare()
    with Probe(address) as probe:
        phase.did = misbehave()
    for sampler in samplers:
        sampler.stop()
    phase.codes, phase.latencies = probe.codes, probe.latencies
    phase.rss_peak = max(phase.rss_before, sum(max(value for _, value in s.samples) for s in samplers if s.samples))
    phase.rss_after = sum(rss_bytes(pid) for pid in pids)
    return phase


@contextlib.contextmanager
def _more_files(needed: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed <= hard or (hard == resource.RLIM_INFINITY and soft < needed):
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    yield


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.reliability.misbehaving", description=__doc__)
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase (default 10)")
    parser.add_argument("--idle", type=int, default=2000, help="idle connections (default 2000)")
    parser.add_argument("--silent-connections", type=int, default=20, help="never-reading connections (default 20)")
    parser.add_argument("--silent-streams", type=int, default=100, help="calls on each (default 100)")
    parser.add_argument("--trickle", type=int, default=50, help="trickled gRPC calls, and HTTP requests (default 50)")
    parser.add_argument("--resets", type=int, default=5_000_000, help="most streams opened and reset (default 5000000)")
    parser.add_argument(
        "--phases",
        type=lambda text: [part.strip() for part in text.split(",") if part.strip()],
        default=list(MISBEHAVIOURS),
        help=f"the misbehaviours to run, between the baseline and the after phase (default all: "
        f"{','.join(MISBEHAVIOURS)})",
    )
    parser.add_argument("--work", type=Path, default=Path("build/misbehaving"), help="server logs")
    parser.add_argument(
        "--proxy", choices=["none", "nghttpx"], default="none", help="what the gRPC clients connect through"
    )
    parser.add_argument(
        "--server",
        choices=["attnserve", "noop"],
        default="attnserve",
        help="what the clients meet: attnserve on --repository, or the RPC ceiling, a bare grpc.aio server",
    )
    parser.add_argument("server_args", nargs="*", help="extra flags of the server (after --)")
    args = parser.parse_args(argv)
    unknown = set(args.phases) - set(MISBEHAVIOURS)
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}: choose among {', '.join(MISBEHAVIOURS)}")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.server == "noop":
        server = noop_server(args.work, extra=tuple(args.server_args))
    else:
        server = attnserve_server(
            repository_or_smoke(args.repository),
            batching="continuous",
            threads=1,
            provider="cpu",
            log_dir=args.work,
            extra=tuple(args.server_args),
            label="misbehaving",
            http=True,
        )
    if args.proxy == "nghttpx" and shutil.which("nghttpx") is None:
        parser.error("--proxy nghttpx needs nghttpx: apt-get install nghttp2-proxy (Debian, Ubuntu)")
    seconds = args.seconds
    with _more_files(args.idle + 1000), server, contextlib.ExitStack() as proxy:
        assert server.process is not None
        address = server.address
        pids: tuple[int, ...] = (server.process.pid,)
        if args.proxy == "nghttpx":
            address, proxy_pid = proxy.enter_context(nghttpx_in_front(server.address, args.work))
            pids += (proxy_pid,)
            print(f"gRPC clients connect through nghttpx (pid {proxy_pid}) on {address}", flush=True)
        idle = IdleConnections(address, args.idle)
        misbehaviours: dict[str, tuple[str, Callable[[], str], Callable[[], None] | None]] = {
            "idle": ("idle connections", lambda: idle.hold(seconds), idle.open),
            "silent": (
                "never-reading streams",
                lambda: silent_streams(address, args.silent_connections, args.silent_streams, seconds),
                None,
            ),
            "trickle": (
                "trickled requests",
                lambda: trickled_requests(address, server.http_address, args.trickle, seconds),
                None,
            ),
            "metadata": ("oversized metadata", lambda: oversized_metadata(address, seconds), None),
            "resets": ("streams opened and reset", lambda: reset_streams(address, args.resets, seconds), None),
        }

        def quiet() -> str:
            time.sleep(seconds)
            return "nothing else"

        phases = [run_phase("baseline", address, pids, quiet)]
        for key in [key for key in MISBEHAVIOURS if key in args.phases]:  # always in that order
            name, misbehave, prepare = misbehaviours[key]
            phases.append(run_phase(name, address, pids, misbehave, prepare))
        phases.append(run_phase("after", address, pids, quiet))
    baseline = phases[0].p99_ms
    print(
        "\n| phase | what the misbehaving clients did | well-behaved calls | p50 ms | p99 ms | p99 / baseline "
        "| RSS MB before / peak / after (server, and proxy) |"
    )
    print("|---|---|---|---:|---:|---:|---|")
    for phase in phases:
        codes = ", ".join(f"{code} {n:,}" for code, n in sorted(phase.codes.items()))
        print(
            f"| {phase.name} | {phase.did} | {codes} | {phase.p50_ms:.1f} | {phase.p99_ms:.1f} | "
            f"{phase.p99_ms / baseline:.2f} | {phase.rss_before / 2**20:.0f} / {phase.rss_peak / 2**20:.0f} / "
            f"{phase.rss_after / 2**20:.0f} |"
        )
    clean = all(set(phase.codes) <= {"OK", "RESOURCE_EXHAUSTED"} and phase.codes for phase in phases)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
