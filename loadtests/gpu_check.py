"""The GPU check: prove the serving path on an accelerator in one bounded run, and report what it measured.

    make gpu-check                                           # CUDA, report in reports/gpu-check
    python3 -m loadtests.gpu_check --provider cuda --out DIR # the same without make or a venv
    python3 -m loadtests.gpu_check --provider cpu --quick --out DIR   # what CI runs, so the script is proven

Steps, each recorded in DIR/gpu-check.json and DIR/gpu-check.md:
1. **provider**: sessions of the shipped default models are created on the requested provider, and the
   check fails loudly unless the session really runs it (onnxruntime-gpu falls back to the CPU quietly).
   On CUDA, `onnxruntime.preload_dlls()` runs first, so the CUDA and cuDNN libraries of an installed torch
   are found.
2. **parity**: the default models' inputs (loadtests/data/default_model_inputs.json) decoded greedily on the
   provider and on the CPU: identical outputs, the largest |difference| of the step's log probabilities and
   attention (teacher-forced with the CPU's tokens), and exact match against the references.
3. **tests**: tests/device (the session's provider, IO binding, the engine against the CPU, a gRPC round
   trip) under pytest with ATTNSERVE_TEST_PROVIDER set to the provider.
4. **benchmark**: the matrix-multiply peak on the provider; per model, the engine ceiling and the served
   throughput (attnserve serve, continuous batching, closed-loop gRPC clients) at 1, 64 and 256 clients, with
   the server's message for each failing status; with --phrasebook, also a phrasebook-size model (hidden 512,
   8,000 pieces) built on the spot with torch. On CUDA also TF32's parity differences, peak and ceiling
   (what `--cuda-tf32` would change), and one decoder step's time with IO binding on and off.

Exit status 0 when the provider, parity and tests checks pass (the benchmark reports figures, it does not
judge them); 1 otherwise. Runs in about 1 minute on 2 CPU cores with --quick, a few minutes on a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[1]
INPUTS = PROJECT_ROOT / "loadtests" / "data" / "default_model_inputs.json"


def newest_version(repository: Path, name: str) -> Path:
    """The folder of the newest version of model `name` (what a server with the default settings serves)."""
    from service.runtime.repository import discover

    return repository / name / str(max(discover(repository)[name]))


MODELS = ("dates", "numbers")
EXPECTED = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
LEVELS = (1, 64, 256)
# What the check imports beyond the standard library and numpy: a machine without a registry needs their wheels.
NEEDED_MODULES = {
    "onnxruntime": "onnxruntime-gpu",
    "onnx": "onnx",  # the matrix-multiply peak's graph is built with it
    "grpc": "grpcio",
    "grpc_health": "grpcio-health-checking",
    "grpc_reflection": "grpcio-reflection",
    "google.protobuf": "protobuf",
    "sentencepiece": "sentencepiece",
    "prometheus_client": "prometheus-client",
    "pydantic": "pydantic (with pydantic-core, annotated-types, typing-inspection)",
    "pydantic_settings": "pydantic-settings (with python-dotenv)",
    "pytest": "pytest",
    # `attnserve serve` serves HTTP beside gRPC, so the server and the device tests import aiohttp.
    "aiohttp": "aiohttp (with aiohappyeyeballs, aiosignal, attrs, frozenlist, multidict, propcache, yarl, idna)",
    # The engine's records cross between processes as msgspec structs, so the engine imports it in every mode.
    "msgspec": "msgspec",
    # The report's tables of loadtests.bench, which the check imports for the machine's description.
    "tabulate": "tabulate",
}
# What --phrasebook imports on top: the model is trained and exported on the spot (export/, the `train` extra).
PHRASEBOOK_MODULES = {
    "torch": "torch",
    "babel": "babel",
    "num2words": "num2words (with docopt)",
    "tqdm": "tqdm",
    "sacrebleu": "sacrebleu (with portalocker, regex, colorama, lxml)",
}


def missing_packages(modules: dict[str, str] | None = None) -> list[str]:
    """The packages of `modules` (NEEDED_MODULES by default) that cannot be imported here (importing, not just
    finding, catches a package whose own dependencies are missing, e.g. pydantic-settings without python-dotenv)."""
    import importlib

    missing = []
    for module, package in (NEEDED_MODULES if modules is None else modules).items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    return missing


def _load(repository: Path, name: str, provider: str, *, io_binding: bool | None = None, tf32: bool = False):
    """The newest version of model `name` on `provider`, with one intra-op thread."""
    from service.runtime.model import load_model

    return load_model(
        newest_version(repository, name), provider=provider, intra_op_threads=1, io_binding=io_binding, tf32=tf32
    )


def _log(message: str) -> None:
    print(f"[gpu-check] {message}", flush=True)


def check_provider(provider: str, repository: Path) -> dict:
    """Load each default model on `provider`; the session must really run it."""
    import onnxruntime

    if provider == "cuda":
        onnxruntime.preload_dlls()
    result = {
        "onnxruntime": onnxruntime.__version__,
        "available": onnxruntime.get_available_providers(),
        "device": onnxruntime.get_device(),
        "models": {},
    }
    for name in MODELS:
        model = _load(repository, name, provider)
        result["models"][name] = {"provider": model.provider, "load_s": round(model.load_seconds, 3)}
    result["ok"] = all(entry["provider"] == EXPECTED[provider] for entry in result["models"].values())
    return result


def _greedy(step_model, sources: list[list[int]], max_length: int) -> tuple[list[list[int]], list[tuple]]:
    """Greedy decoding of `sources` in one batch; returns the tokens and each step's (log probs, attention)."""
    from loadtests.ceiling import pad_sources
    from service.runtime.tokenizers import BOS, EOS

    ids, lengths = pad_sources(sources)
    encoded = step_model.encode(ids, lengths)
    tokens = np.full(len(sources), BOS, dtype=np.int64)
    state = encoded.state
    outputs: list[list[int]] = [[] for _ in sources]
    steps: list[tuple] = []
    done = np.zeros(len(sources), dtype=bool)
    for _ in range(max_length):
        out = step_model.step(tokens, lengths, encoded.memory, state)
        steps.append((out.topk_log_probs, out.attention))
        tokens, state = out.topk_ids[:, 0].astype(np.int64), out.state
        for row, token in enumerate(tokens.tolist()):
            if not done[row]:
                done[row] = token == EOS
                if not done[row]:
                    outputs[row].append(token)
        if done.all():
            break
    return outputs, steps


