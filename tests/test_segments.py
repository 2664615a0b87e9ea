"""Segments: create/attach errors, layout versions, fork, clean, CLI."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest

import pyshm
from pyshm import segments
from pyshm.native import unlink


def test_create_twice_and_attach_missing(heap, heap_name):
    with pytest.raises(pyshm.SegmentExists):
        pyshm.SharedHeap.create(heap_name, size="64MiB")
    with pytest.raises(ValueError, match="too small for tables of 16384 names"):
        pyshm.SharedHeap.create(heap_name + "-small", size="1MiB")
    with pytest.raises(pyshm.SegmentNotFound):
        pyshm.SharedHeap.attach(heap_name + "-missing")
    assert oct(os.stat(f"/dev/shm/pyshm.{heap_name}").st_mode & 0o777) == "0o600"


def _raw_segment(name, header: bytes):
    fd = os.open(f"/dev/shm/pyshm.{name}", os.O_CREAT | os.O_RDWR, 0o600)
    os.ftruncate(fd, 1 << 20)
    os.pwrite(fd, header, 0)
    os.close(fd)


def test_other_layout_version_is_refused(heap_name):
    magic = int.from_bytes(b"PYSHM1", "little")
    _raw_segment(heap_name, struct.pack("<QIIQqQQ", magic, 999, 1, 1 << 20, 1, 1, 1))
    with pytest.raises(pyshm.LayoutMismatch, match="another pyshm layout version"):
        pyshm.SharedHeap.attach(heap_name)


def test_garbage_segment_is_refused(heap_name):
    _raw_segment(heap_name, b"not a pyshm segment at all")
    with pytest.raises(pyshm.SegmentError, match="not a pyshm segment"):
        pyshm.SharedHeap.attach(heap_name)


def test_forked_child_gets_its_own_reader_slot(heap):
    heap.put("x", {"n": 1})
    with heap.map("x") as view:
        pid = os.fork()
        if pid == 0:  # child: inherits the parent's snapshot, maps on its own
            ok = view["n"] == 1
            with heap.map("x") as mine:
                ok = ok and mine["n"] == 1
            ok = ok and heap.stats().readers == 2
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    assert heap.reclaim().dead_readers == 1  # the child exited without detaching
    assert heap.stats().pinned_versions == 0


def test_clean_removes_orphans_only(heap, heap_name):
    orphan = heap_name + "-orphan"
    code = ("import pyshm; h = pyshm.SharedHeap.create(%r, size='16MiB'); h.put('x', 1); "
            "import os; os._exit(0)" % orphan)
    subprocess.run([sys.executable, "-c", code], check=True)
    try:
        names = {s.name: s for s in segments.list_segments()}
        assert names[orphan].orphaned and not names[heap_name].orphaned
        out = subprocess.run([sys.executable, "-m", "pyshm.cli", "clean"], capture_output=True,
                             text=True, check=True).stdout
        assert f"removed {orphan}" in out
        assert not os.path.exists(f"/dev/shm/pyshm.{orphan}")
        assert os.path.exists(f"/dev/shm/pyshm.{heap_name}")
    finally:
        if os.path.exists(f"/dev/shm/pyshm.{orphan}"):
            unlink(orphan)


def test_heap_stats_cli(heap, heap_name):
    heap.put("catalog", {"a": list(range(100))})
    out = subprocess.run([sys.executable, "-m", "pyshm.cli", "heap", "stats", heap_name],
                         capture_output=True, text=True, check=True).stdout
    assert f"heap {heap_name}" in out and "catalog" in out and "closures 1/" in out
    data = json.loads(subprocess.run([sys.executable, "-m", "pyshm.cli", "heap", "stats", heap_name,
                                      "--json"], capture_output=True, text=True, check=True).stdout)
    assert data["names"] == 1 and data["closures"][0]["name"] == "catalog"
    bad = subprocess.run([sys.executable, "-m", "pyshm.cli", "heap", "stats", heap_name + "-nope"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "attach heap" in bad.stderr


def test_corrupt_header_offsets_are_refused(heap, heap_name):
    """Offsets read from the segment header are checked before use."""
    heap.close()
    fd = os.open(f"/dev/shm/pyshm.{heap_name}", os.O_RDWR)
    try:
        dir_cap_at = 128 + 40 + 3 * 8  # seg header, mutex, readers_off, n_readers, dir_off
        os.pwrite(fd, struct.pack("<Q", 3), dir_cap_at)  # not a power of two
    finally:
        os.close(fd)
    with pytest.raises(pyshm.HeapCorrupt):
        pyshm.SharedHeap.attach(heap_name)
