"""The msgpack-RPC front-end as a sans-IO state machine: bytes in, events out."""
from __future__ import annotations

import tracemalloc

import msgpack
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pyshm.frontend import ProtocolError, Request
from pyshm.frontends.msgpack_rpc import MAX_DEPTH, MsgpackRpcFrontEnd


def feed(fe: MsgpackRpcFrontEnd, data: bytes, cuts: list[int] = ()) -> list:
    events, last = [], 0
    for c in sorted({c for c in cuts if c <= len(data)}) + [len(data)]:
        events += fe.receive(data[last:c])
        last = c
    return events


def the_error(events: list) -> str:
    """The one ProtocolError, last; its reply is [1, null, why, null]."""
    assert events and isinstance(events[-1], ProtocolError)
    assert not any(isinstance(e, ProtocolError) for e in events[:-1])
    kind, msgid, why, result = msgpack.unpackb(events[-1].reply)
    assert (kind, msgid, result) == (1, None, None) and why == events[-1].message
    return why


def nested(depth: int) -> bytes:
    """A request whose params hold `depth` - 2 more nested arrays (the
    request itself and its params are the first two levels)."""
    return b"\x94\x00\x01\xa1f" + b"\x91" * (depth - 2) + b"\x90"


# -- item 1: every decoder exception is a malformed-input error ----------------------------------

@pytest.mark.parametrize("data, why", [
    (b"\x81\x90\x00", "a map key is an array or a map"),                 # {[]: 0}: an unhashable key
    (b"\x81\x80\x00", "a map key is an array or a map"),                 # {{}: 0}
    (b"\xc1", "byte 0xc1 is not valid msgpack"),
    (msgpack.packb([0, 1, "add", []])[:-1] + b"\xc1", "byte 0xc1 is not valid msgpack"),
    (b"\x91" * 2000, f"nested more than {MAX_DEPTH} levels"),
    (b"\xa2\xff\xfe", "a string is not valid UTF-8"),
    (b"\xd4\xff\x00", "timestamp"),                                        # ext -1 with 1 byte
    (b"\xd7\xff" + b"\xff" * 8, "nanoseconds"),
])
def test_decoder_exceptions_become_a_malformed_input_error(data, why):
    fe = MsgpackRpcFrontEnd()
    got = the_error(feed(fe, data))
    assert got.startswith("malformed msgpack: ") and why in got
    assert fe.receive(msgpack.packb([0, 2, "add", [1]])) == [] and fe.eof() == []   # nothing after it


def test_requests_before_a_bad_message_still_come_out():
    good = msgpack.packb([0, 1, "add", [1, 2]])
    events = feed(MsgpackRpcFrontEnd(), good + good + b"\x81\x90\x00" + good)
    assert [e.meta.msgid for e in events[:-1]] == [1, 1] and "map key" in the_error(events)


def test_nesting_up_to_max_depth_is_accepted_and_one_more_refused():
    (req,) = feed(MsgpackRpcFrontEnd(), nested(MAX_DEPTH))
    assert isinstance(req, Request)
    assert req.payload == b"\x93\x00\xa1f" + nested(MAX_DEPTH)[5:]      # re-encoded whole: [0, "f", params]
    assert the_error(feed(MsgpackRpcFrontEnd(), nested(MAX_DEPTH + 1))) == \
        f"malformed msgpack: nested more than {MAX_DEPTH} levels"


def test_shapes_are_checked():
    for msg, why in [({"not": "a list"}, "expected"), ([0, "id", "add", []], "msgid"), ([0, True, "add", []], "msgid"),
                     ([0, 2**32, "add", []], "msgid"), ([0, 1, "add", "x"], "params"), ([2, "n"], "notification"),
                     ([1, 1, None, 2], "expected"), ([], "expected"), ([False, 1, "add", []], "expected")]:
        assert why in the_error(feed(MsgpackRpcFrontEnd(), msgpack.packb(msg)))


# -- item 2: nothing is built from a message before it is whole ---------------------------------

def test_array_headers_without_data_allocate_nothing():
    """Each array16(65535) header made msgpack preallocate 512 KiB; now an
    incomplete message is only skipped over, so 30 of them cost nothing."""
    fe = MsgpackRpcFrontEnd()
    tracemalloc.start()
    try:
        for _ in range(30):
            assert fe.receive(b"\xdc\xff\xff") == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024, peak        # 30 preallocated lists would be 15 MiB
    assert fe.partial() and fe.buffered() == 90


def test_array32_header_then_eof_is_refused_without_building_it():
    fe = MsgpackRpcFrontEnd()
    assert fe.receive(b"\x94\x00\x01\xa1f\xdd\xff\xff\xff\xff") == [] and fe.partial()
    (err,) = fe.eof()
    assert isinstance(err, ProtocolError) and "middle of a message" in err.message
    assert not fe.partial()