def _teacher_forced(step_model, sources: list[list[int]], forced: list[list[int]]) -> list[tuple]:
    """Each step's (log probs, attention) with the tokens of `forced` fed, for a like-for-like comparison."""
    from loadtests.ceiling import pad_sources
    from service.runtime.tokenizers import BOS

    ids, lengths = pad_sources(sources)
    encoded = step_model.encode(ids, lengths)
    state, steps = encoded.state, []
    tokens = np.full(len(sources), BOS, dtype=np.int64)
    for position in range(max(len(tokens_) for tokens_ in forced)):
        out = step_model.step(tokens, lengths, encoded.memory, state)
        steps.append((out.topk_log_probs, out.attention))
        state = out.state
        tokens = np.array([row[position] if position < len(row) else BOS for row in forced], dtype=np.int64)
    return steps


def _largest_differences(
    device_steps: list[tuple], cpu_steps: list[tuple], forced: list[list[int]]
) -> tuple[float, float]:
    """The largest |difference| of the steps' log probabilities and of their attention, over the positions a
    row really decodes (past its eos it is fed padding tokens)."""
    log_prob_diff = attention_diff = 0.0
    for position, ((lp_d, at_d), (lp_c, at_c)) in enumerate(zip(device_steps, cpu_steps, strict=False)):
        live = np.array([position < len(row) for row in forced])
        if live.any():
            log_prob_diff = max(log_prob_diff, float(np.abs(lp_d[live] - lp_c[live]).max()))
            attention_diff = max(attention_diff, float(np.abs(at_d[live] - at_c[live]).max()))
    return log_prob_diff, attention_diff


