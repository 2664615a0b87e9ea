"""Applications for the worker-management tests: requests that never end,
workers that grow, huge answers."""
from __future__ import annotations

import os
import time

import pyshm

_hoard: list[bytes] = []


def handle(request) -> bytes:
    """Raw frames: 'pid', 'sleep:S:tag', 'forever:tag' (loops), 'grow:MiB', else echo."""
    data = bytes(request.payload)
    if data == b"pid":
        return str(os.getpid()).encode()
    if data.startswith(b"sleep:"):
        time.sleep(float(data.split(b":")[1]))
        return data
    if data.startswith(b"forever"):
        while True:
            time.sleep(0.05)
    if data.startswith(b"grow:"):
        _hoard.append(b"x" * (int(data[5:]) << 20))
        return str(os.getpid()).encode()
    return data


def wsgi(environ, start_response):
    """HTTP: /pid, /forever (an endless loop), /events (an endless
    generator, as server-sent events), /huge?MiB, /big?KiB, else hello."""
    path, query = environ["PATH_INFO"], environ["QUERY_STRING"]
    if path == "/forever":
        while True:
            time.sleep(0.05)
    if path == "/events":
        start_response("200 OK", [("Content-Type", "text/event-stream")])
        return _events()
    if path == "/huge":
        n = int(query) << 20
        start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(n))])
        return [b"x" * n]
    if path == "/big":
        body = b"y" * (int(query) << 10)
    elif path == "/pid":
        body = str(os.getpid()).encode()
    else:
        body = b"hello"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def _events():
    n = 0
    while True:
        n += 1
        yield b"data: %d\n\n" % n
        time.sleep(0.01)


@pyshm.rpc_method
def add(a, b):
    return a + b


@pyshm.rpc_method
def forever():
    while True:
        time.sleep(0.05)


@pyshm.rpc_method
def pid():
    return os.getpid()
