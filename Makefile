# `make run` and `make test` are the two commands: each sets up what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SOURCES := $(wildcard csrc/*.c csrc/*.h) pyshm/_codec.pyx pyshm/_native_build.py setup.py pyproject.toml

.PHONY: install run test bench redis-server curl wrk clean

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(STAMP)

run: install
	$(VENV)/bin/pyshm demo

# The HTTP tests drive the server with curl.
test: install curl
	$(VENV)/bin/pytest

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

clean:
	rm -rf build $(VENV) *.egg-info pyshm/*.so pyshm/_codec.c
