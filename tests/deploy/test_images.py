"""The serving image's build, without a container engine: the CPU Dockerfile's `build` stage is replayed
instruction by instruction (its WORKDIR, ENV and COPY set, filtered by .dockerignore, and its RUN of
deploy/docker/install-serving.sh) into a scratch root, then the installed entry point serves a real model with
the `serving` stage's environment, from outside the checkout, with a home folder nothing can be written to (as
on the image's read-only root). So the exact install step of both images (they share it: test_manifests.py) is
proven by the test suite on any machine; `make image-check` (deploy/images.py) builds and runs the images
themselves where podman is available."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import grpc
import pytest

from deploy.images import mallocs_said, noisy_lines
from deploy.tool import DOCKERFILES, REPOSITORY_ROOT
from service.gen.attnserve.v1 import translator_pb2 as pb
from service.gen.attnserve.v1 import translator_pb2_grpc as pb_grpc
from service.runtime.allocator import jemalloc_library
from tests.deploy.dockerfiles import dockerignore_patterns, is_ignored, parse_dockerfile
from tests.service.server_harness import free_ports, wait_until_serving

pytestmark = pytest.mark.slow

CPU_DOCKERFILE = DOCKERFILES[0]


def _env_pairs(arguments: str) -> dict[str, str]:
    """`ENV A=1 B=2` (the key=value form this project uses) as a dict."""
    pairs = {}
    for token in shlex.split(arguments):
        key, _, value = token.partition("=")
        pairs[key] = value
    return pairs


def _copy_from_context(sources: list[str], destination: Path, patterns: list[str]) -> None:
    """COPY: each source (a file or a folder's contents) from the repository into `destination`,
    leaving out what .dockerignore excludes."""
    for source in sources:
        origin = REPOSITORY_ROOT / source
        assert not is_ignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
        if origin.is_file():
            target = destination / origin.name if destination.is_dir() else destination
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, target)
            continue
        for path in sorted(origin.rglob("*")):
            relative = path.relative_to(REPOSITORY_ROOT).as_posix()
            if path.is_dir() or is_ignored(relative, patterns):
                continue
            target = destination / path.relative_to(origin)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def replay_build_stage(root: Path) -> Path:
    """Replay the Dockerfile's `build` stage with `root` standing for the image's "/"; returns the venv."""
    build = parse_dockerfile(CPU_DOCKERFILE)[0]
    assert build["name"] == "build"
    patterns = dockerignore_patterns(REPOSITORY_ROOT / ".dockerignore")
    workdir = "/"
    # Like a build with the host's pip and proxy settings passed as build arguments; the Dockerfile's ENV wins.
    passed = {k: v for k, v in os.environ.items() if k.startswith("PIP_") or k.lower().endswith("_proxy")}
    environment = {**passed, "PATH": os.environ["PATH"], "HOME": str(root)}
    ran_install = False
    for instruction, arguments in build["instructions"]:
        if instruction == "WORKDIR":
            workdir = arguments
            (root / workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)
        elif instruction == "ENV":
            environment.update(_env_pairs(arguments))
        elif instruction == "COPY":
            *sources, destination = shlex.split(arguments)
            assert not any(s.startswith("--") for s in sources), "build-stage COPY takes files from the context only"
            target = (
                root / workdir.lstrip("/") / destination
                if not destination.startswith("/")
                else root / destination.lstrip("/")
            )
            if destination.endswith("/") or len(sources) > 1:
                target.mkdir(parents=True, exist_ok=True)
            _copy_from_context(sources, target, patterns)
        elif instruction == "RUN":
            # Image paths become paths under `root`; everything else runs as written.
            command = [str(root / t.lstrip("/")) if t.startswith("/") else t for t in shlex.split(arguments)]
            result = subprocess.run(
                command, cwd=root / workdir.lstrip("/"), env=environment, capture_output=True, text=True, timeout=900
            )
            assert result.returncode == 0, f"RUN {arguments} failed:\n{result.stdout}\n{result.stderr}"
            ran_install |= "install-serving.sh" in arguments
    assert ran_install
    return root / "opt" / "attnserve"


def test_the_build_stage_installs_a_torch_free_server_that_serves(tiny_repository: Path, tmp_path: Path) -> None:
    venv = replay_build_stage(tmp_path / "rootfs")
    python = venv / "bin" / "python"

    # No torch, no training code, no plotting: only what the image COPYs and the CPU runtime; no pip, no bytecode.
    script = (
        "import importlib.metadata as m, importlib.util as u, json, service; print(json.dumps({"
        "'missing': [n for n in ('torch', 'export', 'matplotlib', 'pip') if u.find_spec(n) is None], "
        "'onnxruntime': sorted(d.metadata['Name'] for d in m.distributions() if 'onnxruntime' in d.metadata['Name']),"
        "'service': service.__file__}))"
    )
    probe = subprocess.run(
        [str(python), "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"},
        check=True,
    )
    found = json.loads(probe.stdout)
    assert found["missing"] == ["torch", "export", "matplotlib", "pip"]
    assert found["onnxruntime"] == ["onnxruntime"]  # the CPU package, not onnxruntime-gpu
    assert Path(found["service"]).is_relative_to(venv), found["service"]  # the installed copy, not the checkout
    assert not list(venv.rglob("*.pyc"))

    # --plot says how to get it, before calling any server.
    plot = subprocess.run(
        [str(venv / "bin" / "attnserve"), "translate", "--server", "127.0.0.1:1", "--plot", "a.png", "3 mars 1999"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert plot.returncode == 2
    assert "--plot draws with matplotlib, which is not installed: pip install 'attnserve[plot]'" in plot.stderr

    # Serve with the serving stage's environment; the tiny repository stands for the /models volume. The home
    # folder cannot be made (its parent is a file; the image's, /nonexistent, is on a read-only root).
    (tmp_path / "read-only").write_text("")
    serving = parse_dockerfile(CPU_DOCKERFILE)[1]
    environment: dict[str, str] = {"HOME": str(tmp_path / "read-only" / "home")}
    for instruction, arguments in serving["instructions"]:
        if instruction == "ENV":
            environment.update(_env_pairs(arguments))
    environment["PATH"] = environment["PATH"].replace("/opt/attnserve", str(venv)).replace("$PATH", "/usr/bin:/bin")
    port, metrics_port, http_port = free_ports(3)
    environment.update(
        ATTNSERVE_MODEL_REPOSITORY=str(tiny_repository),
        ATTNSERVE_HOST="127.0.0.1",  # loopback only in tests
        ATTNSERVE_PORT=str(port),
        ATTNSERVE_METRICS_PORT=str(metrics_port),
        ATTNSERVE_HTTP_PORT=str(http_port),
        ATTNSERVE_INTRA_OP_THREADS="1",
    )
    assert environment["ATTNSERVE_PROVIDER"] == "cpu"
    entrypoint = shutil.which("attnserve", path=environment["PATH"])
    assert entrypoint is not None and Path(entrypoint).is_relative_to(venv)
    process = subprocess.Popen(
        [entrypoint, "serve"], cwd=tmp_path, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        wait_until_serving(f"127.0.0.1:{port}", timeout_s=120, process=process)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            response = pb_grpc.TranslatorStub(channel).Translate(
                pb.TranslateRequest(model="dates", texts=["3 mars 1999"]), timeout=30
            )
        assert response.model == "dates" and response.translations[0].hypotheses[0].text
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
        log = output.decode(errors="replace")
        assert process.returncode == 0, log
        # Quiet on a read-only root: onnxruntime's telemetry (on in its own default) would warn that it cannot
        # persist its device id.
        assert "attnserve listening on" in log and noisy_lines(log) == [], log
        # The console script starts itself again on jemalloc where it is installed (as in the image).
        malloc = "jemalloc's malloc" if jemalloc_library() is not None else "the C library's malloc"
        mallocs = mallocs_said(log)
        assert mallocs and set(mallocs) == {malloc}, log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