def check_parity(provider: str, repository: Path) -> dict:
    """Greedy outputs and step outputs on `provider` against the CPU, on the default models' inputs."""
    from service.runtime.tokenizers import EOS

    inputs = json.loads(INPUTS.read_text(encoding="utf-8"))
    result: dict = {"models": {}}
    for name in MODELS:
        device = _load(repository, name, provider)
        cpu = _load(repository, name, "cpu")
        pairs = inputs[name]
        sources = [device.source_tokenizer.encode(source) + [EOS] for source, _ in pairs]
        limit = device.document.limits.max_target_tokens
        on_device, _ = _greedy(device.step_model, sources, limit)
        on_cpu, _ = _greedy(cpu.step_model, sources, limit)
        forced = [tokens + [EOS] for tokens in on_cpu]
        cpu_steps = _teacher_forced(cpu.step_model, sources, forced)
        log_prob_diff, attention_diff = _largest_differences(
            _teacher_forced(device.step_model, sources, forced), cpu_steps, forced
        )
        texts = [device.target_tokenizer.decode(tokens) for tokens in on_device]
        entry = {
            "inputs": len(pairs),
            "greedy_identical": sum(a == b for a, b in zip(on_device, on_cpu, strict=False)),
            "exact_match": sum(text == reference for text, (_, reference) in zip(texts, pairs, strict=False))
            / len(pairs),
            "max_abs_log_prob": log_prob_diff,
            "max_abs_attention": attention_diff,
        }
        if provider == "cuda":  # what `--cuda-tf32` would cost in accuracy, for the record (not judged)
            tf32 = _load(repository, name, provider, tf32=True)
            entry["tf32_max_abs_log_prob"], entry["tf32_max_abs_attention"] = _largest_differences(
                _teacher_forced(tf32.step_model, sources, forced), cpu_steps, forced
            )
        result["models"][name] = entry
    result["ok"] = all(
        entry["greedy_identical"] == entry["inputs"] and entry["max_abs_log_prob"] < 1e-3
        for entry in result["models"].values()
    )
    return result


def run_device_tests(provider: str) -> dict:
    """tests/device under pytest with the provider; counts from pytest's own summary line."""
    started = time.monotonic()
    environment = dict(
        os.environ,
        ATTNSERVE_TEST_PROVIDER=provider,
        PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")])),
    )
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/device"],
        cwd=PROJECT_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    summary = completed.stdout.strip().splitlines()[-1] if completed.stdout.strip() else completed.stderr[-500:]
    counts = {kind: int(number) for number, kind in re.findall(r"(\d+) (passed|failed|error|errors|skipped)", summary)}
    return {
        "ok": completed.returncode == 0,
        "summary": summary,
        "counts": counts,
        "seconds": round(time.monotonic() - started, 1),
        "output_tail": "" if completed.returncode == 0 else (completed.stdout + completed.stderr)[-3000:],
    }


def build_phrasebook(cache: Path, repository: Path) -> Path:
    """A phrasebook-size model for the benchmark (see loadtests/phrasebook.py), trained briefly with torch
    (on the GPU when torch sees one): the cost per token does not depend on how well it is trained."""
    from loadtests.phrasebook import PhrasebookRecipe, ensure_phrasebook

    model = ensure_phrasebook(cache, repository, PhrasebookRecipe(train_steps=20, corpus_lines=12000), log=_log)
    return model.version_dir


def mean_step_s(model, sources: list[np.ndarray], rows: int, steps: int) -> float:
    """Mean seconds of one decoder step of `model` at `rows` rows (the first sources, repeated as needed), its
    memory unchanged between steps (as in a batch that no request joins or leaves): the fixed cost of a step,
    which is what one call in flight pays at every token."""
    from loadtests.ceiling import pad_sources
    from service.runtime.tokenizers import BOS

    ids, lengths = pad_sources([sources[index % len(sources)] for index in range(rows)])
    encoded = model.step_model.encode(ids, lengths)
    tokens, state = np.full(rows, BOS, dtype=np.int64), encoded.state
    for _ in range(5):  # warm: the first runs at a shape allocate
        out = model.step_model.step(tokens, lengths, encoded.memory, state, memory_version=1)
    started = time.perf_counter()
    for _ in range(steps):
        out = model.step_model.step(tokens, lengths, encoded.memory, state, memory_version=1)
        tokens, state = out.topk_ids[:, 0].astype(np.int64), out.state
    return (time.perf_counter() - started) / steps


