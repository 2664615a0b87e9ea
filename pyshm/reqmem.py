"""Request/response memory: the slots and rings between the connection
manager and its workers (csrc/reqmem.c).

One segment per instance, /dev/shm/pyshm.<instance>.rr.  The manager owns
free slots, writes a request into one and submits it to a worker's ring; the
worker takes it (RUNNING), writes the response in place and completes it
(DONE) onto its completion ring; the manager drains completion rings, sends
the responses and releases the slots.  Payloads larger than a slot's inline
area live in a blob of the instance's closure heap.

A RequestMemory object reuses one C struct for its results: use it from one
thread.

A worker maps the segment read-write, so it may hold garbage; the C side
checks every index and length it reads there.  Garbage raises HeapCorrupt
from drain and take (treat the worker concerned as dead), and shows as the
state CORRUPT in slot_info and response (answer that request with an error).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pyshm import native
from pyshm._native import ffi, lib
from pyshm.errors import HeapCorrupt, StaleWorker

log = logging.getLogger(__name__)

FREE, QUEUED, RUNNING, DONE = (lib.PYSHM_SLOT_FREE, lib.PYSHM_SLOT_QUEUED, lib.PYSHM_SLOT_RUNNING,
                               lib.PYSHM_SLOT_DONE)
CORRUPT = -1    # slot_info/response: the slot is in use but its state, worker or lengths are garbage
STATE_NAMES = {FREE: "free", QUEUED: "queued", RUNNING: "running", DONE: "done", CORRUPT: "corrupt"}
RESP_ERROR = lib.PYSHM_RESP_ERROR
RESP_UNAVAILABLE = lib.PYSHM_RESP_UNAVAILABLE


@dataclass
class SlotInfo:
    """A slot's request (and, once DONE, response) as one side sees it."""
    slot: int
    seq: int
    flags: int
    req_len: int
    req_blob: int
    req_data: int
    resp_len: int
    resp_blob: int
    resp_data: int
    session: bytes
    peer: str


def _info(c: Any) -> SlotInfo:
    return SlotInfo(c.slot, c.seq, c.flags, c.req_len, c.req_blob, c.req_data, c.resp_len, c.resp_blob,
                    c.resp_data, bytes(ffi.buffer(c.session, 16)), ffi.unpack(c.peer, c.peer_len).decode(
                        "utf-8", "replace"))


