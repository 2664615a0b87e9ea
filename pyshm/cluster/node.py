"""This node's view of its cluster: the peers, their links and liveness,
and the requests forwarded out to them and in from them.

Peers are found by zeroconf (pyshm.cluster.discovery) or listed statically
(cluster.peers); either way they are only addresses to dial.  A peer is
*alive* while its link is open and it was heard within DEAD_AFTER
heartbeats; it is marked dead at once when the link resets, whatever mDNS
still says, and is alive again only after a new handshake (its boot epoch
tells a restarted node from a returning one).

One link per pair: both nodes may dial each other; when a second link to a
peer opens, the one dialed by the node with the smaller id is kept (both
ends apply the same rule, so they keep the same one).

Forwarding out: the manager's placement gives a request whose session
another live node owns to forward(); its answer (or an error when the peer
dies or stays silent past the request's deadline) comes back through the
reply callback, exactly once.  Forwarding in: a FORWARD from a peer goes to
the host (the manager) as if it had arrived here, and its answer returns
on the same link.
"""
from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from pyshm.cluster import wire
from pyshm.cluster.link import LinkConnection
from pyshm.config import ClusterConfig
from pyshm.frontend import NODE_DIED, SHUTTING_DOWN, TIMED_OUT, Request

log = logging.getLogger(__name__)

DEAD_AFTER = 3              # heartbeats missed
HANDSHAKE_TIMEOUT = 2.0     # seconds for a new link to authenticate
MAX_FORWARDED = 1024        # requests forwarded to one peer and not yet answered
DIAL_BACKOFF = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)

Reply = Callable[[bytes, "str | None"], None]


def node_number(node: str) -> int:
    """The 32-bit number standing for a node id in session entries and
    cookies (never 0, which means "no node")."""
    return int.from_bytes(hashlib.sha256(node.encode()).digest()[:4], "big") or 1


class Host(Protocol):
    """What the node needs of the connection manager."""
    def run_forwarded(self, suite: str, request: Request, peer: str, hops: int, reply: Reply) -> None: ...


@dataclass
class Peer:
    node: str
    number: int
    epoch: int = 0
    link: LinkConnection | None = None      # the open link, None while dead
    link_address: tuple[str, int] | None = None
    last_heard: float = 0.0                 # time.time() of the last frame (for status)
    rtt: float | None = None                # seconds, from the last heartbeat answered
    forwarded_out: int = 0
    forwarded_in: int = 0
    leaving: bool = False                   # it said it drains: nothing new is forwarded to it
    in_flight: int = 0                      # forwarded to it, not yet answered

    @property
    def alive(self) -> bool:
        return self.link is not None


@dataclass
class _Out:
    """A request forwarded to a peer, waiting for its answer."""
    peer: Peer
    reply: Reply
    deadline: float


@dataclass
class _Target:
    """An address to keep a link to (a static peer, or one zeroconf found)."""
    address: tuple[str, int]
    node: str | None = None         # the node there, once known
    conn: LinkConnection | None = None
    failures: int = 0
    next_try: float = 0.0


@dataclass
class Remote:
    """Placement: forward to this peer."""
    peer: Peer


