"""HTTP sessions: a signed cookie, state in a heap closure, any worker."""
from __future__ import annotations

import socket
import time

import httpx
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pyshm.heap import SharedHeap
from pyshm.sessions import SessionKind, SessionTable, state_closure
from server_util import free_port, one_suite, quiescent, status


def start(serve, *, instance: str = "", workers: int = 2):
    port = free_port()
    srv = serve(one_suite("http", port, "wsgi_apps:counter", workers=workers, instance=instance), port)
    return srv, port


def usage(name: str) -> tuple[int, int, list[str]]:
    table = SessionTable.attach(name)
    heap = SharedHeap.attach(name, observe=True)
    try:
        return table.stats().active, heap.stats().used_bytes, [n for n in heap.names() if n.startswith("session/")]
    finally:
        table.close()
        heap.close()


def test_state_carries_across_workers_and_a_tampered_cookie_starts_afresh(serve):
    srv, port = start(serve)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        pids = set()
        for i in range(1, 21):
            visits, pid = client.get("/").text.split()
            assert int(visits) == i
            pids.add(pid)
        assert len(pids) == 2, "served by both workers"
        cookie = client.cookies["pyshm_session"]
        set_cookie = client.get("/").headers.get("set-cookie")
        assert set_cookie is None            # no new cookie while the session lives
    tampered = cookie[:-1] + ("A" if cookie[-1] != "A" else "B")
    forged = ("0" * 32) + cookie[32:]
    for bad in (tampered, forged, "garbage", cookie + "x"):
        r = httpx.get(f"http://127.0.0.1:{port}/", cookies={"pyshm_session": bad})
        assert r.text.split()[0] == "1" and "pyshm_session=" in r.headers["set-cookie"]
    r = httpx.get(f"http://127.0.0.1:{port}/", cookies={"pyshm_session": cookie})
    assert r.text.split()[0] == "22"      # the genuine one still works
    fresh = httpx.get(f"http://127.0.0.1:{port}/").headers["set-cookie"]
    assert "HttpOnly" in fresh and "SameSite=Lax" in fresh and "Path=/" in fresh and "Secure" not in fresh


def test_invalidate_and_expiry_free_entry_and_closure(serve):
    srv, port = start(serve, instance="session_ttl = 1.0")
    active0, _, names0 = usage(srv.name)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        client.get("/")
        active, _, names = usage(srv.name)
        assert active == active0 + 1 and len(names) == len(names0) + 1
        r = client.get("/logout")
        assert r.text == "bye" and "Max-Age=0" in r.headers["set-cookie"]
        assert usage(srv.name)[0] == active0 and usage(srv.name)[2] == names0
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        client.get("/")
        assert usage(srv.name)[0] == active0 + 1
        deadline = time.monotonic() + 10
        while usage(srv.name)[0] != active0:        # the expiry sweep
            assert time.monotonic() < deadline, "expired session not freed"
            time.sleep(0.1)
        assert usage(srv.name)[2] == names0
        assert client.get("/").text.split()[0] == "1"    # the old cookie now starts afresh


def test_10000_sessions_opened_and_closed_leave_nothing(serve):
    srv, port = start(serve, workers=2)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        buf = b""

        def more() -> bytes:
            chunk = s.recv(65536)
            assert chunk, "the server closed the connection"
            return chunk

        def answer() -> bytes:
            nonlocal buf
            while b"\r\n\r\n" not in buf:
                buf += more()
            head, _, rest = buf.partition(b"\r\n\r\n")
            n = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            while len(rest) < n:
                rest += more()
            buf = rest[n:]
            return head

        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")            # warm both sides up first
        answer()
        active0, used0, names0 = usage(srv.name)   # the warm-up's session stays
        manager_free0 = status(srv.name)["slots"]["manager_free"]
        for _ in range(10_000):
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            head = answer()
            cookie = head.split(b"pyshm_session=")[1].split(b";")[0]
            s.sendall(b"GET /logout HTTP/1.1\r\nHost: x\r\nCookie: pyshm_session=" + cookie + b"\r\n\r\n")
            assert b"Max-Age=0" in answer()
    active, used, names = usage(srv.name)
    assert active == active0 and names == names0 and used == used0
    assert status(srv.name)["slots"]["manager_free"] == manager_free0 == 1024


def test_a_read_only_request_saves_nothing(serve):
    """An application that only reads environ["pyshm.session"]: no cookie
    is set, no entry opened, no closure written, without a session and with
    one."""
    srv, port = start(serve)
    active0, used0, names0 = usage(srv.name)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        for _ in range(5):
            r = client.get("/peek")
            assert r.text == "0 0" and "set-cookie" not in r.headers
        assert usage(srv.name) == (active0, used0, names0)
        assert client.get("/").text.split()[0] == "1"            # a write opens one
        active1, used1, names1 = usage(srv.name)
        assert active1 == active0 + 1 and len(names1) == len(names0) + 1
        heap = SharedHeap.attach(srv.name, observe=True)
        try:
            versions1 = list(heap.versions())
            for _ in range(10):                                    # both workers read it; none saves
                r = client.get("/peek")
                assert r.text == "1 1" and "set-cookie" not in r.headers
            assert list(heap.versions()) == versions1
        finally:
            heap.close()
        assert usage(srv.name) == (active1, used1, names1)
    quiescent(srv.name)


def test_a_full_session_table_is_503(serve):
    srv, port = start(serve, instance="sessions = 3", workers=1)
    clients = [httpx.Client(base_url=f"http://127.0.0.1:{port}") for _ in range(4)]
    try:
        assert [c.get("/").status_code for c in clients[:3]] == [200, 200, 200]
        r = clients[3].get("/")
        assert r.status_code == 503 and "session table" in r.text
        assert clients[0].get("/").text.split()[0] == "2"       # existing sessions go on
    finally:
        for c in clients:
            c.close()


