"""Does a server give memory back after a burst? Its RSS through a burst of large calls and the light load after it.

For each `--memory-return-seconds` value, a fresh one-process server (`attnserve serve --frontends 0`, `dates` from
the repository) is warmed up, sent `--burst-seconds` of calls of 64 texts at beam 4 (eight in flight), then one-text
calls one at a time for `--light-seconds`; its RSS is printed after the burst and every 5 s of the light load.

    python -m loadtests.reliability.after_burst                      # 0 (never) against the default, 10 s
    python -m loadtests.reliability.after_burst --memory-return-seconds 0,5
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

from loadtests.procfs import rss_bytes
from loadtests.servers import ServerProcess, free_port, serve_command

MODEL = "dates"
REPORT_EVERY_S = 5.0


def _texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    short = [f"the {rng.randint(1, 28)} of March, {rng.randint(1900, 2100)}" for _ in range(count // 2)]
    long = [
        f"Thursday, {rng.randint(1, 28)} September in the year {rng.randint(1900, 2100)}, noon" for _ in range(count)
    ]
    return short + long[: count - len(short)]


def measure(
    repository: Path, return_s: float, burst_s: float, light_s: float, log_dir: Path
) -> list[tuple[str, float]]:
    """(moment, RSS in MB) of one server's run: warm, after the burst, then every REPORT_EVERY_S of light load."""
    import grpc

    from service.gen.attnserve.v1 import translator_pb2 as pb
    from service.gen.attnserve.v1 import translator_pb2_grpc as pb_grpc

    port = free_port()
    command = [*serve_command(repository, port, 0, "cpu"), "--frontends", "0", "--log-level", "WARNING"]
    server = ServerProcess(
        f"return-{return_s:g}",
        command,
        port,
        log_path=log_dir / f"return-{return_s:g}.log",
        environment={"ATTNSERVE_MEMORY_RETURN_SECONDS": f"{return_s:g}"},
    )
    texts = _texts(64, seed=3)
    rows: list[tuple[str, float]] = []
    with server, grpc.insecure_channel(server.address) as channel:
        assert server.process is not None
        pid = server.process.pid

        def rss_mb() -> float:
            return rss_bytes(pid) / 2**20

        stub = pb_grpc.TranslatorStub(channel)
        one = pb.TranslateRequest(model=MODEL, texts=texts[:1])
        for _ in range(3):
            stub.Translate(one, timeout=30)
        rows.append(("warm", rss_mb()))
        large = pb.TranslateRequest(model=MODEL, texts=texts, options=pb.DecodeOptions(beam_size=4))
        end = time.monotonic() + burst_s
        while time.monotonic() < end:
            calls = [stub.Translate.future(large, timeout=120) for _ in range(8)]
            for call in calls:
                call.result()
        rows.append(("after the burst", rss_mb()))
        for index in range(int(light_s / REPORT_EVERY_S)):
            end = time.monotonic() + REPORT_EVERY_S
            while time.monotonic() < end:
                stub.Translate(one, timeout=30)
            rows.append((f"light load, {REPORT_EVERY_S * (index + 1):.0f} s", rss_mb()))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument("--memory-return-seconds", default="0,10", help="comma-separated; 0 = never")
    parser.add_argument("--burst-seconds", type=float, default=15.0)
    parser.add_argument("--light-seconds", type=float, default=30.0)
    args = parser.parse_args(argv)
    values = [float(value) for value in args.memory_return_seconds.split(",")]
    with tempfile.TemporaryDirectory(prefix="after-burst-") as logs:
        runs = {
            value: measure(args.repository, value, args.burst_seconds, args.light_seconds, Path(logs))
            for value in values
        }
    print("| moment | " + " | ".join(f"RSS MB, memory_return_seconds {value:g}" for value in values) + " |")
    print("|---|" + "---:|" * len(values))
    for index, (moment, _) in enumerate(runs[values[0]]):
        print(f"| {moment} | " + " | ".join(f"{runs[value][index][1]:.1f}" for value in values) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
