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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

from pyshm.cluster import wire
from pyshm.cluster.link import LinkConnection
from pyshm.cluster.moves import Moves
from pyshm.config import ClusterConfig
from pyshm.frontend import NODE_DIED, SHUTTING_DOWN, TIMED_OUT, TOO_LARGE, Request

if TYPE_CHECKING:
    from pyshm.cluster.discovery import Announcement, Discovery

log = logging.getLogger(__name__)

DEAD_AFTER = 3              # heartbeats missed
HANDSHAKE_TIMEOUT = 2.0     # seconds for a new link to authenticate
MAX_HANDSHAKES = 64         # accepted connections not yet authenticated; more are closed at once ...
MAX_HANDSHAKES_FROM = 8     # ... and at most this many from one address
MAX_FORWARDED = 1024        # requests forwarded to one peer and not yet answered
DIAL_BACKOFF = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
MAX_TARGETS = 256           # addresses zeroconf may add (static peers come on top)
FORGET_TARGET_AFTER = 30    # failed dials after which an address zeroconf gave is dropped
HANDOFF_TIMEOUT = 10.0      # seconds a peer has to take a session
MOVED_BATCH = 1024          # sessions per MOVED message
FRAME_SLACK = 64 << 10      # room in a link frame for what goes with a payload (ids, route, label)

Reply = Callable[[bytes, "str | None"], None]


def node_number(node: str) -> int:
    """The 32-bit number standing for a node id in session entries and
    cookies (never 0, which means "no node")."""
    return int.from_bytes(hashlib.sha256(node.encode()).digest()[:4], "big") or 1


class Host(Protocol):
    """What the node needs of the connection manager."""
    def run_forwarded(self, suite: str, request: Request, client: str, hops: int, reply: Reply) -> None: ...
    def take_session(self, handed: Handed) -> str | None: ...
    def pump(self) -> None: ...


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
    draining: bool = False                  # it drains: it takes no session
    leaving: bool = False                   # its sessions moved on: nothing more is forwarded to it
    said_goodbye: bool = False              # it answered our LEAVING: it forwards nothing more to us
    in_flight: int = 0                      # forwarded to it, not yet answered
    sessions_taken: int = 0                 # sessions it took from this node
    links_opened: int = 0                   # links that authenticated with it (a second at once: a duplicate)

    @property
    def alive(self) -> bool:
        return self.link is not None


@dataclass
class _Out:
    """A request forwarded to a peer, waiting for its answer on the link it went by."""
    peer: Peer
    conn: LinkConnection
    reply: Reply
    deadline: float
    limit: float


@dataclass
class _Target:
    """An address to keep a link to (a static peer, or one zeroconf found)."""
    address: tuple[str, int]
    static: bool = False
    node: str | None = None         # the node there, once known
    conn: LinkConnection | None = None
    failures: int = 0
    next_try: float = 0.0


