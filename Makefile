# `make run` and `make test` are the two commands: each sets up what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SOURCES := $(wildcard csrc/*.c csrc/*.h) pyshm/_codec.pyx pyshm/_native_build.py setup.py pyproject.toml

.PHONY: install run test fuzz bench redis-server curl wrk cluster-tools clean

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(STAMP)

run: install
	$(VENV)/bin/pyshm demo

# The HTTP tests drive the server with curl; the cluster tests need
# network namespaces (iproute2) and a real avahi-daemon with its dbus.
test: install curl cluster-tools
	$(VENV)/bin/pytest

# The property tests (marked `fuzz`) with random seeds and many more
# examples, and the garbage fuzzers of the front-ends and the request memory.
# `make test` runs the same tests derandomized: the same examples every run.
fuzz: install
	HYPOTHESIS_PROFILE=fuzz PYSHM_CHAOS_SEED=random $(VENV)/bin/pytest -m fuzz -p no:cacheprovider --timeout 1200

# Benchmarks compare pyshm with its anchors side by side; they need redis-server.
bench: install redis-server wrk
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) benchmarks/heap.py
	$(PY) benchmarks/http.py
	$(PY) benchmarks/rpc.py
	$(PY) benchmarks/sessions.py

redis-server:
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server)

curl:
	@command -v curl >/dev/null || (apt-get update -qq && apt-get install -y -qq curl)

wrk:
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)

CLUSTER_TOOLS := ip avahi-daemon avahi-browse dbus-daemon dbus-send
cluster-tools:
	@for t in $(CLUSTER_TOOLS); do command -v $$t >/dev/null || missing=1; done; \
	test -z "$$missing" || (apt-get update -qq && \
	  apt-get install -y -qq --no-install-recommends iproute2 avahi-daemon avahi-utils dbus-daemon dbus-bin)

clean:
	rm -rf build $(VENV) *.egg-info pyshm/*.so pyshm/_codec.c