def run_benchmark(provider: str, repository: Path, names: tuple[str, ...], *, quick: bool, log_dir: Path) -> dict:
    """Peak, engine ceiling and served throughput per model at LEVELS clients."""
    from loadtests.ceiling import measure_ceiling, tokenize_sources
    from loadtests.flops import measure_matmul_peak
    from loadtests.loadgen import CellPlan, LoadGenerator
    from loadtests.servers import attnserve_server
    from loadtests.workload import task_texts
    from service.settings import Settings

    inputs = json.loads(INPUTS.read_text(encoding="utf-8"))
    peak = measure_matmul_peak(1, provider, sizes=(256, 512) if quick else None, seconds=0.3 if quick else 1.0)
    result: dict = {
        "peak_gflops": peak.flops_per_s / 1e9,
        "peak_size": peak.size,
        # The served figures are of `attnserve serve` as this machine's defaults run it: say how.
        "frontends": Settings.from_sources([]).frontend_processes,
        "models": {},
    }
    _log(f"matrix-multiply peak: {peak.flops_per_s / 1e9:.0f} GFLOP/s")
    if provider == "cuda":
        tf32_peak = measure_matmul_peak(1, provider, seconds=0.3 if quick else 1.0, tf32=True)
        result["tf32_peak_gflops"] = tf32_peak.flops_per_s / 1e9
        _log(f"matrix-multiply peak with TF32: {tf32_peak.flops_per_s / 1e9:.0f} GFLOP/s")
    texts: dict[str, tuple[str, ...]] = {}
    for name in names:
        model = _load(repository, name, provider)
        model.warm_up()
        if name in inputs:
            texts[name] = tuple(source for source, _ in inputs[name])
        else:
            texts[name] = tuple(task_texts("phrasebook", 200))
        sources = tokenize_sources(model, texts[name])
        ceilings = {}
        for level in LEVELS:
            point = measure_ceiling(model, sources, level, min_seconds=0.2 if quick else 1.0, max_waves=20)
            ceilings[level] = {
                "tokens_per_s": point.tokens_per_s,
                "requests_per_s": point.requests_per_s,
                "step_ms": point.step_s * 1e3,
                "encode_ms": point.encode_s * 1e3,
            }
        result["models"][name] = {"engine_ceiling": ceilings, "served": {}}
        if provider == "cuda":
            # The fixed cost of a step on the device, with and without IO binding.
            step_ms = {}
            for binding in (True, False):
                bound = _load(repository, name, provider, io_binding=binding)
                for rows in (1, 64):
                    step_s = mean_step_s(bound, sources, rows, 50 if quick else 300)
                    step_ms[f"{rows} rows, IO binding {'on' if binding else 'off'}"] = 1e3 * step_s
            result["models"][name]["decoder_step_ms"] = step_ms
            _log(f"{name}: decoder step ms: " + ", ".join(f"{what}: {ms:.3f}" for what, ms in step_ms.items()))
            # What `--cuda-tf32` would buy at the largest batch.
            tf32 = _load(repository, name, provider, tf32=True)
            tf32.warm_up()
            point = measure_ceiling(tf32, sources, LEVELS[-1], min_seconds=0.2 if quick else 1.0, max_waves=20)
            result["models"][name]["tf32_ceiling_tokens_per_s"] = point.tokens_per_s
            _log(f"{name}: engine ceiling with TF32 at {LEVELS[-1]}: {point.tokens_per_s:.0f} tok/s")
        _log(
            f"{name}: engine ceiling "
            + ", ".join(f"{level}: {c['tokens_per_s']:.0f} tok/s" for level, c in ceilings.items())
        )
    extra = ("--max-active-hypotheses", "1024", "--max-waiting-requests", "4096")
    with (
        attnserve_server(
            repository,
            batching="continuous",
            threads=1,
            provider=provider,
            log_dir=log_dir,
            extra=extra,
            label="gpu-check",
        ) as server,
        LoadGenerator(processes=min(4, os.cpu_count() or 1), clients_per_process=64) as generator,
    ):
        for name in names:
            for level in LEVELS:
                plan = CellPlan(
                    address=server.address,
                    model=name,
                    texts=texts[name],
                    beam_size=0,
                    concurrency=level,
                    warmup_s=0.3 if quick else 1.0,
                    duration_s=0.7 if quick else 3.0,
                    max_requests=20000,
                    timeout_s=60.0,
                )
                measured = generator.run(plan)
                result["models"][name]["served"][level] = {
                    "tokens_per_s": measured.tokens_per_s,
                    "requests_per_s": measured.requests_per_s,
                    "p50_ms": measured.latency_p50_s * 1e3,
                    "p99_ms": measured.latency_p99_s * 1e3,
                    "ok": measured.ok,
                    "failures": measured.failures,
                    "failure_messages": measured.failure_messages,
                }
                _log(
                    f"{name}: {level} clients: {measured.tokens_per_s:.0f} tok/s, "
                    f"{measured.requests_per_s:.0f} calls/s, p50 {measured.latency_p50_s * 1e3:.2f} ms"
                    + (f", failures {measured.failures}: {measured.failure_messages}" if measured.failures else "")
                )
    return result


