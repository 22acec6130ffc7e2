"""The benchmark report: bench.json (everything), bench.md (tables, targets, closing note), PNG plots.

The targets (issue "load tests and side-by-side benchmarks") are evaluated from the results here, so the
same figures appear in the JSON, the Markdown and the console, and a missed target says where the time
goes from the run's own profile (server metrics and process CPU).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tabulate import tabulate

CONTENDER_ORDER = (
    "pytorch-eager",
    "none",
    "request",
    "continuous",
    "http",
    "rpc-ceiling",
    "engine-ceiling",
    "roofline",
)
TARGET_LEVEL = 64


@dataclass(frozen=True)
class TargetCheck:
    """One target: what it asks, the measured figure, the bar, whether it is met (None: not measurable in
    this run), and the note on where the time goes."""

    target: str
    figure: str
    bar: str
    met: bool | None
    note: str = ""


# ----- lookups ---------------------------------------------------------------------------------------------


def _cells(report: dict) -> list[dict]:
    return report["results"]


def find(report: dict, workload: str, contender: str, level: int) -> dict | None:
    for cell in _cells(report):
        if cell["workload"] == workload and cell["contender"] == contender and cell["level"] == level:
            return cell
    return None


def _value(cell: dict | None, key: str) -> float:
    if cell is None or cell.get(key) is None:
        return math.nan
    return float(cell[key])


def _levels(report: dict) -> list[int]:
    return sorted({cell["level"] for cell in _cells(report)})


def nearest_level(report: dict, wanted: int) -> int | None:
    levels = _levels(report)
    return min(levels, key=lambda level: (abs(math.log(level) - math.log(wanted)), -level)) if levels else None


def ceiling_at_rows(report: dict, workload: str, rows: float) -> float:
    """Engine-ceiling tokens/s at `rows` decoder rows, interpolated in log(rows) between measured points."""
    points = sorted(
        (cell["mean_decoder_rows"], cell["tokens_per_s"])
        for cell in _cells(report)
        if cell["workload"] == workload
        and cell["contender"] == "engine-ceiling"
        and cell.get("mean_decoder_rows")
        and cell.get("tokens_per_s")
    )
    if not points or not (isinstance(rows, (int, float)) and math.isfinite(rows) and rows > 0):
        return math.nan
    if rows <= points[0][0]:
        return points[0][1]
    for (low_rows, low), (high_rows, high) in zip(points, points[1:], strict=False):
        if rows <= high_rows:
            fraction = (math.log(rows) - math.log(low_rows)) / (math.log(high_rows) - math.log(low_rows))
            return low + fraction * (high - low)
    return points[-1][1]


# ----- where the time goes -------------------------------------------------------------------------------


def profile_note(cell: dict | None) -> str:
    """Where the time of one server cell goes, from its server metrics and process CPU."""
    if cell is None:
        return ""
    details = cell.get("details", {})
    parts = []
    cpu = details.get("server_cpu_share")
    if cpu is not None:
        parts.append(f"server process CPU {100 * cpu:.0f}% of one core")
    decoder, encoder = details.get("decoder_busy"), details.get("encoder_busy")
    if decoder is not None:
        parts.append(
            f"decoder steps {100 * decoder:.0f}% and encoder {100 * (encoder or 0):.0f}% of the window (runtime)"
        )
    rpc, engine, queue = details.get("mean_rpc_s"), details.get("mean_engine_s"), details.get("mean_queue_s")
    if rpc is not None and engine is not None:
        note = (
            f"per call: {1e3 * rpc:.2f} ms in the server's handler, of which {1e3 * engine:.2f} ms in the "
            f"engine ({1e3 * (queue or 0):.2f} ms queued)"
        )
        client_p50 = _value(cell, "p50_ms")  # NaN when the cell completed no call
        if math.isfinite(client_p50):
            note += (
                f"; client p50 {client_p50:.2f} ms, so about {max(client_p50 - 1e3 * rpc, 0):.2f} ms is gRPC "
                "transport and the client"
            )
        parts.append(note)
    overhead = loop_overhead(cell)
    if overhead is not None:
        per_step, step, encode = overhead
        parts.append(
            f"each decoding step of a text took {1e3 * per_step:.2f} ms: {1e3 * step:.2f} ms in the decoder "
            f"call, {1e3 * encode:.2f} ms encoding the requests that joined, and "
            f"{1e3 * max(per_step - step - encode, 0):.2f} ms in the scheduler loop (the hand-off to the worker "
            "thread and back, gathering and compacting rows)"
        )
    if cell.get("mean_decoder_rows"):
        parts.append(f"{cell['mean_decoder_rows']:.1f} rows per decoder step")
    return "; ".join(parts)


def loop_overhead(cell: dict) -> tuple[float, float, float] | None:
    """From a server cell's profile, per decoding step of a text: (wall seconds, seconds in the decoder call,
    seconds of encoder calls spread over the steps), or None when the cell has no engine metrics."""
    details = cell.get("details", {})
    values = [
        details.get(key)
        for key in ("mean_engine_s", "mean_queue_s", "mean_step_s", "mean_tokens", "encoder_busy", "window_s", "steps")
    ]
    if not all(isinstance(value, (int, float)) and math.isfinite(value) for value in values):
        return None
    engine, queue, step, tokens, encoder_busy, window, steps = values
    if tokens < 1 or steps <= 0:
        return None
    return (engine - queue) / tokens, step, encoder_busy * window / steps


def _beam(cell: dict) -> float:
    """Decoder rows per request of a cell's workload (its beam width), from the workload's name."""
    return 4.0 if "beam4" in cell.get("workload", "") else 1.0


def _diagnosis(cell: dict | None) -> str:
    """What bounds a cell, read from its profile, and what would move the bound."""
    if cell is None:
        return ""
    details = cell.get("details", {})
    busy = (details.get("decoder_busy") or 0) + (details.get("encoder_busy") or 0)
    cpu = details.get("server_cpu_share") or 0
    overhead = loop_overhead(cell)
    encoder = details.get("encoder_busy") or 0
    if busy >= 0.75 and encoder >= 0.25 and (cell.get("mean_decoder_rows") or 0) > 4:
        return (
            "The runtime is busy, and a third or more of it in the encoder: continuous batching encodes the few "
            "requests that join at each step in a call of their own, and a recurrent encoder is inefficient on "
            "such small batches (request-level batching encodes its whole batch at once). Admitting in groups "
            "(encode what waits every few steps, or when free rows pass a threshold), more intra-op threads or "
            "a GPU would close it."
        )
    if busy >= 0.75:
        return (
            "The runtime is busy most of the window: the model's arithmetic bounds it; more intra-op threads, "
            "a GPU (--provider cuda) or int8 weights would raise it."
        )
    if overhead is not None and overhead[0] > 2 * overhead[1] + overhead[2]:
        loop = overhead[0] - overhead[1] - overhead[2]
        requests = max(1.0, (cell.get("mean_decoder_rows") or 1.0) / _beam(cell))
        return (
            f"The scheduler loop, not the model, sets the pace: {1e3 * loop:.2f} ms per step, about "
            f"{1e6 * loop / requests:.0f} us per request in the batch, against {1e3 * overhead[1]:.2f} ms for the "
            "decoder call. Each request's search is advanced in Python at every step (and its tokens delivered), "
            "and every step is handed to the worker thread and back through the event loop. Advancing all "
            "greedy rows with one vectorised operation, and running several steps per hand-off while no request "
            "is waiting, would close most of it."
        )
    if cpu >= 0.85:
        return (
            "The server's Python process is saturated while the runtime idles: the RPC path, tokenization and "
            "the scheduler loop bound it. More server processes (one per core behind a load balancer) or "
            "moving request handling out of Python would close it; on a 2-core machine the clients take "
            "the other core."
        )
    return (
        "Neither the runtime nor the server process is saturated: the machine's cores are shared with the "
        "client processes (and, in this run, other work), so the figure is bounded by CPU contention."
    )


# ----- the targets ---------------------------------------------------------------------------------------


def check_targets(report: dict) -> list[TargetCheck]:
    checks: list[TargetCheck] = []
    workloads = report.get("workloads", {})
    level64 = nearest_level(report, TARGET_LEVEL)
    # 1. small models vs the RPC ceiling
    for workload in ("dates", "numbers"):
        if workload not in workloads or level64 is None:
            continue
        continuous = find(report, workload, "continuous", level64)
        ceiling = find(report, workload, "rpc-ceiling", level64)
        ratio = _value(continuous, "requests_per_s") / _value(ceiling, "requests_per_s")
        checks.append(
            _check(
                f"{workload}: continuous req/s >= 60% of the RPC ceiling's at {level64} clients",
                f"{_value(continuous, 'requests_per_s'):.0f} / {_value(ceiling, 'requests_per_s'):.0f} req/s = "
                f"{_pct(ratio)}",
                ">= 60%",
                ratio,
                0.60,
                continuous,
            )
        )
    # 2. the large model
    if "phrasebook" in workloads and level64 is not None:
        continuous = find(report, "phrasebook", "continuous", level64)
        for contender, bar, label in (("none", 6.0, "--batching none"), ("pytorch-eager", 15.0, "PyTorch eager")):
            other = find(report, "phrasebook", contender, level64)
            ratio = _value(continuous, "tokens_per_s") / _value(other, "tokens_per_s")
            checks.append(
                _check(
                    f"phrasebook: continuous tokens/s >= {bar:g}x {label} at {level64} clients",
                    f"{_value(continuous, 'tokens_per_s'):.0f} / {_value(other, 'tokens_per_s'):.0f} tok/s = "
                    f"{ratio:.1f}x",
                    f">= {bar:g}x",
                    ratio,
                    bar,
                    continuous,
                )
            )
        for level in [level for level in _levels(report) if level >= 32]:
            cell = find(report, "phrasebook", "continuous", level)
            rows = _value(cell, "mean_decoder_rows")
            ceiling_tokens = ceiling_at_rows(report, "phrasebook", rows)
            ratio = _value(cell, "tokens_per_s") / ceiling_tokens
            bar = 0.90 if level == level64 else 0.80
            checks.append(
                _check(
                    f"phrasebook: continuous >= {_pct(bar)} of the engine ceiling at the same batch size ({level} "
                    "clients)",
                    f"{_value(cell, 'tokens_per_s'):.0f} tok/s at {rows:.1f} rows vs ceiling {ceiling_tokens:.0f} = "
                    f"{_pct(ratio)}",
                    f">= {_pct(bar)}",
                    ratio,
                    bar,
                    cell,
                )
            )
        largest = max(_levels(report))
        for contender in ("continuous", "engine-ceiling"):
            cell = find(report, "phrasebook", contender, largest)
            share = _value(cell, "percent_of_peak") / 100.0
            checks.append(
                _check(
                    f"phrasebook: {contender} >= 60% of the matrix-multiply peak at the largest batch ({largest})",
                    f"{_pct(share)} of {report['peak'].get('flops_per_s', math.nan) / 1e9:.0f} GFLOP/s",
                    ">= 60%",
                    share,
                    0.60,
                    cell if contender == "continuous" else None,
                    extra=("" if share >= 0.6 else _peak_note(report, "phrasebook", largest)),
                )
            )
    # 3. latency at concurrency 1
    if 1 in _levels(report):
        for workload in workloads:
            continuous = find(report, workload, "continuous", 1)
            engine = find(report, workload, "engine-ceiling", 1)
            rpc = find(report, workload, "rpc-ceiling", 1)
            bound = 1.15 * (_value(engine, "p50_ms") + _value(rpc, "p50_ms"))
            measured = _value(continuous, "p50_ms")
            checks.append(
                _check(
                    f"{workload}: continuous p50 at 1 client <= 1.15 x (engine single-request + RPC ceiling p50)",
                    f"{measured:.2f} ms vs 1.15 x ({_value(engine, 'p50_ms'):.2f} + {_value(rpc, 'p50_ms'):.2f}) = "
                    f"{bound:.2f} ms",
                    "<= 1.15x",
                    bound / measured if measured > 0 else math.nan,
                    1.0,
                    continuous,
                )
            )
    # 4. the engine's own cost per step, and serving when the model costs nothing
    checks += _engine_checks(report, level64)
    # 5. mixed lengths: continuous vs request-level
    if "phrasebook-mixed" in workloads:
        checks.append(_mixed_check(report))
    return checks


def overhead_us(report: dict, rows: int, beam: int = 1) -> float:
    """The engine's median cost per step (us) at `rows` rows of `beam`-wide requests; NaN if not measured."""
    for point in report.get("engine_overhead") or ():
        if point["rows"] == rows and point["beam"] == beam:
            return float(point["median_us"])
    return math.nan


