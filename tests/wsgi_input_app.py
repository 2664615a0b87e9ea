"""A WSGI application for tests/test_http_hostile.py: wsgi.input read piece
by piece, the environ a request produced, and headers the application sets
itself.  Every request's method and path is appended to requests.log in the
server's working directory, so a test can tell which requests ran."""
from __future__ import annotations

import json
import os

# The reads /reads performs, in order; the test replays them on io.BytesIO.
READS = [("read", 3), ("readline", None), ("read", 0), ("readline", 4), ("readline", None), ("read", 2),
         ("readlines", None), ("read", None), ("read", 5)]


def _reads(f) -> list:
    out = []
    for op, arg in READS:
        got = getattr(f, op)() if arg is None else getattr(f, op)(arg)
        out.append([x.decode("latin-1") for x in got] if isinstance(got, list) else got.decode("latin-1"))
    return out


def app(environ, start_response):
    path = environ["PATH_INFO"]
    with open(os.path.join(os.getcwd(), "requests.log"), "a") as log:
        log.write(f"{environ['REQUEST_METHOD']} {path}\n")
    headers = [("Content-Type", "text/plain")]
    if path == "/reads":
        body = json.dumps(_reads(environ["wsgi.input"])).encode()
    elif path == "/echo":
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    elif path == "/environ":
        keys = ("REQUEST_METHOD", "PATH_INFO", "QUERY_STRING", "HTTP_HOST", "HTTP_UPGRADE", "SERVER_PROTOCOL")
        body = json.dumps({k: environ.get(k) for k in keys}).encode()
    elif path == "/own-headers":
        headers += [("Date", "Mon, 01 Jan 2024 00:00:00 GMT"), ("SERVER", "myapp/1.0")]
        body = b"own"
    else:
        body = b"ok"
    start_response("200 OK", headers + [("Content-Length", str(len(body)))])
    return [body]
