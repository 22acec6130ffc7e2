"""Build the serving images and the reset guard's with podman, and check the CPU image and the guard as they run.

    python -m deploy.images build     # `make images`: the CPU images (volume, baked models), the guard's, the GPU one
    python -m deploy.images check     # `make image-check` (CI): build the CPU images and the guard's, run and check

The Dockerfiles in deploy/docker are built as they are. Their base images come from Docker Hub; where it
cannot be reached, the CPU image's base, python:3.11-slim-bookworm, is stood in for by an image made from
Debian's own packages (debootstrap: bookworm's Python 3.11, python3-venv, ca-certificates, trimmed as Debian's
slim images are), kept in podman's store under a tag that hashes its recipe, so it is made once per recipe.
The GPU image is skipped, saying why, when its CUDA base cannot be pulled.

podman runs as root with runc (`--runtime runc`), host networking, and ulimits no higher than this process's
hard limits (podman's defaults can be higher, which the runtime then fails to set). The machine's CA store is
mounted read-only into the build, so pip inside trusts what pip outside trusts.

What `check` asserts, for the image with the models from a read-only volume and for the image with them baked
in, each run as deploy/k8s runs it (read-only root, only /tmp writable, every capability dropped, no new
privileges, the image's non-root user):
- inside: the user is uid 10001, nothing but /tmp can be written, no torch, no matplotlib, no compiler, no
  bytecode files, onnxruntime is the CPU package;
- through a client that learns the API by reflection (deploy/reflection.py): health SERVING, correct
  translations from both default models, KServe v2 ServerReady and ModelReady, GetModel's provider;
- the metrics page counts exactly the calls made;
- SIGTERM while calls are in flight: every call finishes with its result, the container exits 0;
- the log holds no warning or error (onnxruntime's telemetry, the usual culprit on a read-only root, is off), and
  says the server runs on jemalloc's malloc (the image installs it; `memory_allocator` auto preloads it);
- the CPU image (models from a volume) is under IMAGE_SIZE_LIMIT_MB.

And for the reset guard's image (deploy/docker/Dockerfile.proxy: nghttpx, the sidecar of
deploy/k8s/components/reset-guard), run restricted in front of the CPU image: both models' translations pass
through it; a connection that resets 500 streams stays open and one that resets 2,000 is ended with GOAWAY (the
image's nghttp2 has the reset limit); stopped with calls in flight (its stop signal, SIGQUIT), it lets each finish
with its result and exits 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.tool import DOCKERFILES, PROXY_DOCKERFILE, REPOSITORY_ROOT, DeployToolError, require_tool

CPU_DOCKERFILE, GPU_DOCKERFILE = DOCKERFILES
VERSION = tomllib.loads((REPOSITORY_ROOT / "pyproject.toml").read_text())["project"]["version"]
CPU_IMAGE = f"localhost/attnserve:{VERSION}-cpu"
CPU_BAKED_IMAGE = f"localhost/attnserve:{VERSION}-cpu-models"
GPU_IMAGE = f"localhost/attnserve:{VERSION}-gpu"
CPU_BUILD_STAGE = f"localhost/attnserve-build-stage:{VERSION}-cpu"
PROXY_IMAGE = f"localhost/attnserve-proxy:{VERSION}"
BAKED_MODELS = "models"
"""The build context folder baked into CPU_BAKED_IMAGE, and mounted as the volume of CPU_IMAGE: the default models."""
IMAGE_SIZE_LIMIT_MB = 300
CA_STORE = Path("/etc/ssl/certs")

STANDIN_REPOSITORY = "localhost/attnserve-python-standin"
STANDIN_RECIPE: dict[str, Any] = {
    "suite": "bookworm",
    "variant": "minbase",
    "packages": ["python3", "python3-venv", "ca-certificates"],
    # What Debian's slim images leave out too: documentation but the copyright files, manual pages,
    # translations, apt's package lists and caches, logs.
    "keep_in_doc": "copyright",
    "remove": [
        "usr/share/man",
        "usr/share/info",
        "usr/share/locale",
        "usr/share/lintian",
        "var/cache/apt",
        "var/lib/apt/lists",
        "var/log",
    ],
    # python:3.11-slim-bookworm's interpreter is /usr/local/bin/python3; the Dockerfile's venv links to
    # whichever python3 comes first on PATH, so the stand-in offers it at the same place.
    "links": {"usr/local/bin/python3": "/usr/bin/python3", "usr/local/bin/python": "/usr/bin/python3"},
    # The image configuration python:3.11-slim-bookworm has (its PATH, locale and command).
    "changes": [
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "ENV LANG=C.UTF-8",
        'CMD ["python3"]',
    ],
}
DEFAULT_DEBIAN_MIRROR = "http://deb.debian.org/debian"

# What the shipped default models answer (the newcomer check asks the same of `make serve`).
TRANSLATIONS = {
    "dates": ("samedi 21 novembre 2026", "2026-11-21"),
    "numbers": ("neunhundertsiebzig", "nine hundred and seventy"),
}
COMPILERS = ("cc", "c++", "gcc", "g++", "clang", "clang++", "tcc", "x86_64-linux-gnu-gcc", "aarch64-linux-gnu-gcc")
SERVING_TIMEOUT_S = 300.0
"""Bound on a container's start (model loading and warm-up); a hang, not a measurement."""
DRAIN_CALLS = 6
DRAIN_TEXTS = 32


