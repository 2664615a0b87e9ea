"""Fuzz: garbage anywhere in the request memory never crashes, hangs or
reaches outside the segment.

A worker maps the request memory read-write and may be buggy or killed at
any instruction, so the segment may hold anything.  Each example creates a
small request memory, binds both workers, puts slots in every state, then
runs hypothesis-chosen steps -- garbage written over the header, worker
table, rings or slots (a chosen field set to a chosen value, or raw bytes at
a chosen offset), interleaved with manager- and worker-side operations --
then calls every operation once more.  It asserts that each operation either
returns values that stay inside the segment (a garbage slot shows as the
state CORRUPT) or raises a PyshmError, within a bounded time, and that
rebinding the workers makes the memory serve a round trip again.  A second
test has another process scribble while the operations run.

Each example runs in a forked child: a segfault shows as a signal (with
faulthandler's trace), an infinite loop in C as a child killed at its
deadline, and hypothesis shrinks either to a minimal example instead of
taking pytest down with it or hanging it.  In-process runs would be a little
faster but a single wild write could corrupt the pytest process and later
examples; a fork costs a few milliseconds, so the default ~100 examples take
a few seconds.  A long run (random seeds, 5000 examples):
`HYPOTHESIS_PROFILE=fuzz pytest -m fuzz tests/test_reqmem_fuzz.py`.

The field offsets below mirror the structs of csrc/reqmem.c and
csrc/segment.h; test_the_layout_table_matches_the_segment keeps them honest.
"""
from __future__ import annotations

import faulthandler
import itertools
import os
import random
import select
import signal
import time
import traceback
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pyshm._native import lib
from pyshm.errors import PyshmError
from pyshm.reqmem import CORRUPT, DONE, FREE, QUEUED, RUNNING, RequestMemory

SLOTS, WORKERS, INLINE = 8, 2, 256
RING_CAP = 8                          # smallest power of two >= SLOTS
CHILD_DEADLINE = 10.0                 # seconds for one whole example (generous: 2 shared cores)
OP_DEADLINE = 2.0                     # seconds for one operation

# (offset, size) of the fields, relative to their struct.
HDR = {  # rm_hdr_t, at offset 0 (starts with pyshm_seg_header_t)
    "magic": (0, 8), "layout_version": (8, 4), "kind": (12, 4), "size": (16, 8), "ready": (40, 8),
    "version": (48, 4), "n_slots": (52, 4), "n_workers": (56, 4), "inline_size": (60, 4),
    "ring_cap": (64, 4), "mgr_armed": (68, 4), "workers_off": (72, 8), "cells_off": (80, 8),
    "slots_off": (88, 8), "slot_stride": (96, 8),
}
WORKER_SIZE = 320
WORKER = {  # worker_t, at workers_off + w * WORKER_SIZE
    "pid": (0, 8), "start": (8, 8), "gen": (16, 8), "wake": (24, 4), "sleeping": (28, 4),
    "req.head": (64, 8), "req.tail": (128, 8), "done.head": (192, 8), "done.tail": (256, 8),
}
SLOT = {  # slot_t, at slots_off + s * slot_stride
    "state": (0, 4), "worker": (4, 4), "gen": (8, 8), "seq": (16, 8), "flags": (24, 4), "peer_len": (28, 4),
    "req_len": (32, 8), "req_blob": (40, 8), "req_data": (48, 8), "resp_len": (56, 8), "resp_blob": (64, 8),
    "resp_data": (72, 8),
}

_names = itertools.count()


def _name() -> str:
    return f"test-{os.getpid()}-fuzz-{next(_names)}.rr"


@dataclass(frozen=True)
class Field:
    """Sets one field to `value` (truncated to the field's size)."""
    where: tuple
    value: int


@dataclass(frozen=True)
class Raw:
    """Writes `data` at offset `offset` modulo the segment size."""
    offset: int
    data: bytes


@dataclass(frozen=True)
class Op:
    name: str
    w: int          # WORKERS is out of range on purpose
    slot: int       # SLOTS and beyond are out of range on purpose
    n: int          # a length, a sequence number, a flag word


OPS = ["drain", "slot_info", "response", "release", "cancel", "submit", "submit_blob", "take", "take_wait",
       "take_stale", "complete", "complete_blob", "states", "unbind", "bind", "interrupt", "arm", "attach"]

INTERESTING = [0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 63, 64, 65, 127, 255, 256, 257, 4095, 4096, 12288,
               2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**63 - 1, 2**63, 2**64 - 8, 2**64 - 1]
