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
from typing import Any, Callable, Iterator

from pyshm import _codec
from pyshm._native import ffi, lib
from pyshm.errors import ClosureNotFound, HeapCorrupt, HeapFull, PyshmError, SegmentExists, SegmentNotFound
from pyshm.native import error, open_segment, segment_path
from pyshm.native import unlink as unlink_segment
from pyshm.sizes import format_size, parse_size

log = logging.getLogger(__name__)

Snapshot = _codec.Snapshot

# Fault-injection points of csrc/heap.h, for the crash tests.
FAULTS = {
    "alloc_split": lib.PYSHM_FAULT_ALLOC_SPLIT, "alloc_used": lib.PYSHM_FAULT_ALLOC_USED,
    "encode": lib.PYSHM_FAULT_ENCODE, "publish_dir": lib.PYSHM_FAULT_PUBLISH_DIR,
    "publish_old": lib.PYSHM_FAULT_PUBLISH_OLD, "free_merge": lib.PYSHM_FAULT_FREE_MERGE,
    "pin": lib.PYSHM_FAULT_PIN, "unpin": lib.PYSHM_FAULT_UNPIN, "dir_insert": lib.PYSHM_FAULT_DIR_INSERT,
}

_PREFAULT_MIN = 1 << 20  # encodings this large fault their pages in with one call
_BLOB_MAGIC = (0x43485350).to_bytes(4, "little")   # "PSHC": an encoded closure's first bytes (_codec)
_BLOB_HEADER = 32
_UNPIN = int(ffi.cast("uintptr_t", ffi.addressof(lib, "pyshm_heap_unpin")))


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
                        raise error(rc, "attach after fork")
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
        nbytes = parse_size(size)
        too_small = ValueError(
            f"create heap {name!r}: {format_size(nbytes)} is too small for tables of "
            f"{names} names and {readers} readers (~{format_size(_table_bytes(names, readers))}); "
            f"pass a larger size or smaller names=/readers=")
        ptr = open_segment(lib.pyshm_heap_create, "pyshm_heap_t **", name, nbytes, names, readers,
                           what="heap", create=True, errors={lib.PYSHM_ERR_TOOSMALL: too_small})
        log.debug("created heap %s (%s)", name, format_size(nbytes))
        return cls(name, _Native(ptr))

    @classmethod
    def attach(cls, name: str, *, observe: bool = False) -> SharedHeap:
        """Attaches an existing heap.  observe=True takes no reader slot
        (stats and checks only: map() then fails)."""
        missing = SegmentNotFound(f"attach heap {name!r}: no segment {segment_path(name)}; "
                                  f"create the heap first")
        ptr = open_segment(lib.pyshm_heap_attach, "pyshm_heap_t **", name, lib.PYSHM_ATTACH_OBSERVE if observe else 0,
                           what="heap", errors={lib.PYSHM_ERR_NOTFOUND: missing})
        return cls(name, _Native(ptr))

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
        unlink_segment(self.name)

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

        def write(address: int, length: int) -> None:
            half = self._fault == FAULTS["encode"]
            enc.write_into(address, length, half)
            if half:
                lib.pyshm_heap_fault_now(self._h(), FAULTS["encode"])

        return self._publish(name, enc.nbytes, write)

    def put_encoded(self, name: str, data: bytes) -> int:
        """Publishes bytes export() gave (here or in another instance's
        heap) as the next version of `name`; returns the version.  The bytes
        are checked when they are mapped, as every closure is."""
        if len(data) < _BLOB_HEADER or data[:4] != _BLOB_MAGIC:
            raise HeapCorrupt(f"put_encoded {name!r}: these bytes are not an encoded closure")
        return self._publish(name, len(data), lambda address, length: ffi.memmove(
            ffi.cast("char *", address), data, len(data)))

    def export(self, name: str) -> bytes:
        """The encoded bytes of the current version of `name` (a copy), for
        put_encoded in another heap: a session handed to another node."""
        h, info = self._pin(name, "export")
        try:
            return ffi.buffer(ffi.cast("const char *", self._native.ro + info.data), info.length)[:]
        finally:
            lib.pyshm_heap_unpin(h, lib.pyshm_heap_slot(h), info.blob)

    def _publish(self, name: str, nbytes: int, write: Callable[[int, int], None]) -> int:
        """Allocates nbytes, lets write() fill them, publishes them as the
        next version of `name` (abandoned if anything fails)."""
        h = self._h()
        info = ffi.new("pyshm_pin_info_t *")
        rc = lib.pyshm_heap_alloc(h, nbytes, info)
        if rc == lib.PYSHM_ERR_FULL:
            st = self.stats()
            raise HeapFull(
                f"put {name!r}: the closure needs {format_size(nbytes)} but the largest free "
                f"block of heap {self.name!r} holds {format_size(st.largest_free)} "
                f"({format_size(st.free_bytes)} free of {format_size(st.arena_bytes)}); "
                f"delete closures, release old snapshots or create a larger heap")
        if rc:
            raise error(rc, f"put {name!r}")
        try:
            if nbytes >= _PREFAULT_MIN:
                lib.pyshm_heap_prefault(h, info.data, info.length)
            write(self._native.rw + info.data, info.length)
            key = name.encode()
            version = ffi.new("uint64_t *")
            rc = lib.pyshm_heap_publish(h, key, len(key), info.blob, version)
            if rc:
                raise error(rc, f"put {name!r}")
        except BaseException:
            lib.pyshm_heap_abandon(h, info.blob)
            raise
        return int(version[0])

    def map(self, name: str) -> Snapshot:
        """Pins the current version of `name` and returns its Snapshot; use
        it as `with heap.map(name) as view:`.  O(1) whatever the size."""
        h, info = self._pin(name, "map")
        native = self._native
        return Snapshot(native, name, info.version, native.ro + info.data, info.length,
                        _UNPIN, native.addr, lib.pyshm_heap_slot(h), info.blob)

    def _pin(self, name: str, what: str) -> tuple[Any, Any]:
        """Pins the current version of `name`: (handle, pin info)."""
        h = self._h()
        key = name.encode()
        info = ffi.new("pyshm_pin_info_t *")
        rc = lib.pyshm_heap_pin(h, key, len(key), info)
        if rc:
            if rc == lib.PYSHM_ERR_NOTFOUND:
                raise ClosureNotFound(f"heap {self.name!r} has no closure named {name!r}")
            raise error(rc, f"{what} {name!r}")
        return h, info

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
        if rc == lib.PYSHM_ERR_NOTFOUND:
            raise ClosureNotFound(f"heap {self.name!r} has no closure named {name!r}")
        if rc:
            raise error(rc, f"delete {name!r}")

    def __contains__(self, name: str) -> bool:
        return self.version(name) is not None

    def version(self, name: str) -> int | None:
        """The current version of `name`, or None if there is none."""
        key = name.encode()
        version = ffi.new("uint64_t *")
        rc = lib.pyshm_heap_lookup(self._h(), key, len(key), version)
        if rc == lib.PYSHM_ERR_NOTFOUND:
            return None
        if rc:
            raise error(rc, f"look up {name!r}")
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
                raise error(rc, "list names")
            if rc:
                yield ffi.string(buf).decode(), int(version[0]), int(length[0])

    # -- raw buffers (request/response payloads too large for a slot) -------------

    def alloc_buffer(self, nbytes: int) -> tuple[int, int, memoryview]:
        """An unnamed BUILDING blob of nbytes: (blob, data offset, writable
        view).  Freed by free_buffer(), or by a reclaim once its owner died."""
        h = self._h()
        info = ffi.new("pyshm_pin_info_t *")
        rc = lib.pyshm_heap_alloc(h, nbytes, info)
        if rc == lib.PYSHM_ERR_FULL:
            raise HeapFull(f"heap {self.name!r} has no free block of {format_size(nbytes)} for a payload")
        if rc:
            raise error(rc, "alloc buffer")
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
            raise error(rc, "free buffer")

    def _size(self) -> int:
        if self._seg_size is None:
            self._seg_size = self.stats().size
        return self._seg_size

    # -- maintenance ---------------------------------------------------------------

    def stats(self) -> HeapStats:
        s = ffi.new("pyshm_heap_stats_t *")
        rc = lib.pyshm_heap_stats(self._h(), s)
        if rc:
            raise error(rc, "stats")
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
            raise error(rc, "reclaim")
        if r.readers or r.blobs:
            log.info("heap %s: reclaimed %d dead readers, %d versions", self.name, r.readers, r.blobs)
        return ReclaimReport(dead_readers=r.readers, freed_versions=r.blobs)

    def trim(self) -> None:
        """Gives the pages of free memory back to the OS.  (Versions freed
        by a newer put keep theirs, warm for the next put; delete() and
        reclaim() give theirs back.)"""
        rc = lib.pyshm_heap_trim(self._h())
        if rc:
            raise error(rc, "trim")

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

