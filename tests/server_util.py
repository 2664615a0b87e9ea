"""A real `pyshm serve` in a subprocess, and a raw-frame client."""
from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

ERROR_FLAG = 0x8000_0000


def one_suite(frontend: str, port: int, app: str, *, workers: int = 2, instance: str = "",
              listen: str = "") -> str:
    """The body of a pyshm.toml with one suite ("main") behind one listener;
    `instance` lines go into [instance], `listen` lines into the listener."""
    return f"""{instance}
[suites.main]
app = "{app}"
workers = {workers}

[[listen]]
frontend = "{frontend}"
address = "127.0.0.1:{port}"
suite = "main"
{listen}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`pyshm serve -c pyshm.toml` run in `workdir`; stopped by pid."""

    def __init__(self, workdir: Path, name: str, toml: str, *, verbose: bool = False) -> None:
        self.workdir = workdir
        self.name = name
        (workdir / "pyshm.toml").write_text(toml)
        args = [sys.executable, "-m", "pyshm.cli"] + (["-v"] if verbose else []) + ["serve", "-c", "pyshm.toml"]
        self.log = open(workdir / "server.log", "wb")
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent)}
        self.proc = subprocess.Popen(args, cwd=workdir, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_listening(self, port: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"server not listening on {port}:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return (self.workdir / "server.log").read_text(errors="replace")

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


class FrameClient:
    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self._buf = b""

    def send(self, payload: bytes) -> None:
        self.sock.sendall(struct.pack(">I", len(payload)) + payload)

    def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def recv(self) -> tuple[bool, bytes]:
        (n,) = struct.unpack(">I", self._read(4))
        return bool(n & ERROR_FLAG), self._read(n & ~ERROR_FLAG)

    def call(self, payload: bytes) -> tuple[bool, bytes]:
        self.send(payload)
        return self.recv()

    def close(self) -> None:
        self.sock.close()
