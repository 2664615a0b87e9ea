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
