"""Request/response memory in one process: slot states, rings, generations."""
from __future__ import annotations

import os
import threading
import time

import pytest

from pyshm.config import SuiteConfig
from pyshm.dispatch import Dispatcher, WorkerRef
from pyshm.reqmem import DONE, QUEUED, RUNNING, RequestMemory, StaleWorker


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


def test_dispatch_policies_and_bound_worker():
    ws = [WorkerRef(i, 1, 100 + i, 0, "s") for i in range(3)]
    ll = Dispatcher(SuiteConfig("s", "a:b", 3, "least-loaded"))
    rr = Dispatcher(SuiteConfig("s", "a:b", 3, "round-robin"))
    for w in ws:
        ll.add(w)
        rr.add(w)
    ws[0].inflight, ws[1].inflight, ws[2].inflight = 3, 0, 2
    assert ll.pick() is ws[1]
    assert {rr.pick().index for _ in range(3)} == {0, 1, 2}
    assert ll.pick(bound=2) is ws[2]          # a bound request ignores the load
    ws[2].draining = True
    assert ll.pick(bound=2) is None and ll.pick() is ws[1]
