# attnserve: everything installs into .venv from this file; nothing is assumed on the machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Two installs into the one .venv: serving and the client (`make serve`: no torch, no test or deploy tools), and
# everything (`make test` and the rest: the train and dev extras on top). onnxruntime comes from the `gpu` extra
# in both (onnxruntime-gpu, which also runs on the CPU; the CPU image installs the `cpu` extra instead), and
# matplotlib from `plot` (the client's --plot; the images leave it out).
SERVE_STAMP := $(VENV)/.installed-serve
STAMP := $(VENV)/.installed
# The default model repository ships in models/ (`make models` rebuilds it).
MODELS ?= models

.PHONY: install models test serve protos clean ci interop loadtest loadtest-smoke bench bench-quick newcomer

$(SERVE_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[gpu,plot]'
	touch $(SERVE_STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[gpu,plot,train,dev]'
	touch $(SERVE_STAMP) $(STAMP)

install: $(STAMP)

# The KServe v2 interop tests (tests/service/test_kserve.py) drive the server with NVIDIA's tritonclient,
# which requires protobuf < 7 while the server requires protobuf >= 7.35 (grpcio-reflection/-health 1.85):
# the client gets its own virtualenv, and the tests run it as a subprocess.
INTEROP_VENV := .venv-interop
INTEROP_STAMP := $(INTEROP_VENV)/.installed

$(INTEROP_STAMP): tests/interop/requirements.txt
	$(PYTHON) -m venv $(INTEROP_VENV)
	$(INTEROP_VENV)/bin/pip install --quiet -r tests/interop/requirements.txt
	touch $(INTEROP_STAMP)

interop: $(INTEROP_STAMP)

protos: $(STAMP)
	$(BIN)/python -m tools.protogen

# Rebuild the default models (about 10 minutes on 2 cores): each is trained, exported, checked on fresh inputs
# and installed into $(MODELS) only if it meets its bar (export/zoo.py). BUILD_ARGS: e.g. --only dates.
BUILD_ARGS ?=
models: $(STAMP)
	$(BIN)/attnserve build-models --repository $(MODELS) $(BUILD_ARGS)

test: $(STAMP) $(INTEROP_STAMP)
	$(BIN)/python -m pytest -q

# The edit-test loop: everything but the tests marked `slow` (they train models or start servers); CI runs all.
.PHONY: test-fast
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# Style, formatting, types and layers (settings in pyproject.toml): ruff on the whole tree, mypy on service/,
# client/, export/, loadtests/ and tools/ (the engine and the runtime with --strict's checks; the generated stubs
# in service/gen are left out), and import-linter's contracts (the server's layers, ipc only behind the client).
.PHONY: lint
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# Load tests and benchmarks (docs/benchmarks.md). `make loadtest LOADTEST_HOST=host:port` targets a running
# server; without LOADTEST_HOST one is started on $(MODELS). Locust's CSV stats and HTML report go to
# reports/loadtest; the run fails when the failure ratio or the p99 latency (ms, 0 = unchecked) is over.
LOADTEST_HOST ?=
LOADTEST_USERS ?= 16
LOADTEST_SPAWN_RATE ?= 4
LOADTEST_RUN_TIME ?= 30s
LOADTEST_MAX_FAIL_RATIO ?= 0.01
LOADTEST_MAX_P99_MS ?= 0
BENCH_ARGS ?=

loadtest: $(STAMP)
	$(BIN)/python -m loadtests.loadtest $(if $(LOADTEST_HOST),--host $(LOADTEST_HOST),--repository $(MODELS)) \
		--users $(LOADTEST_USERS) --spawn-rate $(LOADTEST_SPAWN_RATE) --run-time $(LOADTEST_RUN_TIME) \
		--max-fail-ratio $(LOADTEST_MAX_FAIL_RATIO) --max-p99-ms $(LOADTEST_MAX_P99_MS) --out reports/loadtest

# CI's smoke: tiny models (built once into build/smoke), a live server, 8 users for 20 s, no failure allowed.
loadtest-smoke: $(STAMP)
	$(BIN)/python -m loadtests.loadtest --smoke --out reports/loadtest-smoke

# h2load (Debian's nghttp2-client), the C load generator of the benchmark's cpu-per-call section and of
# `--load-generator h2load`: installed when missing and running as root (CI); otherwise say how, and go on
# (the benchmark then reports the section as not measured).
.PHONY: h2load-tools
h2load-tools:
	@if command -v h2load >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
		--no-install-recommends nghttp2-client; \
	else echo "h2load is missing: install it with 'sudo apt-get install nghttp2-client' (Debian, Ubuntu); without it" \
		"attnserve bench leaves out its cpu-per-call section and refuses --load-generator h2load" >&2; fi

# The side-by-side benchmark: every contender, every workload (about 25 minutes on 2 cores; the phrasebook
# model is trained once into build/bench), and the cpu-per-call section (h2load). Report:
# reports/bench/bench.{json,md}, throughput.png, latency.png. BENCH_ARGS: e.g. --load-generator h2load.
bench: $(STAMP) h2load-tools
	$(BIN)/attnserve bench --repository $(MODELS) $(BENCH_ARGS)

# The benchmark's quick mode on the smoke models (about 3 minutes): dates and numbers, levels 1 and 8, and
# the cpu-per-call section on dates.
bench-quick: $(STAMP) h2load-tools
	$(BIN)/python -m loadtests.smoke
	$(BIN)/attnserve bench --quick --repository build/smoke/models --runs build/smoke/runs \
		--cache-dir build/bench-quick --out reports/bench-quick $(BENCH_ARGS)

# Reliability runs that print their figures (docs/reliability.md); not part of ci. `make overload`: about
# 10x the measured capacity for 30 s, then recovery (about 2 minutes); fails on a lost call or memory growth of 10%
# or more. `make soak`: a mixed load at 70% of the measured capacity for SOAK_MINUTES with faults (a hot reload every
# minute; 2 front-ends, one of them and the engine killed in turn every two minutes); fails on a lost call, RSS growth
# over 1 MB/min per process, or open files that grow. SOAK_ARGS: e.g. --frontends 0 --load 0.5 --kill-every 0.
OVERLOAD_ARGS ?=
SOAK_MINUTES ?= 10
SOAK_ARGS ?=
FUZZ_ARGS ?=
.PHONY: overload soak fuzz
overload: $(STAMP)
	$(BIN)/python -m loadtests.reliability.overload --repository $(MODELS) --out reports/overload $(OVERLOAD_ARGS)

# The fuzz campaign (docs/reliability.md): 100,000 gRPC and 50,000 HTTP inputs against a server on $(MODELS); fails on
# any crash, hang, INTERNAL/UNKNOWN or 5xx, or a call the server did not count. FUZZ_ARGS: e.g. --seconds 300 --seed 7
# --grpc-inputs 10000 --frontends 2; --replay grpc:N shows and sends one input again.
fuzz: $(STAMP)
	$(BIN)/python -m loadtests.reliability.fuzz --repository $(MODELS) --out reports/fuzz $(FUZZ_ARGS)

soak: $(STAMP)
	$(BIN)/python -m loadtests.reliability.soak --repository $(MODELS) --minutes $(SOAK_MINUTES) --out reports/soak $(SOAK_ARGS)

# The page's browser test (tests/service/test_page.py) and the HTTP tests' curl: Debian's chromium, chromium-driver and
# curl, installed only when missing (CI runs as root; elsewhere run it with sudo or install the packages yourself).
.PHONY: browser-tools
browser-tools:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 && command -v curl >/dev/null 2>&1; \
		then :; else apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
		chromium chromium-driver curl; fi

# The proxy for clients you do not control (deploy/proxy/nghttpx.conf; tests/reliability/test_reset_proxy.py and
# `python -m loadtests.reliability.misbehaving --proxy nghttpx`): Debian's nghttp2-proxy, installed only when missing.
.PHONY: proxy-tools
proxy-tools:
	@if command -v nghttpx >/dev/null 2>&1; then :; else apt-get update && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nghttp2-proxy; fi

# Deployment (docs/deploy.md). Prometheus and promtool come from Debian's `prometheus` package, installed only
# when missing (CI runs as root; elsewhere run it with sudo or install the package yourself).
.PHONY: prometheus-tools deploy-check monitor
prometheus-tools:
	@if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then :; else \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus; fi

# Every static deployment check: kustomize renders, kubernetes-validate, CRD schemas, promtool, hadolint.
deploy-check: $(STAMP) prometheus-tools
	$(BIN)/python -m deploy.tool check

# A real Prometheus on 127.0.0.1:9090 scraping `make serve` (localhost:8002) with the alerting rules.
monitor: $(STAMP) prometheus-tools
	$(BIN)/python -m deploy.tool monitor

# The serving images, built with podman from deploy/docker (docs/deploy.md, "Building the images with podman").
# podman, runc and debootstrap come from Debian, installed only when missing, as prometheus-tools does.
# `make images`: the CPU image (models from a volume, and baked in), and the GPU image where its CUDA base can be
# pulled. `make image-check` (CI): the CPU images run as deploy/k8s runs them, and are checked from outside.
.PHONY: container-tools images image-check
container-tools:
	@if command -v podman >/dev/null 2>&1 && command -v runc >/dev/null 2>&1 && command -v debootstrap >/dev/null 2>&1; \
	then :; else apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
		podman runc debootstrap debian-archive-keyring; fi

images: $(STAMP) container-tools
	$(BIN)/python -m deploy.images build

image-check: $(STAMP) container-tools
	$(BIN)/python -m deploy.images check

# What CI runs (.ci/run): the test suite, then every further check the issues ask CI to make.
ci: prometheus-tools browser-tools h2load-tools proxy-tools lint test deploy-check loadtest-smoke bench-quick newcomer image-check
	$(MAKE) gpu-check GPU_CHECK_ARGS='--provider cpu --quick'

# The GPU check (docs/gpu.md): provider, parity against the CPU, the device tests and a short benchmark, in one
# run; report in reports/gpu-check. GPU_CHECK_ARGS: e.g. --provider cpu --quick (what CI runs), --phrasebook.
GPU_CHECK_ARGS ?= --provider cuda
.PHONY: gpu-check
gpu-check: $(STAMP)
	$(BIN)/python -m loadtests.gpu_check --out reports/gpu-check $(GPU_CHECK_ARGS)

# Serves the shipped default models with the serving dependencies alone.
serve: $(SERVE_STAMP)
	$(BIN)/attnserve serve --model-repository $(MODELS)

# The README's first command as a newcomer meets it: a fresh clone, `make serve` into a fresh venv, one correct
# translation (bounded wait), no torch installed. Part of .ci/run.
newcomer:
	bash .ci/newcomer

clean:
	rm -rf $(VENV) $(INTEROP_VENV) build *.egg-info
