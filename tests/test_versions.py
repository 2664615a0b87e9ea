"""Versions, freeing, HeapFull and churn."""
from __future__ import annotations

import os

import pytest

import pyshm
from pyshm.procmem import rss


def test_put_while_mapped_keeps_the_snapshot(heap):
    v1 = heap.put("x", {"n": 1, "l": list(range(1000))})
    snap = heap.map("x")
    view = snap.value
    used_one = heap.stats().used_bytes
    v2 = heap.put("x", {"n": 2, "l": []})
    assert v2 > v1
    assert view["n"] == 1 and len(view["l"]) == 1000 and snap.version == v1
    with heap.map("x") as now:
        assert now["n"] == 2
    st = heap.stats()
    assert st.obsolete_versions == 1 and st.pinned_versions == 1 and st.used_bytes > used_one
    snap.release()
    st = heap.stats()
    assert st.obsolete_versions == 0 and st.active_versions == 1
    assert st.used_bytes < used_one  # the old version's memory came back
    heap.check()


def test_delete_frees_and_names(heap):
    va = heap.put("a", [1])
    heap.put("b", [2])
    assert sorted(heap.names()) == ["a", "b"]
    assert "a" in heap and heap.version("a") == va
    heap.delete("a")
    assert heap.names() == ["b"]
    assert "a" not in heap and heap.version("a") is None
    with pytest.raises(pyshm.ClosureNotFound, match="no closure named 'a'"):
        heap.map("a")
    with pytest.raises(KeyError):
        heap.get("a")
    heap.delete("b")
    assert heap.stats().used_bytes == 0
    heap.check()


def test_heap_full_names_sizes(heap):
    with pytest.raises(pyshm.HeapFull) as info:
        heap.put("big", b"x" * (100 << 20))
    msg = str(info.value)
    assert "needs 100.0 MiB" in msg and "largest free block" in msg and "MiB free of" in msg
    assert heap.stats().used_bytes == 0
    heap.put("small", b"x" * (1 << 20))  # still usable


def test_many_names_and_reuse(heap):
    for i in range(2000):
        heap.put(f"n{i}", i)
    assert heap.stats().names == 2000
    for i in range(0, 2000, 2):
        heap.delete(f"n{i}")
    for i in range(2000, 3000):
        heap.put(f"n{i}", i)
    assert heap.get("n1999") == 1999 and heap.get("n2500") == 2500
    assert len(heap.names()) == 2000
    heap.check()


def test_name_too_long(heap):
    with pytest.raises(ValueError, match="1 to 104 bytes"):
        heap.put("x" * 200, 1)


def test_churn_returns_to_the_same_used_bytes(heap):
    """10,000 put/map/release cycles on one name leak nothing."""
    def cycle(i):
        heap.put("session", {"user": "u1", "count": i, "cart": list(range(i % 50))})
        with heap.map("session") as view:
            assert view["count"] == i

    cycle(0)
    after_first = heap.stats().used_bytes
    for i in range(1, 10_000):
        cycle(i)
    cycle(0)
    assert heap.stats().used_bytes == after_first
    heap.check()


def test_large_blob_pages_go_back_to_the_os(heap_name):
    """A replaced version keeps its pages warm for the next put; delete()
    and trim() give them back to the OS."""
    heap = pyshm.SharedHeap.create(heap_name, size="1GiB")
    base = rss(os.getpid())
    heap.put("big", b"\1" * (200 << 20))
    assert rss(os.getpid()) - base > 150 << 20
    heap.delete("big")
    assert rss(os.getpid()) - base < 50 << 20
    heap.put("big", b"\1" * (200 << 20))
    heap.put("big", b"\2" * (200 << 20))
    heap.put("big", b"")  # both big versions freed, pages kept
    assert rss(os.getpid()) - base > 300 << 20
    heap.trim()
    assert rss(os.getpid()) - base < 50 << 20
    heap.check()
    heap.close()
