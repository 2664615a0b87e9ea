"""The raw-frame front-end as a sans-IO state machine (and its request
timeout once over a real socket), front-end plugins, and a garbage fuzz of
every built-in front-end."""
from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyshm.frontend import ProtocolError, Registry, Request, Send
from pyshm.frontends.http import FEED_PIECE, HttpFrontEnd
from pyshm.frontends.msgpack_rpc import MsgpackRpcFrontEnd
from pyshm.frontends.tcp import TcpFrontEnd, frame
from server_util import FrameClient, free_port, one_suite


def feed(fe, data: bytes, cuts: list[int]):
    events, last = [], 0
    for c in sorted(set(cuts)) + [len(data)]:
        events += fe.receive(data[last:c])
        last = c
    return events


@pytest.mark.fuzz
@given(st.lists(st.binary(max_size=300), max_size=10), st.lists(st.integers(0, 4000), max_size=20))
def test_frames_split_anywhere_come_out_whole(payloads, cuts):
    fe = TcpFrontEnd()
    data = b"".join(frame(p) for p in payloads)
    events = feed(fe, data, [c for c in cuts if c <= len(data)])
    assert [e.payload for e in events] == payloads
    assert fe.eof() == []


@pytest.mark.fuzz
@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=10))
def test_garbage_gives_requests_or_a_protocol_error_never_an_exception(data, cuts):
    fe = TcpFrontEnd(max_frame=512)
    events = feed(fe, data, [c for c in cuts if c <= len(data)]) + fe.eof()
    assert all(isinstance(e, (Request, ProtocolError)) for e in events)
    assert sum(isinstance(e, ProtocolError) for e in events) <= 1


def test_frame_of_exactly_max_frame_is_accepted_and_one_more_refused():
    fe = TcpFrontEnd(max_frame=100)
    (req,) = fe.receive(frame(b"a" * 100))
    assert req.payload == b"a" * 100
    (err,) = fe.receive(struct.pack(">I", 101) + b"b" * 101)
    assert isinstance(err, ProtocolError) and err.message == "frame of 101 bytes exceeds the limit of 100"
    assert fe.eof() == [] and not fe.partial()


def test_partial_frame_times_out_with_an_error_frame():
    fe = TcpFrontEnd(request_timeout=2)
    assert fe.receive(frame(b"hello")[:6]) == [] and fe.partial() and fe.buffered() == 2
    assert fe.timeout_reply() == frame(b"request not received within 2 s", error=True)
    (req,) = fe.receive(b"llo")
    assert req.payload == b"hello" and not fe.partial()
    assert fe.receive(b"\0\0") == [] and fe.partial()     # half a length word is partial too
    (err,) = fe.eof()
    assert isinstance(err, ProtocolError) and fe.eof() == []


def test_a_frame_not_whole_in_time_gets_an_error_frame_and_a_close(serve):
    port = free_port()
    serve(one_suite("tcp", port, "apps:echo", workers=1, listen="request_timeout = 1.0"), port)
    slow = FrameClient(port)
    try:
        slow.sock.sendall(frame(b"hello")[:6])
        assert slow.recv() == (True, b"request not received within 1 s")
        assert slow.sock.recv(1) == b""          # then closed
    finally:
        slow.close()
    ok = FrameClient(port)
    try:
        assert ok.call(b"still serving") == (False, b"still serving")
    finally:
        ok.close()


def test_oversized_frame_is_refused_before_its_body():
    fe = TcpFrontEnd(max_frame=100)
    (ev,) = fe.receive(struct.pack(">I", 101))
    assert isinstance(ev, ProtocolError) and ev.reply == frame(b"frame of 101 bytes exceeds the limit of 100", error=True)
    assert fe.receive(b"x" * 1000) == []      # nothing more is parsed or kept
    assert len(fe._buf) == 0


def test_error_responses_set_the_top_bit():
    fe = TcpFrontEnd()
    assert fe.response(Request(b""), b"no", error="application") == struct.pack(">I", 0x8000_0002) + b"no"
    assert fe.response(Request(b""), b"ok", error=None) == struct.pack(">I", 2) + b"ok"


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="no option 'max_frames'"):
        TcpFrontEnd(max_frames=5)


def test_builtin_front_end_registers_through_the_entry_point():
    assert Registry.load().get("tcp") is TcpFrontEnd


# -- every built-in front-end against garbage -----------------------------------------------

