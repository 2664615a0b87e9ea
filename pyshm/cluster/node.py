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
MAX_HANDSHAKES = 64         # accepted connections not yet authenticated; more are closed at once
MAX_FORWARDED = 1024        # requests forwarded to one peer and not yet answered
DIAL_BACKOFF = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
HANDOFF_TIMEOUT = 10.0      # seconds a peer has to take a session
MOVED_BATCH = 1024          # sessions per MOVED message
MAX_MOVED = 1 << 22         # moved sessions remembered before the expired ones are forgotten

Reply = Callable[[bytes, "str | None"], None]


def node_number(node: str) -> int:
    """The 32-bit number standing for a node id in session entries and
    cookies (never 0, which means "no node")."""
    return int.from_bytes(hashlib.sha256(node.encode()).digest()[:4], "big") or 1


class Host(Protocol):
    """What the node needs of the connection manager."""
    def run_forwarded(self, suite: str, request: Request, peer: str, hops: int, reply: Reply) -> None: ...
    def take_session(self, handed: Handed) -> str | None: ...


@dataclass(frozen=True)
class Handed:
    """A session handed from one node to another: its entry's lasting
    fields and its state (an encoded closure, None when it has none)."""
    sid: bytes
    kind: int           # SessionKind: an HTTP session, or a resumable RPC session (restored from its checkpoint)
    suite: int
    created: float
    last_access: float
    expires: float
    state: bytes | None


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
    said_goodbye: bool = False              # it answered our LEAVING: it forwards nothing more to us
    in_flight: int = 0                      # forwarded to it, not yet answered
    sessions_taken: int = 0                 # sessions it took from this node

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
        # Sessions that moved to another node: session id -> (node, until when
        # the entry is kept).  Kept as long as the session could live.
        self.moved: dict[bytes, tuple[str, float]] = {}
        self.moved_ttl = 1800.0
        self._handoffs: dict[int, tuple[Peer, asyncio.Future]] = {}
        self._left = False          # LEAVING was said

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
            if not self._left:
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
        refuse = ""
        if dialed is None and sum(not c.open for c in self.links) >= MAX_HANDSHAKES:
            refuse = f"{MAX_HANDSHAKES} connections are authenticating already"
        conn = LinkConnection(self, wire.Link(self.cfg.secret, me), dialed, refuse=refuse)
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
        for hid, (to, future) in list(self._handoffs.items()):
            if to is peer and not future.done():
                future.set_result(f"node {peer.node} died")
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
            elif kind == wire.HANDOFF:
                self._take(conn, msg)
            elif kind == wire.TAKEN:
                self._taken(peer, msg)
            elif kind == wire.MOVED:
                self._moved(peer, msg)
            elif kind == wire.LEAVING:
                peer.leaving = True
                conn.send([wire.GOODBYE])
            elif kind == wire.GOODBYE:
                peer.said_goodbye = True
            else:
                log.warning("node %s sent a message of unknown kind %r: ignored", peer.node, kind)
        except (IndexError, TypeError, ValueError) as e:
            conn.abort(f"a malformed message of kind {kind}: {e}")

    # -- forwarding ----------------------------------------------------------------------------------

    def peer_for(self, number: int) -> Peer | None:
        """The live peer a node number stands for, unless it is leaving
        (what it owned moved on: see moved_to)."""
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

    # -- handoff ------------------------------------------------------------------------------------

    def choose(self, sid: bytes, exclude: set[str] = frozenset()) -> Peer | None:
        """The live peer a session goes to when this node leaves: rendezvous
        hashing (the highest hash of session id and node wins), so each
        session's choice moves only if its winner leaves."""
        candidates = [p for p in self.peers.values() if p.alive and not p.leaving and p.node not in exclude]
        if not candidates:
            return None
        return max(candidates, key=lambda p: hashlib.blake2b(sid + p.node.encode(), digest_size=8).digest())

    async def hand_off(self, peer: Peer, handed: Handed) -> str | None:
        """Gives the session to `peer`; None once it took it, else why not."""
        hid = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._handoffs[hid] = (peer, future)
        try:
            if not peer.link.send([wire.HANDOFF, hid, handed.sid, handed.kind, handed.suite, handed.created,
                                   handed.last_access, handed.expires, handed.state]):
                return f"node {peer.node} could not be reached"
            return await asyncio.wait_for(future, HANDOFF_TIMEOUT)
        except asyncio.TimeoutError:
            return f"node {peer.node} did not take it within {HANDOFF_TIMEOUT:g} s"
        finally:
            del self._handoffs[hid]

    def _take(self, conn: LinkConnection, msg: list) -> None:
        _, hid, sid, kind, suite, created, last_access, expires, state = msg
        if not isinstance(sid, bytes) or len(sid) != 16 or not (state is None or isinstance(state, bytes)):
            raise ValueError("a malformed handoff")
        why = self.host.take_session(Handed(sid, int(kind), int(suite), float(created), float(last_access),
                                            float(expires), state))
        if why is None:
            self.moved.pop(sid, None)       # (it may have left here once, and come back)
        conn.send([wire.TAKEN, hid, why])

    def _taken(self, peer: Peer, msg: list) -> None:
        _, hid, why = msg
        pending = self._handoffs.get(hid)
        if pending is not None and pending[0] is peer and not pending[1].done():
            pending[1].set_result(why if isinstance(why, str) else None)

    def record_move(self, sid: bytes, node: str) -> None:
        self.moved[sid] = (node, time.monotonic() + self.moved_ttl)

    def announce_moved(self, moves: list[tuple[bytes, str]]) -> None:
        """Tells every live peer where these sessions went."""
        for i in range(0, len(moves), MOVED_BATCH):
            msg = [wire.MOVED, [[sid, node] for sid, node in moves[i:i + MOVED_BATCH]]]
            for peer in self.alive():
                peer.link.send(msg)

    def _moved(self, peer: Peer, msg: list) -> None:
        for sid, node in msg[1]:
            if isinstance(sid, bytes) and len(sid) == 16 and isinstance(node, str):
                if node == self.name:
                    self.moved.pop(sid, None)
                else:
                    self.record_move(sid, node)
        if len(self.moved) > MAX_MOVED:
            self._forget_old_moves()

    def _forget_old_moves(self) -> None:
        now = time.monotonic()
        self.moved = {sid: v for sid, v in self.moved.items() if v[1] > now}

    def moved_to(self, sid: bytes) -> Peer | None:
        """The live peer a session moved to, if it moved away from here."""
        entry = self.moved.get(sid)
        if entry is None:
            return None
        peer = self.peers.get(entry[0])
        return peer if peer is not None and peer.alive and not peer.leaving else None

    async def leave(self, busy: Callable[[], bool], timeout: float) -> None:
        """Tells every peer this node leaves and waits until each answered
        (it forwards nothing more here) and busy() is false: what they
        forwarded is answered.  Bounded by timeout."""
        self._left = True
        for peer in self.alive():
            peer.link.send([wire.LEAVING])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(p.said_goodbye for p in self.alive()) and not busy():
                return
            await asyncio.sleep(0.01)

    # -- status -----------------------------------------------------------------------------------------

    def status(self) -> dict:
        """The `cluster` part of `pyshm status` (never the secret)."""
        now = time.time()
        return {
            "name": self.cfg.name, "node": self.name, "number": self.number, "epoch": self.epoch,
            "link": f"{self.cfg.link[0]}:{self.link_port}", "interfaces": self.cfg.interfaces,
            "forwarded_in": self.forwarded_in, "forwarded_out": self.forwarded_out,
            "sessions_moved_away": len(self.moved),
            "peers": [{
                "node": p.node, "state": "leaving" if p.alive and p.leaving else "alive" if p.alive else "dead",
                "link": f"{p.link_address[0]}:{p.link_address[1]}" if p.link_address else None,
                "last_heartbeat": round(now - p.last_heard, 3) if p.last_heard else None,
                "rtt_ms": round(p.rtt * 1000, 3) if p.rtt is not None else None,
                "epoch": p.epoch, "forwarded_in": p.forwarded_in, "forwarded_out": p.forwarded_out,
            } for p in sorted(self.peers.values(), key=lambda p: p.node)],
        }
