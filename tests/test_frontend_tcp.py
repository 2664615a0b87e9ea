"""The raw-frame front-end as a sans-IO state machine, and front-end plugins."""
from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from pyshm.frontend import ProtocolError, Registry, Request
from pyshm.frontends.tcp import TcpFrontEnd, frame


def feed(fe, data: bytes, cuts: list[int]):
    events, last = [], 0
    for c in sorted(set(cuts)) + [len(data)]:
        events += fe.receive(data[last:c])
        last = c
    return events


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=10), st.lists(st.integers(0, 4000), max_size=20))
def test_frames_split_anywhere_come_out_whole(payloads, cuts):
    fe = TcpFrontEnd()
    data = b"".join(frame(p) for p in payloads)
    events = feed(fe, data, [c for c in cuts if c <= len(data)])
    assert [e.payload for e in events] == payloads
    assert fe.eof() == []


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=10))
def test_garbage_gives_requests_or_a_protocol_error_never_an_exception(data, cuts):
    fe = TcpFrontEnd(max_frame=512)
    events = feed(fe, data, [c for c in cuts if c <= len(data)]) + fe.eof()
    assert all(isinstance(e, (Request, ProtocolError)) for e in events)
    assert sum(isinstance(e, ProtocolError) for e in events) <= 1


def test_oversized_frame_is_refused_before_its_body():
    fe = TcpFrontEnd(max_frame=100)
    (ev,) = fe.receive(struct.pack(">I", 101))
    assert isinstance(ev, ProtocolError) and ev.reply == frame(b"frame of 101 bytes exceeds the limit of 100", error=True)
    assert fe.receive(b"x" * 1000) == []      # nothing more is parsed or kept
    assert len(fe._buf) == 0


def test_error_responses_set_the_top_bit():
    fe = TcpFrontEnd()
    assert fe.response(Request(b""), b"no", error="application") == struct.pack(">I", 0x8000_0002) + b"no"
    assert fe.response(Request(b""), b"ok", error=None) == struct.pack(">I", 2) + b"ok"


def test_unknown_option_is_named():
    import pytest

    with pytest.raises(ValueError, match="no option 'max_frames'"):
        TcpFrontEnd(max_frames=5)


def test_builtin_front_end_registers_through_the_entry_point():
    assert Registry.load().get("tcp") is TcpFrontEnd
