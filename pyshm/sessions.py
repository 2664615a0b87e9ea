"""The session table: one entry per live session, in shared memory
(csrc/sessions.c), read without locks by any process of the instance.

    table = SessionTable.create("shop")             # the manager, once
    table = SessionTable.attach("shop")             # workers
    s = table.open(SessionKind.REQUEST, suite=0, ttl=1800)
    table.get(s.id)                                 # a copy, or None
    table.bind(s.id, worker=3, gen=7); table.touch(s.id, ttl=1800)
    table.saved(s.id, state_closure(s.id), version)
    table.end(s.id)

Entries hold flow state only (who is bound, when it expires, which closure
holds the state); the state itself lives in the closure heap, in the
closure named state_closure(id).  An entry is written only by its field
writers (bind, touch, saved, cluster), each changing its own fields in one
locked step: processes writing different fields never undo each other.
"""
from __future__ import annotations

import enum
import os
import time
from dataclasses import dataclass
from typing import Any

from pyshm import native
from pyshm._native import ffi, lib
from pyshm.errors import HeapCorrupt, SessionTableFull
from pyshm.native import session_segment

# Fault-injection points of csrc/sessions.h, for the crash tests.
FAULTS = {"create": lib.PYSHM_SFAULT_CREATE, "update": lib.PYSHM_SFAULT_UPDATE, "end": lib.PYSHM_SFAULT_END}


MOVED = lib.PYSHM_SESSF_MOVED      # flag: handed to this node by another; its cookie names the old owner
RESUMABLE = lib.PYSHM_SESSF_RESUMABLE   # flag: a token was given for it: it outlives its connection


class SessionKind(enum.IntEnum):
    DISTRIBUTED = lib.PYSHM_SESS_DISTRIBUTED   # a connection bound to one worker
    REQUEST = lib.PYSHM_SESS_REQUEST           # non-distributed: one command per request


@dataclass
class Session:
    id: bytes
    kind: SessionKind
    suite: int
    worker: int                 # bound worker index, -1 when none
    worker_gen: int
    created: float
    last_access: float
    expires: float              # 0: never
    closure: str                # the state closure's name in the heap, "" when none
    closure_version: int
    repl_seq: int
    owner_node: int = 0
    secondary_node: int = 0
    flags: int = 0


@dataclass(frozen=True)
class SessionStats:
    capacity: int
    active: int
    tombstones: int
    repairs: int


def new_id() -> bytes:
    """128 bits from the OS CSPRNG."""
    return os.urandom(16)


def state_closure(sid: bytes) -> str:
    """The name of the heap closure holding session sid's state."""
    return f"session/{sid.hex()}"