class RequestMemory:
    def __init__(self, name: str, ptr: Any) -> None:
        self.name = name
        self._ptr = ptr
        self.n_slots = lib.pyshm_rm_n_slots(ptr)
        self.n_workers = lib.pyshm_rm_n_workers(ptr)
        self.inline_size = lib.pyshm_rm_inline_size(ptr)
        self.size = lib.pyshm_rm_size(ptr)
        self.buf = memoryview(ffi.buffer(ffi.cast("char *", lib.pyshm_rm_base(ptr)), self.size))
        self._c = ffi.new("pyshm_slot_info_t *")
        self._state = ffi.new("uint32_t[2]")
        self._drained = ffi.new("uint32_t[]", self.n_slots)

    @classmethod
    def create(cls, name: str, *, slots: int = 1024, workers: int = 64,
               inline_size: int = 64 * 1024) -> RequestMemory:
        """Creates the segment `name` (native.request_segment(instance))."""
        return cls(name, native.open_instance_segment(
            lib.pyshm_rm_create, "pyshm_reqmem_t **", name, slots, workers, inline_size, what="request memory",
            create=True, too_small=f"slots (1..16M), workers (1..4096) and inline size (up to 64 MiB) "
                                   f"out of range: {slots}, {workers}, {inline_size}"))

    @classmethod
    def attach(cls, name: str) -> RequestMemory:
        return cls(name, native.open_instance_segment(lib.pyshm_rm_attach, "pyshm_reqmem_t **", name,
                                                      what="request memory"))

    def close(self) -> None:
        if self._ptr is not None:
            self.buf.release()
            lib.pyshm_rm_detach(self._ptr)
            self._ptr = None

    def unlink(self) -> None:
        native.unlink(self.name, quiet=True)

    # -- offsets -------------------------------------------------------------

    def request_area(self, slot: int) -> memoryview:
        off = lib.pyshm_rm_req_off(self._ptr, slot)
        if not off:           # 0: no such slot (the header is at 0)
            raise IndexError(f"slot {slot} out of range (0..{self.n_slots - 1})")
        return self.buf[off:off + self.inline_size]

    def response_area(self, slot: int) -> memoryview:
        off = lib.pyshm_rm_resp_off(self._ptr, slot)
        if not off:
            raise IndexError(f"slot {slot} out of range (0..{self.n_slots - 1})")
        return self.buf[off:off + self.inline_size]

    # -- manager side -----------------------------------------------------------

    def bind_worker(self, w: int, pid: int, start: int) -> int:
        gen = ffi.new("uint64_t *")
        self._check(lib.pyshm_rm_bind_worker(self._ptr, w, pid, start, gen), "bind worker")
        return int(gen[0])

    def unbind_worker(self, w: int) -> None:
        self._check(lib.pyshm_rm_unbind_worker(self._ptr, w), "unbind worker")

    def submit(self, w: int, slot: int, seq: int, req_len: int, *, blob: int = 0, data: int = 0,
               session: bytes | None = None, peer: bytes = b"") -> bool:
        """Queues slot on worker w's ring; True when w sleeps and needs an
        interrupt() (the caller batches them)."""
        if session and len(session) != 16:
            raise ValueError(f"a session id is 16 bytes, not {len(session)}")
        rc = lib.pyshm_rm_submit(self._ptr, w, slot, seq, req_len, blob, data,
                                 session if session else ffi.NULL, peer, len(peer))
        if rc == lib.PYSHM_ERR_TOOSMALL:
            raise ValueError(f"a request of {req_len} bytes does not fit the slot's {self.inline_size} "
                             f"inline bytes; put it in a heap buffer")
        self._check(rc, "submit")
        return rc == 1

    def drain(self, w: int) -> list[int]:
        """Slots worker w completed.  HeapCorrupt: its completion ring held
        garbage and was emptied; retire w (its DONE slots are found by
        slot_info)."""
        n = lib.pyshm_rm_drain(self._ptr, w, self._drained, self.n_slots)
        self._check(min(n, 0), "drain")
        return list(self._drained[0:n])

    def arm(self) -> None:
        lib.pyshm_rm_arm(self._ptr)

    def slot_info(self, slot: int) -> tuple[int, int, SlotInfo]:
        """(state, worker, info) of a slot; (CORRUPT, -1, info) when the
        slot is in use but its fields are garbage (info's inline lengths are
        clamped to the slot, its values mean nothing)."""
        rc = lib.pyshm_rm_slot_info(self._ptr, slot, self._state, self._state + 1, self._c)
        if rc == lib.PYSHM_ERR_CORRUPT and slot < self.n_slots:
            return CORRUPT, -1, _info(self._c)
        self._check(rc, "slot")
        return int(self._state[0]), int(self._state[1]), _info(self._c)

    def cancel(self, slot: int) -> bool:
        """Withdraws a QUEUED request; False if its worker already took it."""
        rc = lib.pyshm_rm_cancel(self._ptr, slot)
        self._check(rc, "cancel")
        return rc == 1

    def response(self, slot: int) -> tuple[int, int, int, int, int]:
        """(state, flags, resp_len, resp_blob, resp_data): what the manager
        needs of a completed slot, without building a SlotInfo.  An inline
        response (blob 0) is always inside buf.  State CORRUPT as slot_info."""
        c = self._c
        rc = lib.pyshm_rm_slot_info(self._ptr, slot, self._state, self._state + 1, c)
        if rc:
            if rc == lib.PYSHM_ERR_CORRUPT and slot < self.n_slots:
                return CORRUPT, c.flags, c.resp_len, c.resp_blob, c.resp_data
            self._check(rc, "slot")
        return self._state[0], c.flags, c.resp_len, c.resp_blob, c.resp_data

    def release(self, slot: int) -> None:
        self._check(lib.pyshm_rm_release(self._ptr, slot), "release")

    def states(self) -> dict[str, int]:
        """How many slots are in each state ("corrupt" too, only when a
        slot's state is garbage)."""
        s = ffi.new("pyshm_reqmem_stats_t *")
        self._check(lib.pyshm_rm_stats(self._ptr, s), "stats")
        out = {"free": s.free, "queued": s.queued, "running": s.running, "done": s.done}
        if s.corrupt:
            out["corrupt"] = s.corrupt
        return out

    # -- worker side ----------------------------------------------------------------

    def take(self, w: int, gen: int, timeout_ms: int) -> SlotInfo | None:
        """The next request for worker w (now RUNNING), or None after
        timeout_ms without one.  Raises StaleWorker when w was rebound,
        HeapCorrupt when a ring entry or the request was garbage (it was
        not started)."""
        rc = lib.pyshm_rm_take(self._ptr, w, gen, timeout_ms, self._c)
        if rc == 1:
            return _info(self._c)
        if rc == lib.PYSHM_ERR_STATE:
            raise StaleWorker(f"worker index {w} generation {gen} was rebound")
        self._check(rc, "take")
        return None

    def complete(self, w: int, gen: int, slot: int, resp_len: int, *, blob: int = 0, data: int = 0,
                 flags: int = 0, wake_fd: int = -1) -> None:
        """flags: 0, RESP_ERROR, or RESP_ERROR | RESP_UNAVAILABLE."""
        rc = lib.pyshm_rm_complete(self._ptr, w, gen, slot, resp_len, blob, data, flags, wake_fd)
        if rc == lib.PYSHM_ERR_STATE:
            raise StaleWorker(f"worker index {w} generation {gen} was rebound")
        self._check(rc, "complete")

    def interrupt(self, w: int) -> None:
        lib.pyshm_rm_interrupt(self._ptr, w)

    def _check(self, rc: int, what: str) -> None:
        if rc < 0:
            if rc == lib.PYSHM_ERR_CORRUPT:
                raise HeapCorrupt(f"request memory {self.name!r}: {what}: a value read from the segment "
                                  f"failed its bounds check (a worker wrote garbage)")
            native.check(rc, f"request memory {self.name!r}: {what}")
