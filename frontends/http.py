"""HTTP/1.1 (and 1.0) as a sans-IO front-end, parsed by httptools (llhttp).

Keep-alive, pipelining (answers in order), chunked request bodies,
`Expect: 100-continue`, HEAD, `Connection: close`.  Limits answer with their
status and close: header section over max_header -> 431, body over max_body
-> 413 (refused when the headers announce it, before any body byte is
kept), malformed -> 400, a request not whole within request_timeout -> 408.

Between this front-end and a WSGI worker (pyshm.wsgi) a request travels as
`encode_request` and the answer as `encode_response`: a 4-byte length, a
msgpack header, then the body bytes, so the body is read in place."""
from __future__ import annotations

import logging
import struct
import time
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus

import httptools
import msgpack

from pyshm.frontend import SHUTTING_DOWN, TOO_LARGE, UNAVAILABLE, Event, FrontEnd, ProtocolError, Request, Send
from pyshm.sizes import parse_size

access_log = logging.getLogger("pyshm.access")
_LEN = struct.Struct(">I")
FEED_PIECE = 8192     # bytes fed to the parser at a time, so header limits bite early


# -- the wire format between front-end and worker --------------------------------------

@dataclass
class RequestHead:
    method: str
    target: bytes
    version: str          # "1.1" or "1.0"
    keep_alive: bool
    headers: list[tuple[bytes, bytes]]
    server: tuple[str, int]


def encode_request(head: RequestHead, body: bytes) -> bytes:
    packed = msgpack.packb([head.method, head.target, head.version, head.keep_alive, head.headers,
                            list(head.server)])
    return _LEN.pack(len(packed)) + packed + body


def decode_request(payload: memoryview) -> tuple[RequestHead, memoryview]:
    (n,) = _LEN.unpack_from(payload)
    method, target, version, keep_alive, headers, server = msgpack.unpackb(payload[4:4 + n])
    return (RequestHead(method, target, version, keep_alive, [tuple(h) for h in headers], (server[0], server[1])),
            payload[4 + n:])


def render_response(head: RequestHead, status: str, headers: list[tuple[str, str]], chunks: list[bytes],
                    streamed: bool) -> list[bytes]:
    """The whole HTTP answer as parts to write one after another, built in
    the worker (the manager only sends it).  streamed: the application gave
    no Content-Length and yielded its body piece by piece: chunked on
    HTTP/1.1."""
    lines = [f"HTTP/{head.version} {status}"]
    has_length = False
    for name, value in headers:
        lname = name.lower()
        if lname.encode() in _HOP:
            continue
        has_length |= lname == "content-length"
        lines.append(f"{name}: {value}")
    code = int(status[:3])
    bodiless = code in (204, 304) or 100 <= code < 200
    chunked = False
    if not has_length and not bodiless:
        if streamed and head.version == "1.1":
            chunked = True
            lines.append("transfer-encoding: chunked")
        else:
            lines.append(f"content-length: {sum(len(c) for c in chunks)}")
    lines.append(f"date: {_date()}")
    lines.append("server: pyshm")
    if not head.keep_alive:
        lines.append("connection: close")
    elif head.version == "1.0":
        lines.append("connection: keep-alive")
    out = [("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")]
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


# -- the front-end ---------------------------------------------------------------------------

class _Limit(Exception):
    def __init__(self, status: int, why: str) -> None:
        self.status, self.why = status, why


def simple_response(status: int, text: str, *, close: bool, version: str = "1.1") -> bytes:
    body = (text + "\n").encode()
    phrase = HTTPStatus(status).phrase
    conn = "close" if close else "keep-alive"
    return (f"HTTP/{version} {status} {phrase}\r\ncontent-type: text/plain; charset=utf-8\r\n"
            f"content-length: {len(body)}\r\nconnection: {conn}\r\ndate: {_date()}\r\n"
            f"server: pyshm\r\n\r\n").encode() + body


_date_cache = (0, "")


def _date() -> str:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]


_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"proxy-connection"}
_ERROR_STATUS = {UNAVAILABLE: 503, SHUTTING_DOWN: 503, TOO_LARGE: 413}


