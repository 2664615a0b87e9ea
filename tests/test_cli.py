"""The `pyshm` command itself."""
from __future__ import annotations

import subprocess
import sys


def test_help_and_status_do_not_load_the_codec_or_the_c_core():
    for args in (["--help"], ["status", "no-such-instance-here"]):
        r = subprocess.run([sys.executable, "-X", "importtime", "-m", "pyshm.cli", *args], capture_output=True,
                           text=True, timeout=60)
        loaded = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time")}
        assert "pyshm.cli" in loaded or "pyshm" in loaded, r.stderr[-500:]
        assert not loaded & {"pyshm._codec", "pyshm._native", "pyshm.heap"}, (args, loaded & {"pyshm._codec"})
    assert "pyshm: no pyshm instance 'no-such-instance-here' is running here" in r.stderr
    assert r.returncode == 1


def test_the_docstring_lists_every_command():
    from pyshm import cli

    r = subprocess.run([sys.executable, "-m", "pyshm.cli", "--help"], capture_output=True, text=True, timeout=60)
    commands = r.stdout.split("{", 1)[1].split("}", 1)[0].split(",")
    assert commands and all(f"pyshm {c}" in cli.__doc__ for c in commands if c != "demo-worker"), commands


def _loaded(module: str) -> set[str]:
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-500:]
    return {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time")}


def test_imports_run_one_way():
    """The manager does not load the worker side; the worker loads neither
    the manager side nor any front-end."""
    assert not _loaded("pyshm.manager") & {"pyshm.worker", "pyshm.wsgi", "pyshm.rpc", "pyshm.http_sessions"}
    worker = _loaded("pyshm.worker")
    assert not {m for m in worker if m.startswith("pyshm.frontends")}
    assert not worker & {"pyshm.manager", "pyshm.transport", "pyshm.supervisor", "pyshm.dispatch",
                         "pyshm.control_server"}
