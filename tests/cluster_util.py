"""Cluster nodes for tests: each a real `pyshm serve` with a [cluster]
table, in its own directory (its own log), stopped by pid."""
from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from server_util import Server, free_port, status, wait_for

APP = "wsgi_apps:node_counter"
_runs = itertools.count()


class Node:
    def __init__(self, root: Path, node: str, *, cluster: str, secret_file: Path, link: int = 0,
                 peers: list[int] = (), interfaces: list[str] = (), workers: int = 1, app: str = APP,
                 instance: str = "", http: int = 0, host: str = "127.0.0.1", netns: str = "",
                 frontend: str = "http") -> None:
        self.netns = netns          # run inside this network namespace (its control socket is there too)
        self.node = node
        self.http = http or free_port()
        self.link = link or free_port()
        self.name = f"test-{os.getpid()}-c{next(_runs)}-{node}"
        self.dir = root / node
        self.dir.mkdir(parents=True, exist_ok=True)
        peer_list = ", ".join(f'"{host}:{p}"' for p in peers)
        iface_list = ", ".join(f'"{ip}"' for ip in interfaces)
        toml = f"""[instance]
name = "{self.name}"
{instance}

[suites.main]
app = "{app}"
workers = {workers}

[[listen]]
frontend = "{frontend}"
address = "{host}:{self.http}"
suite = "main"

[cluster]
name = "{cluster}"
node = "{node}"
link = "{host}:{self.link}"
peers = [{peer_list}]
interfaces = [{iface_list}]
secret_file = "{secret_file}"
"""
        self.server = Server(self.dir, self.name, toml, verbose=True,
                             wrap=["ip", "netns", "exec", netns] if netns else [])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    def wait_listening(self) -> Node:
        if not self.netns:
            self.server.wait_listening(self.http)
        else:       # (its ports are in its namespace: its control socket answers once it serves)
            wait_for(self._serving, lambda: f"{self.node} did not start:\n{self.log()[-3000:]}", 30)
        return self

    def _serving(self) -> bool:
        if self.server.proc.poll() is not None:
            raise RuntimeError(f"{self.node} exited with {self.server.proc.returncode}:\n{self.log()[-3000:]}")
        try:
            return self.status()["cluster"] is not None
        except (OSError, subprocess.CalledProcessError, ValueError):
            return False

    def status(self) -> dict:
        if not self.netns:
            return status(self.name)
        out = subprocess.run(["ip", "netns", "exec", self.netns, sys.executable, "-m", "pyshm.cli", "status",
                              self.name, "--json"], capture_output=True, text=True, timeout=30, check=True)
        return json.loads(out.stdout)

    def peers(self) -> dict[str, str]:
        """node -> alive | dead | leaving, as this node's status says."""
        return {p["node"]: p["state"] for p in self.status()["cluster"]["peers"]}

    def wait_peers(self, expected: dict[str, str], timeout: float = 15.0) -> None:
        wait_for(lambda: self.peers() == expected,
                 lambda: f"{self.node} lists {self.peers()}, not {expected}:\n{self.log()[-3000:]}", timeout)

    def log(self) -> str:
        return self.server.output()

    def kill(self) -> None:
        """SIGKILL the manager (its workers exit by themselves); its
        segments, which no one removes after a SIGKILL, are unlinked."""
        from pyshm.native import heap_segment, request_segment, session_segment, unlink

        self.server.signal(signal.SIGKILL)
        self.server.proc.wait()
        for segment in (heap_segment(self.name), request_segment(self.name), session_segment(self.name)):
            unlink(segment, quiet=True)

    def stop(self) -> int:
        return self.server.stop()


def secret_file(path: Path, secret: bytes = b"0123456789abcdef" * 3) -> Path:
    path.write_bytes(secret)
    path.chmod(0o600)
    return path
