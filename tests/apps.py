"""Applications the server tests run (imported by workers from tests/)."""
from __future__ import annotations

import os
import time


def echo(request) -> bytes:
    """'pid' -> the worker's pid; 'sleep:S:tag' sleeps S seconds; else echoes."""
    data = bytes(request.payload)
    if data == b"pid":
        return str(os.getpid()).encode()
    if data == b"sid":
        return request.session.hex().encode() if request.session else b"none"
    if data.startswith(b"msleep:"):       # sleeps holding a pin on the closure "data"
        from pyshm import application

        _, secs, tag = data.split(b":", 2)
        with application.heap().map("data") as view:
            time.sleep(float(secs))
            return b"%d:%s:%d" % (os.getpid(), tag, view["n"])
    if data.startswith(b"sleep:"):
        _, secs, tag = data.split(b":", 2)
        time.sleep(float(secs))
        return b"%d:%s" % (os.getpid(), tag)
    if data.startswith(b"big:"):
        return bytes(range(256)) * (int(data[4:]) // 256)
    if data == b"boom":
        raise ValueError("boom")
    return data


def suite_a(request) -> bytes:
    return b"A:%d:%s" % (os.getpid(), bytes(request.payload))


def suite_b(request) -> bytes:
    return b"B:%d:%s" % (os.getpid(), bytes(request.payload))


def setup(heap) -> None:
    heap.put("data", {"n": 7, "blob": b"x" * 100_000})
