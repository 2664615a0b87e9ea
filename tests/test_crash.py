"""SIGKILL at any point leaves the heap consistent and its memory reclaimable."""
from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest

import pyshm
from pyshm.heap import FAULTS
from tests.heap_worker import payload

# Fault points passed with the heap lock held: the survivor must repair.
LOCK_HELD = {"alloc_split", "alloc_used", "publish_dir", "publish_old", "free_merge", "pin",
             "unpin", "dir_insert"}


def test_kill_while_holding_pins(heap, heap_name, procs):
    heap.put("x", payload(1))
    holder = procs.start("hold", heap_name, "x")
    assert json.loads(holder.stdout.readline())["version"] == 1
    heap.put("x", payload(2))  # version 1 is obsolete, pinned by the holder
    with_pin = heap.stats()
    assert with_pin.obsolete_versions == 1 and with_pin.pinned_versions == 1
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    report = heap.reclaim()
    assert report.dead_readers == 1 and report.freed_versions == 1
    st = heap.stats()
    assert st.obsolete_versions == 0 and st.pinned_versions == 0 and st.readers == 1
    heap.check()
    heap.delete("x")
    assert heap.stats().used_bytes == 0


@pytest.mark.parametrize("point", sorted(FAULTS))
def test_kill_at_fault_point(heap, heap_name, procs, point):
    heap.put("x", payload(1))
    heap.put("hole", payload(9, 5))
    heap.put("keep", payload(8, 5))
    heap.delete("hole")  # a free hole after x, too small for x: freeing x merges with it
    baseline = heap.stats().used_bytes
    name = "new" if point == "dir_insert" else "x"
    child = procs.start("fault", heap_name, point, name, "2")
    out, _ = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, (point, out)  # it died at the fault point
    # Other processes go on: the lock is not left held (a hang would time out).
    heap.put("after", payload(3))
    assert heap.get("after") == payload(3)
    assert heap.get("x") in (payload(1), payload(2))
    if point in LOCK_HELD:
        assert heap.stats().repairs == 1
    heap.reclaim()
    heap.check()
    heap.delete("after")
    if "new" in heap.names():
        assert heap.get("new") == payload(2)
        heap.delete("new")
    st = heap.stats()
    assert st.used_bytes == baseline, (point, st)
    assert st.building_versions == 0 and st.obsolete_versions == 0 and st.pinned_versions == 0


def test_random_kills(heap, heap_name, procs):
    """Kill a busy process at random points, many times; after each kill the
    heap works and checks out; at the end all memory is back."""
    rnd = random.Random(2024)
    repairs_seen = 0
    for i in range(60):
        child = procs.start("churn", heap_name, str(i))
        json.loads(child.stdout.readline())
        time.sleep(rnd.uniform(0.0, 0.1))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        heap.put("mine", {"round": i})
        with heap.map("mine") as view:
            assert view["round"] == i
        heap.reclaim()
        heap.check()
        repairs_seen = heap.stats().repairs
    for name in heap.names():
        heap.delete(name)
    heap.reclaim()
    st = heap.stats()
    assert st.used_bytes == 0 and st.names == 0 and st.readers == 1
    heap.check()
    print(f"lock repairs after a death: {repairs_seen} of 60 kills")
