"""The HTTP/1.1 codec both sides of an HTTP request share: the HTTP
front-end (frontends/http.py, in the manager) and the WSGI worker
(pyshm.wsgi).  The worker imports this module, never the front-end plug-in.

Between front-end and worker:
- a request travels as `encode_request`: a 4-byte length, a msgpack header
  (RequestHead), then the body bytes, so the worker reads the body in place
  (`decode_request`);
- an answer the application produced (its success, or its own failure: 500)
  is rendered whole in the worker (`render_response`, `error_answer`) and
  travels as ANSWER (the status code and the length of the HTTP head, as
  data) followed by the bytes the client receives.  The front-end reads the
  status from ANSWER (`read_answer`) and sends what follows it; the errors
  the manager itself originates it renders with `simple_response`.

The same date cache serves both sides."""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus

import msgpack

_LEN = struct.Struct(">I")
#: Before the HTTP bytes of a worker's answer: status code, length of the HTTP head.
ANSWER = struct.Struct(">HI")
_HOP = {"connection", "keep-alive", "transfer-encoding", "upgrade", "proxy-connection"}


# -- requests ------------------------------------------------------------------------------

@dataclass
class RequestHead:
    method: str
    target: bytes
    version: str          # "1.1" or "1.0"
    keep_alive: bool
    headers: list[tuple[bytes, bytes]]
    server: tuple[str, int]

    def describe(self) -> str:
        """How the log names the request: "GET /cart" (no query)."""
        return f"{self.method} {split_target(self.target)[1][:200].decode('latin-1')}"


def encode_request(head: RequestHead, body: bytes) -> bytes:
    packed = msgpack.packb([head.method, head.target, head.version, head.keep_alive, head.headers,
                            list(head.server)])
    return _LEN.pack(len(packed)) + packed + body


def decode_request(payload: memoryview) -> tuple[RequestHead, memoryview]:
    (n,) = _LEN.unpack_from(payload)
    method, target, version, keep_alive, headers, server = msgpack.unpackb(payload[4:4 + n])
    return (RequestHead(method, target, version, keep_alive, [tuple(h) for h in headers], (server[0], server[1])),
            payload[4 + n:])


def split_target(target: bytes) -> tuple[bytes | None, bytes, bytes]:
    """(authority, path, query) of a request target.  The authority is None
    but for the absolute form (`http://host:port/path?query`, RFC 9112
    §3.2.2), whose path is "/" when empty."""
    authority = None
    scheme, sep, rest = target.partition(b"://")
    if sep and scheme.lower() in (b"http", b"https"):
        cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
        authority, target = rest[:cut].rpartition(b"@")[2], rest[cut:]
        if not target.startswith(b"/"):
            target = b"/" + target
    path, _, query = target.partition(b"?")
    return authority, path, query


# -- answers ---------------------------------------------------------------------------------

def render_response(head: RequestHead, status: str, headers: list[tuple[str, str]], chunks: list[bytes],
                    streamed: bool) -> list[bytes]:
    """The worker's answer as parts to write one after another: ANSWER, the
    HTTP head, the body (the manager only sends what follows ANSWER).
    streamed: the application gave no Content-Length and yielded its body
    piece by piece: chunked on HTTP/1.1.  Date and Server are added unless
    the application set them."""
    lines = [f"HTTP/{head.version} {status}"]
    seen = set()
    for name, value in headers:
        lname = name.lower()
        if lname in _HOP:
            continue
        seen.add(lname)
        lines.append(f"{name}: {value}")
    code = int(status[:3])
    bodiless = code in (204, 304) or 100 <= code < 200
    chunked = False
    if "content-length" not in seen and not bodiless:
        if streamed and head.version == "1.1":
            chunked = True
            lines.append("transfer-encoding: chunked")
        else:
            lines.append(f"content-length: {sum(len(c) for c in chunks)}")
    if "date" not in seen:
        lines.append(f"date: {http_date()}")
    if "server" not in seen:
        lines.append("server: pyshm")
    if not head.keep_alive:
        lines.append("connection: close")
    elif head.version == "1.0":
        lines.append("connection: keep-alive")
    http_head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    out = [ANSWER.pack(code, len(http_head)), http_head]
    if head.method == "HEAD" or bodiless:
        return out
    if chunked:
        for c in chunks:
            if c:
                out += [b"%x\r\n" % len(c), c, b"\r\n"]
        out.append(b"0\r\n\r\n")
    else:
        out += chunks
    return out


def error_answer(head: RequestHead, status: int) -> list[bytes]:
    """The worker's answer when the application failed (500): the same bytes
    the front-end renders for an error it originates, after ANSWER."""
    http_head, body = simple_parts(status, HTTPStatus(status).phrase, close=not head.keep_alive, version=head.version)
    if head.method == "HEAD":
        body = b""          # its Content-Length says what a GET would carry
    return [ANSWER.pack(status, len(http_head)), http_head, body]


def read_answer(answer: bytes) -> tuple[int, int]:
    """(status code, length of the body the client receives) of a worker's
    answer; the client receives answer[ANSWER.size:]."""
    status, head_len = ANSWER.unpack_from(answer)
    return status, len(answer) - ANSWER.size - head_len


def simple_response(status: int, text: str, *, close: bool, version: str = "1.1") -> bytes:
    """A whole answer with `text` as a plain-text body (errors, refusals)."""
    http_head, body = simple_parts(status, text, close=close, version=version)
    return http_head + body


def simple_parts(status: int, text: str, *, close: bool, version: str) -> tuple[bytes, bytes]:
    body = (text + "\n").encode()
    phrase = HTTPStatus(status).phrase
    conn = "close" if close else "keep-alive"
    return (f"HTTP/{version} {status} {phrase}\r\ncontent-type: text/plain; charset=utf-8\r\n"
            f"content-length: {len(body)}\r\nconnection: {conn}\r\ndate: {http_date()}\r\n"
            f"server: pyshm\r\n\r\n").encode(), body


_date_cache = (0, "")


def http_date() -> str:
    """The Date header's value, formatted once a second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]
