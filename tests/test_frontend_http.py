"""The HTTP front-end as a sans-IO state machine: bytes in, events out."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pyshm.frontend import ProtocolError, Request, Send
from pyshm.frontends.http import HttpFrontEnd, decode_request, render_response

VALID = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /echo?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    b"PUT /e HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok",
    b"HEAD /h HTTP/1.0\r\n\r\n",
]


def run(fe, data: bytes, cuts: list[int]) -> list:
    events, last = [], 0
    for c in sorted({c for c in cuts if c <= len(data)}) + [len(data)]:
        events += fe.receive(data[last:c])
        last = c
    return events + fe.eof()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(VALID[:4]), min_size=1, max_size=6), st.lists(st.integers(0, 600), max_size=12))
def test_pipelined_requests_split_anywhere(msgs, cuts):
    events = run(HttpFrontEnd(), b"".join(msgs), cuts)
    reqs = [e for e in events if isinstance(e, Request)]
    assert len(reqs) == len(msgs) and not [e for e in events if isinstance(e, ProtocolError)]
    for req, msg in zip(reqs, msgs):
        head, body = decode_request(memoryview(req.payload))
        assert msg.startswith(head.method.encode() + b" " + head.target)
        expected = {VALID[1]: b"hello", VALID[2]: b"abcde", VALID[3]: b"ok"}.get(msg, b"")
        assert bytes(body) == expected
    assert sum(isinstance(e, Send) for e in events) == msgs.count(VALID[3])   # one 100 Continue each


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=600),
                 st.tuples(st.sampled_from(VALID), st.integers(0, 200), st.binary(min_size=1, max_size=8))
                 .map(lambda t: t[0][:t[1]] + t[2] + t[0][t[1]:])),
       st.lists(st.integers(0, 700), max_size=10))
def test_garbage_and_mutations_give_only_protocol_events(data, cuts):
    fe = HttpFrontEnd(max_header=512, max_body=64)
    events = run(fe, data, cuts)
    assert all(isinstance(e, (Request, ProtocolError, Send)) for e in events)
    errors = [e for e in events if isinstance(e, ProtocolError)]
    assert len(errors) <= 1
    if errors and errors[0].reply:
        assert errors[0].reply.split(b" ")[1] in (b"400", b"413", b"431")


def test_head_and_http10_answers():
    fe = HttpFrontEnd()
    (req,) = [e for e in fe.receive(VALID[4]) if isinstance(e, Request)]
    out = b"".join(render_response(req.meta, "200 OK", [("Content-Type", "text/plain")], [b"body!"], False))
    head, body = out.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.0 200 OK") and b"content-length: 5" in head and body == b""
    assert b"connection: close" in head and not fe.keep_alive(req)


def test_streamed_answers_are_chunked_on_1_1_and_errors_map_to_statuses():
    fe = HttpFrontEnd()
    (req,) = fe.receive(VALID[0])
    out = b"".join(render_response(req.meta, "200 OK", [], [b"ab", b"cde"], True))
    assert b"transfer-encoding: chunked" in out and out.endswith(b"2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n")
    assert fe.response(req, b"x", error="unavailable").startswith(b"HTTP/1.1 503 ")
    assert fe.response(req, b"secret traceback", error="application").startswith(b"HTTP/1.1 500 ")
    assert b"secret" not in fe.response(req, b"secret traceback", error="application")
