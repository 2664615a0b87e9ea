"""Closures put by one process, mapped by separately started processes."""
from __future__ import annotations

import json

import numpy as np

import pyshm
from pyshm.procmem import smaps_rollup
from tests.heap_worker import payload


def test_four_separate_processes_map_one_closure(heap, heap_name, procs):
    version = heap.put("data", payload(7, 500))
    workers = [procs.start("map", heap_name, "data") for _ in range(4)]
    reports = [json.loads(p.stdout.readline()) for p in workers]
    assert len({r["pid"] for r in reports}) == 4
    for r in reports:
        assert r == {"pid": r["pid"], "version": version, "n": 500, "last": "v7-499", "equal": True}
    assert heap.stats().readers == 5
    assert heap.stats().pinned_versions == 1
    for p in workers:
        p.stdin.close()
        assert p.wait(timeout=30) == 0
    assert heap.stats().readers == 1 and heap.stats().pinned_versions == 0


def test_500mb_closure_is_in_memory_once(heap_name, procs):
    """4 processes mapping a 500 MB closure each see all of it (Rss) but
    together cost about 500 MB more, not 2 GB (sum of Pss)."""
    size = 500 << 20
    heap = pyshm.SharedHeap.create(heap_name, size="1GiB")
    data = np.arange(size // 8, dtype=np.uint64)
    expected = int(data[::512].sum())
    heap.put("big", {"data": data})
    del data
    heap.close()  # the parent keeps nothing mapped: only the workers count
    workers = [procs.start("touch", heap_name, "big") for _ in range(4)]
    reports = [json.loads(p.stdout.readline()) for p in workers]
    assert all(r["total"] == expected and r["nbytes"] == size for r in reports)
    rollups = [smaps_rollup(p.pid) for p in workers]
    # Each worker really has the pages mapped...
    assert all(r["Rss"] > 0.9 * size for r in rollups), rollups
    # ...but the shared pages are counted once across the four of them.
    shared_pss = sum(r["Pss_Shmem"] for r in rollups)
    assert 0.9 * size < shared_pss < 1.1 * size, shared_pss
    assert sum(r["Pss"] for r in rollups) < size + 4 * (120 << 20)
    for p in workers:
        p.stdin.close()
        assert p.wait(timeout=30) == 0
