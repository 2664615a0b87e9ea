"""HTTP/1.1 with clients and an application no one here wrote: curl, httpx,
Flask; and every limit over a real socket."""
from __future__ import annotations

import select
import socket
import subprocess
import time

import httpx
import pytest

from server_util import HttpConn, free_port, one_suite, quiescent, status, wait_for, worker_pids


def http_config(port: int, app: str = "wsgi_apps:hello", **kw: object) -> str:
    return one_suite("http", port, app, **kw)


def raw(port: int, data: bytes, *, timeout: float = 10.0) -> bytes:
    """Sends data, reads until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def curl(*args: str) -> str:
    r = subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture
def web(serve):
    port = free_port()
    serve(http_config(port), port)
    return port


def test_curl(web, tmp_path):
    url = f"http://127.0.0.1:{web}"
    assert curl(f"{url}/") == "hello"
    assert curl("-d", "posted", f"{url}/echo") == "posted"
    assert curl("-H", "Transfer-Encoding: chunked", "-d", "chunky", f"{url}/echo") == "chunky"
    head = curl("-I", f"{url}/")
    assert head.startswith("HTTP/1.1 200 OK") and "Content-Length: 5" in head
    assert curl("--http1.0", "-i", f"{url}/").startswith("HTTP/1.0 200 OK")
    big = tmp_path / "big"
    big.write_bytes(b"x" * 300_000)
    out = subprocess.run(["curl", "-sv", "-H", "Expect: 100-continue", "--data-binary", f"@{big}", f"{url}/echo"],
                         capture_output=True, timeout=60)
    assert len(out.stdout) == 300_000 and set(out.stdout) == {ord("x")}
    assert b"HTTP/1.1 100 Continue" in out.stderr
    # Keep-alive: curl reuses one connection for several URLs.
    out = subprocess.run(["curl", "-sv", f"{url}/", f"{url}/echo"], capture_output=True, text=True, timeout=60)
    assert "Re-using existing connection" in out.stderr or "Reusing existing" in out.stderr
    env = curl("-H", "X-Test: yes", f"{url}/environ?a=1&b=%20")
    assert "QUERY_STRING=a=1&b=%20" in env and "HTTP_X_TEST=yes" in env and "SERVER_PROTOCOL=HTTP/1.1" in env


def test_httpx_keep_alive_and_large_bodies(web):
    with httpx.Client(base_url=f"http://127.0.0.1:{web}") as client:
        for i in range(50):
            r = client.post("/echo", content=b"%d" % i)
            assert r.status_code == 200 and r.content == b"%d" % i
        pids = {client.get("/pid").text for _ in range(10)}
        assert len(pids) == 2    # one connection, served by both workers
        r = client.get("/big")
        assert r.content == b"0123456789" * 100_000
        body = bytes(range(256)) * 4000
        assert client.post("/echo", content=body).content == body


def test_pipelined_requests_are_answered_in_order(web):
    reqs = b"".join(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(b"r%d" % i), b"r%d" % i)
                    for i in range(20))
    out = raw(web, reqs + b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    bodies = [part.split(b"\r\n\r\n", 1)[1][:len(b"r%d" % i)] for i, part in enumerate(out.split(b"HTTP/1.1 200 OK")[1:21])]
    assert bodies == [b"r%d" % i for i in range(20)]
    assert out.endswith(b"hello") and out.count(b"HTTP/1.1 200 OK") == 21


def test_flask_app_served_unchanged(serve):
    port = free_port()
    serve(http_config(port, "wsgi_apps:flask_app"), port)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        assert client.get("/").text == "flask index"
        assert client.get("/items/42").json()["id"] == 42
        assert client.get("/nope").status_code == 404
        r = client.post("/form", data={"name": "Ada", "x": "1"})
        assert r.text == "name=Ada;n=2"
        with client.stream("GET", "/stream") as r:
            assert r.headers.get("transfer-encoding") == "chunked"
            assert "".join(r.iter_text()) == "".join(f"chunk {i}\n" for i in range(5))


def test_limits_and_malformed_input(serve):
    port = free_port()
    serve(http_config(port, listen='max_header = "4KiB"\nmax_body = "1KiB"\nrequest_timeout = 1.0\n'
                                   'idle_timeout = 2.0'), port)
    out = raw(port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 431 ")
    # 413 as soon as the headers announce too much: the body is never sent.
    out = raw(port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 413 ")
    chunked = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"400\r\n" + b"a" * 1024 + b"\r\n" * 1
    out = raw(port, chunked + b"10\r\n" + b"b" * 16 + b"\r\n0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 413 ")
    assert raw(port, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw(port, b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    # Slowloris: a request trickling in is cut off after request_timeout.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        t0 = time.monotonic()
        s.sendall(b"GET / HTTP/1.1\r\n")
        got = b""
        try:
            for _ in range(50):              # a header line every 0.1 s, until the server answers
                s.sendall(b"X-A: b\r\n")
                if select.select([s], [], [], 0.1)[0]:
                    got = s.recv(4096)
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert got.startswith(b"HTTP/1.1 408 ") and time.monotonic() - t0 < 3
    # An idle keep-alive connection is closed after idle_timeout.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        t0 = time.monotonic()
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        assert data.endswith(b"hello") and 1.5 < time.monotonic() - t0 < 5
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        assert client.get("/").text == "hello"      # the server goes on


def test_worker_error_is_500_and_no_worker_in_time_is_503(serve):
    port = free_port()
    srv = serve(http_config(port, workers=1, instance="queue_timeout = 0.5"), port)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        r = client.get("/boom")
        assert r.status_code == 500 and "boom" not in r.text      # no traceback leaks to clients
        assert client.get("/").status_code == 200
    with socket.create_connection(("127.0.0.1", port), timeout=10) as busy:
        busy.sendall(b"GET /sleep?2 HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for(lambda: status(srv.name)["slots"]["running"] == 1, "the one worker runs /sleep")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            r = client.get("/")
            assert r.status_code == 503
        assert busy.recv(4096).startswith(b"HTTP/1.1 200 OK")


def test_access_log_is_off_by_default_and_switchable(serve, tmp_path):
    port = free_port()
    srv = serve(http_config(port, listen="access_log = true"), port, verbose=True)
    assert curl(f"http://127.0.0.1:{port}/environ?q=1")
    wait_for(lambda: '"GET /environ?q=1 HTTP/1.1" 200' in srv.output(), lambda: f"an access line in {srv.output()}")
    port2 = free_port()
    srv2 = serve(http_config(port2), port2, verbose=True)
    assert curl(f"http://127.0.0.1:{port2}/") == "hello"
    # The manager logs a request's line before it writes the answer, so any
    # line for this one is in the output already.
    assert "pyshm.access" not in srv2.output() and "GET / HTTP" not in srv2.output()


def test_a_worker_death_is_500_and_the_server_goes_on(serve):
    """A WSGI worker SIGKILLed in the middle of a request: that request is
    answered 500 on its keep-alive connection, which goes on; a replacement
    worker starts; nothing is left in flight."""
    port = free_port()
    srv = serve(http_config(port, "wsgi_apps:tagged", workers=2), port)
    before = set(worker_pids(srv.name))
    conn = HttpConn(port, timeout=10)
    try:
        conn.sock.sendall(b"GET /die HTTP/1.1\r\nHost: x\r\n\r\n")
        code, headers, body = conn.response()
        assert code == 500 and b"died" not in body and headers.get(b"connection") != b"close"
        for i in range(10):                  # the same connection serves on
            conn.send(b"after-%d" % i)
            code, _, body = conn.response()
            assert code == 200 and body.endswith(b":after-%d" % i), (code, body)
    finally:
        conn.close()
    now = wait_for(lambda: len(p := set(worker_pids(srv.name))) == 2 and p, "a replacement worker joined")
    assert len(now & before) == 1, (before, now)      # exactly one worker died and was replaced
    assert status(srv.name)["restarts"] == {"main": 1}
    quiescent(srv.name)
