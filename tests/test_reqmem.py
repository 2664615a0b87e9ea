"""Request/response memory in one process: slot states, rings, generations."""
from __future__ import annotations

import os
import threading
import time

import pytest

from pyshm.config import SuiteConfig
from pyshm.dispatch import Dispatcher, WorkerRef
from pyshm.errors import HeapCorrupt, StaleWorker
from pyshm.reqmem import CORRUPT, DONE, FREE, QUEUED, RUNNING, RequestMemory


@pytest.fixture
def rm(heap_name):
    r = RequestMemory.create(heap_name + ".rr", slots=8, workers=2, inline_size=100)
    yield r
    r.unlink()
    r.close()


def test_a_request_goes_round_trip(rm):
    assert rm.inline_size == 128                  # rounded up to 64 bytes
    gen = rm.bind_worker(0, os.getpid(), 0)
    rm.request_area(3)[:5] = b"hello"
    rm.submit(0, 3, 42, 5, session=b"s" * 16, peer=b"127.0.0.1:5")
    assert rm.slot_info(3)[0] == QUEUED
    info = rm.take(0, gen, 0)
    assert (info.slot, info.seq, info.session, info.peer) == (3, 42, b"s" * 16, "127.0.0.1:5")
    assert bytes(rm.buf[info.req_data:info.req_data + info.req_len]) == b"hello"
    assert rm.slot_info(3)[0] == RUNNING
    rm.response_area(3)[:3] = b"bye"
    rm.complete(0, gen, 3, 3, flags=1)
    assert rm.drain(0) == [3] and rm.drain(0) == []
    state, worker, info = rm.slot_info(3)
    assert (state, worker, info.flags, bytes(rm.buf[info.resp_data:info.resp_data + 3])) == (DONE, 0, 1, b"bye")
    rm.release(3)
    assert rm.states() == {"free": 8, "queued": 0, "running": 0, "done": 0}


def test_a_rebound_worker_index_refuses_the_old_generation(rm):
    gen = rm.bind_worker(1, os.getpid(), 0)
    rm.submit(1, 0, 1, 0)
    rm.unbind_worker(1)
    with pytest.raises(StaleWorker):
        rm.take(1, gen, 0)
    gen2 = rm.bind_worker(1, os.getpid(), 0)
    assert gen2 > gen and rm.take(1, gen2, 0) is None   # the old ring's entry is gone with it


def test_inline_overflow_is_refused(rm):
    rm.bind_worker(0, os.getpid(), 0)
    with pytest.raises(ValueError, match="129 bytes does not fit"):
        rm.submit(0, 0, 1, 129)   # larger than the slot, and no blob


def test_take_sleeps_until_a_submit_wakes_it(rm):
    gen = rm.bind_worker(0, os.getpid(), 0)
    got = []
    t = threading.Thread(target=lambda: got.append(rm.take(0, gen, 10_000)))
    t0 = time.monotonic()
    t.start()
    time.sleep(0.2)
    assert rm.submit(0, 5, 7, 0), "the worker sleeps: the submitter is told to wake it"
    rm.interrupt(0)
    t.join(5)
    assert got and got[0].slot == 5 and time.monotonic() - t0 < 5


def test_dispatch_policies_skip_draining_workers():
    ws = [WorkerRef(i, 1, 100 + i, 0, "s") for i in range(3)]
    ll = Dispatcher(SuiteConfig("s", "a:b", 3, "least-loaded"))
    rr = Dispatcher(SuiteConfig("s", "a:b", 3, "round-robin"))
    for w in ws:
        ll.add(w)
        rr.add(w)
    ws[0].inflight, ws[1].inflight, ws[2].inflight = 3, 0, 2
    assert ll.pick() is ws[1]
    assert {rr.pick().index for _ in range(3)} == {0, 1, 2}
    ws[1].draining = True
    assert ll.pick() is ws[2]                 # the least loaded of those not draining


# -- a worker may scribble on the segment: what the other side sees -----------------
# (tests/test_reqmem_fuzz.py throws random garbage; these pin the designed answers)

@pytest.fixture
def small(heap_name):
    from tests.test_reqmem_fuzz import INLINE, SLOTS, WORKERS, Poke

    r = RequestMemory.create(heap_name + ".rr", slots=SLOTS, workers=WORKERS, inline_size=INLINE)
    yield r, Poke(r)
    r.unlink()
    r.close()


