"""What the overload and soak runs share: the server they start, its memory, the texts they send, and
how figures are summarised and printed."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from loadtests.procfs import rss_bytes
from loadtests.servers import ServerProcess, attnserve_server
from service.gen.attnserve.v1 import translator_pb2 as pb
from service.gen.attnserve.v1 import translator_pb2_grpc as pb_grpc

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def repository_or_smoke(repository: Path) -> Path:
    """`repository` when it holds models; otherwise the tiny smoke models (built once into build/smoke),
    so the runs work on a fresh clone. Says which it uses."""
    from service.runtime.repository import discover

    if discover(repository):
        print(f"model repository: {repository}")
        return repository
    from loadtests.smoke import SMOKE_ROOT, build_smoke_repository

    smoke = build_smoke_repository(SMOKE_ROOT)
    print(
        f"model repository: {repository} holds no model; using the tiny smoke models in {smoke} "
        "(run `make models` for the real ones; figures differ)"
    )
    return smoke


def start_server(repository: Path, out: Path, label: str, extra: Sequence[str] = (), threads: int = 1) -> ServerProcess:
    """`attnserve serve` on free loopback ports, continuous batching on the CPU, its log in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    return attnserve_server(
        repository, batching="continuous", threads=threads, provider="cpu", log_dir=out, extra=tuple(extra), label=label
    ).start()


def workload_texts(address: str) -> dict[str, list[str]]:
    """Texts for every served model whose task can be generated (loadtests.workload), by model name."""
    from loadtests.workload import build_workload, texts_by_model

    with grpc.insecure_channel(address) as channel:
        reply = pb_grpc.TranslatorStub(channel).ListModels(pb.ListModelsRequest(), timeout=30)
        models = {model.name: model.task.kind for model in reply.models}
        generated = texts_by_model(build_workload(models, per_model=200))
        # Keep the texts the model accepts (a generated text may be longer than a small model takes), so
        # that every refusal during a run is about load, never about the input.
        stub = pb_grpc.TranslatorStub(channel)
        texts: dict[str, list[str]] = {}
        for model, candidates in generated.items():
            for text in candidates:
                request = pb.TranslateRequest(model=model, texts=[text], options=pb.DecodeOptions(max_length=1))
                try:
                    stub.Translate(request, timeout=30)
                except grpc.RpcError as error:
                    if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                        raise
                    continue
                texts.setdefault(model, []).append(text)
    if not texts:
        raise RuntimeError(f"no workload can be generated for the served models {models}")
    return texts


@dataclass
class MemorySampler:
    """Samples a process's RSS every `interval_s` seconds in a thread: (time.monotonic(), bytes)."""

    pid: int
    interval_s: float = 1.0
    samples: list[tuple[float, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), rss_bytes(self.pid)))
            except (OSError, RuntimeError):
                return
            self._stop.wait(self.interval_s)

    def start(self) -> MemorySampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def between(self, start: float, end: float) -> list[int]:
        return [value for at, value in self.samples if start <= at <= end]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.1f} ms"


def mib(value: float) -> str:
    return f"{value / (1 << 20):.1f} MiB"


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain aligned text table."""
    cells = [[str(cell) for cell in header]] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[index]) for row in cells) for index in range(len(header))]
    print(f"\n{title}")
    for number, row in enumerate(cells):
        print(
            "  "
            + "  ".join(
                cell.ljust(width) if index == 0 else cell.rjust(width)
                for index, (cell, width) in enumerate(zip(row, widths, strict=True))
            )
        )
        if number == 0:
            print("  " + "  ".join("-" * width for width in widths))