def _engine_checks(report: dict, level64: int | None) -> list[TargetCheck]:
    checks = []
    if report.get("engine_overhead"):
        for rows, bound in ((64, 150.0), (256, 400.0)):
            cost = overhead_us(report, rows)
            checks.append(
                _check(
                    f"engine alone: <= {bound:.0f} us per step at {rows} greedy rows (zero-cost model)",
                    f"{cost:.0f} us",
                    f"<= {bound:.0f} us",
                    bound / cost,
                    1.0,
                    None,
                    extra="see the engine-overhead table",
                )
            )
        small, large = overhead_us(report, 16), overhead_us(report, 256)
        checks.append(
            _check(
                "engine alone: the step at 256 greedy rows costs <= 2x the step at 16",
                f"{large:.0f} / {small:.0f} us = {large / small:.2f}x",
                "<= 2x",
                2.0 / (large / small),
                1.0,
                None,
                extra="see the engine-overhead table",
            )
        )
    workloads = report.get("workloads", {})
    if "near-free" in workloads:
        if level64 is not None:
            served = find(report, "near-free", "continuous", level64)
            ceiling = find(report, "near-free", "rpc-ceiling", level64)
            ratio = _value(served, "requests_per_s") / _value(ceiling, "requests_per_s")
            checks.append(
                _check(
                    f"near-free: continuous calls/s >= 80% of the no-op RPC ceiling's at {level64} clients",
                    f"{_value(served, 'requests_per_s'):.0f} / {_value(ceiling, 'requests_per_s'):.0f} calls/s = "
                    f"{_pct(ratio)}",
                    ">= 80%",
                    ratio,
                    0.80,
                    served,
                )
            )
        if 1 in _levels(report):
            served, ceiling = find(report, "near-free", "continuous", 1), find(report, "near-free", "rpc-ceiling", 1)
            ratio = _value(served, "p50_ms") / _value(ceiling, "p50_ms")
            checks.append(
                _check(
                    "near-free: continuous p50 at 1 client <= 2x the no-op RPC ceiling's",
                    f"{_value(served, 'p50_ms'):.2f} / {_value(ceiling, 'p50_ms'):.2f} ms = {ratio:.2f}x",
                    "<= 2x",
                    2.0 / ratio,
                    1.0,
                    served,
                )
            )
    if "dates" in workloads and level64 is not None:
        served = find(report, "dates", "continuous", level64)
        engine = _value(find(report, "dates", "engine-ceiling", level64), "requests_per_s")
        rpc = _value(find(report, "dates", "rpc-ceiling", level64), "requests_per_s")
        composed = 1.0 / (1.0 / engine + 1.0 / rpc)
        ratio = _value(served, "requests_per_s") / composed
        checks.append(
            _check(
                f"dates: continuous calls/s >= 80% of the composed ceiling 1/(1/engine + 1/RPC) at {level64} clients",
                f"{_value(served, 'requests_per_s'):.0f} / 1/(1/{engine:.0f} + 1/{rpc:.0f}) = {composed:.0f} calls/s "
                f"= {_pct(ratio)}",
                ">= 80%",
                ratio,
                0.80,
                served,
            )
        )
    return checks


