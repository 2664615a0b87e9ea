"""msgpack-RPC methods the RPC tests serve."""
from __future__ import annotations

import os
import time

import pyshm

notes: list = []


@pyshm.rpc_method
def add(a, b):
    return a + b


@pyshm.rpc_method
def sleep(secs, tag):
    time.sleep(secs)
    return tag


@pyshm.rpc_method
def pid():
    return os.getpid()


@pyshm.rpc_method
def fail(msg):
    raise ValueError(msg)


@pyshm.rpc_method
def note(x):          # a notification target: its result is never sent
    notes.append(x)


@pyshm.rpc_method
def noted():
    return notes


@pyshm.endpoint
class Counter:
    def __init__(self):
        self.n = 0

    def incr(self, by=1):
        self.n += by
        return self.n


@pyshm.endpoint
class Slow:
    """A counter whose step can take a while (to be killed in the middle)."""

    def __init__(self):
        self.n = 0

    def incr(self, secs=0.0):
        time.sleep(secs)
        self.n += 1
        return self.n


@pyshm.endpoint(restorable=False)
class Ephemeral:
    def __init__(self):
        self.n = 0

    def incr(self):
        self.n += 1
        return self.n
