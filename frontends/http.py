"""HTTP/1.1 (and 1.0) as a sans-IO front-end, parsed by httptools (llhttp).

Keep-alive, pipelining (answers in order), chunked request bodies,
`Expect: 100-continue`, HEAD, `Connection: close`.  Limits answer with their
status and close: header section over max_header -> 431, body over max_body
-> 413 (refused when the headers announce it, before any body byte is
kept), malformed -> 400, a request not whole within request_timeout -> 408.

The header section's size is that of its canonical form (request line,
`name: value` lines, CRLFs: the bytes themselves when the client wrote it
so); while it has not ended the bytes received count, so one that never ends
is refused once about max_header bytes have come.

Framing (RFC 9112): every request gets exactly one answer.
- Only HTTP/1.0 and 1.1: HTTP/0.9 (no version), HTTP/2.0 and any other
  version -> 505 (its status line says HTTP/1.1, never 0.9), and close.
- Transfer-Encoding together with Content-Length -> 400 and close (§6.3
  allows refusing or letting chunked win; llhttp refuses, as most servers
  do).  Transfer-Encoding on an HTTP/1.0 request: the request is answered
  and the connection closed, nothing after its body is read (§6.1).
- Upgrade (websocket, h2c) is ignored (RFC 9110 §7.8): the request is
  answered as if it had no Upgrade header, its body included, and the
  connection goes on as HTTP/1.1.  CONNECT -> 501 and close.
- An absolute-form target (`GET http://host/p?q HTTP/1.1`, §3.2.2) routes by
  its path; pyshm.wsgi gives the application PATH_INFO /p, QUERY_STRING q
  and HTTP_HOST host (the target's authority overrides the Host header).

Between this front-end and a WSGI worker (pyshm.wsgi) requests and answers
travel in the format of pyshm.http11, the codec both sides share: the
worker renders every answer the application produced (500 when it failed),
its status code passed as data; this front-end renders only the errors the
manager originates (no worker in time, worker died, timed out, too large,
shutting down) and its own refusals."""
from __future__ import annotations

import logging
import time
from http import HTTPStatus

import httptools

from pyshm.frontend import (NODE_DIED, SHUTTING_DOWN, TIMED_OUT, TOO_LARGE, UNAVAILABLE, Event, FrontEnd,
                            ProtocolError, Request, Send)
from pyshm.http11 import ANSWER, RequestHead, encode_request, read_answer, simple_parts, simple_response, split_target
from pyshm.session_cookie import COOKIE_BYTES, cookie_value
from pyshm.sizes import parse_size

log = logging.getLogger(__name__)
access_log = logging.getLogger("pyshm.access")
FEED_PIECE = 8192     # bytes fed to the parser at a time, so header limits bite early
VERSIONS = ("1.0", "1.1")


# -- the front-end ---------------------------------------------------------------------------

class _Limit(Exception):
    """Raised in a parser callback: answer `status` and close."""

    def __init__(self, status: int, why: str) -> None:
        self.status, self.why = status, why


class _Closed(Exception):
    """Raised in a parser callback: the request just parsed closes the
    connection, so nothing after it is parsed."""


_SKIP = ANSWER.size
_COPY_MAX = 8192       # smaller answers are copied past ANSWER: cheaper than a memoryview
_ERROR_STATUS = {UNAVAILABLE: 503, SHUTTING_DOWN: 503, TOO_LARGE: 413, TIMED_OUT: 504, NODE_DIED: 502}


def _parse_error(e: httptools.HttpParserError) -> tuple[int, str]:
    why = str(e) or type(e).__name__
    if why in ("Invalid HTTP version", "Pause on PRI/Upgrade"):   # HTTP/1.2, 3.0; HTTP/2's preface
        return 505, "only HTTP/1.0 and HTTP/1.1 are supported"
    return 400, f"malformed request: {why}"


