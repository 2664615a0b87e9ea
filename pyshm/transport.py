"""The one asyncio transport adapter that drives every front-end.

A Connection feeds the client's bytes to its front-end, hands the requests
it parses to the connection manager (which decides where they go: routing
and sessions are policy, not the transport's), and writes each response the
front-end encodes, in request order when the front-end asks for it.  Bad input: the
responses already due go out, then the front-end's error reply, then the
connection closes; nothing more is read.  Timeouts: a connection idle longer
than the front-end's idle_timeout, or a request not whole within
request_timeout of its first byte (slowloris), is closed.

Flow control, so that one client can neither grow the manager's memory nor
crowd out the others: at most MAX_IN_FLIGHT of a connection's requests are
with the manager at once; the rest wait here, in order, and their queue
timeout starts only when they are handed over.  While the socket's unsent
bytes are above the transport's high-water mark (the client does not read)
no more requests are handed over and reading stops; reading also stops
while MAX_HELD requests wait.  So a connection holds at most MAX_IN_FLIGHT
answers, plus MAX_HELD requests and one read's worth of bytes."""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from typing import TYPE_CHECKING

from pyshm.config import ListenConfig
from pyshm.frontend import FrontEnd, ProtocolError, Request, Send

if TYPE_CHECKING:
    from pyshm.manager import ConnectionManager

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 64      # a connection's requests with the manager at once
MAX_HELD = 64           # reading stops while this many more wait here (resumes below a quarter)
LINGER = 1.0        # seconds between the error reply's FIN and the close