def test_cookie_signature_and_flags():
    from pyshm.http_sessions import SessionStore
    from pyshm.session_cookie import Claim

    store = SessionStore(None, None, b"k" * 32, secure=True)
    other = SessionStore(None, None, b"j" * 32)
    sid = bytes(range(16))
    value = store.sign(sid)
    assert store.signer.verify(value.encode()) == Claim(sid, 0, 0)                   # the manager's check
    assert other.signer.verify(value.encode()) is None                                # another secret: not ours
    assert store.signer.verify(value.replace(sid.hex(), bytes(16).hex()).encode()) is None
    assert store.signer.verify(b"zz" + value.encode()[2:]) is None and store.signer.verify(b"") is None
    suite1 = SessionStore(None, None, b"k" * 32, suite=1)     # same secret, another suite: not its cookie
    assert suite1.signer.verify(value.encode()) is None and suite1.signer.verify(suite1.sign(sid).encode()).sid == sid
    # A cluster node signs its number as the owner; the client can change neither owner nor secondary.
    owned = SessionStore(None, None, b"k" * 32, node=0x1234abcd).sign(sid)
    assert store.signer.verify(owned.encode()) == Claim(sid, 0x1234abcd, 0)
    forged = owned.replace("1234abcd00000000", "0000000100000000")
    assert forged != owned and store.signer.verify(forged.encode()) is None
    name, header = store.cookie(value)
    assert name == "Set-Cookie" and "Secure" in header and "HttpOnly" in header


def test_a_session_is_recorded_under_its_own_suite(serve):
    """The HTTP suite is the second of the configuration: its sessions'
    entries say suite 1 (its index among the suites, as the manager counts)."""
    tcp_port, port = free_port(), free_port()
    body = f"""
[suites.first]
app = "apps:suite_a"
workers = 1

[suites.web]
app = "wsgi_apps:counter"
workers = 1

[[listen]]
frontend = "tcp"
address = "127.0.0.1:{tcp_port}"
suite = "first"

[[listen]]
frontend = "http"
address = "127.0.0.1:{port}"
suite = "web"
"""
    srv = serve(body, tcp_port)
    srv.wait_listening(port)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        assert client.get("/").text.split()[0] == "1"
        sid = bytes.fromhex(client.cookies["pyshm_session"].partition(".")[0])[:16]     # (then owner, secondary)
    table = SessionTable.attach(srv.name)
    try:
        entry = table.get(sid)
        assert entry is not None and entry.kind == SessionKind.REQUEST and entry.suite == 1
        assert entry.closure == state_closure(sid) and entry.closure_version
    finally:
        table.close()


def test_the_front_end_passes_the_cookie_and_the_manager_verifies_it():
    """The HTTP front-end lifts the session cookie's value out of the headers
    (any Cookie header, among other cookies) for the manager to verify."""
    from pyshm.frontends.http import HttpFrontEnd
    from pyshm.session_cookie import CookieSigner

    signer = CookieSigner(b"s" * 32)
    value = signer.sign(bytes(range(16)))
    (req,) = HttpFrontEnd().receive(b"GET / HTTP/1.1\r\nHost: a\r\nCookie: theme=dark\r\n"
                                    b"Cookie: a=1; pyshm_session=" + value.encode() + b"; b=2\r\n\r\n")
    assert req.claim == value.encode() and signer.verify(req.claim).sid == bytes(range(16))
    (req,) = HttpFrontEnd().receive(b"GET / HTTP/1.1\r\nHost: a\r\nCookie: pyshm_sessionx=1\r\n\r\n")
    assert req.claim is None


@pytest.mark.fuzz
@given(st.binary(max_size=120), st.binary(min_size=16, max_size=16), st.integers(0, 2**32 - 1))
@example(b"0" * 48 + b".", bytes(16), 0)
@example(("0" * 48 + "." + "A" * 43).encode(), bytes(16), 0)
def test_cookie_values_from_clients_never_raise_and_only_signed_ones_verify(value: bytes, sid: bytes,
                                                                            owner: int) -> None:
    from pyshm.session_cookie import Claim, CookieSigner

    signer = CookieSigner(b"k" * 32)
    assert signer.verify(value) is None         # (a random value is never a valid signature)
    signed = signer.sign(sid, owner).encode()
    assert signer.verify(signed) == Claim(sid, owner, 0)
    changed = signed[:-1] + (b"A" if signed[-1:] != b"A" else b"B")
    assert signer.verify(changed) is None       # one character of the signature changed


def _cookie_value_by_pairs(header: bytes) -> bytes | None:
    """RFC 6265's reading, pair by pair (the reference for the fast scan)."""
    for pair in header.split(b";"):
        key, sep, value = pair.strip().partition(b"=")
        if sep and key == b"pyshm_session":
            return value.strip().strip(b'"')
    return None


@pytest.mark.fuzz
@given(st.lists(st.tuples(st.sampled_from([b"pyshm_session", b"xpyshm_session", b"a", b"pyshm_sessionx", b" b"]),
                          st.lists(st.sampled_from([b"pyshm_session=", b" ", b"x", b"\t", b'"', b"="]),
                                   max_size=4).map(b"".join)), max_size=5),
       st.sampled_from([b"; ", b";", b" ;  "]))
@example([(b"a", b"pyshm_session=zz")], b"; ")
@example([(b"a", b" pyshm_session=1")], b"; ")
def test_the_cookie_scan_reads_as_the_pairs_do(pairs, sep: bytes) -> None:
    from pyshm.session_cookie import cookie_value

    header = sep.join(k + b"=" + v for k, v in pairs)
    assert cookie_value(header) == _cookie_value_by_pairs(header)