# Seeds to mutate: valid input of each front-end.
HTTP_SEEDS = [b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
              b"POST /e HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhello",
              b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
              b"GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
              b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n1\r\na\r\n0\r\n\r\n"]
RPC_SEEDS = [msgpack.packb([0, 1, "add", [1, 2]]), msgpack.packb([2, "note", ["x"]]),
             msgpack.packb([0, 2**32 - 1, "m", [{"k": [1.5, None, b"b"]}]])]
TCP_SEEDS = [frame(b"hello"), frame(b""), frame(b"x" * 40)]

# (front-end factory, seeds, how many bytes it may hold for a request not yet whole)
FRONT_ENDS = {
    "http": (lambda: HttpFrontEnd(max_header=512, max_body=64), HTTP_SEEDS, 512 + FEED_PIECE + 64),
    "msgpack-rpc": (lambda: MsgpackRpcFrontEnd(max_message=256), RPC_SEEDS, 256),
    "tcp": (lambda: TcpFrontEnd(max_frame=256), TCP_SEEDS, 256 + 4),
}


def test_the_fuzz_covers_every_built_in_front_end():
    builtin = {name for name, cls in Registry.load().classes.items() if cls.__module__.startswith("pyshm.frontends.")}
    assert builtin == set(FRONT_ENDS)


def test_each_front_end_declares_the_worker_interface_it_needs():
    interfaces = Registry.load().interfaces()
    assert {n: interfaces[n] for n in FRONT_ENDS} == {"http": "wsgi", "msgpack-rpc": "rpc", "tcp": "handler"}


def test_a_suite_takes_the_interface_its_front_ends_declare():
    """The configuration infers a suite's interface from the mapping its
    builder passes (a third party's front-end declares its own), else from
    the installed front-ends."""
    from pyshm.config import from_dict
    from pyshm.errors import ConfigError

    def cfg(*frontends: str, interface: str | None = None) -> dict:
        suite = {"app": "mod:app", **({"interface": interface} if interface else {})}
        return {"suites": {"s": suite},
                "listen": [{"frontend": fe, "address": f"127.0.0.1:{7000 + i}", "suite": "s"}
                           for i, fe in enumerate(frontends)]}

    assert from_dict(cfg("http")).suites["s"].interface == "wsgi"
    assert from_dict(cfg("msgpack-rpc")).suites["s"].interface == "rpc"
    assert from_dict(cfg("tcp")).suites["s"].interface == "handler"
    assert from_dict(cfg("lines"), {"lines": "rpc"}).suites["s"].interface == "rpc"
    assert from_dict(cfg("lines"), {}).suites["s"].interface == "handler"
    assert from_dict(cfg("http", "tcp", interface="handler"), {}).suites["s"].interface == "handler"
    with pytest.raises(ConfigError, match="different application interfaces"):
        from_dict(cfg("http", "tcp"))
    with pytest.raises(ConfigError, match="interface 'grpc'"):
        from_dict(cfg("lines"), {"lines": "grpc"})


def mutated(seeds: list[bytes]):
    """A few seeds pipelined, then bytes inserted, deleted or overwritten."""
    edit = st.tuples(st.integers(0, 400), st.integers(0, 4), st.binary(max_size=6))
    return st.tuples(st.lists(st.sampled_from(seeds), min_size=1, max_size=4), st.lists(edit, max_size=4)).map(
        lambda t: _apply(b"".join(t[0]), t[1]))


def _apply(data: bytes, edits: list) -> bytes:
    for at, drop, insert in edits:
        at = min(at, len(data))
        data = data[:at] + insert + data[at + drop:]
    return data


@pytest.mark.fuzz
@pytest.mark.parametrize("name", sorted(FRONT_ENDS))
@given(data=st.data())
def test_garbage_into_every_front_end(name, data):
    """Random or mutated bytes, split at random points, then EOF: no
    exception escapes, only Request/Send/ProtocolError come out, nothing
    after a ProtocolError, and what is held stays under the limits."""
    make, seeds, bound = FRONT_ENDS[name]
    stream = data.draw(st.one_of(st.binary(max_size=1500), mutated(seeds)), label="stream")
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12).map(sorted), label="cuts")
    fe = make()
    events, last = [], 0
    for c in cuts + [len(stream)]:
        events += fe.receive(stream[last:c])
        last = c
        assert fe.buffered() <= bound
    events += fe.eof()
    assert all(isinstance(e, (Request, Send, ProtocolError)) for e in events)
    errors = [i for i, e in enumerate(events) if isinstance(e, ProtocolError)]
    assert errors in ([], [len(events) - 1])          # at most one, and nothing after it
    if errors:
        assert fe.receive(stream) == [] and not fe.partial()    # nothing more is parsed
