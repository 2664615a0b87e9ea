"""The manager's end of the control channel (pyshm.control is the other end).

One listening Unix socket in the abstract namespace per instance.  Two kinds
of peers connect: workers, which say hello and keep the connection for their
whole life (its EOF is how the manager learns at once that one died), and
`pyshm status`, which gets one read-only report and is closed, and
`pyshm drain`, which asks the instance to stop as SIGTERM does.  The kernel
says who connected (SO_PEERCRED): only processes of this user are answered.

This module knows the socket and the message shapes, nothing of what they
mean: a worker's hello, start failure and departure go to a ControlHandler
(the supervisor); a status request is answered with what `status()` returns.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from typing import Any, Callable, Protocol

from pyshm import control
from pyshm.errors import PyshmError, SegmentExists

log = logging.getLogger(__name__)

_CRED = struct.Struct("3i")     # struct ucred: pid, uid, gid


class ControlConn:
    """One accepted connection; `owner` is whatever the handler attaches
    (the supervisor: the worker it belongs to)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lines = control.LineReader()
        self.owner: Any = None
        self.closed = False

    def peer(self) -> tuple[int, int]:
        """(pid, uid) of the process at the other end, as the kernel says."""
        pid, uid, _ = _CRED.unpack(self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
        return pid, uid


class ControlHandler(Protocol):
    def on_hello(self, conn: ControlConn, hello: dict) -> None: ...
    def on_failed(self, conn: ControlConn, failed: dict) -> None: ...
    def on_closed(self, conn: ControlConn) -> None: ...


class ControlServer:
    def __init__(self, instance: str, handler: ControlHandler, status: Callable[[], dict],
                 drain: Callable[[], dict] | None = None) -> None:
        self.instance = instance
        self.handler = handler
        self.status = status
        self.drain = drain
        self.listener: socket.socket | None = None
        self.conns: set[ControlConn] = set()

    def start(self) -> None:
        """Binds the instance's control socket; SegmentExists when another
        instance of this name runs here."""
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            self.listener.bind(control.address(self.instance))
        except OSError as e:
            self.listener.close()
            self.listener = None
            raise SegmentExists(f"instance {self.instance!r} already runs here (control socket: {e.strerror}); "
                                f"choose another instance.name") from None
        self.listener.listen(128)
        asyncio.get_running_loop().add_reader(self.listener, self._accept)

    def send(self, conn: ControlConn, msg: dict, fds: list[int] | None = None) -> bool:
        """One message (and file descriptors); False when the peer is gone."""
        try:
            if fds:
                socket.send_fds(conn.sock, [control.encode(msg)], fds)
            else:
                conn.sock.send(control.encode(msg))
            return True
        except OSError:
            return False

    def close(self, conn: ControlConn) -> None:
        """Closes one connection; the handler hears of it (on_closed)."""
        if conn.closed:
            return
        conn.closed = True
        self.conns.discard(conn)
        asyncio.get_running_loop().remove_reader(conn.sock)
        conn.sock.close()
        self.handler.on_closed(conn)

    def shut(self) -> None:
        """The manager goes away: every connection and the listener close,
        without telling the handler."""
        loop = asyncio.get_running_loop()
        for conn in list(self.conns):
            conn.closed = True
            loop.remove_reader(conn.sock)
            conn.sock.close()
        self.conns.clear()
        if self.listener is not None:
            loop.remove_reader(self.listener)
            self.listener.close()
            self.listener = None

    # -- the loop's callbacks ------------------------------------------------------------------

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        conn = ControlConn(sock)
        self.conns.add(conn)
        asyncio.get_running_loop().add_reader(sock, self._readable, conn)

    def _readable(self, conn: ControlConn) -> None:
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close(conn)
            return
        try:
            for msg in conn.lines.feed(data):
                if conn.closed:
                    return              # a message before this one closed it
                if conn.owner is not None:
                    continue            # a joined worker only ever closes
                if "hello" in msg:
                    self.handler.on_hello(conn, msg["hello"])
                elif "failed" in msg:
                    self.handler.on_failed(conn, msg["failed"])
                    return
                elif msg.get("status"):
                    self._answer(conn, self.status)
                    return
                elif msg.get("drain") and self.drain is not None:
                    self._answer(conn, self.drain)
                    return
        except (ValueError, KeyError, TypeError, OSError, PyshmError) as e:
            log.warning("bad control message or a failed join: %s", e)
            self.close(conn)

    def _answer(self, conn: ControlConn, request: Callable[[], dict]) -> None:
        """`pyshm status` or `pyshm drain`, for this user's processes only: one answer, then the close."""
        if conn.peer()[1] == os.getuid():
            conn.sock.setblocking(True)
            try:
                conn.sock.sendall(control.encode(request()))
            except OSError:
                pass
        self.close(conn)