values = st.sampled_from(INTERESTING) | st.integers(0, 2**64 - 1)
wheres = st.one_of(
    st.tuples(st.just("hdr"), st.sampled_from(sorted(HDR))),
    st.tuples(st.just("worker"), st.integers(0, WORKERS - 1), st.sampled_from(sorted(WORKER))),
    st.tuples(st.just("cell"), st.integers(0, WORKERS - 1), st.integers(0, 1), st.integers(0, RING_CAP - 1)),
    st.tuples(st.just("slot"), st.integers(0, SLOTS - 1), st.sampled_from(sorted(SLOT))),
)
garbage = (st.builds(Field, wheres, values)
           | st.builds(Raw, st.integers(0, 2**20), st.binary(min_size=1, max_size=64)))
ops = st.builds(Op, st.sampled_from(OPS), st.integers(0, WORKERS), st.integers(0, SLOTS + 1),
                st.sampled_from([0, 1, 3, INLINE, INLINE + 1, 2**32, 2**64 - 1]) | st.integers(0, 2**64 - 1))
steps = st.lists(garbage | ops, min_size=1, max_size=25)


# -- the child --------------------------------------------------------------------------

class Bad(AssertionError):
    """An operation returned something that escapes the segment."""


class Poke:
    """Reads and writes the fields of a request memory by name, as a
    scribbling process would."""

    def __init__(self, rm: RequestMemory) -> None:
        self.rm = rm
        self.size = rm.size
        self.workers_off, self.cells_off, self.slots_off, self.stride = (
            self.get(("hdr", k)) for k in ("workers_off", "cells_off", "slots_off", "slot_stride"))

    def offset(self, where: tuple) -> tuple[int, int]:
        kind = where[0]
        if kind == "hdr":
            return HDR[where[1]]
        if kind == "worker":
            o, n = WORKER[where[2]]
            return self.workers_off + where[1] * WORKER_SIZE + o, n
        if kind == "cell":
            return self.cells_off + 4 * ((2 * where[1] + where[2]) * RING_CAP + where[3]), 4
        o, n = SLOT[where[2]]
        return self.slots_off + where[1] * self.stride + o, n

    def get(self, where: tuple) -> int:
        off, n = self.offset(where)
        return int.from_bytes(self.rm.buf[off:off + n], "little")

    def set(self, where: tuple, value: int) -> None:
        off, n = self.offset(where)
        self.rm.buf[off:off + n] = (value & ((1 << 8 * n) - 1)).to_bytes(n, "little")

    def scribble(self, g: Field | Raw) -> None:
        if isinstance(g, Field):
            self.set(g.where, g.value)
        else:
            off = g.offset % self.size
            data = g.data[:self.size - off]
            self.rm.buf[off:off + len(data)] = data