class ClusterNode:
    def __init__(self, cfg: ClusterConfig, host: Host, *, ports: dict[str, int] | None = None,
                 deadline: float = 60.0) -> None:
        self.cfg = cfg
        self.host = host
        self.name = cfg.node
        self.number = node_number(cfg.node)
        self.epoch = time.time_ns()
        self.ports = ports or {}
        self.deadline = deadline            # seconds a forwarded request may wait for its answer
        self.peers: dict[str, Peer] = {}
        self.by_number: dict[int, Peer] = {}
        self.targets: dict[tuple[str, int], _Target] = {}
        self.links: set[LinkConnection] = set()   # every connection, open or not yet
        self.server: asyncio.base_events.Server | None = None
        self.link_port = 0
        self._out: dict[int, _Out] = {}
        self._ids = itertools.count(1)
        self._tasks: list[asyncio.Task] = []
        self.discovery = None
        self.forwarded_out = 0
        self.forwarded_in = 0
        self.stopping = False

    # -- life cycle ---------------------------------------------------------------------------

    async def bind(self) -> None:
        """Listens for links (before anything else starts: an address in
        use stops the start)."""
        host, port = self.cfg.link
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: self._connection(None), host, port, reuse_address=True,
                                               start_serving=False)
        self.link_port = self.server.sockets[0].getsockname()[1]

    async def start(self, ports: dict[str, int]) -> None:
        """Accepts links, dials the static peers, announces this node."""
        self.ports = ports
        await self.server.start_serving()
        for address in self.cfg.peers:
            self.targets.setdefault(address, _Target(address))
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._tick()))
        if self.cfg.interfaces:
            from pyshm.cluster.discovery import Discovery

            self.discovery = Discovery(cluster=self.cfg.name, node=self.name, epoch=self.epoch,
                                       link_port=self.link_port, ports=ports, interfaces=self.cfg.interfaces,
                                       on_found=self._found, on_removed=self._removed)
            await self.discovery.start()
        log.info("cluster %s: node %s links on %s:%d", self.cfg.name, self.name, self.cfg.link[0], self.link_port)

    async def stop(self) -> None:
        """Leaves: unannounces, closes every link, fails what is forwarded out."""
        self.stopping = True
        for t in self._tasks:
            t.cancel()
        if self.discovery is not None:
            try:
                await self.discovery.stop()
            except Exception:
                log.exception("stopping zeroconf failed")
        if self.server is not None:
            self.server.close()
        for conn in list(self.links):
            conn.send([wire.LEAVING])
            conn.close("this node stops")
        self.fail_forwarded(b"server shutting down", SHUTTING_DOWN)

    # -- peers ---------------------------------------------------------------------------------

    def alive(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.alive]

    def _found(self, ann) -> None:
        """zeroconf announced a node of this cluster."""
        if ann.node == self.name or not ann.addresses:
            return
        address = (ann.addresses[0], ann.link_port)
        target = self.targets.setdefault(address, _Target(address))
        target.node = ann.node
        peer = self.peers.get(ann.node)
        if peer is not None and peer.alive and peer.epoch != ann.epoch:
            log.info("node %s announces a new boot epoch: it restarted", ann.node)

    def _removed(self, node: str) -> None:
        """zeroconf heard a goodbye: nothing to do (liveness is the link's)."""
        log.debug("zeroconf: node %s said goodbye", node)

    def _connection(self, dialed: tuple[str, int] | None) -> LinkConnection:
        me = wire.Hello(self.cfg.name, self.name, self.epoch, self.link_port)
        conn = LinkConnection(self, wire.Link(self.cfg.secret, me), dialed)
        self.links.add(conn)
        return conn

    async def _dial(self, target: _Target) -> None:
        loop = asyncio.get_running_loop()
        conn = self._connection(target.address)
        target.conn = conn
        try:
            await asyncio.wait_for(loop.create_connection(lambda: conn, *target.address), HANDSHAKE_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as e:
            self.links.discard(conn)
            target.conn = None
            target.failures += 1
            target.next_try = time.monotonic() + DIAL_BACKOFF[min(target.failures, len(DIAL_BACKOFF) - 1)]
            log.debug("dialing %s:%d failed: %s", *target.address, e)

    def link_opened(self, conn: LinkConnection) -> None:
        hello = conn.peer
        if conn.dialed is not None:
            target = self.targets.get(conn.dialed)
            if target is not None:
                target.node, target.failures = hello.node, 0
        peer = self.peers.get(hello.node)
        if peer is None:
            peer = self.peers[hello.node] = Peer(hello.node, node_number(hello.node))
            other = self.by_number.setdefault(peer.number, peer)
            if other is not peer:
                conn.abort(f"node ids {hello.node!r} and {other.node!r} have the same number; rename one")
                del self.peers[hello.node]
                return
        was_dead = peer.link is None
        if peer.link is not None and peer.link is not conn:
            if self._keep_existing(peer.link, conn, hello.node):
                conn.close("a link to this peer is open already")
                return
            old = peer.link
            peer.link = None            # (so its loss is not taken for a death)
            old.close("a second link replaced it")
        elif peer.epoch and peer.epoch != hello.epoch:
            log.warning("node %s restarted (new boot epoch): what it owned before is gone", hello.node)
        peer.link, peer.epoch, peer.leaving = conn, hello.epoch, False
        peer.link_address = (conn.peer_host, hello.link_port)
        peer.last_heard = time.time()
        if was_dead:
            log.info("node %s at %s:%d is alive", hello.node, *peer.link_address)

    def _keep_existing(self, existing: LinkConnection, new: LinkConnection, other: str) -> bool:
        """Of two links to one peer, keep the one dialed by the smaller node
        id (both ends choose the same one); of two alike, the older."""
        def dialed_by_smaller(conn: LinkConnection) -> bool:
            return (conn.dialed is not None) == (self.name < other)
        if dialed_by_smaller(existing) != dialed_by_smaller(new):
            return dialed_by_smaller(existing)
        return True

    def link_lost(self, conn: LinkConnection) -> None:
        self.links.discard(conn)
        for target in self.targets.values():
            if target.conn is conn:     # dial again soon; later and later while it refuses or fails
                target.conn = None
                target.failures = 0 if conn.link.state == wire.OPEN else target.failures + 1
                target.next_try = time.monotonic() + DIAL_BACKOFF[min(target.failures, len(DIAL_BACKOFF) - 1)]
        hello = conn.link.peer
        peer = self.peers.get(hello.node) if hello is not None else None
        if peer is not None and peer.link is conn:
            self._dead(peer, conn.reason or "link closed")

    def _dead(self, peer: Peer, why: str) -> None:
        peer.link, peer.rtt = None, None
        if not self.stopping:
            log.warning("node %s is dead: %s", peer.node, why) if not peer.leaving else \
                log.info("node %s left", peer.node)
        self.fail_forwarded(f"node {peer.node} {'left' if peer.leaving else 'died'} before it answered".encode(),
                            NODE_DIED, peer)

    async def _tick(self) -> None:
        """Every heartbeat: pings every open link, declares silent peers
        dead, drops links stuck in their handshake, dials what has no link,
        and times out forwarded requests past their deadline."""
        hb = self.cfg.heartbeat
        last = time.monotonic()
        while True:
            await asyncio.sleep(hb)
            now = time.monotonic()
            try:
                # A tick this late means this loop stalled: the peers' frames
                # may be waiting unread, so silence proves nothing this time.
                self._tick_once(now, judge=now - last < 2 * hb)
            except Exception:
                log.exception("the cluster's heartbeat failed")
            last = now

    def _tick_once(self, now: float, judge: bool = True) -> None:
        hb = self.cfg.heartbeat
        for conn in list(self.links):
            if conn.open:
                if judge and now - conn.last_heard > DEAD_AFTER * hb:
                    conn.reason = f"silent for {now - conn.last_heard:.2f} s ({DEAD_AFTER} heartbeats missed)"
                    conn.abort(conn.reason)
                    self.link_lost(conn)        # now, not when the transport gets round to it
                else:
                    conn.send([wire.PING, now])
            elif conn.link.state != wire.CLOSED and now - conn.made > HANDSHAKE_TIMEOUT:
                conn.abort("no handshake within 2 s")
        for target in self.targets.values():
            if target.conn is None and now >= target.next_try and not self._linked(target):
                target.next_try = now + 1.0     # (until _dial says otherwise)
                self._tasks.append(asyncio.get_running_loop().create_task(self._dial(target)))
        self._tasks = [t for t in self._tasks if not t.done()]
        for fid, out in [(fid, out) for fid, out in self._out.items() if out.deadline < now]:
            del self._out[fid]
            out.peer.in_flight -= 1
            out.reply(f"node {out.peer.node} did not answer within {self.deadline:g} s".encode(), TIMED_OUT)

    def _linked(self, target: _Target) -> bool:
        peer = self.peers.get(target.node) if target.node else None
        return peer is not None and peer.alive

    # -- messages ---------------------------------------------------------------------------------

    def link_message(self, conn: LinkConnection, msg: list) -> None:
        peer = self.peers.get(conn.link.peer.node)
        if peer is None or peer.link is not conn:
            return      # a duplicate link being closed
        peer.last_heard = time.time()
        kind = msg[0]
        try:
            if kind == wire.PING:
                conn.send([wire.PONG, msg[1]])
            elif kind == wire.PONG:
                peer.rtt = time.monotonic() - float(msg[1])
            elif kind == wire.FORWARD:
                self._forwarded_in(peer, conn, msg)
            elif kind == wire.ANSWER:
                self._answered(peer, msg)
            elif kind == wire.LEAVING:
                peer.leaving = True
            else:
                log.warning("node %s sent a message of unknown kind %r: ignored", peer.node, kind)
        except (IndexError, TypeError, ValueError) as e:
            conn.abort(f"a malformed message of kind {kind}: {e}")

    # -- forwarding ----------------------------------------------------------------------------------

    def peer_for(self, number: int) -> Peer | None:
        """The live peer a node number stands for, if it takes requests."""
        peer = self.by_number.get(number)
        if peer is None or not peer.alive or peer.leaving:
            return None
        return peer

    def can_forward(self, peer: Peer) -> bool:
        return peer.in_flight < MAX_FORWARDED and not peer.link.congested

    def forward(self, peer: Peer, suite: str, request: Request, hops: int, reply: Reply) -> None:
        """Sends the request to run at `peer`; reply(body, error) is called
        exactly once, with its answer or an error."""
        fid = next(self._ids)
        msg = [wire.FORWARD, fid, suite, request.payload, request.route, request.session, hops + 1,
               request.describe()]
        self._out[fid] = _Out(peer, reply, time.monotonic() + self.deadline)
        peer.in_flight += 1
        if not peer.link.send(msg):
            del self._out[fid]
            peer.in_flight -= 1
            reply(f"node {peer.node} could not be reached".encode(), NODE_DIED)
            return
        peer.forwarded_out += 1
        self.forwarded_out += 1

    def _answered(self, peer: Peer, msg: list) -> None:
        _, fid, body, error = msg
        out = self._out.get(fid)
        if out is None or out.peer is not peer:
            return      # timed out meanwhile (or a lie: ignored)
        del self._out[fid]
        peer.in_flight -= 1
        out.reply(bytes(body), error if isinstance(error, str) else None)

    def _forwarded_in(self, peer: Peer, conn: LinkConnection, msg: list) -> None:
        _, fid, suite, payload, route, session, hops, label = msg
        if session is not None and (not isinstance(session, bytes) or len(session) != 16):
            raise ValueError("a session id is 16 bytes")
        request = Request(bytes(payload), bytes(route), session, label=str(label))
        peer.forwarded_in += 1
        self.forwarded_in += 1

        def reply(body: bytes, error: str | None) -> None:
            conn.send([wire.ANSWER, fid, body, error])   # (lost with the link: the peer answers the client)

        self.host.run_forwarded(str(suite), request, f"node {peer.node}", int(hops), reply)

    def fail_forwarded(self, body: bytes, error: str, peer: Peer | None = None) -> None:
        """Answers what is forwarded out (to `peer`, or to any) with an error."""
        for fid, out in [(fid, out) for fid, out in self._out.items() if peer is None or out.peer is peer]:
            del self._out[fid]
            out.peer.in_flight -= 1
            out.reply(body, error)

    def forwarded_waiting(self) -> int:
        return len(self._out)

    # -- status -----------------------------------------------------------------------------------------

    def status(self) -> dict:
        """The `cluster` part of `pyshm status` (never the secret)."""
        now = time.time()
        return {
            "name": self.cfg.name, "node": self.name, "number": self.number, "epoch": self.epoch,
            "link": f"{self.cfg.link[0]}:{self.link_port}", "interfaces": self.cfg.interfaces,
            "forwarded_in": self.forwarded_in, "forwarded_out": self.forwarded_out,
            "peers": [{
                "node": p.node, "state": "leaving" if p.alive and p.leaving else "alive" if p.alive else "dead",
                "link": f"{p.link_address[0]}:{p.link_address[1]}" if p.link_address else None,
                "last_heartbeat": round(now - p.last_heard, 3) if p.last_heard else None,
                "rtt_ms": round(p.rtt * 1000, 3) if p.rtt is not None else None,
                "epoch": p.epoch, "forwarded_in": p.forwarded_in, "forwarded_out": p.forwarded_out,
            } for p in sorted(self.peers.values(), key=lambda p: p.node)],
        }
