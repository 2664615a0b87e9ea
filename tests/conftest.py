"""Fixtures: unique heap names unlinked after each test, and subprocesses
stopped by pid when the test ends.  Hypothesis profiles: "ci" (the default:
the same examples every run) and "fuzz" (HYPOTHESIS_PROFILE=fuzz: random
seeds, many more examples); property tests carry the `fuzz` marker, so
`HYPOTHESIS_PROFILE=fuzz pytest -m fuzz` runs them all hard."""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pyshm import SegmentNotFound, SharedHeap
from pyshm.native import unlink

# "ci" keeps hypothesis's default of 100 examples a test; tests set no
# max_examples of their own, so that "fuzz" raises every one.
settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile("fuzz", derandomize=False, deadline=None, print_blob=True, max_examples=5000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fuzz: a property or fuzz test (hypothesis); run hard by "
                                       "HYPOTHESIS_PROFILE=fuzz pytest -m fuzz")


HERE = Path(__file__).resolve().parent
WORKER = HERE / "heap_worker.py"
_names = itertools.count()


def _prefix() -> str:
    return f"test-{os.getpid()}-"


@pytest.fixture
def heap_name():
    name = f"{_prefix()}{next(_names)}"
    yield name
    try:
        unlink(name)
    except SegmentNotFound:
        pass


@pytest.fixture
def heap(heap_name):
    h = SharedHeap.create(heap_name, size="64MiB")
    yield h
    h.close()


class Procs:
    """Starts tests/heap_worker.py subcommands; kills leftovers by pid."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def start(self, *args: str, **kw) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, str(WORKER), *args], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, **kw)
        self.started.append(p)
        return p

    def stop_all(self) -> None:
        for p in self.started:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.wait()
            for f in (p.stdin, p.stdout):
                if f:
                    f.close()


@pytest.fixture
def procs():
    ps = Procs()
    yield ps
    ps.stop_all()


@pytest.fixture(scope="session", autouse=True)
def no_leaked_segments():
    """Every segment a test created is gone when the suite ends."""
    yield
    left = [f for f in os.listdir("/dev/shm") if f.startswith("pyshm." + _prefix())]
    for f in left:
        unlink(f[len("pyshm."):])
    assert not left, f"tests left shared-memory segments behind: {left}"


@pytest.fixture
def serve(tmp_path):
    """serve(toml_body, port) starts a real instance named test-<pid>-<n>
    (serve("", port, args=[...]): `pyshm ARGS...` without a configuration
    file); every one is stopped by pid when the test ends."""
    from server_util import Server

    servers = []

    def start(body: str, port: int, *, verbose: bool = False, name: str | None = None,
              args: list[str] | None = None) -> Server:
        if args is not None:
            srv = Server(tmp_path, name or "", args=args, log=f"cli-{port}.log")
        else:
            name = name or f"{_prefix()}{next(_names)}"
            srv = Server(tmp_path, name, f'[instance]\nname = "{name}"\n' + body, verbose=verbose)
        servers.append(srv)
        srv.wait_listening(port)
        return srv

    yield start
    for srv in servers:
        srv.stop()