class ClusterNode:
    def __init__(self, cfg: ClusterConfig, host: Host, *, session_ttl: float = 1800.0) -> None:
        self.cfg = cfg
        self.host = host
        self.name = cfg.node
        self.number = node_number(cfg.node)
        self.epoch = time.time_ns()
        self.ports: dict[str, int] = {}
        self.peers: dict[str, Peer] = {}
        self.by_number: dict[int, Peer] = {}
        self.targets: dict[tuple[str, int], _Target] = {}
        self.links: set[LinkConnection] = set()   # every connection, open or not yet
        self.server: asyncio.base_events.Server | None = None
        self.link_port = 0
        self.moves = Moves(ttl=session_ttl)        # sessions handed from a node to another
        self.discovery: Discovery | None = None
        self.forwarded_out = 0
        self.forwarded_in = 0
        self.stopping = False
        self._out: dict[int, _Out] = {}
        self._ids = itertools.count(1)
        self._tasks: list[asyncio.Task] = []
        self._handoffs: dict[int, tuple[Peer, LinkConnection, asyncio.Future]] = {}
        self._draining = False      # DRAINING was said
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
            self.targets[address] = _Target(address, static=True)
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

    def _found(self, ann: Announcement) -> None:
        """zeroconf announced a node of this cluster: an address to dial."""
        if ann.node == self.name or not ann.addresses:
            return
        address = (ann.addresses[0], ann.link_port)
        target = self.targets.get(address)
        if target is None:
            if sum(not t.static for t in self.targets.values()) >= MAX_TARGETS:
                log.warning("zeroconf announces more than %d nodes: node %r at %s:%d is not dialed", MAX_TARGETS,
                            ann.node, *address)
                return
            target = self.targets[address] = _Target(address)
        target.node = ann.node
        peer = self.peers.get(ann.node)
        if peer is not None and peer.alive and peer.epoch != ann.epoch:
            log.info("node %s announces a new boot epoch: it restarted", ann.node)

    def _removed(self, node: str) -> None:
        """zeroconf heard a goodbye: the addresses it gave for the node are
        forgotten unless linked (liveness itself is the link's)."""
        for address, target in list(self.targets.items()):
            if target.node == node and not target.static and target.conn is None and not self._linked(target):
                del self.targets[address]

    def _connection(self, dialed: tuple[str, int] | None) -> LinkConnection:
        me = wire.Hello(self.cfg.name, self.name, self.epoch, self.link_port)
        conn = LinkConnection(self, wire.Link(self.cfg.secret, me), dialed)
        self.links.add(conn)
        return conn

    def admit(self, conn: LinkConnection) -> str:
        """Whether an accepted connection may authenticate: "" or why not
        (too many unauthenticated ones, from anywhere or from its address)."""
        waiting = [c for c in self.links if c.dialed is None and not c.open and c is not conn]
        if len(waiting) >= MAX_HANDSHAKES:
            return f"{MAX_HANDSHAKES} connections are authenticating already"
        if sum(c.peer_host == conn.peer_host for c in waiting) >= MAX_HANDSHAKES_FROM:
            return f"{MAX_HANDSHAKES_FROM} connections from {conn.peer_host} are authenticating already"
        return ""

    async def _dial(self, target: _Target) -> None:
        loop = asyncio.get_running_loop()
        conn = self._connection(target.address)
        target.conn = conn
        try:
            await asyncio.wait_for(loop.create_connection(lambda: conn, *target.address), HANDSHAKE_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as e:
            self.links.discard(conn)
            target.conn = None
            self._failed(target)
            log.debug("dialing %s:%d failed: %s", *target.address, e)

    def _failed(self, target: _Target) -> None:
        """A dial failed or was refused: try later and later; an address
        zeroconf gave that keeps failing is dropped."""
        target.failures += 1
        target.next_try = time.monotonic() + DIAL_BACKOFF[min(target.failures, len(DIAL_BACKOFF) - 1)]
        if not target.static and target.failures >= FORGET_TARGET_AFTER:
            self.targets.pop(target.address, None)

    def link_opened(self, conn: LinkConnection) -> None:
        hello = conn.peer
        # The address this peer is dialed at, known now: dialing it stops while
        # the peer is linked (an accepted link counts too: else both ends would
        # dial on and on, and each new link would replace the one in use).
        address = conn.dialed if conn.dialed is not None else (conn.peer_host, hello.link_port)
        target = self.targets.get(address)
        if target is not None:
            target.node, target.failures = hello.node, 0
        peer = self.peers.get(hello.node)
        if peer is None:
            peer = Peer(hello.node, node_number(hello.node))
            other = self.by_number.get(peer.number)
            if other is not None:
                conn.abort(f"node ids {hello.node!r} and {other.node!r} have the same number; rename one")
                return
            self.peers[hello.node] = self.by_number[peer.number] = peer
        peer.links_opened += 1
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
        if peer.epoch != hello.epoch:       # a new incarnation: what the old one said is void
            peer.draining = peer.leaving = peer.said_goodbye = False
        peer.link, peer.epoch = conn, hello.epoch
        peer.link_address = (conn.peer_host, hello.link_port)
        peer.last_heard = time.time()
        # A peer that links while this node drains or leaves hears it now.
        if self._draining:
            conn.send([wire.DRAINING])
        if self._left:
            conn.send([wire.LEAVING])
        if was_dead:
            log.info("node %s at %s:%d is alive", hello.node, *peer.link_address)
            self._tell_moves(peer)

    def _keep_existing(self, existing: LinkConnection, new: LinkConnection, other: str) -> bool:
        """Of two links to one peer, keep the one dialed by the smaller node
        id; of two alike, the one with the smaller link id (both ends
        compute the same, so both keep the same link)."""
        def dialed_by_smaller(conn: LinkConnection) -> bool:
            return (conn.dialed is not None) == (self.name < other)
        if dialed_by_smaller(existing) != dialed_by_smaller(new):
            return dialed_by_smaller(existing)
        return existing.link.link_id < new.link.link_id

    def link_lost(self, conn: LinkConnection) -> None:
        if conn not in self.links:
            return
        self.links.discard(conn)
        for target in self.targets.values():
            if target.conn is conn:     # dial again soon; later and later while it refuses or fails
                target.conn = None
                if conn.link.state == wire.OPEN:
                    target.failures, target.next_try = 0, time.monotonic() + DIAL_BACKOFF[0]
                else:
                    self._failed(target)
                break
        hello = conn.link.peer
        peer = self.peers.get(hello.node) if hello is not None else None
        if peer is None:
            return
        if peer.link is conn:
            self._dead(peer, conn.reason or "link closed")
        else:   # a replaced link: what went by it and was not answered on it fails now, never hangs
            self._fail_on(conn, f"the link to node {peer.node} closed before it answered".encode())

    def _dead(self, peer: Peer, why: str) -> None:
        conn, peer.link, peer.rtt = peer.link, None, None
        if not self.stopping:
            if peer.leaving:
                log.info("node %s left", peer.node)
            else:
                log.warning("node %s is dead: %s", peer.node, why)
        verb = "left" if peer.leaving else "died"
        self._fail_on(conn, f"node {peer.node} {verb} before it answered".encode())

    def _fail_on(self, conn: LinkConnection, why: bytes) -> None:
        """Everything sent by `conn` and not answered gets an error now."""
        for fid, out in [(fid, out) for fid, out in self._out.items() if out.conn is conn]:
            del self._out[fid]
            out.peer.in_flight -= 1
            out.reply(why, NODE_DIED)
        for hid, (_, by, future) in list(self._handoffs.items()):
            if by is conn and not future.done():
                future.set_result(why.decode())

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
        for target in list(self.targets.values()):
            if target.conn is None and now >= target.next_try and not self._linked(target):
                target.next_try = now + 1.0     # (until _dial says otherwise)
                self._tasks.append(asyncio.get_running_loop().create_task(self._dial(target)))
        self._tasks = [t for t in self._tasks if not t.done()]
        for fid, out in [(fid, out) for fid, out in self._out.items() if out.deadline < now]:
            del self._out[fid]
            out.peer.in_flight -= 1
            out.reply(f"node {out.peer.node} did not answer within {out.limit:g} s".encode(), TIMED_OUT)

    def _linked(self, target: _Target) -> bool:
        peer = self.peers.get(target.node) if target.node else None
        return peer is not None and peer.alive

    def link_writable(self, conn: LinkConnection) -> None:
        """A congested link drains again: what waited for room on it is placed."""
        self.host.pump()

    # -- messages ---------------------------------------------------------------------------------

    def link_message(self, conn: LinkConnection, msg: list) -> None:
        """A message from a peer, on its current link or on one being
        replaced (answers still come back by the link their request went).
        A malformed one cuts the link; the host's own failures are not the
        peer's fault and are logged, never blamed on the link."""
        peer = self.peers.get(conn.link.peer.node)
        if peer is None:
            return
        if peer.link is conn:
            peer.last_heard = time.time()
        kind = msg[0]
        handler = self._HANDLERS.get(kind)
        if handler is None:
            log.warning("node %s sent a message of unknown kind %r: ignored", peer.node, kind)
            return
        try:
            handler(self, peer, conn, msg)
        except _Malformed as e:
            log.warning("node %s sent a malformed message of kind %d (%s): cutting the link", peer.node, kind, e)
            conn.abort(f"a malformed message of kind {kind}: {e}")
        except Exception:   # this node's own failure: the link and the peer are not to blame
            log.exception("handling a message of kind %d from node %s failed", kind, peer.node)

    def _ping(self, peer: Peer, conn: LinkConnection, msg: list) -> None:
        conn.send([wire.PONG, _field(msg, 1, float)])

    def _pong(self, peer: Peer, conn: LinkConnection, msg: list) -> None:
        peer.rtt = time.monotonic() - _field(msg, 1, float)

    def _leaving(self, peer: Peer, conn: LinkConnection, msg: list) -> None:
        peer.leaving = True
        conn.send([wire.GOODBYE])

    def _goodbye(self, peer: Peer, conn: LinkConnection, msg: list) -> None:
        peer.said_goodbye = True

    def _draining(self, peer: Peer, conn: LinkConnection, msg: list) -> None:
        peer.draining = True

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

    def forward(self, peer: Peer, suite: str, request: Request, client: str, hops: int, limit: float,
                reply: Reply) -> None:
        """Sends the request to run at `peer`; reply(body, error) is called
        exactly once: with its answer, or an error when the peer dies, its
        link closes, or no answer comes within `limit` seconds."""
        fid = next(self._ids)
        conn = peer.link
        if len(request.payload) > conn.link.max_frame - FRAME_SLACK:   # (known before packing it)
            reply(f"the request cannot be forwarded to node {peer.node}: it is larger than a link frame "
                  f"({conn.link.max_frame} bytes)".encode(), TOO_LARGE)
            return
        msg = [wire.FORWARD, fid, suite, request.payload, request.route, request.session, hops + 1,
               request.describe(), client]
        try:
            sent = conn.send(msg)
        except ValueError as e:         # larger than a link frame after all
            reply(f"the request cannot be forwarded to node {peer.node}: {e}".encode(), TOO_LARGE)
            return
        if not sent:
            reply(f"node {peer.node} could not be reached".encode(), NODE_DIED)
            return
        self._out[fid] = _Out(peer, conn, reply, time.monotonic() + limit, limit)
        peer.in_flight += 1
        peer.forwarded_out += 1
        self.forwarded_out += 1

    def _answered(self, peer: Peer, conn: LinkConnection, msg: list) -> None:
        fid, body = _field(msg, 1, int), _field(msg, 2, bytes)
        error = msg[3] if len(msg) > 3 and isinstance(msg[3], str) else None
        out = self._out.get(fid)
        if out is None or out.peer is not peer:
            return      # timed out meanwhile (or a lie: ignored)
        del self._out[fid]
        peer.in_flight -= 1
        out.reply(body, error)

    def _forwarded_in(self, peer: Peer, conn: LinkConnection, msg: list) -> None:
        fid, suite, payload = _field(msg, 1, int), _field(msg, 2, str), _field(msg, 3, bytes)
        route, hops, label, client = _field(msg, 4, bytes), _field(msg, 6, int), _field(msg, 7, str), \
            _field(msg, 8, str)
        session = msg[5] if len(msg) > 5 else None
        if session is not None and (not isinstance(session, bytes) or len(session) != 16):
            raise _Malformed("a session id is 16 bytes")
        peer.forwarded_in += 1
        self.forwarded_in += 1

        def reply(body: bytes, error: str | None) -> None:
            # (Lost with the link: the peer answers the client.)  Too large
            # is known before packing: packing it first would stall the loop.
            if len(body) <= conn.link.max_frame - FRAME_SLACK:
                try:
                    conn.send([wire.ANSWER, fid, body, error])
                    return
                except ValueError:
                    pass
            why = f"the answer ({len(body)} bytes) cannot cross the link (at most {conn.link.max_frame})"
            conn.send([wire.ANSWER, fid, why.encode(), TOO_LARGE])

        self.host.run_forwarded(suite, Request(payload, route, session, label=label), client, hops, reply)

    def fail_forwarded(self, body: bytes, error: str) -> None:
        """Answers everything forwarded out with an error (this node stops)."""
        for fid, out in list(self._out.items()):
            del self._out[fid]
            out.peer.in_flight -= 1
            out.reply(body, error)

    def forwarded_waiting(self) -> int:
        return len(self._out)

    # -- handoff ------------------------------------------------------------------------------------

    def announce_draining(self) -> None:
        """This node drains: peers hand it no session from now on."""
        self._draining = True
        for peer in self.alive():
            peer.link.send([wire.DRAINING])

    def choose(self, sid: bytes, exclude: set[str] = frozenset()) -> Peer | None:
        """The live peer a session goes to when this node leaves: rendezvous
        hashing (the highest hash of session id and node wins), so each
        session's choice moves only if its winner leaves."""
        candidates = [p for p in self.peers.values()
                      if p.alive and not p.draining and not p.leaving and p.node not in exclude]
        if not candidates:
            return None
        return max(candidates, key=lambda p: hashlib.blake2b(sid + p.node.encode(), digest_size=8).digest())

    async def hand_off(self, peer: Peer, handed: Handed) -> tuple[bool, str | None]:
        """Gives the session to `peer`: (False, None) once it took it;
        (retry, why) when it did not: retry is False when it may have taken
        it after all (no answer in time), so the session is not offered to
        another node as well; True when it surely did not."""
        hid = next(self._ids)
        conn = peer.link
        if handed.state is not None and len(handed.state) > conn.link.max_frame - FRAME_SLACK:
            return True, f"its state ({len(handed.state)} bytes) is larger than a link frame"
        future = asyncio.get_running_loop().create_future()
        self._handoffs[hid] = (peer, conn, future)
        try:
            if not conn.send([wire.HANDOFF, hid, handed.sid, handed.kind, handed.suite, handed.created,
                              handed.last_access, handed.expires, handed.state]):
                return True, f"node {peer.node} could not be reached"
            why = await asyncio.wait_for(future, HANDOFF_TIMEOUT)
            return why is not None, why
        except ValueError as e:         # larger than a link frame
            return True, f"its state cannot cross the link: {e}"
        except asyncio.TimeoutError:
            return False, f"node {peer.node} did not answer within {HANDOFF_TIMEOUT:g} s"
        finally:
            del self._handoffs[hid]

    def _take(self, peer: Peer, conn: LinkConnection, msg: list) -> None:
        hid, sid, kind, suite = _field(msg, 1, int), _field(msg, 2, bytes), _field(msg, 3, int), \
            _field(msg, 4, int)
        created, last_access, expires = _field(msg, 5, float), _field(msg, 6, float), _field(msg, 7, float)
        state = msg[8] if len(msg) > 8 else None
        if len(sid) != 16 or not (state is None or isinstance(state, bytes)) or not 0 <= suite < 1 << 16:
            raise _Malformed("a malformed handoff")
        why = self.host.take_session(Handed(sid, kind, suite, created, last_access, expires, state))
        if why is None:     # here now: what a restarted node is told (cookies and tokens may name it still)
            self.moves.record(sid, self.name)
        conn.send([wire.TAKEN, hid, why])

    def _taken(self, peer: Peer, conn: LinkConnection, msg: list) -> None:
        hid = _field(msg, 1, int)
        why = msg[2] if len(msg) > 2 and isinstance(msg[2], str) else None
        pending = self._handoffs.get(hid)
        if pending is not None and pending[0] is peer and not pending[2].done():
            pending[2].set_result(why)

    def record_move(self, sid: bytes, node: str) -> None:
        self.moves.record(sid, node)

    def announce_moved(self, moves: list[tuple[bytes, str]], peers: list[Peer] | None = None) -> None:
        """Tells live peers (or these) where these sessions went."""
        for i in range(0, len(moves), MOVED_BATCH):
            msg = [wire.MOVED, [[sid, node] for sid, node in moves[i:i + MOVED_BATCH]]]
            for peer in peers if peers is not None else self.alive():
                if peer.link is not None:
                    peer.link.send(msg)

    def _tell_moves(self, peer: Peer) -> None:
        """A peer (re)joined: it learns where the sessions went that moved
        while it was away (a restarted node's cookies may name it still)."""
        moves = [(sid, node) for sid, node in self.moves.entries() if node != peer.node]
        if moves:
            self.announce_moved(moves, [peer])

    def _moved(self, peer: Peer, conn: LinkConnection, msg: list) -> None:
        entries = _field(msg, 1, list)
        if len(entries) > MOVED_BATCH:
            raise _Malformed(f"more than {MOVED_BATCH} entries")
        for entry in entries:
            if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], bytes) \
                    and len(entry[0]) == 16 and isinstance(entry[1], str):
                self.moves.record(entry[0], entry[1])

    def moved_to(self, sid: bytes) -> Peer | None:
        """The live peer a session moved to, if it moved away from here
        (None too when it moved here)."""
        node = self.moves.node_of(sid)
        if node is None:
            return None
        peer = self.peers.get(node)
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

    _HANDLERS: dict[int, Callable[[ClusterNode, Peer, LinkConnection, list], None]] = {
        wire.PING: _ping, wire.PONG: _pong, wire.FORWARD: _forwarded_in, wire.ANSWER: _answered,
        wire.HANDOFF: _take, wire.TAKEN: _taken, wire.MOVED: _moved, wire.LEAVING: _leaving,
        wire.GOODBYE: _goodbye, wire.DRAINING: _draining,
    }

    # -- status -----------------------------------------------------------------------------------------

    def status(self) -> dict:
        """The `cluster` part of `pyshm status` (never the secret)."""
        now = time.time()
        return {
            "name": self.cfg.name, "node": self.name, "number": self.number, "epoch": self.epoch,
            "link": f"{self.cfg.link[0]}:{self.link_port}", "interfaces": self.cfg.interfaces,
            "forwarded_in": self.forwarded_in, "forwarded_out": self.forwarded_out,
            "sessions_moved_known": len(self.moves),
            "peers": [{
                "node": p.node, "state": _state(p),
                "link": f"{p.link_address[0]}:{p.link_address[1]}" if p.link_address else None,
                "last_heartbeat": round(now - p.last_heard, 3) if p.last_heard else None,
                "rtt_ms": round(p.rtt * 1000, 3) if p.rtt is not None else None,
                "epoch": p.epoch, "forwarded_in": p.forwarded_in, "forwarded_out": p.forwarded_out,
                "links_opened": p.links_opened, "sessions_taken": p.sessions_taken,
            } for p in sorted(self.peers.values(), key=lambda p: p.node)],
        }


def _state(p: Peer) -> str:
    if not p.alive:
        return "dead"
    return "leaving" if p.leaving else "draining" if p.draining else "alive"


class _Malformed(ValueError):
    """A peer's message does not have the shape its kind says."""


def _field(msg: list, i: int, kind: type):
    """msg[i], checked to be of `kind` (an int is accepted for a float)."""
    if len(msg) <= i:
        raise _Malformed(f"field {i} is missing")
    value = msg[i]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > 1 << 53:
            raise _Malformed(f"field {i} is out of range")
        return float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _Malformed(f"field {i} is not a {kind.__name__}")
    if kind is float and value != value or kind is int and abs(value) > 1 << 62:
        raise _Malformed(f"field {i} is out of range")
    return value
