"""Handing a cluster node's sessions to its peers, and taking theirs.

On a drain the node hands each HTTP session and each RPC session with a
token (entry and state) to a live peer while requests go on; a peer that
drains hands this node its sessions the same way (take_session).

A part of ConnectionManager (mixed into it): it uses the manager's
sessions, heap, cluster, config, pending calls per session
(_session_calls), the requests parked while their session moves
(_moving, _parked), backlog and pump, and nothing else of it.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from pyshm.errors import PyshmError
from pyshm.sessions import MOVED, RESUMABLE, Session, SessionKind, state_closure

if TYPE_CHECKING:
    from pyshm.cluster.node import Handed

log = logging.getLogger("pyshm.manager")


class Handover:
    def take_session(self, handed: Handed) -> str | None:
        """A peer hands this node one of its sessions (it drains): entry and
        state are made here, this node its owner.  An HTTP session is marked
        MOVED (its next answer signs the cookie anew); an RPC session, bound
        to no worker yet, is restored from its checkpoint at its next call.
        None when taken, else why not."""
        if self.stopping:
            return f"node {self.node_name} is draining"
        if handed.suite >= len(self.config.suites):
            return f"node {self.node_name} has no suite {handed.suite}"
        try:
            kind = SessionKind(handed.kind)
        except ValueError:
            return f"no session kind {handed.kind}"
        name = state_closure(handed.sid) if handed.state else ""
        try:
            version = self.heap.put_encoded(name, handed.state) if handed.state else 0
            self.sessions.end(handed.sid)           # (an older copy of it, if any)
            self.sessions.insert(Session(handed.sid, kind, handed.suite, -1, 0, handed.created,
                                         handed.last_access, handed.expires, name, version, 0,
                                         owner_node=self.node_number,
                                         flags=MOVED if kind == SessionKind.REQUEST else RESUMABLE))
        except PyshmError as e:
            if name and name in self.heap:
                self.heap.delete(name)
            return f"node {self.node_name} cannot take it: {e}"
        return None

    async def _hand_over(self, deadline: float) -> None:
        """This node leaves its cluster: each of its HTTP sessions and
        resumable RPC sessions goes to a live peer (entry and state), 64 at
        once, while requests go on: a session's calls finish first, calls
        that arrive while it moves wait, then follow it.  Peers first hear
        that this node drains (they hand it nothing more); the table is
        scanned again until nothing is left to move (a forwarded request
        may have made a session meanwhile), all within `deadline`.  Then
        every peer learns where each went."""
        self.cluster.announce_draining()
        moves: list[tuple[bytes, str]] = []
        tried: set[bytes] = set()
        started = time.monotonic()
        while time.monotonic() < deadline:
            sids = [sid for sid in self._movable() if sid not in tried]
            if not sids:
                break
            if not self.cluster.choose(sids[0]):
                log.warning("no live peer to take this node's %d sessions: they end with it", len(sids))
                break
            tried.update(sids)
            window = asyncio.Semaphore(64)

            async def move(sid: bytes) -> None:
                async with window:
                    node = await self._move(sid, deadline)
                    if node is not None:
                        moves.append((sid, node))

            for failed in await asyncio.gather(*(move(sid) for sid in sids), return_exceptions=True):
                if isinstance(failed, Exception):
                    log.error("handing a session over failed: %r", failed)
        self.cluster.announce_moved(moves)
        log.info("handed %d of %d sessions to %d peers in %.2f s", len(moves), len(tried), len(self.cluster.alive()),
                 time.monotonic() - started)

    def _movable(self) -> list[bytes]:
        """Sessions of this node that outlive a connection: HTTP sessions, and RPC sessions with a token."""
        return [sid for sid in self.sessions.ids(limit=self.sessions.stats().capacity)
                if (e := self.sessions.get(sid)) is not None
                and (e.kind == SessionKind.REQUEST or e.flags & RESUMABLE)]

    async def _move(self, sid: bytes, deadline: float) -> str | None:
        """Hands one session to a peer; the node that took it, or None."""
        self._moving.add(sid)
        try:
            while self._session_calls.get(sid):
                if time.monotonic() >= deadline:    # a call still running: the session stays (and ends) here
                    log.warning("session %s still runs a call at the graceful timeout: not handed over", sid.hex())
                    return None
                await asyncio.sleep(0.002)          # its calls running here finish first
            entry = self.sessions.get(sid)
            if entry is None:
                return None                         # ended meanwhile
            from pyshm.cluster.node import Handed

            state = self.heap.export(entry.closure) if entry.closure and entry.closure in self.heap else None
            handed = Handed(sid, int(entry.kind), entry.suite, entry.created, entry.last_access, entry.expires, state)
            tried: set[str] = set()
            while (peer := self.cluster.choose(sid, tried)) is not None:
                retry, why = await self.cluster.hand_off(peer, handed)
                if why is None or not retry:
                    if why is not None:     # it may have taken it: never offered to a second node as well
                        log.error("handing session %s to node %s: %s; counting it as moved there", sid.hex(),
                                  peer.node, why)
                    self.cluster.record_move(sid, peer.node)
                    peer.sessions_taken += 1
                    self.sessions.end(sid, self.heap)
                    return peer.node
                log.warning("handing session %s to node %s failed: %s", sid.hex(), peer.node, why)
                tried.add(peer.node)
            log.error("no peer took session %s: it ends with this node", sid.hex())
            return None
        finally:
            self._moving.discard(sid)
            parked = self._parked.pop(sid, None)
            if parked:      # they follow the session, in their order, ahead of what came later
                self.backlog[parked[0].suite].extendleft(reversed(parked))
                self.pump()
