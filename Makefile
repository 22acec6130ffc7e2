# attnserve: everything installs into .venv from this file; nothing is assumed on the machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODELS ?= models

.PHONY: install models test serve protos clean ci

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[train,dev]'
	touch $(STAMP)

install: $(STAMP)

protos: $(STAMP)
	$(BIN)/python -m service.protogen

models: $(STAMP)
	$(BIN)/attnserve build-models --repository $(MODELS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# What CI runs (.ci/run): the test suite, then every further check the issues ask CI to make.
ci: test

serve: $(STAMP) models
	$(BIN)/attnserve serve --model-repository $(MODELS)

clean:
	rm -rf $(VENV) build *.egg-info
