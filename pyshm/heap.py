"""SharedHeap: named, versioned closures in one shared-memory segment.

    heap = SharedHeap.create("shop", size="2GiB")
    v = heap.put("catalog", obj)          # encode once, publish version v
    with heap.map("catalog") as view:     # O(1), a consistent snapshot
        view["items"][42]["price"]
    local = heap.get("catalog")           # a private deep copy

The C core (pyshm._native) owns the segment, the allocator, the directory
and the reader table; pyshm._codec encodes closures and decodes views.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Iterator

from pyshm import _codec
from pyshm._native import ffi, lib
from pyshm.errors import (
    ClosureNotFound, DirectoryFull, HeapCorrupt, HeapFull, LayoutMismatch, PinLimit,
    PyshmError, ReaderTableFull, SegmentError, SegmentExists, SegmentNotFound,
)
from pyshm.sizes import format_size, parse_size

log = logging.getLogger(__name__)

Snapshot = _codec.Snapshot

# Fault-injection points of csrc/heap.h, for the crash tests.
FAULTS = {
    "alloc_split": 1, "alloc_used": 2, "encode": 3, "publish_dir": 4, "publish_old": 5,
    "free_merge": 6, "pin": 7, "unpin": 8, "dir_insert": 9,
}

_PREFAULT_MIN = 1 << 20  # encodings this large fault their pages in with one call
_UNPIN = int(ffi.cast("uintptr_t", ffi.addressof(lib, "pyshm_heap_unpin")))


def _raise(rc: int, what: str) -> None:
    """Turns a negative C return code into the matching exception."""
    if rc == -1:
        err = ffi.errno
        raise SegmentError(err, f"{what}: {os.strerror(err)}")
    table: dict[int, tuple[type[Exception], str]] = {
        -2: (SegmentError, "not a pyshm segment"),
        -3: (LayoutMismatch, "segment written by another pyshm layout version; "
                             "stop its users and remove it with `pyshm clean --force`"),
        -4: (SegmentError, "segment is not a closure heap"),
        -5: (HeapFull, "heap full"),
        -6: (ClosureNotFound, "no such closure"),
        -7: (HeapCorrupt, "heap consistency check failed"),
        -8: (ReaderTableFull, "reader table full: too many processes attached"),
        -9: (PinLimit, "this process holds too many snapshots of distinct versions; release some"),
        -10: (DirectoryFull, "directory full: create the heap with a larger names="),
        -11: (ValueError, "name must be 1 to 104 bytes (heap names 1 to 200, without '/')"),
        -12: (SegmentExists, "segment exists"),
        -13: (ValueError, "segment too small for its tables"),
        -14: (SegmentError, "segment still being initialised by its creator"),
        -15: (HeapCorrupt, "heap lock not recoverable"),
        -16: (PyshmError, "operation on a version in the wrong state"),
    }
    cls, msg = table.get(rc, (PyshmError, f"error {rc}"))
    raise cls(f"{what}: {msg}")


def open_handle(fn: Any, ctype: str, name: str, what: str, *args: Any, create: bool = False,
                too_small: str = "") -> Any:
    """Calls a C create or attach function of one of the instance's segments
    (request memory, session table) and maps its errors to ones a user can
    act on; returns the handle."""
    out = ffi.new(ctype)
    rc = fn(name.encode(), *args, out)
    if rc == -12:
        raise SegmentExists(f"{what} {name!r} exists: another instance of that name runs, "
                            f"or a dead one left it (`pyshm clean`)")
    if rc == -13:
        raise ValueError(f"{what} {name!r}: {too_small}")
    if rc == -6:
        raise SegmentNotFound(f"no {what} {name!r}: is the instance running?")
    if rc == -7:
        raise HeapCorrupt(f"{what} {name!r}: header fails its layout checks")
    if rc:
        _raise(rc, f"{'create' if create else 'attach'} {what} {name!r}")
    return out[0]


@dataclass(frozen=True)
class HeapStats:
    """What stats() reports.  Sizes are bytes."""
    size: int
    arena_bytes: int
    used_bytes: int
    free_bytes: int
    largest_free: int
    names: int
    active_versions: int
    obsolete_versions: int
    building_versions: int
    pinned_versions: int
    readers: int
    reader_capacity: int
    name_capacity: int
    repairs: int


@dataclass(frozen=True)
class ReclaimReport:
    dead_readers: int
    freed_versions: int


def _table_bytes(names: int, readers: int) -> int:
    """Roughly what csrc/heap.c's layout() reserves before the arena."""
    cap = 16
    while cap < names + names // 2:
        cap *= 2
    return 8192 + readers * (32 + 256 * 16) + cap * 128


