"""The connection manager: one asyncio process per instance.

It hosts the listeners (one front-end each, driven by pyshm.transport),
turns each request into a slot of the request memory, asks the suite's
dispatcher for a worker, submits the slot to that worker's ring, and, woken
through an eventfd in its loop, drains the completion rings and hands the
responses back to the connections.  It never blocks.  pyshm.supervisor,
running in this process, tells it when workers join and leave.
"""
from __future__ import annotations

import asyncio
import collections
import gc
import logging
import os
import random
import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import msgpack

from pyshm.config import Config, ListenConfig
from pyshm.dispatch import Dispatcher, WorkerRef
from pyshm import segments
from pyshm.errors import ConfigError, HeapFull, ListenError, PyshmError, SegmentExists, SessionTableFull
from pyshm.frontend import (
    APP_ERROR, INTERNAL, SESSION_ENDED, SHUTTING_DOWN, TIMED_OUT, TOO_LARGE, UNAVAILABLE, WORKER_DIED, Registry,
    Request,
)
from pyshm.heap import SharedHeap
from pyshm.procmem import resident_bytes
from pyshm.native import heap_segment, request_segment, session_segment
from pyshm.native import unlink as unlink_segment
from pyshm.reqmem import DONE, QUEUED, RESP_ERROR, RESP_UNAVAILABLE, RUNNING, RequestMemory
from pyshm.session_cookie import CookieSigner
from pyshm.sessions import RESUMABLE, SessionKind, SessionTable
from pyshm.handover import Handover
from pyshm.session_tokens import RESUME_METHOD, TOKEN_METHOD, SessionTokens
from pyshm.supervisor import Refused, Supervisor
from pyshm.transport import Connection
from pyshm.application import import_app

if TYPE_CHECKING:       # (the cluster, and its cryptography, are imported only by a node of one)
    from pyshm.cluster.node import ClusterNode, Peer

log = logging.getLogger(__name__)

Reply = Callable[[bytes, "str | None"], None]
GC_YOUNG = 50_000       # allocations between collections of the young generation (Python's default: 700)




@dataclass(slots=True)
class Client:
    """A client connection as the manager sees it."""
    listen: ListenConfig
    peer: bytes
    session: bytes | None = None         # its distributed session, opened at its first request
    session_error: str | None = None     # why it could have none (the table is full)
    owner: int = 0                       # the cluster node running its session, when not this one


@dataclass(slots=True)
class Local:
    """Placement: this worker of this instance."""
    worker: WorkerRef


@dataclass(slots=True)
class Remote:
    """Placement: forwarded to this peer (a cluster node owning its session)."""
    peer: Peer


@dataclass(slots=True)
class Answer:
    """Placement: answered here, with this error."""
    body: bytes
    error: str


class Park:
    """Placement: waits until its session's calls at a draining worker are answered."""


PARK = Park()


@dataclass(slots=True)
class Pending:
    """A request between its arrival and its response."""
    suite: str
    request: Request
    peer: bytes
    reply: Reply
    arrived: float
    seq: int
    slot: int = -1               # -1 until it has a slot
    blob: int = 0                # heap blob of a payload too large for the slot
    data: int = 0
    worker: WorkerRef | None = None
    started: float = 0.0         # when it was first seen RUNNING (0: not yet)
    answered: bool = False       # its reply was sent (its slot may still be held: see _answer)
    owner: int = 0               # the cluster node its session's cookie names, when not this one
    hops: int = 0                # times it was forwarded already (a forwarded request is not again, but once)


