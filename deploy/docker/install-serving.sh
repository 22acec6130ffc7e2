#!/bin/sh
# Install attnserve's serving path into a new virtual environment: the project, its own dependencies and one
# onnxruntime package, never the `train` extra (torch) nor the `plot` extra (matplotlib).
#
#   sh deploy/docker/install-serving.sh VENV PROJECT_DIR RUNTIME      (PYTHON=python3 by default)
#
# RUNTIME is the project's extra that brings onnxruntime: `cpu` (onnxruntime, the CPU image) or `gpu`
# (onnxruntime-gpu, the CUDA image). Both Dockerfiles run exactly this, and CI runs it too
# (tests/deploy/test_images.py: the build stage's COPY set, then this script, then a real server started from
# VENV; `make image-check`: the images themselves), so the install step is proven on every commit.
#
# The venv is what the serving image copies, so it is left lean: no bytecode (the root filesystem is read-only
# at run time; Python compiles in memory), no pip cache, and no pip or setuptools (nothing installs at run time).
set -eu

usage="usage: install-serving.sh VENV PROJECT_DIR {cpu,gpu}"
venv=${1:?$usage}
project=${2:?$usage}
runtime=${3:?$usage}
python=${PYTHON:-python3}
case "$runtime" in
    cpu) wanted=onnxruntime; unwanted=onnxruntime-gpu ;;
    gpu) wanted=onnxruntime-gpu; unwanted=onnxruntime ;;
    *) echo "$usage" >&2; exit 2 ;;
esac
export PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# onnxruntime's telemetry is off while this script imports it (the server turns it off itself: its
# onnxruntime_telemetry setting).
export ORT_DISABLE_TELEMETRY=1

"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --no-compile "$project[$runtime]"

fail() {
    echo "install-serving.sh: $*" >&2
    exit 1
}
# What the image must not carry, whatever a dependency pulls in: torch (the serving path never imports it),
# matplotlib (only the client's --plot draws), the other onnxruntime package (both own the `onnxruntime`
# module, and one overwrites the other's files).
"$venv/bin/python" - "$wanted" "$unwanted" <<'EOF' || fail "the serving venv in $venv holds what it must not (above)"
import importlib.metadata as metadata
import importlib.util
import sys

wanted, unwanted = sys.argv[1:]
problems = [f"{module} is installed" for module in ("torch", "matplotlib") if importlib.util.find_spec(module)]
installed = {d.metadata["Name"].lower() for d in metadata.distributions()}
if wanted not in installed:
    problems.append(f"{wanted} is not installed")
if unwanted in installed:
    problems.append(f"{unwanted} is installed next to {wanted}")
for problem in problems:
    print(f"install-serving.sh: {problem}", file=sys.stderr)
sys.exit(1 if problems else 0)
EOF
# Test suites (numpy's alone are 8 MB) and onnxruntime's offline model tools (quantization, the transformer
# optimisers, conversion scripts) are never imported when serving: left out, about 12 MB of the image.
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
find "$site" -type d -name tests -prune -exec rm -rf {} +
rm -rf "$site/onnxruntime/transformers" "$site/onnxruntime/quantization" "$site/onnxruntime/tools"
# Some wheels ship their extension modules with DWARF debug information that nothing reads when serving (uvloop's
# loop module is 13.6 MB with it, 1.9 MB without; aiohttp's and its helpers' 7 MB more): dropped, as
# `strip --strip-debug` would, by strip_debug.py beside this script (the Python base images have no binutils).
"$venv/bin/python" "$(dirname "$0")/strip_debug.py" "$site"
# The entry point resolves and every serving module imports.
"$venv/bin/attnserve" serve --help > /dev/null
"$venv/bin/python" -c 'import service.server, service.processes.__main__, onnxruntime, grpc'

"$venv/bin/python" -m pip uninstall --yes --quiet pip setuptools
if [ -n "$(find "$venv" -name '*.pyc' -print -quit)" ]; then
    fail "bytecode files in $venv"
fi
echo "install-serving.sh: attnserve serving path ($wanted) installed in $venv"