def _mixed_check(report: dict) -> TargetCheck:
    """Continuous against request-level batching on the mixed-length workload, from measured points only.

    Latency at equal throughput: for each continuous point, the lowest request-level p99 among its points
    with at least as much throughput. Throughput at equal p99: for each continuous point, the highest
    request-level throughput among its points with at most the same p99. The best ratio of each counts.
    """

    def curve(contender: str) -> list[tuple[float, float]]:
        return [
            (cell["tokens_per_s"], cell["p99_ms"])
            for cell in _cells(report)
            if cell["workload"] == "phrasebook-mixed"
            and cell["contender"] == contender
            and cell.get("tokens_per_s")
            and cell.get("p99_ms")
        ]

    continuous, request = curve("continuous"), curve("request")
    latency_ratio, latency_where = math.inf, ""
    throughput_ratio, throughput_where = 0.0, ""
    unreachable = []
    for throughput, p99 in continuous:
        matching = [request_p99 for request_throughput, request_p99 in request if request_throughput >= throughput]
        if matching:
            if p99 / min(matching) < latency_ratio:
                latency_ratio = p99 / min(matching)
                latency_where = f"p99 {p99:.0f} vs {min(matching):.0f} ms at >= {throughput:.0f} tok/s"
        elif request:
            unreachable.append(throughput)
        faster = [request_throughput for request_throughput, request_p99 in request if request_p99 <= p99]
        if faster and throughput / max(faster) > throughput_ratio:
            throughput_ratio = throughput / max(faster)
            throughput_where = f"{throughput:.0f} vs {max(faster):.0f} tok/s at p99 <= {p99:.0f} ms"
    met = latency_ratio <= 0.6 or throughput_ratio >= 1.5
    measurable = bool(continuous and request) and (math.isfinite(latency_ratio) or throughput_ratio > 0)
    figure = (
        "; ".join(
            part
            for part in (
                f"p99 ratio at equal throughput {latency_ratio:.2f}x ({latency_where})"
                if math.isfinite(latency_ratio)
                else "",
                f"throughput ratio at equal p99 {throughput_ratio:.2f}x ({throughput_where})"
                if throughput_ratio > 0
                else "",
                f"request-level reached no level with {max(unreachable):.0f} tok/s" if unreachable else "",
            )
            if part
        )
        or "no comparable points"
    )
    note = (
        ""
        if met or not measurable
        else (
            "Request-level batching was tuned per level (batch size and queue delay), which keeps it close; see "
            "latency.png. " + profile_note(find(report, "phrasebook-mixed", "continuous", max(_levels(report))))
        )
    )
    return TargetCheck(
        "phrasebook-mixed: continuous p99 at equal throughput <= 0.6x request-level's, or throughput at equal p99 "
        ">= 1.5x",
        figure,
        "<= 0.6x or >= 1.5x",
        met if measurable else None,
        note,
    )