class ConnectionManager(SessionTokens, Handover):
    def __init__(self, config: Config, registry: Registry | None = None) -> None:
        self.config = config
        self.registry = registry or Registry.load()
        for i, ls in enumerate(config.listen):
            # Fails now, naming the listener, not at the first client.
            try:
                self.registry.get(ls.frontend)(**ls.options)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"listen[{i}]: {e}") from None
        self.dispatchers = {name: Dispatcher(s) for name, s in config.suites.items()}
        self.suite_index = {name: i for i, name in enumerate(config.suites)}
        self.pending: dict[int, Pending] = {}          # by slot
        # Requests waiting for a slot or a worker, oldest first, by suite.
        self.backlog: dict[str, collections.deque[Pending]] = {name: collections.deque() for name in config.suites}
        self._pumping = False
        self._final = False      # shutting down past graceful_timeout: nothing more is placed
        # Distributed sessions: calls placed and not answered, and calls
        # waiting for those to finish at a draining worker before the session moves.
        self._session_calls: dict[bytes, int] = {}
        self._parked: dict[bytes, collections.deque[Pending]] = {}
        self._moving: set[bytes] = set()        # sessions being handed to another node: their calls park
        self.workers: dict[int, WorkerRef] = {}        # by worker index
        self.connections: set[Connection] = set()
        self.servers: list[asyncio.base_events.Server] = []
        self.heap: SharedHeap | None = None
        self.rm: RequestMemory | None = None
        self.sessions: SessionTable | None = None
        self.secret = config.secret.encode() if config.secret else os.urandom(32)
        self.cluster: ClusterNode | None = None
        self.node_name, self.node_number = config.name, 0
        if config.cluster is not None:
            from pyshm.cluster import node, wire

            # Every node signs and verifies session cookies with one key, derived from the cluster secret.
            self.secret = wire.derive(config.cluster.secret, b"instance secret")
            self.cluster = node.ClusterNode(config.cluster, self, session_ttl=config.session_ttl)
            self.node_name, self.node_number = self.cluster.name, self.cluster.number
        # HTTP session cookies are signed per suite: one suite's cookie is no key to another's sessions.
        self.cookies = {name: CookieSigner(self.secret, i) for i, name in enumerate(config.suites)}
        self.wake_fd = -1
        self.free_slots: list[int] = []
        self._to_wake: set[int] = set()
        self._seq = 0
        self.stopping = False
        self.free_indices = list(range(config.max_workers - 1, -1, -1))   # worker indices in the request memory
        self.supervisor = Supervisor(config, self, self.status, self.drain)
        self.served = 0
        self.ready = asyncio.Event()
        self._stop: asyncio.Event | None = None

    # -- life cycle -----------------------------------------------------------

    def open_segments(self) -> None:
        cfg = self.config
        for name in (heap_segment(cfg.name), request_segment(cfg.name), session_segment(cfg.name)):
            _remove_if_orphaned(name)
        self.heap = SharedHeap.create(heap_segment(cfg.name), cfg.heap_size)
        try:
            self.rm = RequestMemory.create(request_segment(cfg.name), slots=cfg.slots, workers=cfg.max_workers,
                                           inline_size=cfg.inline_size)
            self.sessions = SessionTable.create(cfg.name, cfg.sessions)
        except BaseException:
            self.close_segments()
            raise
        self.free_slots = list(range(self.rm.n_slots - 1, -1, -1))
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def close_segments(self) -> None:
        if self.sessions is not None:
            self.sessions.unlink()
            self.sessions.close()
            self.sessions = None
        if self.rm is not None:
            self.rm.unlink()
            self.rm.close()
            self.rm = None
        if self.heap is not None:
            self.heap.unlink()
            self.heap.close()
            self.heap = None
        if self.wake_fd >= 0:
            os.close(self.wake_fd)
            self.wake_fd = -1

    async def run(self) -> int:
        """Serves until SIGTERM/SIGINT; returns the exit status.  The
        listeners are bound first: an address in use stops the start before
        any segment or worker exists."""
        loop = asyncio.get_running_loop()
        await self._bind()
        try:
            self.open_segments()
            if self.config.preload:
                self._preload(self.config.preload)
            loop.add_reader(self.wake_fd, self.on_wake)
            self.rm.arm()
            await self.supervisor.start()
            for server, ls in zip(self.servers, self.config.listen):
                await server.start_serving()
                log.info("%s front-end on %s:%d -> suite %s", ls.frontend, ls.host, ls.port, ls.suite)
            if self.cluster is not None:
                await self.cluster.start({ls.frontend: s.sockets[0].getsockname()[1]
                                          for s, ls in zip(self.servers, self.config.listen)})
            stop = self._stop = asyncio.Event()
            loop.add_signal_handler(signal.SIGTERM, stop.set)
            loop.add_signal_handler(signal.SIGINT, stop.set)
            loop.add_signal_handler(signal.SIGHUP, self.supervisor.reload)
            timers = [loop.create_task(self._sweep_requests()), loop.create_task(self._sweep_connections()),
                      loop.create_task(self._expire_sessions())]
            if any(s.max_rss for s in self.config.suites.values()):
                timers.append(loop.create_task(self._watch_memory()))
            # What exists now lives as long as the process: out of the
            # collector's sight, so a full collection does not walk it on
            # every pass (imports alone are tens of thousands of objects).
            # A request's objects form no cycles (reference counts free
            # them), so the young generation is collected 70 times less often.
            gc.collect()
            gc.freeze()
            gc.set_threshold(GC_YOUNG, 20, 20)
            self.ready.set()
            await stop.wait()
            await self.shutdown()       # (request timeouts still apply while it drains)
            for timer in timers:
                timer.cancel()
            return 0
        finally:
            for server in self.servers:
                server.close()
            self.supervisor.kill_all()
            if self.wake_fd >= 0:
                loop.remove_reader(self.wake_fd)
            self.close_segments()

    def drain(self) -> dict:
        """`pyshm drain NAME`: stops as SIGTERM does (in a cluster: after
        handing its sessions to its peers)."""
        if self._stop is not None:
            self._stop.set()
        return {"draining": self.node_name}

    async def _bind(self) -> None:
        loop = asyncio.get_running_loop()
        for ls in self.config.listen:
            fe = self.registry.get(ls.frontend)
            try:
                server = await loop.create_server(lambda ls=ls, fe=fe: Connection(self, ls, fe), ls.host, ls.port,
                                                  reuse_address=True, start_serving=False)
            except OSError as e:
                for s in self.servers:
                    s.close()
                why = (os.strerror(e.errno) if e.errno else str(e)).lower()
                raise ListenError(f"cannot listen on {_address(ls.host, ls.port)}: {why}") from None
            self.servers.append(server)
        if self.cluster is not None:
            try:
                await self.cluster.bind()
            except OSError as e:
                for s in self.servers:
                    s.close()
                why = (os.strerror(e.errno) if e.errno else str(e)).lower()
                raise ListenError(f"cannot listen for cluster links on "
                                  f"{_address(*self.config.cluster.link)}: {why}") from None

    def _forward_limit(self, suite: str) -> float:
        """How long a request of `suite` forwarded to a peer may go
        unanswered: the owner's own queue and request timeouts, and a second
        for the link (no request timeout: an hour)."""
        return self.config.queue_timeout + (self.config.suites[suite].timeout or 3600.0) + 1.0

    def _preload(self, spec: str) -> None:
        import_app(spec)(self.heap)

    async def shutdown(self) -> None:
        """Stops accepting, answers what is in flight (bounded by
        graceful_timeout), then stops the workers."""
        self.stopping = True
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            conn.shutdown()     # reads no more; closes once its answers are out
        deadline = time.monotonic() + self.config.graceful_timeout
        if self.cluster is not None:
            # Peers go on forwarding requests for this node's sessions until
            # each has moved; then they forward nothing more here.
            await self._hand_over(deadline)
            await self.cluster.leave(self._unanswered, max(0.0, deadline - time.monotonic()))
        while self._unanswered() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        # Past the deadline nothing more is placed; every request still
        # unanswered is answered now.  Slots a worker may still be running
        # in are not freed (the segments go away with the manager).
        self._final = True
        for conn in list(self.connections):
            conn.answer_held(b"server shutting down", SHUTTING_DOWN)
        waiting = [p for q in self.backlog.values() for p in q] + [p for q in self._parked.values() for p in q]
        for q in self.backlog.values():
            q.clear()
        self._parked.clear()
        for p in waiting + list(self.pending.values()):
            self._answer(p, b"server shutting down", SHUTTING_DOWN, keep_slot=p.worker is not None)
        await self.supervisor.stop_all()
        if self.cluster is not None:
            await self.cluster.stop()
        while self.connections and time.monotonic() < deadline + 2:
            await asyncio.sleep(0.02)

    def _unanswered(self) -> bool:
        return (any(not p.answered for p in self.pending.values()) or self.waiting() > 0
                or any(conn.held() for conn in self.connections)
                or (self.cluster is not None and self.cluster.forwarded_waiting() > 0))

    def _waiting_here(self) -> bool:
        for queue in self.backlog.values():
            if queue:
                return True
        return False

    def waiting(self) -> int:
        """Requests waiting here for a slot or a worker (or for their
        session to move)."""
        return sum(len(q) for q in self.backlog.values()) + sum(len(q) for q in self._parked.values())

    # -- the request path ------------------------------------------------------------

    def connection_opened(self, listen: ListenConfig, peer: bytes) -> Client:
        """A client connected to `listen`: its record, passed back with each
        request and at the close."""
        return Client(listen, peer)

    def connection_closed(self, client: Client) -> None:
        """The client is gone: its distributed session ends (entry and state
        closure), unless a token was given for it: then it may be resumed
        within session_ttl (its node keeps it; the expiry sweep ends it)."""
        sid, client.session = client.session, None
        if sid is None or client.owner:
            return
        brief = self.sessions.brief(sid)
        if brief is not None and brief[4] & RESUMABLE:
            self.sessions.touch(sid, self.config.session_ttl)
        else:
            self.sessions.end(sid, self.heap)

    def submit(self, client: Client, request: Request, reply: Reply) -> None:
        """Called by a connection for each request; `reply(body, error)` is
        called exactly once.  Routing and sessions are decided here: the
        suite by the listener's rules; a connection to a distributed suite is
        a session, opened at its first request (a probe costs no entry)."""
        suite = client.listen.suite_for(request.route)
        if suite == client.listen.suite and self.config.suites[suite].distributed:
            if request.route in (TOKEN_METHOD, RESUME_METHOD) and self.config.suites[suite].interface == "rpc":
                self._session_method(client, suite, request, reply)
                return
            if client.session is None and client.session_error is None:
                self._open_session(client, suite)
            if client.session_error is not None:
                reply(client.session_error.encode(), UNAVAILABLE)
                return
            request.session = client.session
            if client.owner:
                self._enqueue(suite, request, client.peer, reply, client.owner)
                return
        elif request.claim is not None:   # only an id the manager verified reaches a worker
            claim = self.cookies[suite].verify(request.claim)      # (None: a forged or foreign cookie)
            request.session = claim.sid if claim is not None else None
            owner = claim.owner if claim is not None and claim.owner != self.node_number else 0
            self._enqueue(suite, request, client.peer, reply, owner)
            return
        self._enqueue(suite, request, client.peer, reply)

    def run_forwarded(self, suite: str, request: Request, client: str, hops: int, reply: Reply) -> None:
        """A request a peer forwarded here: placed as if it had arrived here
        (it is not forwarded again, unless its session moved on from here)."""
        if suite not in self.backlog:
            reply(f"no suite {suite!r} on node {self.node_name}".encode(), INTERNAL)
            return
        if request.route == RESUME_METHOD and request.session is not None:   # a client resumed at a peer
            if self.sessions.brief(request.session) is None:
                reply(b"the session ended", SESSION_ENDED)
            else:
                reply(msgpack.packb(True), None)
            return
        self._enqueue(suite, request, client.encode(), reply, 0, hops)

    def _open_session(self, client: Client, suite: str) -> None:
        try:
            client.session = self.sessions.open(SessionKind.DISTRIBUTED, suite=self.suite_index[suite]).id
        except SessionTableFull as e:
            client.session_error = str(e)    # each of its requests is answered with it

    def _enqueue(self, suite: str, request: Request, peer: bytes, reply: Reply, owner: int = 0,
                 hops: int = 0) -> None:
        self._seq += 1
        p = Pending(suite, request, peer, reply, time.monotonic(), self._seq, owner=owner, hops=hops)
        queue = self.backlog[suite]
        if queue or not self._place(p):
            queue.append(p)     # behind the ones already waiting
            self.pump()

    def _place(self, p: Pending) -> bool:
        """Carries out p's placement; False when it must wait (for a slot,
        a worker, or room on a link)."""
        where = self.place(p)
        if where is None:
            return False
        if isinstance(where, Local):
            self._submit_local(p, where.worker)
        elif isinstance(where, Remote):
            self.cluster.forward(where.peer, p.suite, p.request, p.peer.decode(), p.hops,
                                 self._forward_limit(p.suite), lambda body, error: self._answer(p, body, error))
        elif isinstance(where, Answer):
            self._answer(p, where.body, where.error)
        else:
            self._parked.setdefault(p.request.session, collections.deque()).append(p)
        return True

    def place(self, p: Pending) -> Local | Remote | Answer | Park | None:
        """Where p goes next: the cluster node owning its session, a local
        worker (the suite's dispatcher picks it, or the worker its session
        is bound to), an answer here (its session ended), parked (its
        session is moving), or None: nowhere yet (no slot, no worker, no
        room on the link).  The one placement step."""
        if self.cluster is not None and p.request.session is not None:
            where = self._elsewhere(p)
            if isinstance(where, Remote):
                return where if self.cluster.can_forward(where.peer) else None
            if where is not None:
                return where
        if p.slot < 0 and not self.free_slots:
            return None
        dispatcher = self.dispatchers[p.suite]
        sid = p.request.session
        if sid is None or not self.config.suites[p.suite].distributed:
            w = dispatcher.pick()
            return Local(w) if w is not None else None
        brief = self.sessions.brief(sid)
        if brief is None:
            return Answer(b"the session ended", SESSION_ENDED)
        w = dispatcher.bound(brief[0], brief[1])
        if w is not None:
            if not w.draining:
                # (a resumable session expires session_ttl after its last call)
                self.sessions.touch(sid, self.config.session_ttl if brief[4] & RESUMABLE else 0.0)
                return Local(w)
            if self._session_calls.get(sid):
                # Its worker is being replaced but still runs earlier calls
                # of this session: this one waits, so that the session moves
                # between calls, not during them.
                return PARK
        w = dispatcher.pick()       # bound to a new worker: it restores the endpoints from the checkpoint
        if w is None:
            return None
        self.sessions.bind(sid, w.index, w.gen)
        return Local(w)

    def _elsewhere(self, p: Pending) -> Remote | Park | Answer | None:
        """Where the cluster sends p: parked while its session is being
        handed to another node; to the node that took it; to the owner its
        cookie names, unless the session is here after all (handed to this
        node); None: here.  A session whose owner is gone is lost: the
        client starts a fresh one."""
        sid = p.request.session
        if sid in self._moving:
            return PARK
        peer = self.cluster.moved_to(sid)
        if peer is not None:
            if p.hops >= 2:     # (forwarded at most twice: to the owner, and on to where it moved)
                return Answer(b"the session is moving between nodes: try again", UNAVAILABLE)
            return Remote(peer)
        if p.hops < 2:
            if p.owner and self.sessions.brief(sid) is None:
                peer = self.cluster.peer_for(p.owner)
                if peer is not None:
                    return Remote(peer)
                if self.config.suites[p.suite].distributed:
                    return Answer(b"the session ended: its node is gone", SESSION_ENDED)
                log.warning("session %s of node %08x is lost (that node is gone): the client starts a fresh one",
                            sid.hex(), p.owner)
                p.request.session = None
        p.owner = 0
        return None

    def _submit_local(self, p: Pending, worker: WorkerRef) -> None:
        if p.slot < 0:
            try:
                self._write_payload(p)
            except HeapFull as e:
                self._answer(p, f"request too large for the server's memory: {e}".encode(), TOO_LARGE)
                return
        if self.rm.submit(worker.index, p.slot, p.seq, len(p.request.payload), blob=p.blob, data=p.data,
                          session=p.request.session, peer=p.peer):
            self._wake_later(worker.index)
        p.worker = worker
        worker.inflight += 1
        sid = p.request.session
        # Calls are counted per session where a session can move while they
        # run: to another worker (distributed), or to another node (a cluster).
        if sid is not None and (self.cluster is not None or self.config.suites[p.suite].distributed):
            self._session_calls[sid] = self._session_calls.get(sid, 0) + 1

    def _unplace(self, p: Pending) -> None:
        """p left its worker (answered, or requeued after the worker died)."""
        w, p.worker = p.worker, None
        w.inflight -= 1
        sid = p.request.session
        if sid is not None and sid in self._session_calls:
            n = self._session_calls[sid] - 1
            if n:
                self._session_calls[sid] = n
                return
            del self._session_calls[sid]
            parked = self._parked.pop(sid, None)
            if parked:      # the session may move now: its calls go first
                self.backlog[p.suite].extendleft(reversed(parked))

    def _wake_later(self, index: int) -> None:
        """Sleeping workers are woken once per loop iteration, not per request."""
        if not self._to_wake:
            asyncio.get_running_loop().call_soon(self._wake_all)
        self._to_wake.add(index)

    def _wake_all(self) -> None:
        for index in self._to_wake:
            self.rm.interrupt(index)
        self._to_wake.clear()

    def _write_payload(self, p: Pending) -> None:
        payload = p.request.payload
        n = len(payload)
        if n > self.rm.inline_size:
            p.blob, p.data, buf = self.heap.alloc_buffer(n)
            buf[:n] = payload
        p.slot = self.free_slots.pop()
        self.pending[p.slot] = p
        if not p.blob:
            self.rm.request_area(p.slot)[:n] = payload

    def pump(self) -> None:
        """Places waiting requests, the oldest first across suites, while
        slots and workers allow.  A suite whose first request must still
        wait is passed over, so the cost is what is placed, not what waits."""
        if self._pumping or self._final:
            return          # an answer given while placing: the loop below goes on
        self._pumping = True
        try:
            queues = [q for q in self.backlog.values() if q]
            while queues:
                queue = min(queues, key=lambda q: q[0].seq) if len(queues) > 1 else queues[0]
                p = queue[0]
                if p.slot < 0 and not self.free_slots:
                    queues = [q for q in queues if q[0].slot >= 0]    # only requeued ones hold a slot
                    continue
                queue.popleft()
                if not self._place(p):
                    queue.appendleft(p)
                    queues.remove(queue)
                elif not queue:
                    queues.remove(queue)
        finally:
            self._pumping = False

    async def _expire_sessions(self) -> None:
        """Ends idle sessions: entry and state closure go."""
        while True:
            await asyncio.sleep(min(1.0, self.config.session_ttl / 4))
            for sid in self.sessions.expired():
                self.sessions.end(sid, self.heap)

    async def _sweep_connections(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for conn in list(self.connections):
                conn.check_timeouts(now)

    async def _sweep_requests(self) -> None:
        """Ten times a second: withdraws requests not started within
        queue_timeout, and times out those running longer than their
        suite's timeout."""
        while True:
            await asyncio.sleep(0.1)
            try:
                self._sweep_requests_once(time.monotonic())
            except Exception:   # a bug here must not end every later timeout
                log.exception("sweeping requests failed")

    def _sweep_requests_once(self, now: float) -> None:
        self._expire_waiting(now - self.config.queue_timeout)
        for p in [p for p in self.pending.values() if p.worker is not None and not p.answered]:
            if not p.started:
                self._check_started(p, now)
            else:
                limit = self.config.suites[p.suite].timeout
                if limit and now - p.started > limit:
                    if self.rm.slot_info(p.slot)[0] == DONE:
                        self.complete(p.slot)   # finished just now, not yet drained
                    else:
                        self._time_out(p, limit)

    def _unavailable(self, p: Pending) -> None:
        limit = self.config.queue_timeout
        self._answer(p, f"no worker of suite {p.suite!r} could start it within {limit:g} s".encode(), UNAVAILABLE)

    def _expire_waiting(self, old: float) -> None:
        """Requests waiting here arrived in order: the late ones are first."""
        for queue in self.backlog.values():
            while queue and queue[0].arrived < old:
                self._unavailable(queue.popleft())

    def _check_started(self, p: Pending, now: float) -> None:
        """Learns whether p's worker took it; withdraws it when it waited
        in the worker's ring past queue_timeout."""
        state, _, _ = self.rm.slot_info(p.slot)
        if state == QUEUED:
            if p.arrived >= now - self.config.queue_timeout:
                return
            if self.rm.cancel(p.slot):
                self._unavailable(p)
                return
            # The cancel lost: its worker took it just now.
        p.started = now

    def _time_out(self, p: Pending, limit: float) -> None:
        """p ran past its suite's timeout: the client is answered now; its
        worker is killed and replaced, and its slot is freed when the worker
        is gone (until then the worker could still write into it)."""
        w = p.worker
        log.error("worker pid %d of suite %s ran %s for more than %g s: answering 'timed out' and replacing "
                  "the worker", w.pid, p.suite, p.request.describe(), limit)
        self.supervisor.kill(w, f"request timeout ({limit:g} s)")     # first: it takes nothing new
        self._answer(p, f"timed out after {limit:g} s".encode(), TIMED_OUT, keep_slot=True)

    def on_wake(self) -> None:
        """The eventfd fired: drain every completion ring, re-arm, drain again
        (a worker that saw the manager unarmed did not write the eventfd)."""
        try:
            os.eventfd_read(self.wake_fd)
        except BlockingIOError:
            pass
        try:
            self.drain_all()
        finally:
            self.rm.arm()       # whatever failed, workers must go on waking the manager
        self.drain_all()
        if self._waiting_here():
            self.pump()

    def drain_all(self) -> None:
        for w in list(self.workers.values()):
            for slot in self._drain(w):
                try:
                    self.complete(slot)
                except Exception:
                    log.exception("completing slot %d of worker pid %d failed", slot, w.pid)

    def _drain(self, w: WorkerRef) -> list[int]:
        """The slots worker w completed; none (and w killed) when its ring is
        corrupt: a worker that scribbles on shared memory is not trusted."""
        try:
            return self.rm.drain(w.index)
        except PyshmError as e:
            log.error("worker pid %d of suite %s left its completion ring inconsistent (%s)", w.pid, w.suite, e)
            self.supervisor.kill(w, "inconsistent completion ring")
            return []

    def complete(self, slot: int) -> None:
        """Slot `slot` is DONE: send its response and free it."""
        p = self.pending.get(slot)
        if p is None or p.answered:
            return
        state, flags, length, blob, data = self.rm.response(slot)
        if state != DONE:
            log.error("slot %d completed in state %d; answering with an error", slot, state)
            self._answer(p, b"internal error: response lost", INTERNAL)
            return
        error = (UNAVAILABLE if flags & RESP_UNAVAILABLE else APP_ERROR) if flags & RESP_ERROR else None
        if blob:
            w = p.worker
            if w is None or not self.heap.adopt_buffer(blob, w.pid, w.start):
                self._answer(p, b"worker died before its response could be read", WORKER_DIED)
                return
            view = self.heap.buffer_at(data, length)
            body = bytes(view)
            view.release()
            self.heap.free_buffer(blob)
        else:
            body = bytes(self.rm.buf[data:data + length])
        self.served += 1
        self._answer(p, body, error)
        w = p.worker
        if w is not None:
            w.served += 1
            if w.recycle_at and w.served >= w.recycle_at and not w.draining:
                self.supervisor.recycle(w, f"it served {w.served} requests (max_requests)")

    def _answer(self, p: Pending, body: bytes, error: str | None, *, keep_slot: bool = False) -> None:
        """The one place a request is answered.  Its slot and payload are
        freed, unless keep_slot: a worker may still write into them (a timed
        out request whose worker is being killed); worker_left frees them."""
        if p.answered:
            return
        p.answered = True
        w = p.worker
        if w is not None:
            self._unplace(p)
            p.worker = w        # (worker_left finds a kept slot by its worker)
            self.supervisor.worker_idle(w)
        if not keep_slot:
            self._free(p)
        try:
            p.reply(body, error)
        except Exception:
            log.exception("sending a response failed")
        if self._waiting_here():
            self.pump()

    def _free(self, p: Pending) -> None:
        if p.slot >= 0:
            self.rm.release(p.slot)
            del self.pending[p.slot]
            self.free_slots.append(p.slot)
            p.slot = -1
        if p.blob:
            self.heap.free_buffer(p.blob)
            p.blob = 0

    def status(self) -> dict:
        """What `pyshm status` shows (read-only)."""
        by_kind: dict[str, int] = {}
        for sid in self.sessions.ids():
            entry = self.sessions.get(sid)
            if entry is not None:
                key = f"{entry.kind.name.lower()}/{'bound' if entry.worker >= 0 else 'unbound'}"
                by_kind[key] = by_kind.get(key, 0) + 1
        st, heap = self.sessions.stats(), self.heap.stats()
        return {
            "instance": self.config.name, "pid": os.getpid(), "requests_served": self.served,
            "connections": len(self.connections), "requests_in_flight": len(self.pending),
            "requests_waiting": self.waiting() + sum(conn.held() for conn in self.connections),
            "workers": [{"pid": w.pid, "suite": w.suite, "index": w.index,
                         "state": "draining" if w.draining else "serving", "served": w.served,
                         "in_flight": w.inflight} for w in sorted(self.workers.values(), key=lambda w: w.index)],
            "restarts": {name: self.supervisor.restarts.get(name, 0) for name in self.config.suites},
            "sessions": {"active": st.active, "capacity": st.capacity, "by_kind": by_kind},
            "slots": {**self.rm.states(), "manager_free": len(self.free_slots)},
            "heap": {"used_bytes": heap.used_bytes, "arena_bytes": heap.arena_bytes, "closures": heap.names},
            "cluster": ({**self.cluster.status(), "sessions_owned": st.active}
                        if self.cluster is not None else None),
        }

    # -- workers join and leave (called by the supervisor) ---------------------------------

    def worker_joining(self, pid: int, start: int, suite: str) -> tuple[WorkerRef, dict, list[int]]:
        """Admits a worker (the supervisor checked who it is): binds it an
        index of the request memory; the reply tells it what it needs, and
        it gets the eventfd that wakes the manager."""
        if suite not in self.dispatchers:
            raise Refused(f"no suite {suite!r}")
        if not self.free_indices:
            raise Refused("no free worker index (instance.max_workers)")
        index = self.free_indices[-1]
        gen = self.rm.bind_worker(index, pid, start)     # (raises: the index stays free)
        self.free_indices.pop()
        cfg = self.config
        reply = {"index": index, "gen": gen, "secret": self.secret.hex(), "session_ttl": cfg.session_ttl,
                 "secure_cookies": cfg.secure_cookies, "suite_index": self.suite_index[suite],
                 "node": self.node_name, "node_number": self.node_number}
        return WorkerRef(index, gen, pid, start, suite), reply, [self.wake_fd]

    def worker_joined(self, w: WorkerRef) -> None:
        suite = self.config.suites[w.suite]
        if suite.max_requests:
            w.recycle_at = suite.max_requests + random.randint(0, suite.max_requests_jitter)
        self.workers[w.index] = w
        self.dispatchers[w.suite].add(w)
        self.pump()

    def worker_left(self, w: WorkerRef) -> None:
        """Worker w is gone.  Pushed responses are delivered; of its other
        requests, the not-yet-started go to another worker, the started get
        an error response, the finished-but-not-pushed are delivered; the
        slots of requests answered already (timed out) are freed."""
        if self.rm is None:
            return      # the manager is closing down
        w.draining = True       # nothing answered below is placed on it
        self.workers.pop(w.index, None)
        self.dispatchers[w.suite].remove(w.index)
        for slot in self._drain(w):
            self.complete(slot)
        self.rm.unbind_worker(w.index)
        self.free_indices.append(w.index)
        requeue = []
        for p in [p for p in self.pending.values() if p.worker is w]:
            state, _, _ = self.rm.slot_info(p.slot)
            if p.answered:
                self._free(p)
            elif state == DONE:
                self.complete(p.slot)
            elif state == QUEUED:
                self._unplace(p)
                requeue.append(p)       # keeps its slot: submitted to another worker as it is
            else:
                why = "running" if state == RUNNING else f"in state {state}"
                self._answer(p, f"worker {w.pid} died while the request was {why}".encode(), WORKER_DIED)
        self.backlog[w.suite].extendleft(reversed(requeue))
        try:
            self.heap.reclaim()
        except PyshmError:
            log.exception("reclaiming the heap after worker %d died", w.pid)
        self.pump()

    async def _watch_memory(self) -> None:
        """Once a second: a worker whose resident memory passed its suite's
        max_rss is replaced (gracefully, as for max_requests)."""
        while True:
            await asyncio.sleep(1.0)
            try:
                self._check_memory()
            except Exception:
                log.exception("checking the workers' memory failed")

    def _check_memory(self) -> None:
        for w in list(self.workers.values()):
            limit = self.config.suites[w.suite].max_rss
            if not limit or w.draining:
                continue
            rss = resident_bytes(w.pid)
            if rss > limit:
                self.supervisor.recycle(w, f"its resident memory {rss >> 20} MiB passed max_rss {limit >> 20} MiB")


def _remove_if_orphaned(name: str) -> None:
    """A segment of this instance's name left by a manager that died (and
    that no live process uses) is removed; a live one is an error."""
    info = segments.probe(name)
    if info.size == 0 and not info.readable:
        return   # absent (or unreadable: create() will say so)
    if info.orphaned:
        log.warning("removing segment %s left by dead process %d", name, info.creator_pid)
        unlink_segment(name)
    elif info.creator_alive:
        raise SegmentExists(f"instance segment {name!r} belongs to running process {info.creator_pid}: "
                            f"that instance still runs; stop it or choose another instance.name")


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