class Run:
    def __init__(self, name: str) -> None:
        self.name = name
        self.rm = RequestMemory.create(name, slots=SLOTS, workers=WORKERS, inline_size=INLINE)
        self.size = self.rm.size
        self.poke = Poke(self.rm)
        self.gens = {w: self.rm.bind_worker(w, os.getpid(), 0) for w in range(WORKERS)}
        self.seq = 100

    def setup(self) -> None:
        """Slots in every state, entries on every ring: 0,1 QUEUED on w0 and
        w1, 2 RUNNING on w0, 3 DONE (pushed) on w0, 4 DONE (drained) on w1."""
        rm = self.rm
        for slot, w in [(2, 0), (3, 0), (4, 1), (0, 0), (1, 1)]:
            rm.request_area(slot)[:5] = b"hello"
            rm.submit(w, slot, self.next_seq(), 5, session=bytes(range(16)), peer=b"10.0.0.1:80")
        assert rm.take(0, self.gens[0], 0).slot == 2
        assert rm.take(0, self.gens[0], 0).slot == 3
        assert rm.take(1, self.gens[1], 0).slot == 4
        rm.complete(0, self.gens[0], 3, 3)
        rm.complete(1, self.gens[1], 4, 0)
        assert rm.drain(1) == [4]

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    # -- checks of what comes back -------------------------------------------------------

    # (against rm's own geometry: an attached view may have another one)

    def check_inline(self, rm, blob: int, data: int, length: int, what: str) -> None:
        if not blob and not (0 < data and data + length <= rm.size and length <= rm.inline_size):
            raise Bad(f"{what}: inline bytes {data}+{length} escape the segment of {rm.size}")

    def check_info(self, rm, info, what: str) -> None:
        if not 0 <= info.slot < rm.n_slots:
            raise Bad(f"{what}: slot {info.slot}")
        self.check_inline(rm, info.req_blob, info.req_data, info.req_len, what + " request")
        self.check_inline(rm, info.resp_blob, info.resp_data, info.resp_len, what + " response")
        if len(info.session) != 16 or len(info.peer.encode("utf-8", "surrogatepass")) > 64 * 3:
            raise Bad(f"{what}: session or peer too long")

    # -- operations --------------------------------------------------------------------------

    def op(self, op: Op, rm: RequestMemory | None = None) -> None:
        rm = rm or self.rm
        t0 = time.monotonic()
        try:
            getattr(self, "op_" + op.name)(rm, op)
        except PyshmError:
            pass
        if time.monotonic() - t0 > OP_DEADLINE:
            raise Bad(f"{op} took {time.monotonic() - t0:.1f} s")

    def gen(self, w: int) -> int:
        return self.gens.get(w, 1)

    def op_drain(self, rm, op):
        ids = rm.drain(op.w)
        if len(ids) > rm.n_slots or any(not 0 <= i < rm.n_slots for i in ids):
            raise Bad(f"drain({op.w}) returned {ids}")

    def op_slot_info(self, rm, op):
        state, worker, info = rm.slot_info(op.slot)
        ok = (state == CORRUPT and worker == -1) or state == FREE or (
            state in (QUEUED, RUNNING, DONE) and 0 <= worker < rm.n_workers)
        if not ok:
            raise Bad(f"slot_info({op.slot}): state {state} worker {worker}")
        self.check_info(rm, info, f"slot_info({op.slot})")

    def op_response(self, rm, op):
        state, flags, length, blob, data = rm.response(op.slot)
        if state not in (FREE, QUEUED, RUNNING, DONE, CORRUPT):
            raise Bad(f"response({op.slot}): state {state}")
        self.check_inline(rm, blob, data, length, f"response({op.slot})")

    def op_release(self, rm, op):
        rm.release(op.slot)

    def op_cancel(self, rm, op):
        rm.cancel(op.slot)

    def op_submit(self, rm, op):
        rm.submit(op.w, op.slot, self.next_seq(), op.n % (INLINE + 1), session=b"s" * 16, peer=b"p" * (op.n % 80))

    def op_submit_blob(self, rm, op):
        rm.submit(op.w, op.slot, self.next_seq(), op.n, blob=op.n or 1, data=op.n)

    def _take(self, rm, op, gen, timeout_ms):
        info = rm.take(op.w, gen, timeout_ms)
        if info is not None:
            self.check_info(rm, info, f"take({op.w})")

    def op_take(self, rm, op):
        self._take(rm, op, self.gen(op.w), 0)

    def op_take_wait(self, rm, op):
        self._take(rm, op, self.gen(op.w), 1)

    def op_take_stale(self, rm, op):
        self._take(rm, op, (self.gen(op.w) + 1 + op.n % 3) % 2**64, 0)   # a bind may have wrapped gen

    def op_complete(self, rm, op):
        rm.complete(op.w, self.gen(op.w), op.slot, op.n % (INLINE + 1), flags=op.n & 3)

    def op_complete_blob(self, rm, op):
        rm.complete(op.w, self.gen(op.w), op.slot, op.n, blob=op.n or 1, data=op.n, flags=1)

    def op_states(self, rm, op):
        st_ = rm.states()
        if sum(st_.values()) != rm.n_slots or any(v < 0 for v in st_.values()):
            raise Bad(f"states {st_}")

    def op_unbind(self, rm, op):
        rm.unbind_worker(op.w)

    def op_bind(self, rm, op):
        self.gens[op.w] = rm.bind_worker(op.w, os.getpid(), op.n)

    def op_interrupt(self, rm, op):
        rm.interrupt(op.w)

    def op_arm(self, rm, op):
        rm.arm()

    def op_attach(self, rm, op):
        """Another process attaching now: refused, or every operation of its
        view stays in bounds too.  Its geometry may differ from ours when the
        scribbled counts describe a layout of the same size (n_workers 1..12
        fit the same pages): the checks below hold for its geometry.  A zero
        `ready` word makes attach wait for the creator (a second, in
        csrc/segment.c): not tried."""
        if not int.from_bytes(self.rm.buf[40:48], "little"):
            return
        other = RequestMemory.attach(self.name)
        try:
            for name in OPS:
                if name not in ("attach", "bind", "unbind", "take_wait"):
                    self.op(Op(name, op.w, op.slot, op.n), other)
        finally:
            other.close()

    def sweep(self) -> None:
        """Every operation on every worker index and slot (and one past
        each); attach once."""
        for slot in range(SLOTS + 1):
            for name in ("slot_info", "response", "cancel"):
                self.op(Op(name, 0, slot, 5))
        for w in range(WORKERS + 1):
            for name in ("drain", "take", "take_wait", "take_stale", "states", "interrupt", "arm"):
                self.op(Op(name, w, 0, 5))
            for slot in (0, 2, 3, 4, SLOTS):
                for name in ("complete", "complete_blob", "submit", "submit_blob", "take", "drain", "release"):
                    self.op(Op(name, w, slot, 5))
        self.op(Op("attach", 0, 3, 5))
        for w in range(WORKERS + 1):
            self.op(Op("unbind", w, 0, 0))
            self.op(Op("bind", w, 0, 0))

    def recover(self) -> None:
        """Rebound workers get fresh rings: a round trip works again on
        every slot, whatever the garbage left in the slots and cells."""
        rm = self.rm
        for w in range(WORKERS):
            self.gens[w] = rm.bind_worker(w, os.getpid(), 0)
        for slot in range(SLOTS):
            w = slot % WORKERS
            rm.release(slot)
            rm.submit(w, slot, self.next_seq(), 2, peer=b"x")
            info = rm.take(w, self.gens[w], 0)
            assert info is not None and info.slot == slot and info.req_len == 2, info
            rm.complete(w, self.gens[w], slot, 1)
            assert rm.drain(w) == [slot]
            assert rm.response(slot)[:3] == (DONE, 0, 1)
            rm.release(slot)