def _peak_note(report: dict, workload: str, level: int) -> str:
    model = report.get("models", {}).get(workload, {})
    cell = find(report, workload, "engine-ceiling", level)
    if not model or cell is None:
        return ""
    details = cell.get("details", {})
    step_ms, encode_ms = details.get("step_ms"), details.get("encode_ms")
    rows = cell.get("mean_decoder_rows")
    flops = model.get("step_flops_per_row", math.nan) * (rows or 0)
    if not step_ms or not encode_ms:
        return ""
    rate = flops / (step_ms / 1e3)
    encoder_flops = model.get("encoder_flops_per_source", math.nan) * level
    encoder_rate = encoder_flops / (encode_ms / 1e3)
    share = encoder_flops / (encoder_flops + flops * model.get("mean_generated_tokens", math.nan))
    return (
        f"In the engine ceiling at {level} requests, one decoder step of {rows:.0f} rows does {flops / 1e9:.2f} GFLOP "
        f"in {step_ms:.2f} ms ({rate / 1e9:.0f} GFLOP/s), and the encoder call {encoder_flops / 1e9:.2f} GFLOP in "
        f"{encode_ms:.1f} ms ({encoder_rate / 1e9:.0f} GFLOP/s; {100 * share:.0f}% of the FLOPs of a request). The "
        "encoder's recurrent layers run one source position at a time, and the step adds attention over the "
        "source, log-softmax over the whole vocabulary and top-k, element-wise work the matrix-multiply peak does "
        "not count. More rows per step (a GPU), a self-attention encoder and a fused log-softmax + top-k would "
        "close part of the gap."
    )