def test_message_of_exactly_max_message_bytes_is_accepted_and_one_more_refused():
    limit = 1000
    head = msgpack.packb([0, 7, "put", ["x" * 900]])
    pad = limit - len(head)          # grow the string to fill the message exactly
    exact = msgpack.packb([0, 7, "put", ["x" * (900 + pad)]])
    assert len(exact) == limit
    (req,) = feed(MsgpackRpcFrontEnd(max_message=limit), exact, [1, 500, 999])
    assert msgpack.unpackb(req.payload) == [0, "put", ["x" * (900 + pad)]]
    over = msgpack.packb([0, 7, "put", ["x" * (901 + pad)]])
    assert len(over) == limit + 1
    fe = MsgpackRpcFrontEnd(max_message=limit)
    # Refused as soon as the limit is held and the message is still not whole.
    assert the_error(fe.receive(over[:limit])) == f"message over the limit of {limit} bytes"
    assert fe.buffered() <= limit


def test_a_read_of_many_small_messages_may_exceed_max_message():
    msgs = [msgpack.packb([0, i, "add", [i, 1]]) for i in range(200)]
    data = b"".join(msgs)
    assert len(data) > 4 * 100
    events = MsgpackRpcFrontEnd(max_message=100).receive(data)
    assert [e.meta.msgid for e in events] == list(range(200))


# -- item 3: a request not whole in time ---------------------------------------------------------

def test_partial_and_timeout_reply():
    fe = MsgpackRpcFrontEnd(request_timeout=1.5)
    msg = msgpack.packb([0, 1, "add", [1, 2]])
    assert not fe.partial()
    assert fe.receive(msg[:3]) == [] and fe.partial()
    assert len(fe.receive(msg[3:])) == 1 and not fe.partial()
    assert msgpack.unpackb(fe.timeout_reply()) == [1, None, "request not received within 1.5 s", None]
    assert msgpack.unpackb(MsgpackRpcFrontEnd().timeout_reply())[2] == "request not received within 60 s"


def test_request_label_and_route():
    (req,) = MsgpackRpcFrontEnd().receive(msgpack.packb([2, "Counter.incr", [1]]))
    assert req.label == "method Counter.incr" and req.route == b"Counter.incr" and req.describe() == req.label


# -- properties -------------------------------------------------------------------------------------

calls = st.one_of(
    st.tuples(st.just(0), st.integers(0, 2**32 - 1), st.text(max_size=8),
              st.lists(st.one_of(st.integers(-2**63, 2**64 - 1), st.text(max_size=5), st.none(), st.binary(max_size=5),
                                 st.lists(st.integers(0, 9), max_size=3)), max_size=4)),
    st.tuples(st.just(2), st.text(max_size=8), st.lists(st.integers(-2**63, 2**64 - 1), max_size=3)),
)


@pytest.mark.fuzz
@given(st.lists(calls, max_size=8), st.lists(st.integers(0, 600), max_size=12))
def test_valid_calls_split_anywhere_come_out_whole(msgs, cuts):
    fe = MsgpackRpcFrontEnd()
    events = feed(fe, b"".join(msgpack.packb(list(m)) for m in msgs), cuts) + fe.eof()
    assert len(events) == len(msgs) and all(isinstance(e, Request) for e in events)
    for ev, m in zip(events, msgs):
        kind, method, params = (m[0], m[2], m[3]) if m[0] == 0 else m
        assert msgpack.unpackb(ev.payload, raw=False) == [kind, method, params]
        assert ev.meta.msgid == (m[1] if kind == 0 else None)


# Pieces of msgpack that make the decoder's corner cases likely: container
# headers (some announcing 65535 or 2**32-1 elements), the unused byte 0xc1,
# strings of raw bytes, ext and timestamp headers.
TOKENS = [b"\x81", b"\x82", b"\x90", b"\x91", b"\x93", b"\x94", b"\x80", b"\xdc\xff\xff", b"\xdd\xff\xff\xff\xff",
          b"\xde\x00\x01", b"\xc1", b"\xa1", b"\xa2\xff\xfe", b"\xc4\x02", b"\xd4\xff", b"\xd7\xff", b"\xc0", b"\x00",
          b"\x01", b"\x02", b"\xa3add", b"\xcf" + b"\xff" * 8, b"\xd9\x03abc", b"\xc7\x01\x05"]
token_streams = st.lists(st.sampled_from(TOKENS) | st.binary(max_size=4), max_size=40).map(b"".join)


@pytest.mark.fuzz
@given(st.one_of(st.binary(max_size=300), token_streams,
                 st.lists(st.one_of(st.integers(-2**63, 2**64 - 1), st.text(max_size=5), st.none(),
                                    st.lists(st.integers(0, 9), max_size=3)),
                          max_size=5).map(msgpack.packb)),
       st.lists(st.integers(0, 300), max_size=8))
@example(b"\x81\x90\x00", [])           # a map whose key is an array: TypeError escaped the front-end
@example(b"\x91" * 1100, [7])           # StackError (deeper than MAX_DEPTH): no message
@example(b"\xc1", [])                   # FormatError: no message
def test_garbage_gives_only_protocol_events(data, cuts):
    fe = MsgpackRpcFrontEnd(max_message=2048)
    events = feed(fe, data, cuts) + fe.eof()
    assert all(isinstance(e, (Request, ProtocolError)) for e in events)
    errors = [i for i, e in enumerate(events) if isinstance(e, ProtocolError)]
    assert errors in ([], [len(events) - 1])
    for i in errors:
        assert events[i].message and not events[i].message.endswith(": ")    # says what was wrong
    assert fe.buffered() <= 2048
