"""The one asyncio transport adapter that drives every front-end.

A Connection feeds the client's bytes to its front-end, hands the requests
it parses to the connection manager, and writes each response the front-end
encodes, in request order when the front-end asks for it.  Bad input: the
responses already due go out, then the front-end's error reply, then the
connection closes; nothing more is read."""
from __future__ import annotations

import asyncio
import itertools
import logging
from typing import TYPE_CHECKING

from pyshm.config import ListenConfig
from pyshm.frontend import FrontEnd, ProtocolError, Request

if TYPE_CHECKING:
    from pyshm.manager import ConnectionManager

log = logging.getLogger(__name__)

PAUSE_AT = 256      # requests in flight on one connection before it stops reading
RESUME_AT = 64
LINGER = 1.0        # seconds between the error reply's FIN and the close


class Connection(asyncio.Protocol):
    def __init__(self, manager: ConnectionManager, listen: ListenConfig, frontend: type[FrontEnd]) -> None:
        self.manager = manager
        self.listen = listen
        self.fe = frontend(**listen.options)
        self.transport: asyncio.Transport | None = None
        self.peer = b""
        self._seq = itertools.count()
        self._next_out = 0                    # ordered front-ends: next seq to write
        self._ready: dict[int, bytes] = {}    # ordered front-ends: written when their turn comes
        self._outstanding = 0
        self._paused = False
        self._error: ProtocolError | None = None
        self._eof = False
        self._closing = False

    # -- asyncio callbacks ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = (f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)).encode()
        self.manager.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self._error is not None:
            return
        try:
            events = self.fe.receive(data)
        except Exception:  # a front-end bug must cost one connection, not the server
            log.exception("front-end %s failed on input from %s", self.fe.name, self.peer.decode())
            events = [ProtocolError("internal front-end error")]
        self._handle(events)

    def eof_received(self) -> bool:
        self._eof = True
        self._handle(self.fe.eof())
        self._maybe_close()
        return True   # keep our side open until the responses are out

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.manager.connections.discard(self)

    # -- requests and responses --------------------------------------------------

    def _handle(self, events: list) -> None:
        for ev in events:
            if self._error is not None:
                break
            if isinstance(ev, Request):
                seq = next(self._seq)
                self._outstanding += 1
                suite = self.listen.suite_for(ev.route)
                self.manager.submit(suite, ev, self.peer, lambda body, error, seq=seq, req=ev:
                                    self._answered(seq, req, body, error))
            else:
                log.info("closing %s: %s", self.peer.decode(), ev.message)
                self._error = ev
                if self.transport is not None:
                    self.transport.pause_reading()
                self._maybe_close()
        if self._outstanding >= PAUSE_AT and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def _answered(self, seq: int, req: Request, body: bytes, error: bool) -> None:
        self._outstanding -= 1
        if self.transport is None:
            return
        out = self.fe.response(req, body, error=error)
        if not self.fe.ordered:
            self.transport.write(out)
        else:
            self._ready[seq] = out
            while self._next_out in self._ready:
                self.transport.write(self._ready.pop(self._next_out))
                self._next_out += 1
        if self._paused and self._outstanding <= RESUME_AT and self._error is None:
            self._paused = False
            self.transport.resume_reading()
        self._maybe_close()

    def _maybe_close(self) -> None:
        """Closes once every answer is out, after an error or the client's EOF."""
        t = self.transport
        if t is None or self._closing or self._outstanding or not (self._error or self._eof):
            return
        self._closing = True
        if self._error is not None:
            if self._error.reply:
                t.write(self._error.reply)
            if t.can_write_eof():
                # FIN first, so the client reads the reply before the reset
                # that closing with unread input causes.
                t.write_eof()
                asyncio.get_running_loop().call_later(LINGER, t.close)
                return
        t.close()

    def shutdown(self) -> None:
        """The server stops: close now if idle, else once the answers are out."""
        self._eof = True
        if self.transport is not None:
            self.transport.pause_reading()
        self._maybe_close()