class HttpFrontEnd(FrontEnd):
    name = "http"
    # Keep-alive connections idle 75 s at most (nginx's default); a request
    # has 30 s to arrive whole.
    defaults = {"max_header": 65536, "max_body": 16 << 20, "access_log": False, "idle_timeout": 75.0,
                "request_timeout": 30.0}

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        self.max_header = parse_size(self.options["max_header"])
        self.max_body = parse_size(self.options["max_body"])
        self.access_log = bool(self.options["access_log"])
        self.parser = httptools.HttpRequestParser(self)
        self.server = ("", 0)
        self.peer = ""
        self._events: list[Event] = []
        self._dead = False
        self._in_message = False
        self._in_headers = False
        self._header_bytes = 0
        self._limit: _Limit | None = None   # what a callback refused (httptools wraps its exception)
        self._reset()

    def _reset(self) -> None:
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body = bytearray()
        self._header_bytes = 0

    def connection_made(self, peer: str, server: tuple[str, int]) -> None:
        self.peer, self.server = peer, server

    # -- bytes in ----------------------------------------------------------------------

    def receive(self, data: bytes) -> list[Event]:
        if self._dead:
            return []
        self._events = []
        try:
            for i in range(0, len(data), FEED_PIECE):
                piece = data[i:i + FEED_PIECE]
                if not self._in_message or self._in_headers:
                    self._header_bytes += len(piece)
                self.parser.feed_data(piece)
                if self._dead:
                    break
                if (self._in_headers or not self._in_message) and self._header_bytes > self.max_header:
                    raise _Limit(431, "request header section too large")
        except _Limit as lim:
            self._fail(lim.status, lim.why)
        except httptools.HttpParserCallbackError:
            lim = self._limit
            if lim is None:
                raise
            self._fail(lim.status, lim.why)
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as e:
            self._fail(400, f"malformed request: {e}")
        return self._events

    def _refuse(self, status: int, why: str) -> None:
        """From a parser callback: stop parsing with this answer."""
        self._limit = _Limit(status, why)
        raise self._limit

    def _fail(self, status: int, why: str) -> None:
        self._dead = True
        self._events.append(ProtocolError(why, simple_response(status, why, close=True)))

    def eof(self) -> list[Event]:
        if self._in_message and not self._dead:
            self._dead = True
            return [ProtocolError("connection closed in the middle of a request")]
        return []

    def partial(self) -> bool:
        return self._in_message

    def timeout_reply(self) -> bytes:
        return simple_response(408, "request not received in time", close=True)

    # -- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_message = True
        self._in_headers = True
        self._reset()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_headers = False
        if len(self._url) + sum(len(n) + len(v) + 4 for n, v in self._headers) > self.max_header:
            self._refuse(431, "request header section too large")
        for name, value in self._headers:
            lname = name.lower()
            if lname == b"content-length":
                if not value.strip().isdigit():
                    self._refuse(400, "bad content-length")
                if int(value) > self.max_body:
                    self._refuse(413, f"request body of {int(value)} bytes is over the limit of {self.max_body}")
            elif lname == b"expect" and value.lower() == b"100-continue" and self.parser.get_http_version() == "1.1":
                self._events.append(Send(b"HTTP/1.1 100 Continue\r\n\r\n"))

    def on_body(self, body: bytes) -> None:
        if len(self._body) + len(body) > self.max_body:
            self._refuse(413, f"request body over the limit of {self.max_body} bytes")
        self._body += body

    def on_message_complete(self) -> None:
        self._in_message = False
        version = self.parser.get_http_version()
        keep_alive = self.parser.should_keep_alive()
        method = self.parser.get_method().decode("ascii", "replace")
        head = RequestHead(method, self._url, version, keep_alive, self._headers, self.server)
        self._events.append(Request(encode_request(head, bytes(self._body)), route=self._url.split(b"?", 1)[0],
                                    meta=head))
        if not keep_alive:
            self._dead = True      # nothing after a request that closes the connection
        self._reset()

    # -- bytes out --------------------------------------------------------------------------

    def keep_alive(self, request: Request) -> bool:
        return request.meta.keep_alive

    def response(self, request: Request, body: bytes, *, error: str | None) -> bytes:
        head: RequestHead = request.meta
        if error is not None:
            status = _ERROR_STATUS.get(error, 500)
            text = HTTPStatus(status).phrase if status == 500 else body.decode("utf-8", "replace")
            body = simple_response(status, text, close=not head.keep_alive, version=head.version)
        if self.access_log:
            self._log(head, int(body[9:12]), len(body) - body.find(b"\r\n\r\n") - 4)
        return body   # the worker rendered it (render_response)

    def _log(self, head: RequestHead, status: int, size: int) -> None:
        host = self.peer.rsplit(":", 1)[0]
        when = time.strftime("%d/%b/%Y:%H:%M:%S %z")
        target = head.target.decode("latin-1")
        access_log.info('%s - - [%s] "%s %s HTTP/%s" %d %d', host, when, head.method, target, head.version,
                        status, size)
