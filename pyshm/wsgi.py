"""Running a WSGI application (PEP 3333) in a worker.

The request arrives as the HTTP front-end encoded it (pyshm.http11), in
shared memory: `wsgi.input` reads the body in place.  The whole answer is
collected (the application's iterable is drained and closed) and rendered
here as the complete HTTP answer (with a Content-Length, or chunked when the
application streamed it without one), and so is the 500 when the
application fails: the manager only sends it."""
from __future__ import annotations

import io
import logging
import sys
import traceback
from typing import Any, Callable
from urllib.parse import unquote_to_bytes

from pyshm import application
from pyshm.errors import SessionTableFull
from pyshm.http11 import RequestHead, decode_request, error_answer, render_response, split_target
from pyshm.http_sessions import SessionStore

log = logging.getLogger(__name__)


class BodyInput(io.RawIOBase):
    """wsgi.input: a read-only file over the request body in shared memory."""

    def __init__(self, body: memoryview) -> None:
        self._body = body
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), len(self._body) - self._pos)
        b[:n] = self._body[self._pos:self._pos + n]
        self._pos += n
        return n

    def read(self, size: int | None = -1) -> bytes:
        end = len(self._body) if size is None or size < 0 else min(len(self._body), self._pos + size)
        out = bytes(self._body[self._pos:end])
        self._pos = end
        return out

    def readline(self, size: int | None = -1) -> bytes:
        rest = self._body[self._pos:]
        limit = len(rest) if size is None or size < 0 else min(size, len(rest))
        i = bytes(rest[:limit]).find(b"\n")
        return self.read(limit if i < 0 else i + 1)

    def __iter__(self):
        while line := self.readline():
            yield line


def environ_for(head: RequestHead, body: memoryview, peer: str) -> dict[str, Any]:
    """The WSGI environ.  An absolute-form target (http://host/path?query,
    RFC 9112 §3.2.2) gives PATH_INFO /path and HTTP_HOST host, whatever
    the Host header said."""
    method, target, version, headers, server = head.method, head.target, head.version, head.headers, head.server
    authority, path, query = split_target(target)
    env: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": unquote_to_bytes(path).decode("latin-1"),
        "QUERY_STRING": query.decode("latin-1"),
        "RAW_URI": target.decode("latin-1"),
        "SERVER_NAME": server[0],
        "SERVER_PORT": str(server[1]),
        "SERVER_PROTOCOL": f"HTTP/{version}",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": BodyInput(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    host, _, port = peer.rpartition(":")
    env["REMOTE_ADDR"], env["REMOTE_PORT"] = host, port
    for name, value in headers:
        key = name.decode("latin-1").upper()
        if "_" in key:
            continue   # as gunicorn: X_Forwarded could pose as X-Forwarded
        key = key.replace("-", "_")
        val = value.decode("latin-1")
        if key == "CONTENT_TYPE" or key == "CONTENT_LENGTH":
            env[key] = val
            continue
        key = "HTTP_" + key
        env[key] = f"{env[key]},{val}" if key in env else val
    if authority is not None:
        env["HTTP_HOST"] = authority.decode("latin-1")
    if "CONTENT_LENGTH" not in env and len(body):
        env["CONTENT_LENGTH"] = str(len(body))   # a chunked body, now whole
    return env


def call(app: Callable[..., Any], payload: memoryview, peer: str, sessions: SessionStore | None = None,
         sid: bytes | None = None) -> list[bytes]:
    """Runs one request through `app`; returns the answer in parts
    (pyshm.http11: ANSWER, then the HTTP answer), a 500 when the
    application raised.  With a session store, environ["pyshm.session"]
    is the client's session (sid: the id the manager verified from its
    cookie); SessionTableFull (no room for one) propagates:
    the server is unavailable, the application did not fail."""
    head, body = decode_request(payload)
    env = environ_for(head, body, peer)
    env["pyshm.node"] = application.node()
    session = sessions.session_for(sid) if sessions is not None else None
    if session is not None:
        env["pyshm.session"] = session
    try:
        return _run(app, env, head, session)
    except SessionTableFull:
        raise
    except Exception:
        log.error("application error in %s\n%s", head.describe(), traceback.format_exc())
        return error_answer(head, 500)


def _run(app: Callable[..., Any], env: dict[str, Any], head: RequestHead, session: Any) -> list[bytes]:
    """The application's answer, rendered; raises what the application raised."""
    state: dict[str, Any] = {}
    chunks: list[bytes] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable:
        if exc_info is not None:
            try:
                if state.get("sent"):
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif "status" in state:
            raise AssertionError("start_response called twice without exc_info")
        state["status"], state["headers"] = status, list(headers)
        return chunks.append   # the legacy write() callable

    result = app(env, start_response)
    try:
        n_before = len(chunks)
        for piece in result:
            if piece:
                state["sent"] = True
                chunks.append(bytes(piece))
        pieces_yielded = len(chunks) - n_before
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    if "status" not in state:
        raise RuntimeError("the WSGI application returned without calling start_response")
    if session is not None:
        state["headers"] += session.finish()
    has_length = any(k.lower() == "content-length" for k, _ in state["headers"])
    streamed = not has_length and not isinstance(result, (list, tuple)) and pieces_yielded > 1
    return render_response(head, state["status"], state["headers"], chunks, streamed)
