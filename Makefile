# Fresh machine: `make run` or `make test`. Both create .venv if missing, install, compile, then act.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.llmgw-installed
PYTEST_ARGS ?=

.PHONY: run test build bench clean protos cluster

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml setup.py
	$(PY) -m pip install -q -U pip "setuptools>=77" wheel "Cython>=3.0" "grpcio-tools>=1.60"
	$(PY) -m pip install -q --no-build-isolation -e '.[dev]'
	touch $(STAMP)

# Always re-run: cythonize and protoc only redo what changed; a failed compile stops make loudly.
build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

# Starts the local cluster (gateway + 3 simulated replicas), streams a completion over gRPC and over the
# OpenAI-compatible HTTP front, then stops it. `make cluster` keeps it running until Ctrl-C.
run: build
	$(PY) -m llmgw demo
	$(PY) -m llmgw cluster --demo --base-port 0

cluster: build
	$(PY) -m llmgw cluster

test: build
	$(PY) -m pytest $(PYTEST_ARGS)

bench: build
	$(PY) -m llmgw bench

clean:
	rm -rf build llmgw/_proto/*_pb2*.py* llmgw/_core/*.c llmgw/_core/*.so *.egg-info

protos: $(STAMP)
	$(PY) tools/genproto.py
