"""Two ClusterNodes in one event loop, over real sockets on 127.0.0.1,
each with a stand-in for its manager (a Host that answers forwarded
requests after a delay): the link's life cycle without worker processes."""
from __future__ import annotations

import asyncio
import logging
import socket
import time

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pyshm.cluster.node import ClusterNode, _Target
from pyshm.config import ClusterConfig
from pyshm.frontend import NODE_DIED, Request

pytestmark = pytest.mark.timeout(60)
SECRET = b"s" * 32


class Host:
    """Answers each forwarded request `delay` seconds later."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.ran = 0

    def run_forwarded(self, suite, request, client, hops, reply) -> None:
        self.ran += 1
        asyncio.get_running_loop().call_later(self.delay, reply, b"ok " + request.payload, None)

    def take_session(self, handed) -> str | None:
        return None

    def pump(self) -> None:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make(name: str, port: int, peers: list[int] = (), host: Host | None = None) -> ClusterNode:
    cfg = ClusterConfig("c", name, ("127.0.0.1", port), SECRET, peers=[("127.0.0.1", p) for p in peers])
    return ClusterNode(cfg, host or Host())


async def started(*nodes: ClusterNode) -> None:
    for n in nodes:
        await n.bind()
    for n in nodes:
        await n.start({})


async def until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_a_request_in_flight_when_its_link_is_replaced_is_answered_or_fails_at_once():
    """B dialed A; A forwards on that link; then A dials B too and the
    second link replaces the first on both ends."""
    async def main() -> tuple:
        pa, pb = free_port(), free_port()
        a, b = make("a", pa), make("b", pb, [pa], Host(delay=0.2))
        await started(a, b)
        try:
            await until(lambda: "b" in a.peers and a.peers["b"].alive)
            done = asyncio.get_running_loop().create_future()
            t0 = time.monotonic()
            a.forward(a.peers["b"], "main", Request(b"x", b"/"), "client", 0, 30.0,
                      lambda body, error: done.set_result((body, error, time.monotonic() - t0)))
            target = a.targets[("127.0.0.1", pb)] = _Target(("127.0.0.1", pb))
            await a._dial(target)
            result = await asyncio.wait_for(done, 10)
            await until(lambda: a.peers["b"].alive and b.peers["a"].alive)
            await asyncio.sleep(0.5)      # (both ends settled on one link)
            return result, a.peers["b"].in_flight, a.peers["b"].link.link.link_id == b.peers["a"].link.link.link_id
        finally:
            await a.stop()
            await b.stop()

    (body, error, took), in_flight, same_link = asyncio.run(main())
    assert (body, error) == (b"ok x", None) or error == NODE_DIED
    assert took < 5 and in_flight == 0
    assert same_link        # both ends kept the same link


def test_heartbeats_measure_the_round_trip_and_a_stopped_peer_is_dead_at_once():
    async def main() -> tuple:
        pa, pb = free_port(), free_port()
        a, b = make("a", pa, [pb]), make("b", pb, [pa])
        await started(a, b)
        try:
            await until(lambda: "b" in a.peers and a.peers["b"].rtt is not None)
            rtt = a.peers["b"].rtt
            await b.stop()
            t0 = time.monotonic()
            await until(lambda: not a.peers["b"].alive, 5)
            return rtt, time.monotonic() - t0, a.status()["peers"][0]["state"]
        finally:
            await a.stop()

    rtt, took, state = asyncio.run(main())
    assert 0 < rtt < 1 and took < 1 and state == "dead"


class _Conn:
    """What link_message needs of a link: its peer's name, send, abort."""

    def __init__(self) -> None:
        from types import SimpleNamespace

        self.link = SimpleNamespace(peer=SimpleNamespace(node="b"), max_frame=64 << 20)
        self.sent: list = []
        self.aborted = ""
        self.congested = False

    def send(self, msg: list) -> bool:
        self.sent.append(msg)
        return True

    def abort(self, reason: str) -> None:
        self.aborted = reason


_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.binary(max_size=20)
                       | st.text(max_size=10), lambda inner: st.lists(inner, max_size=4), max_leaves=12)


class _AtOnce(Host):
    """Answers a forwarded request at once (no event loop needed)."""

    def run_forwarded(self, suite, request, client, hops, reply) -> None:
        self.ran += 1
        reply(b"ok", None)


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.fuzz
@given(kind=st.integers(1, 11), fields=st.lists(_values, max_size=9))
@example(kind=3, fields=[1, "main", b"x", b"/", None, float("inf"), "GET /", "c"])
@example(kind=3, fields=[1, "main", b"x", b"/", b"s" * 16, 0, "GET /", "c"])     # well formed: answered
@example(kind=5, fields=[1, b"s" * 16, 1, 0, 1e308, 0, 2**70, None])
@example(kind=7, fields=[[[b"s" * 16, "c"], [b"short", "c"], "junk"]])
def test_whatever_a_peer_sends_is_handled_or_cuts_its_link(kind: int, fields: list) -> None:
    """A well-formed message is handled, anything else cuts the peer's
    link: no exception, and no error logged (the stand-in manager never
    fails, so an error would be a field read unchecked)."""
    from pyshm.cluster.node import Peer

    node = make("a", free_port(), host=_AtOnce())
    conn = _Conn()
    node.peers["b"] = Peer("b", 2, link=conn)
    errors = _Errors()
    logging.getLogger("pyshm.cluster.node").addHandler(errors)
    try:
        node.link_message(conn, [kind, *fields])
    finally:
        logging.getLogger("pyshm.cluster.node").removeHandler(errors)
    assert not errors.records, [r.getMessage() for r in errors.records]