def test_a_req_ring_overflowed_by_withdrawn_requests_still_delivers(small):
    rm, _ = small
    gen = rm.bind_worker(0, os.getpid(), 0)
    for seq in range(21):          # the worker is stuck: each request is withdrawn on timeout
        rm.submit(0, 1, seq, 0)
        assert rm.cancel(1)
    rm.submit(0, 2, 99, 0)         # 22 entries in a ring of 8: the oldest were overwritten
    info = rm.take(0, gen, 0)
    assert (info.slot, info.seq) == (2, 99) and rm.take(0, gen, 0) is None


def test_drain_skips_entries_of_slots_answered_meanwhile(small):
    rm, _ = small
    gen = rm.bind_worker(0, os.getpid(), 0)
    for slot in (3, 4):
        rm.submit(0, slot, slot, 0)
        rm.take(0, gen, 0)
        rm.complete(0, gen, slot, 0)
    rm.release(3)                  # answered without draining (shutdown): its entry is stale
    assert rm.drain(0) == [4]


def test_a_garbage_done_ring_is_reported_once_and_emptied(small):
    rm, poke = small
    gen = rm.bind_worker(0, os.getpid(), 0)
    rm.submit(0, 3, 1, 0)
    rm.take(0, gen, 0)
    rm.complete(0, gen, 3, 0)
    poke.set(("worker", 0, "done.tail"), 2**63)
    with pytest.raises(HeapCorrupt, match="drain"):
        rm.drain(0)
    assert rm.drain(0) == []                   # emptied: the manager retires the worker...
    assert rm.slot_info(3)[:2] == (DONE, 0)    # ...and finds its DONE slot by state
    poke.set(("cell", 0, 1, 0), 1000)          # a slot id out of range
    poke.set(("worker", 0, "done.tail"), 2**63 + 1)
    with pytest.raises(HeapCorrupt):
        rm.drain(0)


def test_slot_info_tells_garbage_of_a_slot_in_use_only(small):
    rm, poke = small
    gen = rm.bind_worker(1, os.getpid(), 0)
    poke.set(("slot", 0, "state"), 9)
    assert rm.slot_info(0)[:2] == (CORRUPT, -1)
    assert rm.states()["corrupt"] == 1
    poke.set(("slot", 1, "req_len"), 2**40)    # FREE: leftovers are clamped, not judged
    assert rm.slot_info(1)[2].req_len == rm.inline_size
    rm.submit(1, 2, 1, 0)
    rm.take(1, gen, 0)
    rm.complete(1, gen, 2, 10)
    poke.set(("slot", 2, "resp_len"), 2**40)   # DONE with an inline response larger than the slot
    state, _, length, blob, data = rm.response(2)
    assert (state, length, blob) == (CORRUPT, rm.inline_size, 0) and data + length <= rm.size
    poke.set(("slot", 2, "resp_len"), 10)
    assert rm.response(2)[:3] == (DONE, 0, 10)
    poke.set(("slot", 2, "worker"), 7)         # no such worker index
    assert rm.slot_info(2)[:2] == (CORRUPT, -1)
    with pytest.raises(HeapCorrupt):           # a caller's slot out of range is not a state
        rm.slot_info(rm.n_slots)


def test_take_refuses_a_garbage_request_without_starting_it(small):
    rm, poke = small
    gen = rm.bind_worker(0, os.getpid(), 0)
    rm.submit(0, 5, 1, 10)
    poke.set(("slot", 5, "req_len"), 2**40)    # inline, larger than the slot
    with pytest.raises(HeapCorrupt, match="take"):
        rm.take(0, gen, 0)
    assert rm.states()["queued"] == 1 and rm.cancel(5)   # not started: withdrawn by the queue timeout
    rm.submit(0, 6, 2, 0)
    poke.set(("cell", 0, 0, 1), 1000)         # a slot id out of range in the req ring
    with pytest.raises(HeapCorrupt):
        rm.take(0, gen, 0)
    assert rm.slot_info(6)[0] == QUEUED


def test_the_header_is_read_once(small, heap_name):
    rm, poke = small
    poke.set(("hdr", "n_slots"), 5)            # another geometry that still fits the segment
    poke.set(("hdr", "ring_cap"), 2**31)
    assert rm.states()["free"] == 8 and rm.slot_info(7)[0] == FREE   # our copy of the geometry
    with pytest.raises(HeapCorrupt, match="layout"):
        RequestMemory.attach(heap_name + ".rr")


def test_caller_mistakes_are_refused(small):
    rm, _ = small
    with pytest.raises(IndexError):
        rm.request_area(rm.n_slots)
    with pytest.raises(IndexError):
        rm.response_area(rm.n_slots)
    rm.bind_worker(0, os.getpid(), 0)
    with pytest.raises(ValueError, match="16 bytes"):
        rm.submit(0, 0, 1, 0, session=b"short")
