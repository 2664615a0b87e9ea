"""The node link's sans-IO protocol (pyshm.cluster.wire): handshake,
refusals, sealed frames, and garbage."""
from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pyshm.cluster import wire
from pyshm.cluster.wire import CLOSED, OPEN, Closed, Hello, Link, Message, Opened, Send

SECRET = b"k" * 32


def node(name: str, secret: bytes = SECRET, cluster: str = "shop", **kw) -> Link:
    return Link(secret, Hello(cluster, name, epoch=7, link_port=7400), **kw)


def exchange(a: Link, b: Link, *, chunk: int = 0) -> tuple[list, list]:
    """Runs both ends until neither has anything more to say; the events
    each saw (without the Sends).  chunk > 0 delivers bytes that many at a time."""
    seen_a: list = []
    seen_b: list = []
    to_b, to_a = [a.start()], [b.start()]
    while to_a or to_b:
        for data, link, seen, out in ((to_b, b, seen_b, to_a), (to_a, a, seen_a, to_b)):
            pending = b"".join(data)
            data.clear()
            pieces = [pending[i:i + chunk] for i in range(0, len(pending), chunk)] if chunk else [pending]
            for piece in pieces:
                for ev in link.receive(piece):
                    (out.append(ev.data) if isinstance(ev, Send) else seen.append(ev))
    return seen_a, seen_b


@pytest.mark.parametrize("chunk", [0, 1, 7])
def test_handshake_opens_both_ends_and_messages_cross(chunk: int) -> None:
    a, b = node("a"), node("b")
    seen_a, seen_b = exchange(a, b, chunk=chunk)
    assert seen_a == [Opened(Hello("shop", "b", 7, 7400))] and seen_b == [Opened(Hello("shop", "a", 7, 7400))]
    assert a.state == b.state == OPEN
    frames = a.send([wire.PING, 1.5]) + a.send([wire.FORWARD, 1, "main", b"x" * 100_000, b"/", None, 0, "GET /"])
    assert SECRET not in frames and b"x" * 64 not in frames      # sealed: nothing in clear
    got = []
    for i in range(0, len(frames), chunk or len(frames)):
        got += b.receive(frames[i:i + (chunk or len(frames))])
    assert got == [Message([wire.PING, 1.5]), Message([wire.FORWARD, 1, "main", b"x" * 100_000, b"/", None, 0,
                                                       "GET /"])]
    assert a.receive(b.send([wire.PONG, 1.5])) == [Message([wire.PONG, 1.5])]


def refusal(seen: list) -> Closed:
    assert len(seen) == 1 and isinstance(seen[0], Closed), seen
    return seen[0]


def test_a_wrong_secret_is_refused_by_both() -> None:
    a, b = node("a"), node("b", secret=b"z" * 32)
    seen_a, seen_b = exchange(a, b)
    assert refusal(seen_a).refused and refusal(seen_b).refused
    assert "does not hold this cluster's secret" in refusal(seen_a).reason + refusal(seen_b).reason
    assert a.state == b.state == CLOSED
    with pytest.raises(RuntimeError):
        a.send([wire.PING, 0])


@pytest.mark.parametrize("b, why", [
    (lambda: node("b", cluster="other"), "belongs to cluster 'other', not 'shop'"),
    (lambda: node("a"), "is this node's own"),
    (lambda: Link(SECRET, Hello("shop", "b", 7, 7400, version=99)), "link protocol 99"),
])
def test_other_clusters_versions_and_ids_are_refused(b, why: str) -> None:
    a = node("a")
    seen_a, seen_b = exchange(a, b())
    assert why in refusal(seen_a).reason and refusal(seen_a).refused
    assert refusal(seen_b).refused and a.state == CLOSED      # (b sees the same mismatch, or hears a's refusal)


def opened_pair() -> tuple[Link, Link]:
    a, b = node("a"), node("b")
    exchange(a, b)
    assert a.state == b.state == OPEN
    return a, b


def test_tampered_replayed_and_reordered_frames_close_the_link() -> None:
    a, b = opened_pair()
    f0, f1 = a.send([wire.PING, 0]), a.send([wire.PING, 1])
    bad = bytearray(f0)
    bad[-1] ^= 1
    assert "did not open" in refusal(b.receive(bytes(bad))).reason and b.state == CLOSED
    a, b = opened_pair()
    f0, f1 = a.send([wire.PING, 0]), a.send([wire.PING, 1])
    assert refusal(b.receive(f1)).reason.startswith("sealed frame 0 did not open")       # reordered
    a, b = opened_pair()
    f0 = a.send([wire.PING, 0])
    assert b.receive(f0) == [Message([wire.PING, 0])]
    assert "did not open" in refusal(b.receive(f0)).reason                                # replayed
    a, b = opened_pair()
    c, d = opened_pair()                                                                  # another link's frame
    assert "did not open" in refusal(b.receive(c.send([wire.PING, 0]))).reason


def test_frame_size_limits() -> None:
    a, b = opened_pair()
    b.max_frame = 1000
    assert "a frame of" in refusal(b.receive(a.send([wire.PING, b"x" * 2000]))).reason
    small = node("c", max_frame=10)
    small.state, small._seal = OPEN, a._seal
    with pytest.raises(ValueError):
        small.send([wire.PING, b"x" * 100])
    fresh = node("b")
    assert "at most 4096" in refusal(fresh.receive(b"\x00\x01\x00\x00")).reason   # a 64 KiB clear frame


def test_garbage_and_half_handshakes() -> None:
    b = node("b")
    assert refusal(b.receive(b"\x00\x00\x00\x05GET /")).reason == "garbage during the handshake"
    b = node("b")
    assert refusal(b.receive(wire._clear({"proof": b"x" * 32}))).reason.startswith("unexpected 'proof'")
    b = node("b")
    assert refusal(b.receive(wire._clear({"hello": {"node": "x"}}))).reason == "a malformed hello"
    b = node("b")
    assert b.receive(b"\x00\x00\x00") == [] and b.state == "hello"     # half a length: waits (the adapter times out)


@pytest.mark.fuzz
@given(st.binary(max_size=600), st.integers(min_value=1, max_value=64))
@example(b"\x00\x00\x00\x01\xc1", 1)
@example(b"\x00\x00\x00\x03\x81\xa5hello", 3)
def test_garbage_never_raises(data: bytes, chunk: int) -> None:
    b = node("b")
    for i in range(0, len(data), chunk):
        for ev in b.receive(data[i:i + chunk]):
            assert isinstance(ev, (Send, Closed))
    assert b.state in ("hello", CLOSED)


@pytest.mark.fuzz
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=400))
def test_garbage_after_open_closes_and_never_raises(data: bytes, cut: int) -> None:
    a, b = opened_pair()
    good = a.send([wire.PING, 1])
    stream = good[:cut] + data if cut < len(good) else good + data
    events = b.receive(stream)
    assert all(isinstance(ev, (Message, Closed)) for ev in events)
    assert b.state in (OPEN, CLOSED)