def exercise(name: str, todo: list) -> None:
    run = Run(name)
    try:
        run.setup()
        for step in todo:
            if isinstance(step, Op):
                run.op(step)
            else:
                run.poke.scribble(step)
        run.sweep()
        run.recover()
    finally:
        run.rm.close()


TARGETS = ([("hdr", k) for k in HDR] + [("worker", w, k) for w in range(WORKERS) for k in WORKER]
           + [("cell", w, d, i) for w in range(WORKERS) for d in (0, 1) for i in range(RING_CAP)]
           + [("slot", i, k) for i in range(SLOTS) for k in SLOT])


def scribble_forever(poke: Poke, seed: int, parent: int) -> None:
    """A worker gone mad: random fields and bytes, as fast as Python goes,
    until its parent is gone (killed at its deadline, or crashed)."""
    rnd = random.Random(seed)
    for i in itertools.count():
        if i % 256 == 0 and os.getppid() != parent:
            return
        if rnd.random() < 0.8:
            value = rnd.choice(INTERESTING) if rnd.random() < 0.5 else rnd.getrandbits(64)
            poke.set(rnd.choice(TARGETS), value)
        else:
            poke.scribble(Raw(rnd.randrange(poke.size), rnd.randbytes(rnd.randrange(1, 64))))


def hammer(name: str, seed: int, seconds: float) -> None:
    """Every operation, at random, while another process scribbles on the
    segment at the same time (cffi drops the GIL in C calls, and the
    scribbler is a process of its own): what a value read twice, or checked
    then used, would get wrong."""
    run = Run(name)
    try:
        run.setup()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the scribbler shares the mapping
            try:
                scribble_forever(run.poke, seed, parent)
            finally:
                os._exit(0)
        try:
            rnd = random.Random(~seed)
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                run.op(Op(rnd.choice(OPS), rnd.randrange(WORKERS + 1), rnd.randrange(SLOTS + 2),
                          rnd.choice(INTERESTING)))
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        run.recover()
    finally:
        run.rm.close()


# -- the parent -------------------------------------------------------------------------------