class SessionTable:
    """One process's handle; a Session returned is a copy (re-read it)."""

    def __init__(self, name: str, ptr: Any) -> None:
        self.name = name
        self._ptr = ptr
        self._c = ffi.new("pyshm_session_t *")
        self._brief = ffi.new("pyshm_session_brief_t *")

    @classmethod
    def create(cls, instance: str, capacity: int = 65536) -> SessionTable:
        name = session_segment(instance)
        return cls(name, native.open_instance_segment(
            lib.pyshm_sessions_create, "pyshm_sessions_t **", name, capacity, what="session table", create=True,
            too_small=f"capacity must be 1 to 67,108,864, not {capacity}"))

    @classmethod
    def attach(cls, instance: str) -> SessionTable:
        name = session_segment(instance)
        return cls(name, native.open_instance_segment(lib.pyshm_sessions_attach, "pyshm_sessions_t **", name,
                                                      what="session table"))

    def close(self) -> None:
        if self._ptr is not None:
            lib.pyshm_sessions_detach(self._ptr)
            self._ptr = None

    def unlink(self) -> None:
        native.unlink(self.name, quiet=True)

    # -- entries ------------------------------------------------------------------

    def open(self, kind: SessionKind, *, suite: int = 0, worker: int = -1, worker_gen: int = 0,
             ttl: float = 0.0, closure: str = "", now: float | None = None, owner_node: int = 0) -> Session:
        """A new session with a fresh id.  Raises SessionTableFull."""
        now = time.time() if now is None else now
        s = Session(new_id(), SessionKind(kind), suite, worker, worker_gen, now, now, now + ttl if ttl else 0.0,
                    closure, 0, 0, owner_node)
        self.insert(s)
        return s

    def insert(self, s: Session) -> None:
        """Adds an entry made elsewhere (a session handed over by another
        node).  Raises SessionTableFull."""
        self._fill(s)
        rc = lib.pyshm_sessions_insert(self._ptr, self._c)
        if rc == lib.PYSHM_ERR_FULL:
            raise SessionTableFull(f"session table {self.name!r} is full "
                                   f"({self.stats().capacity} sessions); raise sessions= or shorten their ttl")
        self._check(rc, "insert")

    def get(self, sid: bytes) -> Session | None:
        """The session's entry (a consistent copy, read without a lock)."""
        rc = lib.pyshm_sessions_get(self._ptr, self._id(sid), self._c)
        if rc == lib.PYSHM_ERR_NOTFOUND:
            return None
        self._check(rc, "get")
        return self._session(self._c)

    def brief(self, sid: bytes) -> tuple[int, int, float, int, int] | None:
        """(bound worker, its generation, expires, closure version, flags),
        or None: the hot paths' lookup, without building a Session."""
        b = self._brief
        if lib.pyshm_sessions_brief(self._ptr, sid, b):
            return None
        return b.worker, b.worker_gen, b.expires, b.closure_version, b.flags

    # Field writers: each changes only its own fields; False if the session is gone.

    def bind(self, sid: bytes, worker: int, gen: int) -> bool:
        """Binds the session to worker `worker` (-1: none) of generation `gen`."""
        return self._wrote(lib.pyshm_sessions_bind(self._ptr, self._id(sid), worker, gen), "bind")

    def touch(self, sid: bytes, ttl: float = 0.0, now: float | None = None) -> bool:
        """Marks an access (and pushes expiry ttl on); False if it is gone."""
        now = time.time() if now is None else now
        return self._wrote(lib.pyshm_sessions_touch(self._ptr, self._id(sid), now, now + ttl if ttl else 0.0),
                           "touch")

    def saved(self, sid: bytes, closure: str, version: int, ttl: float = 0.0, *, touch: bool = True) -> bool:
        """Records that the session's state is `version` of `closure` and,
        with touch, marks an access (as touch(sid, ttl)); False if the
        session is gone."""
        name = closure.encode()
        if len(name) >= 48:
            raise ValueError(f"closure name {closure!r} is longer than 47 bytes")
        now = time.time() if touch else -1.0
        return self._wrote(lib.pyshm_sessions_saved(self._ptr, self._id(sid), name, version, now,
                                                    now + ttl if touch and ttl else 0.0), "save")

    def cluster(self, sid: bytes, owner_node: int, secondary_node: int, repl_seq: int) -> bool:
        """Records the cluster's fields: the node owning the session, the
        node holding its replica, the last change replicated."""
        return self._wrote(lib.pyshm_sessions_cluster(self._ptr, self._id(sid), owner_node, secondary_node,
                                                      repl_seq), "cluster")

    def flags(self, sid: bytes, *, set: int = 0, clear: int = 0) -> bool:
        """Clears then sets bits of the entry's flags (MOVED)."""
        return self._wrote(lib.pyshm_sessions_flags(self._ptr, self._id(sid), set, clear), "flags")

    def end(self, sid: bytes, heap: Any = None) -> bool:
        """Frees the entry (and, given the heap, deletes its state closure);
        False if it was already gone."""
        if heap is not None:
            entry = self.get(sid)
            if entry is not None and entry.closure and entry.closure in heap:
                try:
                    heap.delete(entry.closure)
                except KeyError:   # ClosureNotFound: deleted meanwhile
                    pass
        return self._wrote(lib.pyshm_sessions_remove(self._ptr, self._id(sid)), "end")

    def expired(self, now: float | None = None, limit: int = 4096) -> list[bytes]:
        return self._scan(time.time() if now is None else now, lib.PYSHM_SCAN_EXPIRED, limit)

    def ids(self, limit: int = 65536) -> list[bytes]:
        """The ids of live sessions (up to limit)."""
        return self._scan(0.0, lib.PYSHM_SCAN_ALL, limit)

    def bound_to(self, worker: int, limit: int = 65536) -> list[bytes]:
        return self._scan(0.0, worker, limit)

    def stats(self) -> SessionStats:
        st = ffi.new("pyshm_sessions_stats_t *")
        self._check(lib.pyshm_sessions_stats(self._ptr, st), "stats")
        return SessionStats(st.capacity, st.active, st.tombstones, st.repairs)

    def check(self) -> None:
        """Verifies every invariant of the table; raises HeapCorrupt."""
        rc = lib.pyshm_sessions_check(self._ptr)
        if rc == lib.PYSHM_ERR_CORRUPT:
            raise HeapCorrupt(f"session table {self.name!r} failed its consistency check")
        self._check(rc, "check")

    def _set_fault(self, point: str | None) -> None:
        """Tests only: SIGKILL this process at a named point of the next write."""
        lib.pyshm_sessions_set_fault(self._ptr, FAULTS[point] if point else 0)

    # -- conversions -------------------------------------------------------------------

    def _scan(self, now: float, worker: int, limit: int) -> list[bytes]:
        buf = ffi.new("uint8_t[]", 16 * limit)
        n = lib.pyshm_sessions_scan(self._ptr, now, worker, buf, limit)
        self._check(min(n, 0), "scan")
        raw = ffi.buffer(buf, 16 * n)[:]
        return [raw[i:i + 16] for i in range(0, len(raw), 16)]

    def _wrote(self, rc: int, what: str) -> bool:
        if rc == lib.PYSHM_ERR_NOTFOUND:
            return False
        self._check(rc, what)
        return True

    @staticmethod
    def _id(sid: bytes) -> bytes:
        if len(sid) != 16:
            raise ValueError("a session id is 16 bytes")
        return sid

    def _fill(self, s: Session) -> None:
        c = self._c
        name = s.closure.encode()
        if len(name) >= 48:
            raise ValueError(f"closure name {s.closure!r} is longer than 47 bytes")
        c.id = self._id(s.id)
        c.kind, c.suite, c.worker, c.worker_gen = int(s.kind), s.suite, s.worker, s.worker_gen
        c.owner_node, c.secondary_node, c.flags = s.owner_node, s.secondary_node, s.flags
        c.created, c.last_access, c.expires = s.created, s.last_access, s.expires
        c.closure_version, c.repl_seq = s.closure_version, s.repl_seq
        c.closure = name + b"\0"

    @staticmethod
    def _session(c: Any) -> Session:
        return Session(bytes(c.id), SessionKind(c.kind), c.suite, c.worker, c.worker_gen, c.created,
                       c.last_access, c.expires, ffi.string(c.closure).decode(), c.closure_version, c.repl_seq,
                       c.owner_node, c.secondary_node, c.flags)

    def _check(self, rc: int, what: str) -> None:
        native.check(rc, f"session table {self.name!r}: {what}")
