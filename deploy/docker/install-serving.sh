#!/bin/sh
# Install attnserve's serving path into a new virtual environment: the project and its own dependencies
# (onnxruntime-gpu, grpcio, ...), never the `train` extra, so never torch.
#
#   sh deploy/docker/install-serving.sh VENV [PROJECT_DIR]      (PYTHON=python3 by default)
#
# Both Dockerfiles run exactly this, and CI runs it too (tests/deploy/test_images.py: the build stage's COPY
# set, then this script, then a real server started from VENV), so the image's install step is proven on every
# commit without a container engine.
set -eu

venv=${1:?usage: install-serving.sh VENV [PROJECT_DIR]}
project=${2:-.}
python=${PYTHON:-python3}

"$python" -m venv "$venv"
"$venv/bin/python" -m pip install "$project"

# The serving path never imports torch (service/ is torch-free) and the image must not carry it either:
# fail the build if any dependency pulled it in.
if "$venv/bin/python" -c 'import importlib.util, sys; sys.exit(0 if importlib.util.find_spec("torch") else 1)'; then
    echo "install-serving.sh: torch got installed into $venv; the serving image must not contain it" >&2
    exit 1
fi
# The entry point resolves and every serving module imports.
"$venv/bin/attnserve" serve --help > /dev/null
"$venv/bin/python" -c 'import service.server, service.processes.__main__, onnxruntime, grpc'
echo "install-serving.sh: attnserve serving path installed in $venv"
