"""msgpack-RPC with a client no one here wrote (pynvim's msgpack-rpc
session), out-of-order pipelined answers, and malformed input."""
from __future__ import annotations

import socket

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pynvim.msgpack_rpc import tcp_session

from pyshm.frontend import ProtocolError, Request
from pyshm.frontends.msgpack_rpc import MsgpackRpcFrontEnd
from server_util import free_port, one_suite


def rpc_config(port: int, workers: int = 2, *, distributed: bool = True) -> str:
    body = one_suite("msgpack-rpc", port, "rpc_apps", workers=workers, listen='max_message = "64KiB"')
    return body if distributed else body.replace("workers = ", "distributed = false\nworkers = ")


@pytest.fixture
def rpc_port(serve):
    port = free_port()
    serve(rpc_config(port), port)
    return port


def test_pynvim_session(rpc_port):
    session = tcp_session("127.0.0.1", rpc_port)
    session.error_wrapper = lambda err: RuntimeError(err)
    try:
        assert session.request("add", 2, 3) == 5
        assert session.request("add", "a", "b") == "ab"
        session.request("note", "hi", async_=True)                     # a notification: no answer
        session.request("nvim_set_client_info", "x", {}, async_=True)  # unknown notification: ignored
        with pytest.raises(RuntimeError, match="unknown method 'nope'"):
            session.request("nope", 1)
        with pytest.raises(RuntimeError, match="ValueError: bad"):
            session.request("fail", "bad")
        assert session.request("Counter.incr", 2) >= 2                 # an endpoint class's method
        assert session.request("add", 40, 2) == 42                      # still serving
    finally:
        session.close()


def test_pipelined_answers_come_out_of_order(serve):
    """Without sessions (distributed = false) calls of one connection spread
    over the workers, and answers go out as they complete."""
    rpc_port = free_port()
    serve(rpc_config(rpc_port, distributed=False), rpc_port)
    with socket.create_connection(("127.0.0.1", rpc_port), timeout=10) as s:
        s.sendall(msgpack.packb([0, 1, "sleep", [0.5, "slow"]]) + msgpack.packb([0, 2, "sleep", [0.0, "fast"]]))
        unpacker = msgpack.Unpacker(raw=False)
        got = []
        while len(got) < 2:
            unpacker.feed(s.recv(4096))
            got += list(unpacker)
    assert got == [[1, 2, None, "fast"], [1, 1, None, "slow"]]


def test_malformed_input_gets_an_error_and_a_close(rpc_port):
    for bad in (b"\xc1garbage", msgpack.packb({"not": "a list"}), msgpack.packb([0, "id", "add", [1]]),
                msgpack.packb([0, 1, "add", "notalist"]), msgpack.packb("x" * 70000)):
        with socket.create_connection(("127.0.0.1", rpc_port), timeout=10) as s:
            s.sendall(bad)
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        kind, msgid, error, result = msgpack.unpackb(data, raw=False)
        assert (kind, msgid, result) == (1, None, None) and error
    session = tcp_session("127.0.0.1", rpc_port)
    try:
        assert session.request("add", 1, 1) == 2      # the server goes on
    finally:
        session.close()


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=300),
                 st.lists(st.one_of(st.integers(-2**63, 2**64 - 1), st.text(max_size=5), st.none(),
                                    st.lists(st.integers(0, 9), max_size=3)),
                          max_size=5).map(msgpack.packb)),
       st.lists(st.integers(0, 300), max_size=8))
def test_fuzz_only_protocol_events(data, cuts):
    fe = MsgpackRpcFrontEnd(max_message=256)
    events, last = [], 0
    for c in sorted({c for c in cuts if c <= len(data)}) + [len(data)]:
        events += fe.receive(data[last:c])
        last = c
    events += fe.eof()
    assert all(isinstance(e, (Request, ProtocolError)) for e in events)
    assert sum(isinstance(e, ProtocolError) for e in events) <= 1
