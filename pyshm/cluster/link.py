"""The asyncio adapter of one node link: drives a wire.Link over a TCP
connection and tells its node what happened (LinkOwner).

Ownership: a LinkConnection belongs to the ClusterNode that made it (dialed
or accepted); the node decides which link of a pair it keeps and when a
peer is dead (heartbeats).  This module only moves bytes: each byte read is
fed to the protocol, each Send written, each Message handed up.  A peer
that stops reading cannot grow this process: past MAX_UNSENT bytes queued
for it, the link is cut."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from pyshm.cluster import wire

log = logging.getLogger(__name__)

MAX_UNSENT = 256 << 20      # bytes queued for a peer that does not read: past this the link is cut
HIGH_WATER = 4 << 20        # above this the link counts as congested (nothing more is forwarded on it)


REFUSALS_LOGGED_EVERY = 10.0   # seconds: at most one refusal line per peer address this often


class LinkOwner(Protocol):
    def admit(self, conn: LinkConnection) -> str: ...
    def link_opened(self, conn: LinkConnection) -> None: ...
    def link_message(self, conn: LinkConnection, msg: list) -> None: ...
    def link_writable(self, conn: LinkConnection) -> None: ...
    def link_lost(self, conn: LinkConnection) -> None: ...


class LinkConnection(asyncio.Protocol):
    def __init__(self, owner: LinkOwner, protocol: wire.Link, dialed: tuple[str, int] | None = None) -> None:
        self.owner = owner
        self.link = protocol
        self.dialed = dialed            # the address this node dialed; None: accepted
        self.transport: asyncio.Transport | None = None
        self.peer_host = ""
        self.made = time.monotonic()
        self.last_heard = self.made
        self.congested = False
        self.reason = ""                # why it closed, for the log and status

    @property
    def peer(self) -> wire.Hello | None:
        return self.link.peer if self.link.state == wire.OPEN else None

    @property
    def open(self) -> bool:
        return self.transport is not None and self.link.state == wire.OPEN

    # -- asyncio callbacks -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer_host = peer[0] if isinstance(peer, tuple) else ""
        if self.dialed is None:
            refused = self.owner.admit(self)
            if refused:
                self.abort(refused)     # (no line logged: a flood must not flood the log)
                return
        self.transport.set_write_buffer_limits(high=HIGH_WATER)
        self.transport.write(self.link.start())

    def data_received(self, data: bytes) -> None:
        self.last_heard = time.monotonic()
        for ev in self.link.receive(data):
            if self.transport is None:
                return
            if isinstance(ev, wire.Send):
                self.transport.write(ev.data)
            elif isinstance(ev, wire.Message):
                self.owner.link_message(self, ev.msg)
            elif isinstance(ev, wire.Opened):
                self.owner.link_opened(self)
            else:
                self._closed_by_protocol(ev)

    def eof_received(self) -> bool:
        self.reason = self.reason or "the peer closed the link"
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and not self.reason:
            self.reason = f"connection lost: {exc}"
        self.transport = None
        self.owner.link_lost(self)

    def pause_writing(self) -> None:
        self.congested = True

    def resume_writing(self) -> None:
        self.congested = False
        self.owner.link_writable(self)

    # -- the node's calls -----------------------------------------------------------------------

    def send(self, msg: list) -> bool:
        """Seals and writes one message; False when the link is not open
        (or was just cut because its peer stopped reading)."""
        t = self.transport
        if t is None or self.link.state != wire.OPEN:
            return False
        t.write(self.link.send(msg))
        if t.get_write_buffer_size() > MAX_UNSENT:
            self.abort(f"the peer read none of {MAX_UNSENT >> 20} MiB sent to it")
            return False
        return True

    def abort(self, reason: str) -> None:
        """Cuts the link now (a dead or misbehaving peer)."""
        self.reason = self.reason or reason
        if self.transport is not None:
            self.transport.abort()

    def close(self, reason: str) -> None:
        """Closes the link once what was written is sent."""
        self.reason = self.reason or reason
        if self.transport is not None:
            self.transport.close()

    def describe(self) -> str:
        peer = self.link.peer
        who = f"node {peer.node[:64]!r}" if peer is not None else "a peer"
        return f"{who} at {self.peer_host or '?'}"

    def _closed_by_protocol(self, ev: wire.Closed) -> None:
        self.reason = ev.reason
        if ev.refused:
            _log_refusal(self.peer_host, f"link with {self.describe()} refused: {ev.reason}")
        else:
            log.info("link with %s closed: %s", self.describe(), ev.reason)
        self.close(ev.reason)     # (a refusal's reason is written before the FIN)


_refusals: dict[str, tuple[float, int]] = {}     # peer address -> (when one was last logged, refusals since)


def _log_refusal(host: str, line: str) -> None:
    """A refusal is logged, but at most once per REFUSALS_LOGGED_EVERY per
    address (with the count of those not logged): an unauthenticated peer
    cannot flood the log."""
    now = time.monotonic()
    last, quiet = _refusals.get(host, (0.0, 0))
    if now - last < REFUSALS_LOGGED_EVERY:
        _refusals[host] = (last, quiet + 1)
        return
    if len(_refusals) > 4096:
        _refusals.clear()
    _refusals[host] = (now, 0)
    log.warning("%s%s", line, f" ({quiet} more refused from {host} since the last line)" if quiet else "")
