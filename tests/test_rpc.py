"""msgpack-RPC with a client no one here wrote (pynvim's msgpack-rpc
session), out-of-order pipelined answers, malformed input, and hostile
input's cost to the manager (the front-end alone: test_frontend_rpc.py)."""
from __future__ import annotations

import socket
import time

import msgpack
import pytest
from pynvim.msgpack_rpc import tcp_session

from server_util import free_port, one_suite

CAP = 1 << 20     # more than any answer here; a runaway one fails instead of looping


def until_eof(s: socket.socket) -> bytes:
    """What the server sends until it closes (bounded by the socket's timeout and CAP)."""
    data = b""
    while len(data) < CAP and (chunk := s.recv(65536)):
        data += chunk
    return data


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
            chunk = s.recv(4096)
            assert chunk, f"the server closed after {got}"
            unpacker.feed(chunk)
            got += list(unpacker)
    assert got == [[1, 2, None, "fast"], [1, 1, None, "slow"]]


def test_malformed_input_gets_an_error_and_a_close(rpc_port):
    for bad, why in ((b"\xc1garbage", "byte 0xc1"), (msgpack.packb({"not": "a list"}), "expected"),
                     (msgpack.packb([0, "id", "add", [1]]), "msgid"),
                     (msgpack.packb([0, 1, "add", "notalist"]), "params"),
                     (msgpack.packb("x" * 70000), "over the limit"), (b"\x81\x90\x00", "map key"),
                     (b"\x91" * 1100, "nested more than 1024 levels")):
        with socket.create_connection(("127.0.0.1", rpc_port), timeout=10) as s:
            s.sendall(bad)
            data = until_eof(s)
        kind, msgid, error, result = msgpack.unpackb(data, raw=False)
        assert (kind, msgid, result) == (1, None, None) and why in error
    session = tcp_session("127.0.0.1", rpc_port)
    try:
        assert session.request("add", 1, 1) == 2      # the server goes on
    finally:
        session.close()


def private_rss(pid: int) -> int:
    """A process's resident private memory in bytes (RssAnon in
    /proc/<pid>/status: VmRSS less the shared segments and files mapped,
    which the manager's pages of shared memory make grow as it touches them)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no RssAnon for {pid}")


def test_array_headers_without_data_cost_the_manager_nothing(serve):
    """Twenty connections each send a thousand nested array16(65535)
    headers and nothing more: msgpack used to preallocate 512 KiB a header
    (the manager grew by 1.36 GB).  Now the manager stays about its size,
    and each connection gets the timeout error after request_timeout."""
    port = free_port()
    srv = serve(one_suite("msgpack-rpc", port, "rpc_apps", workers=1, listen="request_timeout = 1.0"), port)
    probe = tcp_session("127.0.0.1", port)
    try:
        assert probe.request("add", 1, 1) == 2
        before = private_rss(srv.proc.pid)
        conns = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(20)]
        t0 = time.monotonic()
        for s in conns:
            s.sendall(b"\xdc\xff\xff" * 1000)
        assert probe.request("add", 2, 2) == 4        # the manager has read what came before
        during = private_rss(srv.proc.pid)
        for s in conns:
            with s:
                assert msgpack.unpackb(until_eof(s), raw=False) == [1, None, "request not received within 1 s", None]
        elapsed = time.monotonic() - t0
        after = private_rss(srv.proc.pid)
    finally:
        probe.close()
    assert 1.0 <= elapsed < 10
    assert during - before < 100 << 20 and after - before < 100 << 20, (before, during, after)
