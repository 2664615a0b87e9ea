"""Mapped views: read-only, lazy, released safely; shareable classes;
shared references and cycles."""
from __future__ import annotations

import dataclasses
import gc
from collections.abc import Mapping, Sequence

import numpy as np
import pytest

import pyshm


@pyshm.shareable
@dataclasses.dataclass
class Item:
    name: str
    price: float
    tags: list

    def label(self):
        return f"{self.name} ({self.price})"

    @property
    def expensive(self):
        return self.price > 10


@pyshm.shareable
@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int


@pyshm.shareable
class Slotted:
    __slots__ = ("a", "b")

    def __init__(self, a, b):
        self.a = a
        self.b = b

    def __eq__(self, other):
        return type(other) is Slotted and (self.a, self.b) == (other.a, other.b)


@pyshm.shareable
class Node:
    def __init__(self):
        self.refs = []


def test_views_are_read_only(heap):
    heap.put("x", {"l": [1, 2], "b": b"abc", "a": np.arange(4), "o": Item("pen", 1.5, [])})
    with heap.map("x") as view:
        with pytest.raises(TypeError):
            view["new"] = 1
        with pytest.raises(TypeError):
            del view["l"]
        with pytest.raises(TypeError):
            view["l"][0] = 5
        with pytest.raises(TypeError):
            view["b"][0] = 1
        assert view["b"].readonly
        assert not view["a"].flags.writeable
        with pytest.raises(ValueError):
            view["a"][0] = 9
        with pytest.raises(TypeError):
            view["o"].name = "x"


def test_views_are_collections_abc(heap):
    heap.put("x", {"l": [1], "t": (1, 2), "s": {1}})
    with heap.map("x") as view:
        assert isinstance(view, Mapping)
        assert isinstance(view["l"], Sequence) and view["l"] == [1] and view["l"] != (1,)
        assert view["t"] == (1, 2) and view["t"] != [1, 2]
        assert view["s"] == {1} and 1 in view["s"] and 2 not in view["s"]
        assert dict(view.items())["t"] == (1, 2)
        assert view.get("missing", 5) == 5
        with pytest.raises(KeyError):
            view["missing"]
        with pytest.raises(IndexError):
            view["l"][1]


def test_use_after_release_raises(heap):
    heap.put("x", {"d": {"k": [1, 2]}, "l": [1]})
    snap = heap.map("x")
    view = snap.value
    inner, lst = view["d"], view["l"]
    snap.release()
    for action in (lambda: view["d"], lambda: inner["k"], lambda: lst[0], lambda: len(view),
                   lambda: list(lst), lambda: "k" in inner):
        with pytest.raises(pyshm.ClosureReleased, match="'x' version"):
            action()
    with pytest.raises(pyshm.ClosureReleased):
        snap.value


def test_buffers_keep_their_version_pinned(heap):
    heap.put("x", {"b": b"x" * 100_000, "a": np.arange(100_000)})
    with heap.map("x") as view:
        mv = view["b"]
        arr = view["a"]
    heap.put("x", {})  # the old version is obsolete but still pinned
    assert heap.stats().pinned_versions == 1
    assert bytes(mv[:3]) == b"xxx" and int(arr[-1]) == 99_999  # still readable, not freed
    del mv
    assert heap.stats().obsolete_versions == 1
    del arr
    gc.collect()
    st = heap.stats()
    assert st.obsolete_versions == 0 and st.pinned_versions == 0
    heap.check()


def test_shareable_classes(heap):
    item = Item("pen", 12.5, ["office"])
    x = {"item": item, "p": Point(1, 2), "s": Slotted(1, [2])}
    heap.put("x", x)
    got = heap.get("x")
    assert got == x and type(got["item"]) is Item and type(got["s"]) is Slotted
    assert got["item"] is not item
    with heap.map("x") as view:
        mi = view["item"]
        assert mi.name == "pen" and mi.tags == ["office"]
        assert mi.label() == "pen (12.5)" and mi.expensive
        assert mi == item and item == mi
        assert view["p"] == Point(1, 2)
        assert view["s"].b == [2]
        with pytest.raises(AttributeError):
            mi.missing
        assert mi.copy() == item


def test_shared_references_and_cycles_are_kept(heap):
    shared = {"k": 1}
    cyclic = []
    cyclic.append(cyclic)
    d = {}
    d["self"] = d
    lst = []
    tup = (lst, 1)
    lst.append(tup)
    item = Item("loop", 1.0, [])
    item.tags.append(item)
    fs_holder = Node()
    fs = frozenset([fs_holder])
    fs_holder.refs.append(fs)
    heap.put("x", {"a": shared, "b": [shared], "cyc": cyclic, "d": d, "tup": tup, "item": item,
                   "fs": fs})
    got = heap.get("x")
    assert got["a"] is got["b"][0]
    assert got["cyc"][0] is got["cyc"]
    assert got["d"]["self"] is got["d"]
    assert got["tup"][0][0] is got["tup"]
    assert got["item"].tags[0] is got["item"]
    (holder,) = got["fs"]
    assert holder.refs[0] is got["fs"]
    with heap.map("x") as view:
        assert view["cyc"][0][0][0] == view["cyc"]
        assert view["d"]["self"]["self"]["self"] == view["d"]


def test_dict_keys_of_unhashable_stable_type_scan(heap):
    """Keys without a stable hash (shareable instances) still look up."""
    p = Point(1, 2)
    heap.put("x", {p: "a", Point(3, 4): "b"})
    with heap.map("x") as view:
        assert view[Point(1, 2)] == "a" and view[Point(3, 4)] == "b"
        assert Point(5, 6) not in view


def test_stable_hash_is_stable_across_processes():
    import subprocess
    import sys

    from pyshm._codec import stable_hash_of

    code = "from pyshm._codec import stable_hash_of as h; print(h('abc'), h((1, 'x')), h(1.0))"
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345"}).stdout.split()
    assert got == [str(stable_hash_of("abc")), str(stable_hash_of((1, "x"))), str(stable_hash_of(1))]