class HttpFrontEnd(FrontEnd):
    name = "http"
    interface = "wsgi"
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
        self._stop: Exception | None = None   # what a callback raised (httptools wraps it)
        self._replaying = False               # feeding an Upgrade request again, without the Upgrade
        self._upgrading: tuple[bytes, bytes, str, list[tuple[bytes, bytes]]] | None = None
        self._reset()

    def _reset(self) -> None:
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body = bytearray()
        self._header_bytes = 0     # bytes of the header section seen in whole pieces (a lower bound)
        self._transfer_encoding = False   # the request has a Transfer-Encoding header
        self._claim: bytes | None = None  # the session cookie's value, for the manager to verify

    def connection_made(self, peer: str, server: tuple[str, int]) -> None:
        self.peer, self.server = peer, server

    # -- bytes in ----------------------------------------------------------------------

    def receive(self, data: bytes) -> list[Event]:
        if self._dead:
            return []
        self._events = []
        try:
            for i in range(0, len(data), FEED_PIECE):
                self._feed(data[i:i + FEED_PIECE])
                if self._dead:
                    break
                if (self._in_headers or not self._in_message) and self._header_bytes > self.max_header:
                    raise _Limit(431, "request header section too large")
        except _Limit as lim:
            self._fail(lim.status, lim.why)
        except httptools.HttpParserCallbackError as e:
            self._stopped(e)
        except httptools.HttpParserError as e:
            self._fail(*_parse_error(e))
        except Exception as e:   # the parser must not fail the connection's owner on any input
            log.warning("http parser raised %r on input from %s", e, self.peer)
            self._fail(400, "malformed request")
        return self._events

    def _feed(self, piece: bytes) -> None:
        while True:
            if not self._in_message or self._in_headers:
                self._header_bytes += len(piece)
            try:
                self.parser.feed_data(piece)
                return
            except httptools.HttpParserUpgrade as up:
                self._ignore_upgrade()
                piece = piece[up.args[0]:]     # what follows the request's head

    def _ignore_upgrade(self) -> None:
        """RFC 9110 §7.8: a server may ignore Upgrade.  httptools took the
        request as complete without reading its body and stopped; a new
        parser reads it again without the Upgrade header, body included,
        and then the rest of the connection."""
        if self._upgrading is None:
            raise _Limit(400, "unexpected protocol upgrade")
        method, url, version, headers = self._upgrading
        self._upgrading = None
        lines = [b"%s %s HTTP/%s" % (method, url, version.encode())]
        lines += [name + b": " + value for name, value in headers if name.lower() != b"upgrade"]
        self.parser = httptools.HttpRequestParser(self)
        self._replaying = True
        try:
            self.parser.feed_data(b"\r\n".join(lines) + b"\r\n\r\n")
        finally:
            self._replaying = False

    def _stopped(self, e: httptools.HttpParserCallbackError) -> None:
        stop, self._stop = self._stop, None
        if isinstance(stop, _Limit):
            self._fail(stop.status, stop.why)
        elif not isinstance(stop, _Closed):
            log.warning("http parser callback failed (%r) on input from %s", e.__context__ or e, self.peer)
            self._fail(400, "malformed request")

    def _refuse(self, status: int, why: str) -> None:
        """From a parser callback: stop parsing with this answer."""
        self._stop = _Limit(status, why)
        raise self._stop

    def _fail(self, status: int, why: str) -> None:
        self._dead = True
        self._events.append(ProtocolError(why, simple_response(status, why, close=True)))

    def eof(self) -> list[Event]:
        if self._in_message and not self._dead:
            self._dead = True
            return [ProtocolError("connection closed in the middle of a request")]
        return []

    def partial(self) -> bool:
        return self._in_message and not self._dead

    def buffered(self) -> int:
        """Bytes held of a request not yet whole (the parser's own buffer of
        a header line in progress excepted)."""
        return len(self._url) + sum(len(n) + len(v) for n, v in self._headers) + len(self._body)

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
        version = self.parser.get_http_version()
        if version not in VERSIONS:
            self._refuse(505, "only HTTP/1.0 and HTTP/1.1 are supported")
        method = self.parser.get_method()
        if method == b"CONNECT":
            self._refuse(501, "CONNECT is not supported")
        # The canonical size: "METHOD target HTTP/x.y\r\n", "name: value\r\n" each, "\r\n".
        size = len(method) + len(self._url) + 14 + sum(len(n) + len(v) + 4 for n, v in self._headers)
        if size > self.max_header:
            self._refuse(431, "request header section too large")
        for name, value in self._headers:
            lname = name.lower()
            if lname == b"content-length":
                if not value.strip().isdigit():
                    self._refuse(400, "bad content-length")
                if int(value) > self.max_body:
                    self._refuse(413, f"request body of {int(value)} bytes is over the limit of {self.max_body}")
            elif lname == b"transfer-encoding":
                self._transfer_encoding = True
            elif lname == b"cookie" and self._claim is None and COOKIE_BYTES in value:
                self._claim = cookie_value(value) or None
            elif (lname == b"expect" and value.lower() == b"100-continue" and version == "1.1"
                  and not self._replaying):
                self._events.append(Send(b"HTTP/1.1 100 Continue\r\n\r\n"))

    def on_body(self, body: bytes) -> None:
        if len(self._body) + len(body) > self.max_body:
            self._refuse(413, f"request body over the limit of {self.max_body} bytes")
        self._body += body

    def on_message_complete(self) -> None:
        if self.parser.should_upgrade():
            # Its body is unread: _ignore_upgrade reads the request again.
            self._upgrading = (self.parser.get_method(), self._url, self.parser.get_http_version(), self._headers)
            return
        self._in_message = False
        version = self.parser.get_http_version()
        # RFC 9112 §6.1: Transfer-Encoding on HTTP/1.0 means faulty framing: close after it.
        keep_alive = self.parser.should_keep_alive() and not (version == "1.0" and self._transfer_encoding)
        method = self.parser.get_method().decode("ascii", "replace")
        url = self._url
        path = url.partition(b"?")[0] if url[:1] == b"/" else split_target(url)[1]   # origin form first
        head = RequestHead(method, url, version, keep_alive, self._headers, self.server)
        self._events.append(Request(encode_request(head, bytes(self._body)), route=path, meta=head,
                                    claim=self._claim))
        self._reset()
        if not keep_alive:
            self._dead = True      # nothing after a request that closes the connection is parsed
            self._stop = _Closed()
            raise self._stop

    # -- bytes out --------------------------------------------------------------------------

    def keep_alive(self, request: Request) -> bool:
        return request.meta.keep_alive

    def response(self, request: Request, body: bytes, *, error: str | None) -> bytes | memoryview:
        head: RequestHead = request.meta
        if error is None:
            # The worker rendered it (pyshm.http11): ANSWER, then the bytes
            # to send; a large answer is sent from where it is, not copied.
            if self.access_log:
                self._log(head, *read_answer(body))
            return body[_SKIP:] if len(body) <= _COPY_MAX else memoryview(body)[_SKIP:]
        # An error the manager originates; the worker answers the application's own (500) itself.
        status = _ERROR_STATUS.get(error, 500)
        text = HTTPStatus(status).phrase if status == 500 else body.decode("utf-8", "replace")
        http_head, text_body = simple_parts(status, text, close=not head.keep_alive, version=head.version)
        if head.method == "HEAD":
            text_body = b""     # its Content-Length says what a GET would carry
        if self.access_log:
            self._log(head, status, len(text_body))
        return http_head + text_body

    def _log(self, head: RequestHead, status: int, size: int) -> None:
        host = self.peer.rsplit(":", 1)[0]
        when = time.strftime("%d/%b/%Y:%H:%M:%S %z")
        target = head.target.decode("latin-1")
        access_log.info('%s - - [%s] "%s %s HTTP/%s" %d %d', host, when, head.method, target, head.version,
                        status, size)