class ImageCheckFailed(AssertionError):
    """What the running image did differs from what it must do."""


def log(message: str) -> None:
    print(f"images: {message}", flush=True)


@contextmanager
def timed(what: str, timings: dict[str, float]) -> Iterator[None]:
    started = time.monotonic()
    yield
    timings[what] = time.monotonic() - started
    log(f"{what}: {timings[what]:.1f} s")


# ----- podman -----------------------------------------------------------------------------------------------------


def ulimit_flags() -> list[str]:
    """`--ulimit` flags at this process's hard limits, which the runtime cannot raise a container's above. The
    process limit is also kept to the kernel's pid_max: podman 4.3 lowers its own to that (32768 on the machines
    this was made on), and the runtime inherits it."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    files = resource.getrlimit(resource.RLIMIT_NOFILE)[1]  # never unlimited on Linux (fs.nr_open bounds it)
    processes = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    processes = pid_max if processes == resource.RLIM_INFINITY else min(processes, pid_max)
    return ["--ulimit", f"nofile={files}:{files}", "--ulimit", f"nproc={processes}:{processes}"]


def podman_command(*arguments: str) -> list[str]:
    return [require_tool("podman"), "--runtime", "runc", *arguments]


def podman(*arguments: str, check: bool = True, capture: bool = True, timeout_s: float = 900.0) -> str:
    """Run podman; its stdout (when captured). Raises DeployToolError when it fails and `check` is set."""
    result = subprocess.run(
        podman_command(*arguments), capture_output=capture, text=True, timeout=timeout_s, check=False
    )
    if check and result.returncode != 0:
        output = (result.stdout or "") + (result.stderr or "") if capture else "(output above)"
        raise DeployToolError(f"podman {' '.join(arguments[:2])} failed ({result.returncode}): {output.strip()}")
    return result.stdout or "" if capture else ""


def image_exists(name: str) -> bool:
    return subprocess.run(podman_command("image", "exists", name), check=False).returncode == 0


def image_size_mb(name: str) -> float:
    return int(podman("image", "inspect", "--format", "{{.Size}}", name).strip()) / 1e6


def qualified(image: str) -> str:
    """A Docker Hub short name as podman pulls it without asking (`python:3.11` -> `docker.io/library/python:3.11`)."""
    first = image.split("/", 1)[0]
    if "/" in image and ("." in first or ":" in first or first == "localhost"):
        return image
    return f"docker.io/{image}" if "/" in image else f"docker.io/library/{image}"


def dockerfile_default(dockerfile: Path, argument: str) -> str:
    """The default value of `ARG argument=...` in a Dockerfile."""
    match = re.search(rf"^ARG {argument}=(\S+)\s*$", dockerfile.read_text(), re.MULTILINE)
    if match is None:
        raise DeployToolError(f"{dockerfile.name} has no ARG {argument}=... default")
    return match.group(1)


def pull(image: str) -> bool:
    """Whether `image` is in podman's store, pulling it if needed (False when the registry cannot be reached)."""
    if image_exists(image):
        return True
    result = subprocess.run(podman_command("pull", "--quiet", image), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        log(f"cannot pull {image}: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'failed'}")
    return result.returncode == 0


# ----- the stand-in base --------------------------------------------------------------------------------------------


def debian_mirror(suite: str, sources: Sequence[Path] | None = None) -> str:
    """The first apt source of this machine that serves Debian's `suite` (one-line .list and deb822 .sources
    files), else deb.debian.org; DEBIAN_MIRROR overrides both."""
    if os.environ.get("DEBIAN_MIRROR"):
        return os.environ["DEBIAN_MIRROR"]
    if sources is None:
        apt = Path("/etc/apt")
        sources = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*"))]
    for path in sources:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            found = _deb822_mirror(text, suite)
        elif path.suffix == ".list" or path.name == "sources.list":
            found = _one_line_mirror(text, suite)
        else:
            found = None
        if found:
            return found
    return DEFAULT_DEBIAN_MIRROR


def _one_line_mirror(text: str, suite: str) -> str | None:
    for line in text.splitlines():
        fields = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
        if len(fields) >= 3 and fields[0] == "deb" and fields[2] == suite:
            return fields[1].rstrip("/")
    return None


def _deb822_mirror(text: str, suite: str) -> str | None:
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if fields.get("enabled", "yes").lower() == "no" or "deb" not in fields.get("types", "").split():
            continue
        if suite in fields.get("suites", "").split() and fields.get("uris"):
            return fields["uris"].split()[0].rstrip("/")
    return None


def standin_tag(recipe: dict[str, Any] = STANDIN_RECIPE) -> str:
    """The stand-in's tag: the suite and a hash of the whole recipe, so a changed recipe makes a new image."""
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return f"{STANDIN_REPOSITORY}:{recipe['suite']}-{digest}"


def make_standin(timings: dict[str, float]) -> str:
    """The stand-in base from podman's store, or made now (debootstrap, trimmed, `podman import`)."""
    tag = standin_tag()
    if image_exists(tag):
        log(f"stand-in base {tag} is in podman's store")
        return tag
    recipe = STANDIN_RECIPE
    mirror = debian_mirror(recipe["suite"])
    with (
        timed(f"stand-in base {tag} (debootstrap from {mirror})", timings),
        tempfile.TemporaryDirectory(prefix="attnserve-standin-", dir="/var/tmp") as scratch,
    ):
        root = Path(scratch) / "root"
        command = [
            require_tool("debootstrap"),
            f"--variant={recipe['variant']}",
            f"--include={','.join(recipe['packages'])}",
            recipe["suite"],
            str(root),
            mirror,
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise DeployToolError(f"debootstrap failed:\n{(result.stdout + result.stderr)[-4000:]}")
        doc = root / "usr/share/doc"
        for path in sorted(doc.rglob("*"), reverse=True):  # files before their folders
            if path.is_dir() and not path.is_symlink():
                if not any(path.iterdir()):
                    path.rmdir()
            elif path.name != recipe["keep_in_doc"]:
                path.unlink()
        for relative in recipe["remove"]:
            for path in (root / relative).glob("*"):
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        for relative, target in recipe["links"].items():
            (root / relative).symlink_to(target)
        changes = [flag for change in recipe["changes"] for flag in ("--change", change)]
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(
            podman_command("import", "--quiet", *changes, "-", tag), stdin=tar.stdout, capture_output=True, text=True
        )
        assert tar.stdout is not None
        tar.stdout.close()
        if tar.wait() != 0 or imported.returncode != 0:
            raise DeployToolError(f"podman import of the stand-in failed: {imported.stderr.strip()}")
    # Stand-ins of older recipes only take room now.
    for line in podman("images", "--format", "{{.Repository}}:{{.Tag}}", STANDIN_REPOSITORY).split():
        if line != tag:
            podman("rmi", line, check=False)
    return tag


def cpu_base(timings: dict[str, float]) -> str:
    """The CPU image's base: the Dockerfile's own when it can be pulled, else the stand-in."""
    real = qualified(dockerfile_default(CPU_DOCKERFILE, "PYTHON_IMAGE"))
    if pull(real):
        return real
    log(f"{real} cannot be pulled: the CPU image is built on a stand-in made from Debian's packages")
    return make_standin(timings)


# ----- building -------------------------------------------------------------------------------------------------------


def image_id(name: str) -> str | None:
    if not image_exists(name):
        return None
    return podman("image", "inspect", "--format", "{{.Id}}", name).strip()


def build(dockerfile: Path, tag: str, build_arguments: dict[str, str], target: str | None = None) -> None:
    """`podman build` of one stage (`target`) or the whole Dockerfile, tagged `tag`; the image `tag` named before
    is removed, with the cached layers only it used, so that podman's store does not grow with every change."""
    previous = image_id(tag)
    arguments = ["build", "--network", "host", *ulimit_flags(), "--file", str(dockerfile), "--tag", tag]
    if target is not None:
        arguments += ["--target", target]
    if CA_STORE.is_dir():
        arguments += ["--volume", f"{CA_STORE}:{CA_STORE}:ro"]
    for key, value in build_arguments.items():
        arguments += ["--build-arg", f"{key}={value}"]
    podman(*arguments, str(REPOSITORY_ROOT), capture=False, timeout_s=1800.0)
    if previous is not None and previous != image_id(tag):
        podman("rmi", previous, check=False)  # fails, harmlessly, while a container or another tag uses it


def build_cpu_images(timings: dict[str, float]) -> None:
    base = cpu_base(timings)
    arguments = {"PYTHON_IMAGE": base}
    with timed(f"build {CPU_IMAGE}", timings):
        # The build stage under a tag of its own: its layers are the cache of the next build, and the old ones
        # go when it changes (untagged, only the images built from it would keep them).
        build(CPU_DOCKERFILE, CPU_BUILD_STAGE, arguments, target="build")
        build(CPU_DOCKERFILE, CPU_IMAGE, arguments)
    with timed(f"build {CPU_BAKED_IMAGE}", timings):
        build(CPU_DOCKERFILE, CPU_BAKED_IMAGE, {**arguments, "MODEL_REPOSITORY": BAKED_MODELS})
    for image in (CPU_IMAGE, CPU_BAKED_IMAGE):
        log(f"{image}: {image_size_mb(image):.0f} MB")


def build_proxy_image(timings: dict[str, float]) -> None:
    """The reset guard's image, on its Dockerfile's Debian base or, where that cannot be pulled, on the stand-in
    (Debian bookworm too)."""
    real = qualified(dockerfile_default(PROXY_DOCKERFILE, "DEBIAN_IMAGE"))
    base = real
    if not pull(real):
        log(f"{real} cannot be pulled: the reset guard's image is built on the stand-in (Debian bookworm too)")
        base = make_standin(timings)
    with timed(f"build {PROXY_IMAGE}", timings):
        build(PROXY_DOCKERFILE, PROXY_IMAGE, {"DEBIAN_IMAGE": base})
    log(f"{PROXY_IMAGE}: {image_size_mb(PROXY_IMAGE):.0f} MB")


def build_gpu_image(timings: dict[str, float]) -> bool:
    base = qualified(dockerfile_default(GPU_DOCKERFILE, "CUDA_IMAGE"))
    if not pull(base):
        log(f"GPU image skipped: its base {base} cannot be pulled from here (build it where it can: make images)")
        return False
    with timed(f"build {GPU_IMAGE}", timings):
        build(GPU_DOCKERFILE, GPU_IMAGE, {"CUDA_IMAGE": base})
    log(f"{GPU_IMAGE}: {image_size_mb(GPU_IMAGE):.0f} MB")
    return True


# ----- checking a running container -----------------------------------------------------------------------------------


# Run inside the container as its user: what it may write and what the image holds.
_PROBE = r"""
import errno, glob, importlib.metadata as md, importlib.util, json, os, shutil, sys
writes = {}
for folder in ("/", "/opt/attnserve", "/models", "/tmp", os.environ.get("HOME", "/nonexistent")):
    try:  # as a program would: make the folder (HOME, /nonexistent, is not there), then a file in it
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, ".attnserve-write-probe"), "w") as probe:
            probe.write("x")
        os.unlink(os.path.join(folder, ".attnserve-write-probe"))
        writes[folder] = "ok"
    except OSError as error:
        writes[folder] = errno.errorcode.get(error.errno, str(error.errno))
compilers = sorted({c for c in COMPILERS if shutil.which(c)} | {p for d in ("/usr/bin", "/usr/local/bin")
                   for p in glob.glob(d + "/*-gcc*") + glob.glob(d + "/*clang*")})
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(), "writes": writes, "compilers": compilers,
    "modules": {m: importlib.util.find_spec(m) is not None for m in ("torch", "matplotlib", "onnxruntime")},
    "distributions": sorted(d.metadata["Name"].lower() for d in md.distributions()),
    "bytecode": sum(1 for _ in glob.iglob("/opt/attnserve/**/*.pyc", recursive=True)),
}))
"""


@dataclass
class Container:
    """One run of an image as deploy/k8s runs it, on host networking with ports of its own."""

    name: str
    image: str
    port: int
    metrics_port: int
    http_port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def state(self) -> dict[str, Any]:
        return json.loads(podman("inspect", "--format", "{{json .State}}", self.name))

    def logs(self) -> str:
        result = subprocess.run(podman_command("logs", self.name), capture_output=True, text=True, check=False)
        return result.stdout + result.stderr


def start_container(image: str, volume: Path | None, label: str) -> Container:
    from loadtests.servers import free_ports

    container = Container(f"attnserve-image-check-{label}-{os.getpid()}", image, *free_ports(3))
    arguments = [
        "run",
        "--detach",
        "--name",
        container.name,
        "--network",
        "host",
        *ulimit_flags(),
        # As the restricted pods of deploy/k8s: read-only root, /tmp the one writable place (their emptyDir).
        "--read-only",
        "--read-only-tmpfs=false",
        "--tmpfs",
        "/tmp:rw,size=256m,mode=1777",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        # Loopback only, on free ports; one request at a time, so that calls queue up for the drain check.
        "--env",
        "ATTNSERVE_HOST=127.0.0.1",
        "--env",
        f"ATTNSERVE_PORT={container.port}",
        "--env",
        f"ATTNSERVE_METRICS_PORT={container.metrics_port}",
        "--env",
        f"ATTNSERVE_HTTP_PORT={container.http_port}",
        "--env",
        "ATTNSERVE_BATCHING=none",
        "--env",
        "ATTNSERVE_DRAIN_GRACE_SECONDS=120",
    ]
    if volume is not None:
        arguments += ["--volume", f"{volume}:/models:ro"]
    podman(*arguments, image)
    return container


def wait_serving(container: Container) -> None:
    """Poll health through reflection until SERVING, failing at once if the container stops."""
    import grpc

    from deploy.reflection import ReflectionClient

    deadline = time.monotonic() + SERVING_TIMEOUT_S
    with grpc.insecure_channel(container.address) as channel:
        while time.monotonic() < deadline:
            if not container.state().get("Running"):
                raise ImageCheckFailed(f"{container.image} stopped before serving:\n{container.logs()}")
            try:
                reply = ReflectionClient(channel).call("grpc.health.v1.Health/Check", {"service": ""}, timeout_s=2)
                if reply["status"] == "SERVING":
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise ImageCheckFailed(f"{container.image}: no SERVING health within {SERVING_TIMEOUT_S:.0f} s")


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise ImageCheckFailed(message)


def check_inside(container: Container) -> None:
    probe = _PROBE.replace("COMPILERS", repr(COMPILERS))
    found = json.loads(podman("exec", container.name, "python", "-c", probe))
    expect(found["uid"] == 10001 and found["gid"] == 10001, f"runs as uid/gid {found['uid']}/{found['gid']}")
    home = [folder for folder in found["writes"] if folder not in ("/", "/opt/attnserve", "/models", "/tmp")]
    expected_writes = {"/": "EROFS", "/opt/attnserve": "EROFS", "/models": "EROFS", "/tmp": "ok"}
    expected_writes.update({folder: "EROFS" for folder in home})
    expect(found["writes"] == expected_writes, f"writable places: {found['writes']}, expected {expected_writes}")
    expect(not found["compilers"], f"compilers in the image: {found['compilers']}")
    expect(
        found["modules"] == {"torch": False, "matplotlib": False, "onnxruntime": True},
        f"modules: {found['modules']}",
    )
    expect(
        "onnxruntime" in found["distributions"] and "onnxruntime-gpu" not in found["distributions"],
        "onnxruntime is not the CPU package",
    )
    expect(
        "pip" not in found["distributions"] and "setuptools" not in found["distributions"],
        "pip or setuptools in the serving venv",
    )
    expect(found["bytecode"] == 0, f"{found['bytecode']} bytecode files under /opt/attnserve")
    inspected = json.loads(podman("inspect", "--format", "{{json .HostConfig.ReadonlyRootfs}}", container.name))
    expect(inspected is True, "the root filesystem is not read-only")


def check_api(container: Container) -> None:
    """Reflection lists the services; per model one Translate call (correct), health, KServe v2 ModelReady and
    GetModel's provider; KServe v2 ServerReady."""
    import grpc

    from deploy.reflection import ReflectionClient

    with grpc.insecure_channel(container.address) as channel:
        client = ReflectionClient(channel)
        services = client.services()
        for service in ("attnserve.v1.Translator", "inference.GRPCInferenceService", "grpc.health.v1.Health"):
            expect(service in services, f"reflection does not list {service}: {services}")
        for model, (text, expected) in TRANSLATIONS.items():
            reply = client.call("attnserve.v1.Translator/Translate", {"model": model, "texts": [text]})
            got = reply["translations"][0]["hypotheses"][0]["text"]
            expect(got == expected, f"{model}: {text!r} -> {got!r}, expected {expected!r}")
            health = client.call("grpc.health.v1.Health/Check", {"service": model})
            expect(health["status"] == "SERVING", f"health of {model}: {health}")
            ready = client.call("inference.GRPCInferenceService/ModelReady", {"name": model})
            expect(ready == {"ready": True}, f"KServe ModelReady {model}: {ready}")
            info = client.call("attnserve.v1.Translator/GetModel", {"name": model})
            expect(info["provider"] == "CPUExecutionProvider", f"{model} runs on {info['provider']}")
        expect(client.call("inference.GRPCInferenceService/ServerReady", {}) == {"ready": True}, "KServe ServerReady")


def check_http(container: Container) -> None:
    """The HTTP port: KServe v2 readiness, and one translation through the JSON API."""
    base = f"http://127.0.0.1:{container.http_port}"
    with urllib.request.urlopen(f"{base}/v2/health/ready", timeout=10) as response:
        expect(response.status == 200, f"{base}/v2/health/ready: HTTP {response.status}")
    model, (text, expected) = next(iter(TRANSLATIONS.items()))
    body = json.dumps({"model": model, "texts": [text]}).encode()
    request = urllib.request.Request(f"{base}/v1/translate", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        got = json.load(response)["translations"][0]["hypotheses"][0]["text"]
    expect(got == expected, f"{base}/v1/translate {model}: {text!r} -> {got!r}, expected {expected!r}")


def check_metrics(container: Container) -> None:
    """The page is Prometheus text and counts exactly the one Translate call per model check_api made."""
    from loadtests.servers import metric, scrape

    url = f"http://127.0.0.1:{container.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        expect(response.status == 200, f"{url}: HTTP {response.status}")
        content_type = response.headers.get("Content-Type", "")
    expect(content_type.startswith("text/plain"), f"{url}: Content-Type {content_type}")
    samples = scrape(url, timeout_s=10)
    for model in TRANSLATIONS:
        counted = metric(
            samples, "attnserve_requests_total", method="Translate", code="OK", model=model, protocol="grpc"
        )
        expect(counted == 1.0, f"{url}: {counted} Translate calls of {model} counted, 1 made")
        provider = metric(samples, "attnserve_model_info", model=model, provider="CPUExecutionProvider")
        expect(provider == 1.0, f"{url}: attnserve_model_info of {model}: {provider}")


def stopped_with_calls_in_flight(
    container: Container, stop: Sequence[str], how: str, also_stopped: Sequence[Container] = ()
) -> int:
    """Calls queued through `container` (the server takes one request at a time, so they queue), then `podman
    *stop` once the first has finished, so that every call has reached the server and the rest are in flight: each
    must finish with its result, and `container` and `also_stopped` exit 0. `how` names the stop in messages.
    Returns how many calls were in flight."""
    import grpc

    from deploy.reflection import ReflectionClient

    model, (text, expected) = next(iter(TRANSLATIONS.items()))
    with grpc.insecure_channel(container.address) as channel:
        client = ReflectionClient(channel)
        translate, _ = client.method("attnserve.v1.Translator/Translate")
        request = client.request(
            "attnserve.v1.Translator/Translate",
            {"model": model, "texts": [text] * DRAIN_TEXTS, "options": {"beam_size": 8, "num_hypotheses": 2}},
        )
        futures = [translate.future(request, timeout=300) for _ in range(DRAIN_CALLS)]
        deadline = time.monotonic() + SERVING_TIMEOUT_S
        while not any(future.done() for future in futures):  # then every call has reached the server
            expect(time.monotonic() < deadline, f"no call finished before {how}")
            time.sleep(0.05)
        in_flight = sum(not future.done() for future in futures)
        podman(*stop)
        replies = [future.result() for future in futures]  # raises if a call failed
    expect(in_flight > 0, f"every call finished before {how}; the drain was not exercised")
    for reply in replies:
        texts = [translation.hypotheses[0].text for translation in reply.translations]
        expect(texts == [expected] * DRAIN_TEXTS, f"a call drained at {how} answered {texts[:2]}...")
    for stopped in (container, *also_stopped):
        status = int(podman("wait", stopped.name).strip())
        expect(status == 0, f"{stopped.image}: exit status {status} after {how}:\n{stopped.logs()}")
    return in_flight


def check_drain(container: Container) -> None:
    """SIGTERM with calls in flight: each finishes with its result and the container exits 0."""
    in_flight = stopped_with_calls_in_flight(container, ("kill", "--signal", "TERM", container.name), "SIGTERM")
    log(f"  drain: {in_flight} of {DRAIN_CALLS} calls in flight at SIGTERM, all answered, exit status 0")


_NOT_QUIET = re.compile(r" (WARNING|ERROR|CRITICAL) |\[[WEF]:onnxruntime|Traceback|Warning:")
"""attnserve's log lines at WARNING and above, onnxruntime's own warnings and errors, Python's tracebacks and
warnings."""


def noisy_lines(log_text: str) -> list[str]:
    """The lines of a server's log that are warnings or errors (of attnserve, onnxruntime or Python)."""
    return [line for line in log_text.splitlines() if _NOT_QUIET.search(line)]


_MALLOC_SAID = re.compile(r"(?:attnserve listening on|process \d+ on) .* and (.*'s malloc)")


def mallocs_said(log_text: str) -> list[str]:
    """The malloc each server process says it runs on at its start ("jemalloc's malloc", "the C library's malloc"):
    a one-process server's listening line, each front-end's and the engine process's first line."""
    return _MALLOC_SAID.findall(log_text)


def check_quiet_log(container: Container) -> None:
    output = container.logs()
    expect("attnserve listening on" in output and "draining" in output, f"unexpected log:\n{output}")
    mallocs = mallocs_said(output)
    expect(
        bool(mallocs) and set(mallocs) == {"jemalloc's malloc"},
        f"not every process of the server runs on jemalloc's malloc ({mallocs}):\n{output}",
    )
    noisy = noisy_lines(output)
    expect(not noisy, "the log holds warnings or errors:\n" + "\n".join(noisy))


def check_image(image: str, volume: Path | None, label: str, timings: dict[str, float]) -> None:
    container = start_container(image, volume, label)
    try:
        with timed(f"check {image} ({'models from a read-only volume' if volume else 'models baked in'})", timings):
            wait_serving(container)
            check_inside(container)
            check_api(container)
            check_metrics(container)
            check_http(container)
            check_drain(container)
            check_quiet_log(container)
    except Exception:
        log(f"{image}: the container's log:\n{container.logs()}")
        raise
    finally:
        podman("rm", "--force", container.name, check=False)


POD_STOP_S = 40
"""What a pod of deploy/k8s has left to stop after its 5 s preStop: terminationGracePeriodSeconds 45."""


def start_proxy(server: Container, label: str) -> Container:
    """The reset guard's image in front of `server`'s gRPC port, restricted as the sidecar runs (read-only root,
    every capability dropped, no new privileges, the image's non-root user), on a free loopback port; returned
    once the server's health answers SERVING through it."""
    from loadtests.servers import free_port

    name = f"attnserve-image-check-{label}-{os.getpid()}"
    proxy = Container(name, PROXY_IMAGE, port=free_port(), metrics_port=0, http_port=0)
    podman(
        "run",
        "--detach",
        "--name",
        proxy.name,
        "--network",
        "host",
        *ulimit_flags(),
        "--read-only",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        PROXY_IMAGE,
        f"--frontend=127.0.0.1,{proxy.port};no-tls",
        f"--backend={server.address.replace(':', ',')};;proto=h2",
    )
    wait_serving(proxy)
    return proxy


def check_proxy_in_front(proxy: Container) -> None:
    """Through the proxy: the translations, and a connection that resets streams in a loop closed by nghttp2 (its
    burst allowed, twice it not), while calls still pass."""
    import grpc

    from deploy.reflection import ReflectionClient
    from loadtests.reliability import raw_http2 as h2

    translate = "attnserve.v1.Translator/Translate"
    with grpc.insecure_channel(proxy.address) as channel:
        client = ReflectionClient(channel)
        for model, (text, expected) in TRANSLATIONS.items():
            reply = client.call(translate, {"model": model, "texts": [text]})
            got = reply["translations"][0]["hypotheses"][0]["text"]
            expect(got == expected, f"through the proxy, {model}: {text!r} -> {got!r}, expected {expected!r}")
        burst, path = h2.NGHTTP2_RESET_BURST, f"/{translate}"
        within = h2.reset_then_ping(proxy.address, path, burst // 2)
        expect(within == "ping acknowledged", f"{burst // 2} resets: {within}")
        past = h2.reset_then_ping(proxy.address, path, 2 * burst)
        expect(past == f"goaway {h2.INTERNAL_ERROR}", f"{2 * burst} resets: {past}, not GOAWAY INTERNAL_ERROR")
        model, (text, expected) = next(iter(TRANSLATIONS.items()))
        reply = client.call(translate, {"model": model, "texts": [text]})
        expect(reply["translations"][0]["hypotheses"][0]["text"] == expected, "no answer after the resets")
    log(f"  proxy: translations pass; {burst // 2} resets allowed, {2 * burst} end in GOAWAY")


def check_proxy_stops_gracefully(proxy: Container, server: Container) -> None:
    """The pod's end as Kubernetes brings it: both containers told to stop at once (each image's stop signal:
    SIGQUIT for the proxy, SIGTERM for the server) with calls in flight through the proxy, and killed after
    POD_STOP_S (the grace period the pod has left after its preStop): each call finishes with its result, both
    exit 0."""
    # `podman stop` returns once the containers have stopped (SIGKILL after --time, which the statuses would show).
    stop = ("stop", "--time", str(POD_STOP_S), proxy.name, server.name)
    in_flight = stopped_with_calls_in_flight(proxy, stop, "the pod's stop", also_stopped=(server,))
    log(f"  pod stop: {in_flight} of {DRAIN_CALLS} calls in flight through the proxy, all answered, both exit 0")


def check_proxy(timings: dict[str, float]) -> None:
    """The reset guard's image in front of the CPU image, both run as deploy/k8s runs them."""
    server = start_container(CPU_IMAGE, REPOSITORY_ROOT / BAKED_MODELS, "guarded")
    proxy: Container | None = None
    try:
        with timed(f"check {PROXY_IMAGE} in front of {CPU_IMAGE}", timings):
            wait_serving(server)
            proxy = start_proxy(server, "proxy")
            check_proxy_in_front(proxy)
            check_proxy_stops_gracefully(proxy, server)
    except Exception:
        if proxy is not None:
            log(f"{PROXY_IMAGE}: the container's log:\n{proxy.logs()}")
        raise
    finally:
        for container in (proxy, server):
            if container is not None:
                podman("rm", "--force", container.name, check=False)


def check(timings: dict[str, float]) -> None:
    build_cpu_images(timings)
    size = image_size_mb(CPU_IMAGE)
    expect(size < IMAGE_SIZE_LIMIT_MB, f"{CPU_IMAGE} is {size:.0f} MB, over {IMAGE_SIZE_LIMIT_MB} MB")
    check_image(CPU_IMAGE, REPOSITORY_ROOT / BAKED_MODELS, "volume", timings)
    check_image(CPU_BAKED_IMAGE, None, "baked", timings)
    build_proxy_image(timings)
    check_proxy(timings)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.images", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "build", help="build the CPU images, the reset guard's, and the GPU image where its base can be pulled"
    )
    commands.add_parser("check", help="build the CPU images, then run and check them")
    arguments = parser.parse_args(argv)
    timings: dict[str, float] = {}
    started = time.monotonic()
    actions: dict[str, Callable[[dict[str, float]], object]] = {
        "build": lambda t: (build_cpu_images(t), build_proxy_image(t), build_gpu_image(t)),
        "check": check,
    }
    try:
        actions[arguments.command](timings)
    except (DeployToolError, ImageCheckFailed) as error:
        print(f"images: {error}", file=sys.stderr)
        return 1
    outcome = "everything passed" if arguments.command == "check" else "done"
    log(f"{arguments.command}: {outcome} in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
