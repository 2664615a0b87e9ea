"""Odd and hostile HTTP over a real socket: every request answered exactly
once (Upgrade, CONNECT, HTTP/0.9, HTTP/1.0 with Transfer-Encoding, a
request smuggled behind it), absolute-form targets, an application's own
Date and Server headers, and wsgi.input read piece by piece."""
from __future__ import annotations

import io
import json
import socket

import pytest

from server_util import free_port, one_suite
from wsgi_input_app import READS

CAP = 1 << 20     # no test here expects more; a runaway answer fails instead of looping


@pytest.fixture
def web(serve):
    port = free_port()
    serve(one_suite("http", port, "wsgi_input_app:app", workers=1), port)
    return port


def exchange(port: int, data: bytes) -> bytes:
    """Sends data, reads until the server closes (bounded by the socket
    timeout and CAP)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        out = b""
        while len(out) < CAP and (chunk := s.recv(65536)):
            out += chunk
        return out


def responses(data: bytes) -> list[tuple[str, dict[str, list[str]], bytes]]:
    """(status line, headers by lower-case name, body) of each answer."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"an incomplete answer: {data[:300]!r}"
        status, *lines = head.decode("latin-1").split("\r\n")
        headers: dict[str, list[str]] = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        n = int(headers["content-length"][0])
        out.append((status, headers, rest[:n]))
        data = rest[n:]
    return out


LAST = b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def ran(port: int, tmp_path) -> list[str]:
    """The requests the application ran, in order, before a probe request
    sent now: the one worker runs requests in turn, so anything submitted
    before has run by the time the probe is answered."""
    assert responses(exchange(port, LAST))[0][2] == b"ok"
    log = (tmp_path / "requests.log").read_text().splitlines()
    assert log[-1] == "GET /last"
    return log[:-1]


def test_websocket_upgrade_is_ignored_and_answered_once(web, tmp_path):
    out = exchange(web, b"GET /environ HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n" + LAST)
    (first, last) = responses(out)
    assert first[0] == "HTTP/1.1 200 OK" and json.loads(first[2])["HTTP_UPGRADE"] is None
    assert last[0] == "HTTP/1.1 200 OK" and last[2] == b"ok"        # the connection went on
    assert ran(web, tmp_path) == ["GET /environ", "GET /last"]


def test_h2c_upgrade_with_a_body_is_answered_once_with_its_body(web, tmp_path):
    out = exchange(web, b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                        b"HTTP2-Settings: AAMAAABkAAQAAP__\r\nContent-Length: 11\r\n\r\nhello h2c !" + LAST)
    assert [(status, body) for status, _, body in responses(out)] == [("HTTP/1.1 200 OK", b"hello h2c !"),
                                                                      ("HTTP/1.1 200 OK", b"ok")]
    assert ran(web, tmp_path) == ["POST /echo", "GET /last"]


def test_connect_is_answered_once_with_501_and_the_connection_closed(web, tmp_path):
    out = exchange(web, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n" + LAST)
    ((status, headers, _),) = responses(out)
    assert status == "HTTP/1.1 501 Not Implemented" and headers["connection"] == ["close"]
    assert ran(web, tmp_path) == []


@pytest.mark.parametrize("request_line", [b"GET /", b"GET / HTTP/2.0", b"GET / HTTP/1.2"])
def test_http09_and_other_versions_get_505(web, tmp_path, request_line):
    out = exchange(web, request_line + b"\r\n\r\n")
    ((status, _, _),) = responses(out)
    assert status == "HTTP/1.1 505 HTTP Version Not Supported" and b"0.9" not in out
    assert ran(web, tmp_path) == []


def test_http10_chunked_is_answered_then_closed_and_nothing_smuggled_runs(web, tmp_path):
    out = exchange(web, b"POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
                        b"5\r\nhello\r\n0\r\n\r\n" + b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
    ((status, headers, body),) = responses(out)
    assert status == "HTTP/1.0 200 OK" and headers["connection"] == ["close"] and body == b"hello"
    assert ran(web, tmp_path) == ["POST /echo"]


def test_transfer_encoding_with_content_length_is_refused(web, tmp_path):
    out = exchange(web, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"5\r\nhello\r\n0\r\n\r\n")
    ((status, _, _),) = responses(out)
    assert status == "HTTP/1.1 400 Bad Request" and ran(web, tmp_path) == []


def test_absolute_form_target_reaches_the_application_as_path_and_host(web):
    out = exchange(web, b"GET http://example.com/environ?q=1 HTTP/1.1\r\nHost: other.example\r\n"
                        b"Connection: close\r\n\r\n")
    ((status, _, body),) = responses(out)
    env = json.loads(body)
    assert status == "HTTP/1.1 200 OK"
    assert (env["PATH_INFO"], env["QUERY_STRING"], env["HTTP_HOST"]) == ("/environ", "q=1", "example.com")


def test_the_applications_own_date_and_server_are_not_doubled(web):
    out = exchange(web, b"GET /own-headers HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    ((_, headers, body),) = responses(out)
    assert body == b"own"
    assert headers["date"] == ["Mon, 01 Jan 2024 00:00:00 GMT"] and headers["server"] == ["myapp/1.0"]
    ((_, headers, _),) = responses(exchange(web, LAST))
    assert len(headers["date"]) == 1 and headers["server"] == ["pyshm"]


@pytest.mark.parametrize("chunked", [False, True])
def test_wsgi_input_partial_reads_end_to_end(web, chunked):
    body = b"abcdef\nghij\nkl\n\nmnopq\nrest without newline"
    if chunked:
        framing = b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(
            b"%x\r\n%s\r\n" % (len(body[i:i + 5]), body[i:i + 5]) for i in range(0, len(body), 5)) + b"0\r\n\r\n"
    else:
        framing = b"Content-Length: %d\r\n\r\n" % len(body) + body
    out = exchange(web, b"POST /reads HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + framing)
    ((status, _, got),) = responses(out)
    ref = io.BytesIO(body)
    expected = []
    for op, arg in READS:
        r = getattr(ref, op)() if arg is None else getattr(ref, op)(arg)
        expected.append([x.decode() for x in r] if isinstance(r, list) else r.decode())
    assert status == "HTTP/1.1 200 OK" and json.loads(got) == expected
