"""Starting and stopping the servers a benchmark compares (by pid)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")


def wrk(url: str, duration: int, *, connections: int = 64, headers: list[str] = ()) -> dict[str, float]:
    """`wrk -t2 --latency` against url: requests/s, latency p50/p99 in ms,
    non-2xx answers and socket errors."""
    args = ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency"]
    for h in headers:
        args += ["-H", h]
    out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))

    def lat(pct: str) -> float:
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1000.0}[m.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock_err = re.search(r"Socket errors: (.*)", out)
    return {"rps": rps, "p50": lat("50"), "p99": lat("99"), "non2xx": int(errors.group(1)) if errors else 0,
            "sockerr": sock_err.group(1) if sock_err else ""}


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each, then SIGKILL what has not exited after 30 s."""
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


class Redis:
    """A real redis-server on 127.0.0.1, stopped by pid."""

    def __init__(self) -> None:
        self.proc = None
        self.client = None
        exe = shutil.which("redis-server")
        if not exe:
            print("redis-server not installed (make bench installs it): Redis columns are n/a")
            return
        import redis

        self.port = port = free_port()
        self.proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--proto-max-bulk-len", "1gb"],
                                     stdout=subprocess.DEVNULL)
        self.client = redis.Redis(host="127.0.0.1", port=port)
        for _ in range(100):
            try:
                self.client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait()
