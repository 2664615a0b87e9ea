"""Distributed sessions: each msgpack-RPC connection has its own endpoint
objects in one worker; they survive that worker's death."""
from __future__ import annotations

import os
import signal
import socket
import threading
import time

import msgpack
import pytest
from pynvim.msgpack_rpc import tcp_session

from pyshm.heap import SharedHeap
from pyshm.sessions import SessionTable
from server_util import RpcConn, free_port, one_suite, status, status_cli, wait_for, worker_pids


def session(port: int):
    s = tcp_session("127.0.0.1", port)
    s.error_wrapper = lambda err: RuntimeError(err)
    return s


@pytest.fixture
def rpc(serve):
    port = free_port()
    srv = serve(one_suite("msgpack-rpc", port, "rpc_apps", workers=2), port)
    return srv, port


def table_usage(name: str) -> tuple[int, int]:
    t, h = SessionTable.attach(name), SharedHeap.attach(name, observe=True)
    try:
        return t.stats().active, h.stats().used_bytes
    finally:
        t.close()
        h.close()


def no_sessions_left(name: str) -> None:
    """Waits until every session of earlier connections has ended."""
    deadline = time.monotonic() + 10
    while table_usage(name)[0]:
        assert time.monotonic() < deadline, "sessions never ended"
        time.sleep(0.02)


def test_each_connection_has_its_own_endpoints(rpc):
    srv, port = rpc
    a, b = session(port), session(port)
    try:
        assert [a.request("Counter.incr") for _ in range(3)] == [1, 2, 3]
        assert b.request("Counter.incr", 10) == 10
        assert a.request("Counter.incr") == 4
        assert len({a.request("pid") for _ in range(5)}) == 1       # bound to one worker
    finally:
        a.close()
        b.close()


def test_killed_worker_the_in_flight_call_errors_and_the_next_continues(rpc):
    srv, port = rpc
    a, b = session(port), session(port)
    try:
        for _ in range(5):
            a.request("Slow.incr")
        b.request("Slow.incr")
        victim = a.request("pid")
        errors = []

        def in_flight():
            try:
                a.request("Slow.incr", 3.0)
            except Exception as e:
                errors.append(str(e))

        t = threading.Thread(target=in_flight)
        t.start()
        wait_for(lambda: status(srv.name)["slots"]["running"] == 1, "the call runs in its worker")
        os.kill(victim, signal.SIGKILL)
        t.join(10)
        assert not t.is_alive()
        assert errors and "died while the request was running" in errors[0]
        assert a.request("Slow.incr") == 6              # from the checkpoint (5), on another worker
        assert a.request("pid") != victim
        assert b.request("Slow.incr") == 2              # the other session is intact too
    finally:
        a.close()
        b.close()


def test_a_non_restorable_endpoint_ends_its_session(rpc):
    srv, port = rpc
    a = session(port)
    try:
        assert a.request("Ephemeral.incr") == 1
        victim = a.request("pid")
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: victim not in worker_pids(srv.name), "the manager saw the worker die")
        with pytest.raises(RuntimeError, match="not restorable"):
            a.request("Ephemeral.incr")
        with pytest.raises(RuntimeError, match="session ended"):
            a.request("add", 1, 2)
    finally:
        a.close()


def test_10000_sessions_opened_and_closed_leave_nothing(rpc):
    srv, port = rpc
    no_sessions_left(srv.name)
    active0, used0 = table_usage(srv.name)
    call = msgpack.packb([0, 1, "Counter.incr", [1]])
    for _ in range(10_000):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(call)
            assert msgpack.unpackb(s.recv(100)) == [1, 1, None, 1]    # 5 bytes: one segment
    deadline = time.monotonic() + 10
    while table_usage(srv.name) != (active0, used0):
        assert time.monotonic() < deadline, table_usage(srv.name)
        time.sleep(0.1)


def test_status_reports_workers_sessions_and_memory(rpc):
    import subprocess
    import sys

    srv, port = rpc
    a = session(port)
    try:
        a.request("Counter.incr")
        victim = a.request("pid")
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(p := worker_pids(srv.name)) == 2 and victim not in p, "a replacement worker joined")
        st = status_cli(srv.name)
        assert len(st["workers"]) == 2 and {w["suite"] for w in st["workers"]} == {"main"}
        assert st["restarts"] == {"main": 1}
        assert st["sessions"]["active"] == 1 and st["sessions"]["by_kind"] == {"distributed/bound": 1}
        assert st["slots"]["free"] == 1024 and st["heap"]["closures"] >= 1
        text = subprocess.run([sys.executable, "-m", "pyshm.cli", "status", srv.name], capture_output=True,
                              text=True, timeout=30, check=True).stdout
        assert "sessions: 1 of 65,536" in text and "restarts: main 1" in text
    finally:
        a.close()
    r = subprocess.run([sys.executable, "-m", "pyshm.cli", "status", "no-such-instance"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 1 and "no pyshm instance 'no-such-instance'" in r.stderr


def test_a_full_session_table_is_an_rpc_error(serve):
    port = free_port()
    srv = serve(one_suite("msgpack-rpc", port, "rpc_apps", workers=1, instance="sessions = 2"), port)
    no_sessions_left(srv.name)
    a, b = session(port), session(port)
    try:
        assert a.request("Counter.incr") == 1 and b.request("Counter.incr") == 1
        c = session(port)
        try:
            with pytest.raises(RuntimeError, match="session table .* is full"):
                c.request("Counter.incr")
        finally:
            c.close()
        assert a.request("Counter.incr") == 2      # the others go on
    finally:
        a.close()
        b.close()


def test_a_session_with_a_token_is_resumed_on_a_new_connection(rpc):
    srv, port = rpc
    s = RpcConn(port)
    assert [s.call("Counter.incr") for _ in range(3)] == [1, 2, 3]
    token = s.call("pyshm.session_token")
    s.close()
    wait_for(lambda: status(srv.name)["connections"] == 0, "the manager saw the close")
    assert table_usage(srv.name)[0] == 1            # it outlives its connection
    again = RpcConn(port)
    assert again.call("pyshm.resume", token) is True
    assert again.call("Counter.incr") == 4
    with pytest.raises(RuntimeError, match="before any call that used"):
        again.call("pyshm.resume", token)
    other = RpcConn(port)
    with pytest.raises(RuntimeError, match="not a session token"):
        other.call("pyshm.resume", "0" * 48 + "." + "A" * 43)
    with pytest.raises(RuntimeError, match="not a session token"):
        other.call("pyshm.resume", 42)
    assert other.call("Counter.incr") == 1       # (a failed resume leaves the connection usable)
    for c in (again, other):
        c.close()


def test_pynvim_resumes_a_session_after_its_client_info_notification(rpc):
    """pynvim sends nvim_set_client_info (a notification) before any call:
    the connection's still empty session gives way to the resumed one."""
    srv, port = rpc
    s = session(port)
    assert s.request("Counter.incr") == 1
    token = s.request("pyshm.session_token")
    s.close()
    again = session(port)
    assert again.request("pyshm.resume", token) is True
    assert again.request("Counter.incr") == 2
    again.close()
