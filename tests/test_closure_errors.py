"""put refuses graphs that reach unshareable objects, naming the path."""
from __future__ import annotations

import collections
import io
import socket
import sys
import threading

import pytest

import pyshm


class Unregistered:
    def __init__(self):
        self.x = 1


@pyshm.shareable
class Conn:
    def __init__(self, sock):
        self._sock = sock


def gen():
    yield 1


@pytest.fixture
def sock():
    s = socket.socket()
    yield s
    s.close()


@pytest.fixture
def tmpfile(tmp_path):
    with open(tmp_path / "f", "w") as f:
        yield f


@pytest.mark.parametrize("make, path, words", [
    (lambda s, f: {"db": Conn(s)}, "root['db']._sock", "socket"),
    (lambda s, f: [1, {"log": f}], "root[1]['log']", "open file"),
    (lambda s, f: {"lock": threading.Lock()}, "root['lock']", "lock"),
    (lambda s, f: {"rlock": [threading.RLock()]}, "root['rlock'][0]", "lock"),
    (lambda s, f: {"fn": lambda: 1}, "root['fn']", "function"),
    (lambda s, f: {"fn": len}, "root['fn']", "function"),
    (lambda s, f: (1, sys), "root[1]", "module"),
    (lambda s, f: {"g": gen()}, "root['g']", "generator"),
    (lambda s, f: {"o": Unregistered()}, "root['o']", "@pyshm.shareable"),
    (lambda s, f: {"cls": Unregistered}, "root['cls']", "class"),
    (lambda s, f: {"od": collections.OrderedDict()}, "root['od']", "@pyshm.shareable"),
    (lambda s, f: {frozenset([1]): {Unregistered()}}, "root[frozenset({1})]{", "@pyshm.shareable"),
    (lambda s, f: {Unregistered(): 1}, "root<key ", "@pyshm.shareable"),
])
def test_unshareable_is_refused_with_its_path(heap, sock, tmpfile, make, path, words):
    with pytest.raises(pyshm.ClosureError) as info:
        heap.put("x", make(sock, tmpfile))
    msg = str(info.value)
    assert msg.startswith(path), msg
    assert words in msg
    assert "x" not in heap.names()
    assert heap.stats().used_bytes == 0  # nothing allocated for a refused put


def test_numpy_object_arrays_are_refused(heap):
    np = pytest.importorskip("numpy")
    with pytest.raises(pyshm.ClosureError, match=r"root\['a'\]: a numpy array of Python objects"):
        heap.put("x", {"a": np.array([object()], dtype=object)})


def test_too_deep_nesting_is_a_closure_error(heap):
    x = []
    for _ in range(10000):
        x = [x]
    with pytest.raises(pyshm.ClosureError, match="nesting deeper"):
        heap.put("x", x)


def test_unsupported_time_zone(heap):
    import datetime as dt

    class TZ(dt.tzinfo):
        def utcoffset(self, d):
            return dt.timedelta(0)

    with pytest.raises(pyshm.ClosureError, match=r"root\['t'\]: the time zone"):
        heap.put("x", {"t": dt.datetime(2020, 1, 1, tzinfo=TZ())})