class Connection(asyncio.Protocol):
    def __init__(self, manager: ConnectionManager, listen: ListenConfig, frontend: type[FrontEnd]) -> None:
        self.manager = manager
        self.listen = listen
        self.fe = frontend(**listen.options)
        self.idle_timeout = float(self.fe.options["idle_timeout"])
        self.request_timeout = float(self.fe.options["request_timeout"])
        self.transport: asyncio.Transport | None = None
        self.peer = b""
        self._seq = itertools.count()
        self._next_out = 0                    # ordered front-ends: next seq to write
        self._ready: dict[int, tuple[bytes, bool]] = {}   # ordered: (bytes, keep alive) awaiting their turn
        self._outstanding = 0                 # parsed, not yet answered (held here or with the manager)
        self._in_flight = 0                   # handed to the manager, not yet answered
        self._held: collections.deque[tuple[int, Request]] = collections.deque()
        self._reading_paused = False
        self._write_blocked = False           # unsent bytes above the high-water mark
        self._blocked_since = 0.0
        self._handing = False
        self._error: ProtocolError | None = None
        self._eof = False
        self._closing = False
        self._started: float | None = None    # when the partial request's first byte came
        self._idle_since = time.monotonic()   # last time nothing was partial or in flight

    # -- asyncio callbacks ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("sockname")
        self.peer = (f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)).encode()
        self.fe.connection_made(self.peer.decode(), (sock[0], sock[1]) if isinstance(sock, tuple) else ("", 0))
        self.manager.connections.add(self)
        self.client = self.manager.connection_opened(self.listen, self.peer)

    def data_received(self, data: bytes) -> None:
        if self._error is not None or self._closing:
            return
        if self._started is None:
            self._started = self._idle_since = time.monotonic()
        try:
            events = self.fe.receive(data)
        except Exception:  # a front-end bug must cost one connection, not the server
            log.exception("front-end %s failed on input from %s", self.fe.name, self.peer.decode())
            events = [ProtocolError("internal front-end error")]
        self._handle(events)
        if not self.fe.partial():
            self._started = None

    def eof_received(self) -> bool:
        self._eof = True
        self._handle(self.fe.eof())
        self._maybe_close()
        return True   # keep our side open until the responses are out

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.manager.connections.discard(self)
        self.manager.connection_closed(self.client)

    # -- requests and responses --------------------------------------------------

    def _handle(self, events: list) -> None:
        for ev in events:
            if self._error is not None or self._closing:
                break
            if isinstance(ev, Request):
                self._outstanding += 1
                seq = next(self._seq)
                if self._held or self._handing or self._write_blocked or self._in_flight >= MAX_IN_FLIGHT:
                    self._held.append((seq, ev))
                else:           # the common case: straight to the manager
                    self._in_flight += 1
                    self._submit(seq, ev)
            elif isinstance(ev, Send):
                if self.transport is not None:
                    self.transport.write(ev.data)
            else:
                log.info("closing %s: %s", self.peer.decode(), ev.message)
                self._error = ev
                self._pause_reading()
                self._maybe_close()
        if self._held:
            self._hand_over()

    def _hand_over(self) -> None:
        """Gives held requests to the manager while this connection may have
        more in flight and its client reads its answers."""
        if self._handing:
            return      # an answer given during a hand-over: the loop below goes on
        self._handing = True
        try:
            while self._held and self._in_flight < MAX_IN_FLIGHT and not self._write_blocked:
                if self.transport is None or self._closing:
                    self._held.clear()
                    return
                seq, req = self._held.popleft()
                self._in_flight += 1
                self._submit(seq, req)
        finally:
            self._handing = False
        if self._write_blocked or len(self._held) >= MAX_HELD:
            self._pause_reading()
        elif len(self._held) < MAX_HELD // 4 and self._error is None:
            self._resume_reading()

    def _submit(self, seq: int, req: Request) -> None:
        self.manager.submit(self.client, req, lambda body, error: self._answered(seq, req, body, error))

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not (self._closing or self._eof):
            self._reading_paused = False
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        self._write_blocked = True
        self._blocked_since = time.monotonic()
        self._pause_reading()

    def resume_writing(self) -> None:
        self._write_blocked = False
        self._hand_over()

    def _answered(self, seq: int, req: Request, body: bytes, error: str | None) -> None:
        self._outstanding -= 1
        self._in_flight -= 1
        if self.transport is None or self._closing:
            return
        out = (self.fe.response(req, body, error=error), self.fe.keep_alive(req))
        if not self.fe.ordered:
            self._write(*out)
        else:
            self._ready[seq] = out
            while self._next_out in self._ready and not self._closing:
                self._write(*self._ready.pop(self._next_out))
                self._next_out += 1
        if self._held or self._reading_paused:
            self._hand_over()
        if not self._outstanding:
            self._idle_since = time.monotonic()
        self._maybe_close()

    def _write(self, data: bytes, keep_alive: bool) -> None:
        self.transport.write(data)
        if not keep_alive:
            # Nothing after this answer: the client asked to close.
            self._closing = True
            self.transport.close()

    def _maybe_close(self) -> None:
        """Closes once every answer is out, after an error or the client's EOF."""
        t = self.transport
        if t is None or self._closing or self._outstanding or not (self._error or self._eof):
            return
        if self._error is not None:
            self._close_after(self._error.reply)
        else:
            self._closing = True
            t.close()

    def _close_after(self, reply: bytes) -> None:
        """Sends `reply`, then FIN, then closes LINGER later: the client reads
        the reply before the reset that closing with unread input causes."""
        t = self.transport
        self._closing = True
        if reply:
            t.write(reply)
        if t.can_write_eof():
            t.write_eof()
            asyncio.get_running_loop().call_later(LINGER, t.close)
        else:
            t.close()

    # -- timeouts -------------------------------------------------------------------------

    def check_timeouts(self, now: float) -> None:
        """Called about twice a second by the manager's sweep (one timer for
        all connections, none per request)."""
        t = self.transport
        if t is None or self._closing:
            return
        if self._write_blocked and now - self._blocked_since >= self.idle_timeout:
            log.info("closing %s: it has read none of its answers for %g s", self.peer.decode(), self.idle_timeout)
            self._closing = True
            t.abort()
            return
        if self._outstanding:
            return   # a request in flight is the manager's to time out
        if self._started is not None:
            if now - self._started < self.request_timeout:
                return
            log.info("closing %s: request not whole in time", self.peer.decode())
            self._pause_reading()
            self._close_after(self.fe.timeout_reply())
            return
        if now - self._idle_since < self.idle_timeout:
            return
        log.info("closing %s: idle", self.peer.decode())
        self._closing = True
        t.close()

    def held(self) -> int:
        """Requests parsed but not yet handed to the manager."""
        return len(self._held)

    def answer_held(self, body: bytes, error: str) -> None:
        """The server stops before it could hand these over: each gets `error`."""
        self._handing = True        # none of them goes to the manager now
        try:
            while self._held:
                seq, req = self._held.popleft()
                self._in_flight += 1
                self._answered(seq, req, body, error)
        finally:
            self._handing = False

    def shutdown(self) -> None:
        """The server stops: close now if idle, else once the answers are out."""
        self._eof = True
        self._pause_reading()
        self._maybe_close()
