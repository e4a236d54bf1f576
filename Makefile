# Fresh machine: `make run` or `make test`. Both create .venv if missing, install, compile, then act.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.llmgw-installed
PYTEST_ARGS ?=

.PHONY: run test test-fast build bench clean protos cluster llamacpp

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml setup.py
	$(PY) -m pip install -q -U pip "setuptools>=77" wheel "Cython==3.3.1" "grpcio-tools==1.85.4"
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

# A real OpenAI-compatible model server for the real-backend tests: llama-cpp-python builds llama.cpp from source
# (4-6.5 min on 2 cores the first time; pip keeps the built wheel in its cache, so later set-ups take ~40 s).
# Its own venv: it is a separate process under test, and its dependencies stay out of llmgw's.
LLAMA_VENV ?= .venv-llamacpp
LLAMA_PY := $(LLAMA_VENV)/bin/python
LLAMA_STAMP := $(LLAMA_VENV)/.llamacpp-installed

$(LLAMA_STAMP):
	$(PYTHON) -m venv $(LLAMA_VENV)
	CMAKE_ARGS="-DGGML_NATIVE=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 $(LLAMA_PY) -m pip install -q \
		"llama-cpp-python[server]==0.3.36" "gguf>=0.17"
	touch $@

llamacpp: $(LLAMA_STAMP)

test: build $(LLAMA_STAMP)
	LLMGW_LLAMACPP_PYTHON=$(abspath $(LLAMA_PY)) $(PY) -m pytest $(PYTEST_ARGS)

# The unit tier: cores and policies driven by hand (no listening socket, no server, no child process: enforced),
# without the two simulator soaks. Every test file's tier is in tests/conftest.py (TEST_TIERS); `-m inprocess`,
# `-m cluster` and `-m system` select the others. The "fast" hypothesis profile (tests/conftest.py) runs a few
# derandomized examples per property test and the codec fuzz runs 20 000 mutations; `make test` runs each one's
# full budget.
test-fast: build
	LLMGW_HYPOTHESIS_PROFILE=fast LLMGW_FUZZ_N=20000 $(PY) -m pytest -q -m "unit and not slow" $(PYTEST_ARGS)

bench: build
	$(PY) -m llmgw bench

clean:
	rm -rf build llmgw/_proto/*_pb2*.py* llmgw/_core/*.c llmgw/_core/*.so *.egg-info

protos: $(STAMP)
	$(PY) tools/genproto.py

# Container image from deploy/Dockerfile, built with podman, buildah or docker (whichever works here; otherwise it
# stops and says why). IMAGE names it, e.g. `make image IMAGE=ghcr.io/<owner>/llmgw:0.1.0` (default:
# registry.example.com/llmgw/llmgw:<version>, a placeholder; see deploy/README.md).
.PHONY: image
image:
	sh deploy/build.sh image $(IMAGE)