class _Native:
    """Owns one process's handle on a heap segment.  Snapshots keep it
    alive, so the segment stays mapped while any view may read it."""

    def __init__(self, ptr: Any) -> None:
        self.ptr = ptr
        self.pid = os.getpid()
        self.addr = int(ffi.cast("uintptr_t", ptr))
        self.ro = lib.pyshm_heap_ro_base(ptr)
        self.rw = lib.pyshm_heap_rw_base(ptr)
        self._lock = threading.Lock()

    def handle(self) -> Any:
        """The handle, with a reader slot of this process's own (after fork)."""
        if self.pid != os.getpid():
            with self._lock:
                if self.pid != os.getpid():
                    rc = lib.pyshm_heap_rebind(self.ptr)
                    if rc:
                        _raise(rc, "attach after fork")
                    self.pid = os.getpid()
        return self.ptr

    def __del__(self) -> None:
        if self.ptr is not None:
            lib.pyshm_heap_detach(self.ptr)
            self.ptr = None


class SharedHeap:
    """A shared closure heap.  Create it once, attach from any process of
    the same user; every method may be called from any thread."""

    def __init__(self, name: str, native: _Native) -> None:
        self.name = name
        self._native: _Native | None = native
        self._fault = 0
        self._seg_size: int | None = None

    # -- lifecycle ----------------------------------------------------------

    @classmethod
    def create(cls, name: str, size: int | str = "256MiB", *, names: int = 16384,
               readers: int = 256) -> SharedHeap:
        """Creates the segment /dev/shm/pyshm.<name> (mode 0600).  `size` is
        a ceiling, not a cost: pages take memory only once written."""
        out = ffi.new("pyshm_heap_t **")
        rc = lib.pyshm_heap_create(name.encode(), parse_size(size), names, readers, out)
        if rc == -13:
            raise ValueError(
                f"create heap {name!r}: {format_size(parse_size(size))} is too small for tables of "
                f"{names} names and {readers} readers (~{format_size(_table_bytes(names, readers))}); "
                f"pass a larger size or smaller names=/readers=")
        if rc:
            _raise(rc, f"create heap {name!r}")
        log.debug("created heap %s (%s)", name, format_size(parse_size(size)))
        return cls(name, _Native(out[0]))

    @classmethod
    def attach(cls, name: str, *, observe: bool = False) -> SharedHeap:
        """Attaches an existing heap.  observe=True takes no reader slot
        (stats and checks only: map() then fails)."""
        out = ffi.new("pyshm_heap_t **")
        rc = lib.pyshm_heap_attach(name.encode(), lib.PYSHM_ATTACH_OBSERVE if observe else 0, out)
        if rc == -6:
            raise SegmentNotFound(f"attach heap {name!r}: no segment /dev/shm/pyshm.{name}; "
                                  f"create the heap first")
        if rc:
            _raise(rc, f"attach heap {name!r}")
        return cls(name, _Native(out[0]))

    @classmethod
    def open(cls, name: str, size: int | str = "256MiB", **kwargs: int) -> SharedHeap:
        """Attaches the heap, creating it first if it does not exist."""
        try:
            return cls.create(name, size, **kwargs)
        except SegmentExists:
            return cls.attach(name)

    def close(self) -> None:
        """Detaches this process.  Snapshots still alive keep the segment
        mapped until they are released."""
        self._native = None

    def unlink(self) -> None:
        """Removes the segment's name; processes attached keep using it."""
        unlink(self.name)

    def __enter__(self) -> SharedHeap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _h(self) -> Any:
        if self._native is None:
            raise PyshmError(f"heap {self.name!r} is closed")
        return self._native.handle()

    # -- closures ------------------------------------------------------------

    def put(self, name: str, obj: Any) -> int:
        """Publishes obj as the next version of `name`; returns the version.
        Raises ClosureError if obj reaches something unshareable, HeapFull if
        the segment cannot hold it.  Readers of older versions are not
        disturbed."""
        enc = _codec.encode(obj)
        h = self._h()
        info = ffi.new("pyshm_pin_info_t *")
        rc = lib.pyshm_heap_alloc(h, enc.nbytes, info)
        if rc == -5:
            st = self.stats()
            raise HeapFull(
                f"put {name!r}: the closure needs {format_size(enc.nbytes)} but the largest free "
                f"block of heap {self.name!r} holds {format_size(st.largest_free)} "
                f"({format_size(st.free_bytes)} free of {format_size(st.arena_bytes)}); "
                f"delete closures, release old snapshots or create a larger heap")
        if rc:
            _raise(rc, f"put {name!r}")
        try:
            if enc.nbytes >= _PREFAULT_MIN:
                lib.pyshm_heap_prefault(h, info.data, info.length)
            half = self._fault == FAULTS["encode"]
            enc.write_into(self._native.rw + info.data, info.length, half)
            if half:
                lib.pyshm_heap_fault_now(h, FAULTS["encode"])
            key = name.encode()
            version = ffi.new("uint64_t *")
            rc = lib.pyshm_heap_publish(h, key, len(key), info.blob, version)
            if rc:
                _raise(rc, f"put {name!r}")
        except BaseException:
            lib.pyshm_heap_abandon(h, info.blob)
            raise
        return int(version[0])

    def map(self, name: str) -> Snapshot:
        """Pins the current version of `name` and returns its Snapshot; use
        it as `with heap.map(name) as view:`.  O(1) whatever the size."""
        h = self._h()
        key = name.encode()
        info = ffi.new("pyshm_pin_info_t *")
        rc = lib.pyshm_heap_pin(h, key, len(key), info)
        if rc:
            if rc == -6:
                raise ClosureNotFound(f"heap {self.name!r} has no closure named {name!r}")
            _raise(rc, f"map {name!r}")
        native = self._native
        return Snapshot(native, name, info.version, native.ro + info.data, info.length,
                        _UNPIN, native.addr, lib.pyshm_heap_slot(h), info.blob)

    def get(self, name: str) -> Any:
        """A private deep copy of the current version of `name`."""
        snap = self.map(name)
        try:
            return snap.get()
        finally:
            snap.release()

    def delete(self, name: str) -> None:
        """Removes `name`; its memory is freed once no snapshot pins it."""
        key = name.encode()
        rc = lib.pyshm_heap_delete(self._h(), key, len(key))
        if rc == -6:
            raise ClosureNotFound(f"heap {self.name!r} has no closure named {name!r}")
        if rc:
            _raise(rc, f"delete {name!r}")

    def __contains__(self, name: str) -> bool:
        return self.version(name) is not None

    def version(self, name: str) -> int | None:
        """The current version of `name`, or None if there is none."""
        key = name.encode()
        version = ffi.new("uint64_t *")
        rc = lib.pyshm_heap_lookup(self._h(), key, len(key), version)
        if rc == -6:
            return None
        if rc:
            _raise(rc, f"look up {name!r}")
        return int(version[0])

    def names(self) -> list[str]:
        return [n for n, _, _ in self.versions()]

    def versions(self) -> Iterator[tuple[str, int, int]]:
        """(name, current version, encoded bytes) of every closure."""
        h = self._h()
        buf = ffi.new("char[]", 128)
        version = ffi.new("uint64_t *")
        length = ffi.new("uint64_t *")
        for i in range(lib.pyshm_heap_name_capacity(h)):
            rc = lib.pyshm_heap_name_at(h, i, buf, 128, version, length)
            if rc < 0:
                _raise(rc, "list names")
            if rc:
                yield ffi.string(buf).decode(), int(version[0]), int(length[0])

    # -- raw buffers (request/response payloads too large for a slot) -------------

    def alloc_buffer(self, nbytes: int) -> tuple[int, int, memoryview]:
        """An unnamed BUILDING blob of nbytes: (blob, data offset, writable
        view).  Freed by free_buffer(), or by a reclaim once its owner died."""
        h = self._h()
        info = ffi.new("pyshm_pin_info_t *")
        rc = lib.pyshm_heap_alloc(h, nbytes, info)
        if rc == -5:
            raise HeapFull(f"heap {self.name!r} has no free block of {format_size(nbytes)} for a payload")
        if rc:
            _raise(rc, "alloc buffer")
        return int(info.blob), int(info.data), ffi.buffer(ffi.cast("char *", self._native.rw + info.data), nbytes)

    def buffer_at(self, data: int, nbytes: int) -> memoryview:
        """A read-only view of nbytes at data offset `data` (bounds checked)."""
        native = self._native
        if native is None:
            raise PyshmError(f"heap {self.name!r} is closed")
        if data < 0 or nbytes < 0 or data + nbytes > self._size():
            raise HeapCorrupt(f"heap {self.name!r}: payload at {data}+{nbytes} is outside the segment")
        return memoryview(ffi.buffer(ffi.cast("char *", native.ro + data), nbytes)).toreadonly()

    def adopt_buffer(self, blob: int, pid: int, start: int) -> bool:
        """Takes over a buffer allocated by process (pid, start); False if
        it is gone (its owner died and a reclaim freed it)."""
        return lib.pyshm_heap_adopt(self._h(), blob, pid, start) == 0

    def free_buffer(self, blob: int) -> None:
        rc = lib.pyshm_heap_abandon(self._h(), blob)
        if rc:
            _raise(rc, "free buffer")

    def _size(self) -> int:
        if self._seg_size is None:
            self._seg_size = self.stats().size
        return self._seg_size

    # -- maintenance ---------------------------------------------------------------

    def stats(self) -> HeapStats:
        s = ffi.new("pyshm_heap_stats_t *")
        rc = lib.pyshm_heap_stats(self._h(), s)
        if rc:
            _raise(rc, "stats")
        return HeapStats(
            size=s.size, arena_bytes=s.arena_bytes, used_bytes=s.used_bytes,
            free_bytes=s.arena_bytes - s.used_bytes, largest_free=s.largest_free,
            names=s.n_names, active_versions=s.n_active, obsolete_versions=s.n_obsolete,
            building_versions=s.n_building, pinned_versions=s.n_pinned, readers=s.n_readers,
            reader_capacity=s.reader_capacity, name_capacity=s.name_capacity,
            repairs=s.n_repairs)

    def reclaim(self) -> ReclaimReport:
        """Releases the pins of dead processes and frees versions nobody can
        reach (obsolete and unpinned, or half-built by a dead process)."""
        r = ffi.new("pyshm_reclaim_t *")
        rc = lib.pyshm_heap_reclaim(self._h(), r)
        if rc:
            _raise(rc, "reclaim")
        if r.readers or r.blobs:
            log.info("heap %s: reclaimed %d dead readers, %d versions", self.name, r.readers, r.blobs)
        return ReclaimReport(dead_readers=r.readers, freed_versions=r.blobs)

    def trim(self) -> None:
        """Gives the pages of free memory back to the OS.  (Versions freed
        by a newer put keep theirs, warm for the next put; delete() and
        reclaim() give theirs back.)"""
        rc = lib.pyshm_heap_trim(self._h())
        if rc:
            _raise(rc, "trim")

    def check(self) -> None:
        """Verifies every invariant of the segment; raises HeapCorrupt."""
        msg = ffi.new("char[]", 256)
        rc = lib.pyshm_heap_check(self._h(), msg, 256)
        if rc:
            raise HeapCorrupt(f"heap {self.name!r}: {ffi.string(msg).decode()}")

    def _set_fault(self, point: str | None) -> None:
        """Tests only: SIGKILL this process at a named point of the next put."""
        self._fault = FAULTS[point] if point else 0
        lib.pyshm_heap_set_fault(self._h(), self._fault)

    def __repr__(self) -> str:
        return f"<SharedHeap {self.name!r}{' closed' if self._native is None else ''}>"


def unlink(name: str) -> None:
    """Removes the segment of heap `name`."""
    rc = lib.pyshm_segment_unlink(name.encode())
    if rc == -6:
        raise SegmentNotFound(f"no segment named {name!r}")
    if rc:
        _raise(rc, f"unlink {name!r}")
