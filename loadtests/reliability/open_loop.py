"""Open-loop overload with h2load: calls offered at a fixed rate, whatever the server does, and where each ended.

    python -m loadtests.reliability.open_loop --rate 3000 --seconds 10      # against the default models

h2load (Debian's nghttp2-client: a C HTTP/2 load generator, so the offered rate does not depend on Python)
sends the same `Translate` call at `--rate` calls/s for `--seconds` from 30 connections, while a Python
client sends `--probes` calls spread over the same window and records each call's status. Afterwards the
server's own counters (`attnserve_requests_total`) are compared with what h2load completed: a call that
h2load completed but no counter saw was failed by gRPC core before it reached the server's code. The server
must then still translate. Prints the figures; exits 1 when a probe ended CANCELLED or calls went unseen.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import grpc

from loadtests.servers import attnserve_server, scrape
from service.gen.attnserve.v1 import translator_pb2 as pb
from service.gen.attnserve.v1 import translator_pb2_grpc as pb_grpc

CONNECTIONS = 30
TEXT = "samedi 21 novembre 2026"


def grpc_body(request: pb.TranslateRequest) -> bytes:
    """The HTTP/2 DATA of a unary gRPC call: an uncompressed length-prefixed message."""
    message = request.SerializeToString()
    return b"\x00" + struct.pack(">I", len(message)) + message


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.reliability.open_loop", description=__doc__)
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--rate", type=int, default=3000, help="calls/s offered (default 3000)")
    parser.add_argument("--seconds", type=int, default=10, help="how long (default 10)")
    parser.add_argument("--probes", type=int, default=300, help="calls of the Python client (default 300)")
    parser.add_argument("--work", type=Path, default=Path("build/open-loop"), help="body file and server log")
    parser.add_argument("server_args", nargs="*", help="extra `attnserve serve` flags (after --)")
    args = parser.parse_args(argv)
    if shutil.which("h2load") is None:
        parser.error("h2load is missing: install Debian's nghttp2-client")
    args.work.mkdir(parents=True, exist_ok=True)
    body = args.work / "translate.bin"
    body.write_bytes(grpc_body(pb.TranslateRequest(model="dates", texts=[TEXT])))
    with attnserve_server(
        args.repository,
        batching="continuous",
        threads=1,
        provider="cpu",
        log_dir=args.work,
        extra=tuple(args.server_args),
        label="open-loop",
    ) as server:
        assert server.metrics_url is not None
        before = _counted(scrape(server.metrics_url))
        load = subprocess.Popen(
            [
                "h2load",
                f"http://{server.address}/attnserve.v1.Translator/Translate",
                "-d",
                str(body),
                "-H",
                "content-type: application/grpc",
                "-H",
                "te: trailers",
                "-c",
                str(CONNECTIONS),
                "-m",
                "100",
                f"--rps={max(1, args.rate // CONNECTIONS)}",
                "-D",
                str(args.seconds),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        probes, latencies = _probe(server.address, args.probes, args.seconds)
        output, _ = load.communicate()
        time.sleep(2.0)  # the calls h2load reset at its end reach the counters
        counted = _counted(scrape(server.metrics_url)) - before
        with grpc.insecure_channel(server.address) as channel:
            after = (
                pb_grpc.TranslatorStub(channel)
                .Translate(pb.TranslateRequest(model="dates", texts=[TEXT]), timeout=30)
                .translations[0]
                .hypotheses[0]
                .text
            )
    done = next((int(line.split()[5]) for line in output.splitlines() if line.startswith("requests:")), 0)
    unseen = max(0, done + args.probes - counted.total())
    print(
        f"offered {args.rate} calls/s for {args.seconds} s; h2load: "
        + "; ".join(line for line in output.splitlines() if line.startswith(("finished in", "requests:")))
    )
    print(f"the server counted (Translate): {dict(counted)}")
    print(f"calls completed by a client but counted nowhere: {unseen}")
    print(f"probes: {dict(probes)}; median {1e3 * sorted(latencies)[len(latencies) // 2]:.1f} ms")
    print(f"after: {TEXT!r} -> {after!r}")
    return 1 if probes.get("CANCELLED") or unseen else 0


def _probe(address: str, count: int, seconds: float) -> tuple[collections.Counter[str], list[float]]:
    codes: collections.Counter[str] = collections.Counter()
    latencies = []
    spacing = max(seconds - 2.0, 1.0) / count
    time.sleep(1.0)
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.TranslatorStub(channel)
        for _ in range(count):
            started = time.perf_counter()
            try:
                stub.Translate(pb.TranslateRequest(model="dates", texts=["3 mars 1999"]), timeout=30)
                codes["OK"] += 1
            except grpc.RpcError as error:
                codes[error.code().name] += 1
            latencies.append(time.perf_counter() - started)
            time.sleep(max(0.0, spacing - latencies[-1]))
    return codes, latencies


def _counted(samples: dict) -> collections.Counter[str]:
    codes: collections.Counter[str] = collections.Counter()
    for (name, labels), value in samples.items():
        labels = dict(labels)
        if name == "attnserve_requests_total" and labels.get("method") == "Translate":
            codes[labels["code"]] += int(value)
    return codes


if __name__ == "__main__":
    sys.exit(main())
