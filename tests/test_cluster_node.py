"""Two ClusterNodes in one event loop, over real sockets on 127.0.0.1,
each with a stand-in for its manager (a Host that answers forwarded
requests after a delay): the link's life cycle without worker processes."""
from __future__ import annotations

import asyncio
import socket
import time

import pytest

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