def _check(
    target: str, figure: str, bar: str, ratio: float, threshold: float, cell: dict | None, extra: str = ""
) -> TargetCheck:
    if not math.isfinite(ratio):
        return TargetCheck(target, figure, bar, None, "not measured in this run")
    met = ratio >= threshold
    note = (
        ""
        if met
        else ". ".join(part for part in (extra or profile_note(cell), "" if extra else _diagnosis(cell)) if part)
    )
    return TargetCheck(target, figure, bar, met, note)


def _pct(ratio: float) -> str:
    return f"{100 * ratio:.0f}%" if math.isfinite(ratio) else "n/a"


# ----- writing -------------------------------------------------------------------------------------------


def _fmt(value: object, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> list[str]:
    """A Markdown (pipe) table of already-formatted cells; `align` has one letter per column, `l` or `r`."""
    alignment = tuple({"l": "left", "r": "right"}[letter] for letter in align)
    return tabulate(rows, headers=headers, tablefmt="pipe", colalign=alignment, disable_numparse=True).splitlines()


def markdown(report: dict, checks: Sequence[TargetCheck]) -> str:
    machine = report["machine"]
    config = report["config"]
    lines = [
        "# attnserve benchmark",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {machine['cpu']}, {machine['cores']} cores; provider {machine['provider']}, "
        f"{machine['threads']} intra-op thread(s) per runtime; onnxruntime {machine['onnxruntime']}, "
        f"grpcio {machine['grpcio']}, Python {machine['python']}.  ",
        f"Load average at start {', '.join(f'{v:.2f}' for v in machine['load_average_at_start'])}; at end "
        f"{', '.join(f'{v:.2f}' for v in machine.get('load_average_at_end', []))}.  ",
        f"Matrix-multiply peak (measured): {report['peak'].get('flops_per_s', 0) / 1e9:.1f} GFLOP/s "
        f"(float32 {report['peak'].get('size')}^3 MatMul in onnxruntime).  ",
        f"Each cell: {config['warmup_s']:g} s warm-up, then a {config['duration_s']:g} s window (at most "
        f"{config['max_requests']} calls); clients closed-loop over loopback gRPC in up to "
        f"{config['client_processes']} processes of their own. Run time {report['seconds'] / 60:.1f} min.",
        "",
        "Columns: tokens/s and req/s finished OK in the window; latencies at the client; rows = hypotheses per "
        "decoder step; % peak = FLOPs per generated token x tokens/s / peak. `*` = not steady (fewer calls "
        "finished than clients: the latencies are understated).",
        "",
    ]
    for name, workload in report["workloads"].items():
        model = report["models"].get(name, {})
        lines += [f"## {name}: {workload['description']}", ""]
        if model:
            lines += [
                f"{model['mean_source_tokens']:.1f} source tokens and {model['mean_generated_tokens']:.1f} "
                f"generated tokens per request on average; {model['flops_per_generated_token'] / 1e6:.2f} MFLOP "
                f"per generated token; {workload['texts']} distinct texts.",
                "",
            ]
        rows: list[list[str]] = []
        for contender in CONTENDER_ORDER:
            for level in _levels(report):
                cell = find(report, name, contender, level)
                if cell is None:
                    continue
                label = contender
                if contender == "request" and "batch_size" in cell.get("details", {}):
                    label += f" (b{cell['details']['batch_size']}, {cell['details']['batch_delay_ms']:g} ms)"
                flag = "" if cell.get("steady", True) else "*"
                rows.append(
                    [
                        label,
                        str(level),
                        _fmt(cell["tokens_per_s"], 0),
                        _fmt(cell["requests_per_s"]),
                        _fmt(cell["p50_ms"], 2) + flag,
                        _fmt(cell["p90_ms"], 2) + flag,
                        _fmt(cell["p99_ms"], 2) + flag,
                        _fmt(cell.get("mean_decoder_rows")),
                        _fmt(cell.get("percent_of_peak")),
                        str(cell.get("ok", 0)),
                        str(sum((cell.get("failures") or {}).values())),
                    ]
                )
        headers = ["contender", "clients", "tokens/s", "req/s", "p50 ms", "p90 ms", "p99 ms", "rows", "% peak"]
        lines += [*_table([*headers, "ok", "failed"], rows, "l" + "r" * 10), ""]
    if report.get("request_tuning"):
        lines += [
            "## Request-level batching: tuning",
            "",
            "Every (batch size, queue delay) of the grid was run on every workload and level with a short "
            "window; the configuration with the most tokens/s (within 3%: the lowest p99) was kept and "
            "measured again with the full window.",
            "",
        ]
        tuning: list[list[str]] = []
        for entry in report["request_tuning"]:
            trials = ", ".join(
                f"b{t['batch_size']}/{t['batch_delay_ms']:g}ms: {_fmt(t['tokens_per_s'], 0)} @ {_fmt(t['p99_ms'], 1)}"
                for t in entry["trials"]
            )
            chosen = entry["chosen"]
            tuning.append(
                [
                    entry["workload"],
                    str(entry["level"]),
                    f"b{chosen['batch_size']}, {chosen['batch_delay_ms']:g} ms",
                    trials,
                ]
            )
        lines += [*_table(["workload", "clients", "chosen", "trials (tokens/s @ p99 ms)"], tuning, "lrll"), ""]
    if report.get("engine_overhead"):
        lines += [
            "## The engine alone",
            "",
            "The engine core stepped over a model whose calls cost nothing (prepared arrays), the batch kept full "
            "at each size in a steady state (requests finish and join at every step, as under load): what a "
            "step costs beyond the model. Plot: engine_overhead.png.",
            "",
        ]
        overhead = [
            [
                str(point["beam"]),
                str(point["rows"]),
                _fmt(point["median_us"], 0),
                _fmt(point["p90_us"], 0),
                _fmt(point["per_row_us"], 2),
                _fmt(point["requests_per_step"], 1),
            ]
            for point in report["engine_overhead"]
        ]
        headers = ["beam", "rows", "us per step (median)", "p90", "us per row", "requests finished per step"]
        lines += [*_table(headers, overhead, "rrrrrr"), ""]
    met = {True: "yes", False: "**no**", None: "n/a"}
    targets = [[check.target, check.figure, check.bar, met[check.met]] for check in checks]
    lines += ["## Targets", "", *_table(["target", "measured", "bar", "met"], targets, "llll")]
    lines += ["", "## Closing note", ""]
    missed = [check for check in checks if check.met is False]
    if not missed:
        lines.append("Every target measured in this run is met.")
    for check in missed:
        lines.append(f"- **{check.target}** ({check.figure}): {check.note}")
    lines += [
        "",
        "Plots: throughput.png (generated tokens/s against clients; the RPC ceiling as its req/s times "
        "the workload's tokens per request) and latency.png (p99 latency against tokens/s).",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    workloads = list(report["workloads"])
    columns = min(3, max(1, len(workloads)))
    rows = math.ceil(len(workloads) / columns)
    styles = {
        "pytorch-eager": ("tab:brown", "v"),
        "none": ("tab:red", "s"),
        "request": ("tab:orange", "D"),
        "continuous": ("tab:blue", "o"),
        "http": ("tab:purple", "P"),
        "rpc-ceiling": ("tab:gray", "x"),
        "engine-ceiling": ("tab:green", "^"),
        "roofline": ("black", ""),
    }
    written = []
    for kind in ("throughput", "latency"):
        figure = Figure(figsize=(5.2 * columns, 4.0 * rows), layout="constrained")
        axes_list = figure.subplots(rows, columns, squeeze=False).ravel()
        for axes, workload in zip(axes_list, workloads, strict=False):
            for contender in CONTENDER_ORDER:
                cells = sorted(
                    (
                        cell
                        for cell in _cells(report)
                        if cell["workload"] == workload and cell["contender"] == contender
                    ),
                    key=lambda cell: cell["level"],
                )
                if not cells:
                    continue
                color, marker = styles[contender]
                # The RPC ceiling's answers carry no real tokens: its req/s times this workload's tokens per
                # request is the tokens/s the RPC path alone could carry.
                per_request = report.get("models", {}).get(workload, {}).get("mean_generated_tokens") or 1.0
                label = contender + (" (req/s x tokens/request)" if contender == "rpc-ceiling" else "")
                if kind == "throughput":

                    def tokens(
                        cell: dict, contender: str = contender, per_request: float = per_request
                    ) -> float | None:
                        if contender == "rpc-ceiling":
                            return cell["requests_per_s"] * per_request if cell.get("requests_per_s") else None
                        return cell.get("tokens_per_s")

                    xs = [cell["level"] for cell in cells if tokens(cell)]
                    ys = [tokens(cell) for cell in cells if tokens(cell)]
                    linestyle = "--" if contender == "roofline" else "-"
                    axes.plot(xs, ys, marker=marker or None, color=color, linestyle=linestyle, label=label)
                elif contender not in ("roofline", "engine-ceiling", "rpc-ceiling"):
                    points = [
                        (cell["tokens_per_s"], cell["p99_ms"])
                        for cell in cells
                        if cell.get("tokens_per_s") and cell.get("p99_ms")
                    ]
                    if points:
                        axes.plot(*zip(*points, strict=False), marker=marker, color=color, label=label)
                        for cell in cells:
                            if cell.get("tokens_per_s") and cell.get("p99_ms"):
                                axes.annotate(
                                    str(cell["level"]),
                                    (cell["tokens_per_s"], cell["p99_ms"]),
                                    fontsize=7,
                                    xytext=(3, 3),
                                    textcoords="offset points",
                                )
            axes.set_title(workload)
            axes.set_yscale("log")
            axes.grid(True, which="both", alpha=0.3)
            if kind == "throughput":
                axes.set_xscale("log", base=2)
                axes.set_xlabel("concurrent clients")
                axes.set_ylabel("generated tokens/s")
            else:
                axes.set_xscale("log")
                axes.set_xlabel("tokens/s")
                axes.set_ylabel("p99 latency (ms); labels: clients")
            if axes.get_legend_handles_labels()[0]:  # a workload whose cells all failed has nothing to label
                axes.legend(fontsize=7)
        for axes in axes_list[len(workloads) :]:
            axes.set_visible(False)
        path = out / f"{kind}.png"
        figure.savefig(path, dpi=100)
        written.append(path)
    if report.get("engine_overhead"):
        figure = Figure(figsize=(5.2, 4.0), layout="constrained")
        axes = figure.subplots()
        for beam, color in ((1, "tab:blue"), (4, "tab:orange")):
            points = sorted(
                (point["rows"], point["median_us"])
                for point in report["engine_overhead"]
                if point["beam"] == beam and point.get("median_us")
            )
            if points:
                axes.plot(
                    *zip(*points, strict=False),
                    marker="o",
                    color=color,
                    label="greedy" if beam == 1 else f"beam {beam}",
                )
        axes.set_xscale("log", base=2)
        axes.set_xlabel("decoder rows in the step")
        axes.set_ylabel("engine us per step (median), zero-cost model")
        axes.set_title("the engine's cost per step")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8)
        path = out / "engine_overhead.png"
        figure.savefig(path, dpi=100)
        written.append(path)
    return written


def write_report(report: dict, out: Path) -> list[Path]:
    """Write bench.json, bench.md, throughput.png, latency.png (and engine_overhead.png when measured) into
    `out`; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    checks = check_targets(report)
    report = dict(
        report,
        targets=[{"target": c.target, "figure": c.figure, "bar": c.bar, "met": c.met, "note": c.note} for c in checks],
    )
    json_path = out / "bench.json"
    json_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    markdown_path = out / "bench.md"
    markdown_path.write_text(markdown(report, checks), encoding="utf-8")
    return [json_path, markdown_path, *plot(report, out)]