def _processes(bench: dict) -> str:
    frontends = bench.get("frontends", 0)
    if not frontends:
        return "one process"
    return f"{frontends} front-end process{'es' if frontends > 1 else ''} and the engine process"


def markdown(report: dict) -> str:
    lines = [
        f"# GPU check: provider {report['provider']}",
        "",
        f"{report['verdict']}. Ran {report['seconds']:.0f} s on {report['machine']['cpu']} "
        f"({report['machine']['cores']} cores), onnxruntime {report['steps']['provider'].get('onnxruntime', '?')}, "
        f"device {report['steps']['provider'].get('device', '?')}.",
        "",
    ]
    provider = report["steps"]["provider"]
    lines += ["## Provider", "", "| model | session provider | load s |", "|---|---|---:|"]
    lines += [f"| {name} | {entry['provider']} | {entry['load_s']:.2f} |" for name, entry in provider["models"].items()]
    parity = report["steps"].get("parity")
    if parity:
        lines += [
            "",
            "## Parity against the CPU",
            "",
            "| model | inputs | greedy identical | exact match | max abs log prob | max abs attention |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {name} | {e['inputs']} | {e['greedy_identical']} | {100 * e['exact_match']:.1f}% | "
            f"{e['max_abs_log_prob']:.2e} | {e['max_abs_attention']:.2e} |"
            for name, e in parity["models"].items()
        ]
        with_tf32 = [
            f"{name} {e['tf32_max_abs_log_prob']:.2e} (log prob), {e['tf32_max_abs_attention']:.2e} (attention)"
            for name, e in parity["models"].items()
            if "tf32_max_abs_log_prob" in e
        ]
        if with_tf32:
            lines += ["", "The same differences with TF32 (`--cuda-tf32`, not judged): " + "; ".join(with_tf32) + "."]
    tests = report["steps"].get("tests")
    if tests:
        lines += ["", "## Device tests (tests/device)", "", f"{tests['summary']} ({tests['seconds']} s)"]
    bench = report["steps"].get("benchmark")
    if bench:
        lines += [
            "",
            "## Benchmark",
            "",
            f"Matrix-multiply peak: {bench['peak_gflops']:.0f} GFLOP/s ({bench['peak_size']}^3 float32)"
            + (f"; {bench['tf32_peak_gflops']:.0f} GFLOP/s with TF32." if "tf32_peak_gflops" in bench else "."),
            "",
            f"Served by `attnserve serve` in the processes it chooses for this machine's CPUs: {_processes(bench)}.",
            "",
            "| model | clients | engine ceiling tok/s | served tok/s | served calls/s | p50 ms | p99 ms |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, entry in bench["models"].items():
            for level in LEVELS:
                ceiling, served = entry["engine_ceiling"][level], entry["served"].get(level, {})
                lines.append(
                    f"| {name} | {level} | {ceiling['tokens_per_s']:.0f} | {served.get('tokens_per_s', math.nan):.0f} "
                    f"| {served.get('requests_per_s', math.nan):.0f} | {served.get('p50_ms', math.nan):.2f} | "
                    f"{served.get('p99_ms', math.nan):.2f} |"
                )
        tf32_ceilings = [
            f"{name} {entry['tf32_ceiling_tokens_per_s']:.0f} tok/s"
            for name, entry in bench["models"].items()
            if "tf32_ceiling_tokens_per_s" in entry
        ]
        failed = [
            f"- {name} at {level} clients: {served['failures']}; the server said: {served.get('failure_messages', {})}"
            for name, entry in bench["models"].items()
            for level, served in entry["served"].items()
            if served.get("failures")
        ]
        if failed:
            lines += ["", "Calls that did not end OK:", ""] + failed
        step_lines = [
            f"- {name}: " + ", ".join(f"{what} {ms:.3f} ms" for what, ms in entry["decoder_step_ms"].items())
            for name, entry in bench["models"].items()
            if "decoder_step_ms" in entry
        ]
        if step_lines:
            lines += ["", "One decoder step (memory unchanged between steps):", ""] + step_lines
        if tf32_ceilings:
            lines += [
                "",
                f"Engine ceiling at {LEVELS[-1]} with TF32 (`--cuda-tf32`): " + "; ".join(tf32_ceilings) + ".",
            ]
    errors = report.get("errors")
    if errors:
        lines += ["", "## Errors", ""] + [f"- {step}: {message}" for step, message in errors.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m loadtests.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--provider", default="cuda", choices=sorted(EXPECTED))
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu-check.json and gpu-check.md")
    parser.add_argument("--repository", type=Path, default=PROJECT_ROOT / "models")
    parser.add_argument("--quick", action="store_true", help="short windows (CI's CPU run)")
    parser.add_argument(
        "--phrasebook",
        action="store_true",
        help="also benchmark a phrasebook-size model, built here with torch (a few minutes on a CPU)",
    )
    args = parser.parse_args(argv)
    missing = missing_packages({**NEEDED_MODULES, **(PHRASEBOOK_MODULES if args.phrasebook else {})})
    if missing:
        print(
            f"python3 -m loadtests.gpu_check: missing Python packages: {'; '.join(missing)}. Install their wheels "
            "(docs/gpu.md says how on a machine without a package registry) and run again.",
            file=sys.stderr,
        )
        return 2
    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    from loadtests.bench import machine_description

    report: dict = {
        "provider": args.provider,
        "machine": machine_description(args.provider, 1),
        "steps": {},
        "errors": {},
    }
    steps = [
        ("provider", lambda: check_provider(args.provider, args.repository)),
        ("parity", lambda: check_parity(args.provider, args.repository)),
        ("tests", lambda: run_device_tests(args.provider)),
    ]
    for step, run in steps:
        _log(f"{step} ...")
        try:
            report["steps"][step] = run()
        except Exception as exc:  # a check that cannot run fails; the report still says why
            report["errors"][step] = f"{type(exc).__name__}: {exc}"
            report["steps"][step] = {"ok": False}
        _log(f"{step}: {'ok' if report['steps'][step].get('ok') else 'FAILED'}")
        if step == "provider" and not report["steps"][step].get("ok"):
            break  # nothing else means anything on the wrong provider
    if report["steps"]["provider"].get("ok"):
        with tempfile.TemporaryDirectory(prefix="attnserve-gpu-check-") as work:
            repository = args.repository
            names: tuple[str, ...] = MODELS
            try:
                if args.phrasebook:
                    repository = Path(work) / "repository"
                    repository.mkdir()
                    for name in MODELS:
                        (repository / name).symlink_to((args.repository / name).resolve(), target_is_directory=True)
                    build_phrasebook(Path(work) / "cache", repository)
                    names = (*MODELS, "phrasebook")
                report["steps"]["benchmark"] = run_benchmark(
                    args.provider, repository, names, quick=args.quick, log_dir=args.out
                )
            except Exception as exc:
                report["errors"]["benchmark"] = f"{type(exc).__name__}: {exc}"
    checks = [report["steps"].get(step, {}).get("ok") for step in ("provider", "parity", "tests")]
    report["ok"] = all(checks)
    report["verdict"] = "Passed" if report["ok"] else "FAILED"
    report["seconds"] = time.monotonic() - started
    report["machine"]["platform"] = platform.platform()
    (args.out / "gpu-check.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    (args.out / "gpu-check.md").write_text(markdown(report), encoding="utf-8")
    _log(f"{report['verdict']} in {report['seconds']:.0f} s; report in {args.out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