def in_child(fn, *args, deadline: float = CHILD_DEADLINE) -> None:
    """Runs fn(*args) in a forked child; fails with its traceback, its
    fatal signal (and faulthandler's trace) or a hang."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(r)
            out = os.fdopen(w, "w", closefd=False)
            faulthandler.enable(file=out)
            fn(*args)
            code = 0
        except BaseException:
            os.write(w, traceback.format_exc().encode())
        finally:
            os._exit(code)
    os.close(w)
    pidfd = os.pidfd_open(pid)
    try:
        if not select.select([pidfd], [], [], deadline)[0]:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"hung: killed after {deadline} s")
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(pidfd)
        with os.fdopen(r, "rb") as f:
            report = f.read().decode("utf-8", "replace")
    if os.WIFSIGNALED(status):
        pytest.fail(f"crashed: {signal.Signals(os.WTERMSIG(status)).name}\n{report}")
    assert os.WEXITSTATUS(status) == 0, report


def in_child_then_unlink(todo: list) -> None:
    name = _name()
    try:
        in_child(exercise, name, todo)
    finally:
        lib.pyshm_segment_unlink(name.encode())   # gone already unless the child died


# Bugs this test found in the first version of csrc/reqmem.c, which read its
# bounds from the shared header at every call and looped while a ring's
# positions said it was not empty:
@example([Field(("hdr", "cells_off"), 0)])                    # rings written over the header: SIGSEGV
@example([Field(("hdr", "ring_cap"), 2**31)])                 # cell index far outside: SIGSEGV
@example([Field(("hdr", "workers_off"), 2**40)])              # worker table outside: SIGSEGV
@example([Field(("hdr", "slot_stride"), 2**40)])              # slots outside: SIGSEGV
@example([Field(("hdr", "n_slots"), 2**32 - 1)])              # slot 8 accepted, read past the segment
@example([Field(("hdr", "inline_size"), 2**32 - 1)])          # inline offsets past the segment
@example([Field(("hdr", "n_slots"), 5)])                      # followed by stats(); attach accepted it
@example([Field(("worker", 0, "req.tail"), 2**63)])           # take() skips 2**63 stale entries: hang
@example([Field(("worker", 0, "done.tail"), 2**63),           # drain() drops 2**63 bad ids: hang
          Raw(8192 + 32, b"\xff" * 32)])
@example([Field(("slot", 3, "worker"), 7)])                   # slot_info: worker index 7 of 2, unchecked
@example([Field(("slot", 2, "state"), 9)])                    # slot_info: state 9, unchecked
@pytest.mark.fuzz
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(steps)
def test_garbage_in_the_request_memory_is_refused_not_followed(todo):
    in_child_then_unlink(todo)


def test_the_layout_table_matches_the_segment():
    """The offsets the fuzzer writes at are the fields they name."""
    name = _name()
    rm = RequestMemory.create(name, slots=SLOTS, workers=WORKERS, inline_size=INLINE)
    try:
        p = Poke(rm)
        assert [p.get(("hdr", k)) for k in ("n_slots", "n_workers", "inline_size", "ring_cap")] == [
            SLOTS, WORKERS, INLINE, RING_CAP]
        assert (p.get(("hdr", "ready")), p.get(("hdr", "size")), p.stride) == (1, rm.size, 256 + 2 * INLINE)
        gen = rm.bind_worker(1, 4242, 77)
        assert [p.get(("worker", 1, k)) for k in ("pid", "start", "gen")] == [4242, 77, gen]
        rm.submit(1, 5, 99, 7, peer=b"abc")
        assert [p.get(("slot", 5, k)) for k in ("state", "worker", "seq", "req_len", "peer_len", "gen")] == [
            QUEUED, 1, 99, 7, 3, gen]
        assert p.get(("slot", 5, "req_data")) == lib.pyshm_rm_req_off(rm._ptr, 5)
        assert (p.get(("worker", 1, "req.tail")), p.get(("cell", 1, 0, 0))) == (1, 5)
        rm.take(1, gen, 0)
        rm.complete(1, gen, 5, 3, flags=2)
        assert [p.get(w) for w in [("worker", 1, "req.head"), ("worker", 1, "done.tail"), ("cell", 1, 1, 0)]] == [
            1, 1, 5]
        assert [p.get(("slot", 5, k)) for k in ("state", "resp_len", "flags")] == [DONE, 3, 2]
        rm.drain(1)
        assert p.get(("worker", 1, "done.head")) == 1
    finally:
        rm.unlink()
        rm.close()


@pytest.mark.fuzz
def test_a_worker_scribbling_meanwhile_crashes_nothing():
    """Garbage written while the operations run, for a second (ten under
    HYPOTHESIS_PROFILE=fuzz, with a random seed)."""
    hard = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"
    seed, seconds = (random.randrange(2**32), 10.0) if hard else (1, 1.0)
    name = _name()
    try:
        in_child(hammer, name, seed, seconds, deadline=seconds + CHILD_DEADLINE)
    except BaseException as e:
        e.add_note(f"seed {seed}")
        raise
    finally:
        lib.pyshm_segment_unlink(name.encode())
