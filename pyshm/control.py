"""The control channel between the manager and its workers.

One Unix stream socket per instance in the abstract namespace (nothing on
disk to leak).  A worker connects and says hello (pid, start time, suite);
the manager answers with its worker index and generation and passes the
eventfd that wakes the manager (SCM_RIGHTS).  The connection stays open for
the worker's life: its EOF is how the manager learns, at once, that a
worker died, whoever started it.  Messages are JSON lines.
"""
from __future__ import annotations

import json
import socket
from typing import Any


def address(instance: str) -> str:
    return f"\0pyshm.{instance}.ctl"


def encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


class LineReader:
    """Splits a byte stream into JSON messages; refuses lines over 64 KiB."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        out = []
        while (i := self._buf.find(b"\n")) >= 0:
            line = bytes(self._buf[:i])
            del self._buf[:i + 1]
            msg = json.loads(line)
            if not isinstance(msg, dict):
                raise ValueError("control message is not an object")
            out.append(msg)
        if len(self._buf) > 65536:
            raise ValueError("control line too long")
        return out


def _open(instance: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(address(instance))
    except OSError as e:
        sock.close()
        raise ConnectionError(f"no pyshm instance {instance!r} is running here ({e.strerror})") from None
    return sock


def connect(instance: str, hello: dict[str, Any], timeout: float = 10.0) -> tuple[socket.socket, dict, int]:
    """Worker side: connects, says hello, returns (socket, reply, eventfd)."""
    sock = _open(instance, timeout)
    sock.sendall(encode({"hello": hello}))
    msg, fds, _, _ = socket.recv_fds(sock, 65536, 1)
    if not msg:
        sock.close()
        raise ConnectionError(f"instance {instance!r} closed the control connection")
    reply = json.loads(msg.split(b"\n", 1)[0])
    if "error" in reply:
        sock.close()
        for fd in fds:
            socket.close(fd)
        raise ConnectionError(f"instance {instance!r} refused this worker: {reply['error']}")
    if len(fds) != 1:
        sock.close()
        raise ConnectionError("the manager sent no wake-up fd")
    return sock, reply, fds[0]


def report_failure(instance: str, failed: dict[str, Any], timeout: float = 5.0) -> bool:
    """Worker side, before it exits: tells the manager why it cannot start.
    False when no manager listens."""
    try:
        with _open(instance, timeout) as sock:
            sock.sendall(encode({"failed": failed}))
        return True
    except OSError:
        return False


def status(instance: str, timeout: float = 10.0) -> dict[str, Any]:
    """Asks a running instance for its status report (read-only)."""
    return _ask(instance, "status", timeout)


def drain(instance: str, timeout: float = 10.0) -> dict[str, Any]:
    """Asks a running instance to stop as SIGTERM does (a cluster node
    hands its sessions to its peers first)."""
    return _ask(instance, "drain", timeout)


def _ask(instance: str, what: str, timeout: float) -> dict[str, Any]:
    with _open(instance, timeout) as sock:
        sock.sendall(encode({what: True}))
        reader = LineReader()
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"instance {instance!r} closed the connection without a report")
            msgs = reader.feed(chunk)
            if msgs:
                return msgs[0]
