"""The HTTP front-end as a sans-IO state machine: bytes in, events out; and
the worker's side of a request (environ, wsgi.input) without a server."""
from __future__ import annotations

import io

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyshm.frontend import TIMED_OUT, ProtocolError, Request, Send
from pyshm.frontends.http import FEED_PIECE, HttpFrontEnd
from pyshm.http11 import ANSWER, decode_request, encode_request, render_response, simple_response
from pyshm.wsgi import BodyInput, call, environ_for

VALID = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /echo?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    b"PUT /e HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok",
    b"HEAD /h HTTP/1.0\r\n\r\n",
]
# Upgrade is ignored: each is one request, its body read, and the connection goes on.
UPGRADES = [
    b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"POST /h2c HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n"
    b"Content-Length: 4\r\nExpect: 100-continue\r\n\r\nbody",
    b"POST /h2c HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: h2c\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"2\r\nab\r\n0\r\n\r\n",
]
BODIES = {VALID[1]: b"hello", VALID[2]: b"abcde", VALID[3]: b"ok", UPGRADES[1]: b"body", UPGRADES[2]: b"ab"}
CONTINUES = (VALID[3], UPGRADES[1])


def requests(events: list) -> list[tuple]:
    """(head, body) of each Request, checking nothing else but Send came."""
    assert all(isinstance(e, (Request, Send)) for e in events), events
    return [(r.meta, bytes(decode_request(memoryview(r.payload))[1])) for r in events if isinstance(r, Request)]


def sent(parts: list[bytes], status: int) -> bytes:
    """What the client receives of a worker's answer (pyshm.http11): the
    parts after ANSWER, which carries the status code and the head's length."""
    http = b"".join(parts[1:])
    assert ANSWER.unpack(parts[0]) == (status, http.find(b"\r\n\r\n") + 4)
    assert http[8:13] == b" %d " % status
    return http


def refusal(events: list) -> bytes:
    """The reply of the one ProtocolError, which comes last."""
    assert isinstance(events[-1], ProtocolError)
    assert not any(isinstance(e, ProtocolError) for e in events[:-1])
    return events[-1].reply


def run(fe, data: bytes, cuts: list[int]) -> list:
    events, last = [], 0
    for c in sorted({c for c in cuts if c <= len(data)}) + [len(data)]:
        events += fe.receive(data[last:c])
        last = c
    return events + fe.eof()


@pytest.mark.fuzz
@given(st.lists(st.sampled_from(VALID[:4] + UPGRADES), min_size=1, max_size=6),
       st.lists(st.integers(0, 900), max_size=12))
def test_pipelined_requests_split_anywhere(msgs, cuts):
    events = run(HttpFrontEnd(), b"".join(msgs), cuts)
    reqs = requests(events)
    assert len(reqs) == len(msgs)
    for (head, body), msg in zip(reqs, msgs):
        assert msg.startswith(head.method.encode() + b" " + head.target)
        assert body == BODIES.get(msg, b"") and head.keep_alive
        assert not any(name.lower() == b"upgrade" for name, _ in head.headers)
    assert sum(isinstance(e, Send) for e in events) == sum(m in CONTINUES for m in msgs)   # one 100 Continue each


ODD = [b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", b"GET /\r\n\r\n", b"GET / HTTP/2.0\r\n\r\n",
       b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n1\r\na\r\n0\r\n\r\n",
       b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n"]
mutations = st.tuples(st.lists(st.sampled_from(VALID + UPGRADES + ODD), min_size=1, max_size=3).map(b"".join),
                      st.integers(0, 300), st.integers(0, 3), st.binary(max_size=8)).map(
    lambda t: t[0][:t[1]] + t[3] + t[0][t[1] + t[2]:])


@pytest.mark.fuzz
@given(st.one_of(st.binary(max_size=600), mutations), st.lists(st.integers(0, 700), max_size=10))
def test_garbage_and_mutations_give_only_protocol_events(data, cuts):
    fe = HttpFrontEnd(max_header=512, max_body=64)
    events = run(fe, data, cuts)
    assert all(isinstance(e, (Request, ProtocolError, Send)) for e in events)
    errors = [e for e in events if isinstance(e, ProtocolError)]
    assert len(errors) <= 1
    if errors and errors[0].reply:
        assert errors[0].reply.split(b" ")[1] in (b"400", b"413", b"431", b"501", b"505")
        assert errors[0].reply.startswith(b"HTTP/1.1 ")


@pytest.mark.fuzz
@given(st.one_of(st.binary(max_size=400), mutations), st.lists(st.integers(0, 700), max_size=10))
def test_where_input_is_split_does_not_change_the_requests(data, cuts):
    """Fed whole, split at random points, or byte by byte, the same input
    gives the same requests and the same error (inputs far under the
    header limit, which counts whole pieces)."""
    def outcome(events):
        return ([e.payload for e in events if isinstance(e, Request)],
                [e.message for e in events if isinstance(e, ProtocolError)])

    whole = outcome(run(HttpFrontEnd(), data, []))
    assert outcome(run(HttpFrontEnd(), data, cuts)) == whole
    assert outcome(run(HttpFrontEnd(), data, list(range(len(data))))) == whole


def test_head_and_http10_answers():
    fe = HttpFrontEnd()
    (req,) = [e for e in fe.receive(VALID[4]) if isinstance(e, Request)]
    out = sent(render_response(req.meta, "200 OK", [("Content-Type", "text/plain")], [b"body!"], False), 200)
    head, body = out.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.0 200 OK") and b"content-length: 5" in head and body == b""
    assert b"connection: close" in head and not fe.keep_alive(req)


def test_streamed_answers_are_chunked_on_1_1_and_errors_map_to_statuses():
    fe = HttpFrontEnd()
    (req,) = fe.receive(VALID[0])
    out = sent(render_response(req.meta, "200 OK", [], [b"ab", b"cde"], True), 200)
    assert b"transfer-encoding: chunked" in out and out.endswith(b"2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n")
    assert fe.response(req, b"x", error="unavailable").startswith(b"HTTP/1.1 503 ")
    assert fe.response(req, b"secret traceback", error="application").startswith(b"HTTP/1.1 500 ")
    assert b"secret" not in fe.response(req, b"secret traceback", error="application")



def test_the_workers_answer_is_sent_as_rendered_its_status_passed_as_data(caplog):
    fe = HttpFrontEnd(access_log=True)
    (req,) = fe.receive(VALID[0])
    parts = render_response(req.meta, "404 Not Found", [("Content-Type", "text/plain")], [b"no", b"pe"], False)
    with caplog.at_level("INFO", logger="pyshm.access"):
        out = fe.response(req, b"".join(parts), error=None)
    assert bytes(out) == sent(parts, 404)
    assert caplog.records[-1].getMessage().endswith('"GET / HTTP/1.1" 404 4')
    # The status and the head's length come from ANSWER, not from the bytes sent.
    http = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc"
    with caplog.at_level("INFO", logger="pyshm.access"):
        assert bytes(fe.response(req, ANSWER.pack(299, len(http) - 3) + http, error=None)) == http
    assert caplog.records[-1].getMessage().endswith('"GET / HTTP/1.1" 299 3')
    with caplog.at_level("INFO", logger="pyshm.access"):
        assert fe.response(req, b"timed out after 1 s", error=TIMED_OUT).endswith(b"\r\n\r\ntimed out after 1 s\n")
    assert caplog.records[-1].getMessage().endswith('"GET / HTTP/1.1" 504 %d' % len(b"timed out after 1 s\n"))


def _undated(http: bytes) -> bytes:
    return b"\r\n".join(line for line in http.split(b"\r\n") if not line.startswith(b"date: "))


def _boom(environ, start_response):
    raise ValueError("secret")


def _boom_late(environ, start_response):
    start_response("200 OK", [])
    yield b"partial"
    raise ValueError("secret")


def _no_start(environ, start_response):
    return [b"x"]


@pytest.mark.parametrize("app", [_boom, _boom_late, _no_start])
@pytest.mark.parametrize("request_bytes", [VALID[0], VALID[4]])
def test_an_application_failure_is_the_500_the_front_end_would_render_rendered_in_the_worker(
        app, request_bytes, caplog):
    fe = HttpFrontEnd()
    (req,) = [e for e in fe.receive(request_bytes) if isinstance(e, Request)]
    with caplog.at_level("ERROR", logger="pyshm.wsgi"):
        parts = call(app, memoryview(req.payload), "1.2.3.4:5")
    http = sent(parts, 500)
    assert b"secret" not in http and "application error in" in caplog.text
    assert _undated(http) == _undated(fe.response(req, b"secret traceback", error="application"))
    expected = simple_response(500, "Internal Server Error", close=not req.meta.keep_alive, version=req.meta.version)
    if req.meta.method == "HEAD":
        expected = expected[:expected.index(b"\r\n\r\n") + 4]     # a HEAD's answer has no body
    assert _undated(http) == _undated(expected)


def test_a_full_session_table_is_not_the_applications_failure():
    """SessionTableFull goes to the worker, which answers 'unavailable' (503)."""
    from pyshm.errors import SessionTableFull

    class Full:
        def session_for(self, cookie):
            raise SessionTableFull("no room")

    (req,) = HttpFrontEnd().receive(VALID[0])
    with pytest.raises(SessionTableFull):
        call(lambda env, sr: [b""], memoryview(req.payload), "1.2.3.4:5", Full())


def test_the_worker_side_imports_no_front_end():
    import subprocess
    import sys

    code = ("import sys, pyshm.worker, pyshm.wsgi, pyshm.rpc; "
            "print(sorted(m for m in sys.modules if m.startswith('pyshm.frontends')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_a_request_travels_to_the_worker_as_encoded():
    (req,) = HttpFrontEnd().receive(VALID[1])
    head, body = decode_request(memoryview(req.payload))
    assert head == req.meta and bytes(body) == b"hello"
    assert encode_request(head, b"hello") == req.payload


# -- framing (RFC 9112) --------------------------------------------------------------------------

def test_http10_transfer_encoding_is_answered_then_the_connection_closes():
    """RFC 9112 §6.1: the request is answered, nothing after its body is read."""
    fe = HttpFrontEnd()
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
    events = fe.receive(b"POST /p HTTP/1.0\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
                        b"3\r\nabc\r\n0\r\n\r\n" + smuggled)
    ((head, body),) = requests(events)
    assert (head.target, body, head.keep_alive) == (b"/p", b"abc", False)
    assert not fe.keep_alive(events[0])
    assert fe.receive(smuggled) == [] and fe.eof() == []


@pytest.mark.parametrize("version", [b"1.1", b"1.0"])
def test_transfer_encoding_with_content_length_is_refused(version):
    events = HttpFrontEnd().receive(b"POST / HTTP/" + version + b"\r\nHost: a\r\nContent-Length: 3\r\n"
                                    b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert refusal(events).startswith(b"HTTP/1.1 400 ") and len(events) == 1


@pytest.mark.parametrize("upgrade", UPGRADES)
def test_upgrade_is_ignored_and_the_request_answered_once(upgrade):
    fe = HttpFrontEnd()
    events = fe.receive(upgrade + VALID[0])
    (first, second) = requests(events)
    assert first[1] == BODIES.get(upgrade, b"") and second[0].target == b"/"
    assert [n for n, _ in first[0].headers if n.lower() == b"upgrade"] == []
    assert not fe.partial() and fe.eof() == []


def test_upgrade_on_http10_is_answered_and_closes():
    fe = HttpFrontEnd()
    events = fe.receive(b"GET / HTTP/1.0\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n" + VALID[0])
    ((head, _),) = requests(events)
    assert not head.keep_alive and fe.receive(VALID[0]) == []


def test_connect_is_refused_once_with_501():
    fe = HttpFrontEnd()
    events = fe.receive(VALID[0] + b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n" + VALID[0])
    assert isinstance(events[0], Request) and len(events) == 2
    assert refusal(events).startswith(b"HTTP/1.1 501 ") and b"connection: close" in refusal(events)
    assert fe.receive(VALID[0]) == [] and fe.eof() == []


@pytest.mark.parametrize("request_line", [b"GET /", b"GET / HTTP/0.9", b"GET / HTTP/2.0", b"GET / HTTP/1.2",
                                          b"GET / HTTP/3.0", b"PRI * HTTP/2.0\r\n\r\nSM"])   # HTTP/2's preface
def test_versions_other_than_1_0_and_1_1_are_refused_with_505(request_line):
    events = HttpFrontEnd().receive(request_line + b"\r\n\r\n")
    reply = refusal(events)
    assert reply.startswith(b"HTTP/1.1 505 HTTP Version Not Supported\r\n") and b"0.9" not in reply
    assert len(events) == 1


def test_absolute_form_target_routes_by_its_path_and_names_the_host():
    fe = HttpFrontEnd()
    (req,) = fe.receive(b"GET http://example.com:8080/abs/p%20q?q=1 HTTP/1.1\r\nHost: other\r\nX-Test: y\r\n\r\n")
    assert req.route == b"/abs/p%20q" and req.describe() == "GET /abs/p%20q"
    head, body = decode_request(memoryview(req.payload))
    env = environ_for(head, body, "1.2.3.4:5")
    assert (env["PATH_INFO"], env["QUERY_STRING"], env["HTTP_HOST"]) == ("/abs/p q", "q=1", "example.com:8080")
    assert env["RAW_URI"] == "http://example.com:8080/abs/p%20q?q=1" and env["HTTP_X_TEST"] == "y"
    (req,) = HttpFrontEnd().receive(b"OPTIONS HTTP://user@example.com?x HTTP/1.1\r\n\r\n")
    env = environ_for(*decode_request(memoryview(req.payload)), "1.2.3.4:5")
    assert (env["PATH_INFO"], env["QUERY_STRING"], env["HTTP_HOST"]) == ("/", "x", "example.com")
    (req,) = HttpFrontEnd().receive(b"GET /plain?x=1 HTTP/1.1\r\nHost: h\r\n\r\n")
    env = environ_for(*decode_request(memoryview(req.payload)), "1.2.3.4:5")
    assert (env["PATH_INFO"], env["QUERY_STRING"], env["HTTP_HOST"]) == ("/plain", "x=1", "h")


def test_request_label_is_method_and_path_without_query():
    (req,) = HttpFrontEnd().receive(b"DELETE /cart/7?force=1 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert req.describe() == "DELETE /cart/7"


def test_timed_out_is_504_with_the_managers_message():
    fe = HttpFrontEnd()
    (req,) = fe.receive(VALID[0])
    out = fe.response(req, b"timed out after 30 s", error=TIMED_OUT)
    assert out.startswith(b"HTTP/1.1 504 Gateway Timeout\r\n") and out.endswith(b"\r\n\r\ntimed out after 30 s\n")


def test_date_and_server_come_once_the_applications_own_first():
    (req,) = HttpFrontEnd().receive(VALID[0])
    own = [("DATE", "Mon, 01 Jan 2024 00:00:00 GMT"), ("server", "myapp/1")]
    head = sent(render_response(req.meta, "200 OK", own, [b"x"], False), 200).split(b"\r\n\r\n")[0].lower()
    assert head.count(b"\r\ndate: ") == 1 and b"date: mon, 01 jan 2024" in head
    assert head.count(b"\r\nserver: ") == 1 and b"server: myapp/1" in head
    head = sent(render_response(req.meta, "200 OK", [], [b"x"], False), 200).split(b"\r\n\r\n")[0]
    assert head.count(b"\r\ndate: ") == 1 and head.count(b"\r\nserver: pyshm") == 1


# -- limits --------------------------------------------------------------------------------------

def head_of_size(n: int) -> bytes:
    """A canonical request head of exactly n bytes."""
    base = b"GET /x HTTP/1.1\r\nHost: a\r\nX-Pad: \r\n\r\n"
    return base.replace(b"X-Pad: ", b"X-Pad: " + b"p" * (n - len(base)))


@pytest.mark.parametrize("piece", [1, 7, 1000, 1 << 20])
def test_header_section_of_exactly_max_header_is_accepted_and_one_more_refused(piece):
    limit = 2000
    for size, accepted in ((limit, True), (limit + 1, False)):
        data = head_of_size(size)
        assert len(data) == size
        fe = HttpFrontEnd(max_header=limit)
        events = run(fe, data, list(range(piece, size, piece)))
        if accepted:
            assert [r[0].target for r in requests(events)] == [b"/x"]
        else:
            assert refusal(events).startswith(b"HTTP/1.1 431 ")


@pytest.mark.parametrize("start", [b"GET / HTTP/1.1\r\nX-Endless: ", b"GET /", b"GET / HTTP/1.1\r\n"])
def test_header_section_that_never_ends_is_refused_early(start):
    limit, piece = 4096, 1000
    fe = HttpFrontEnd(max_header=limit)
    filler = b"a" * piece if start.endswith(b": ") or start == b"GET /" else b"X: b\r\n" * (piece // 6)
    events = fe.receive(start)
    sent = len(start)
    while not events:
        events = fe.receive(filler)
        sent += len(filler)
        assert fe.buffered() <= limit + FEED_PIECE + piece
        assert sent <= limit + FEED_PIECE + 2 * piece          # refused early, not after everything came
    assert refusal(events).startswith(b"HTTP/1.1 431 ")


# -- wsgi.input ----------------------------------------------------------------------------------

BODY = b"line one\nline two\n\nlast line without newline"


def test_body_read_honours_size_exactly():
    f = BodyInput(memoryview(BODY))
    assert f.read(0) == b""
    assert f.read(4) == b"line"
    assert f.read(1) == b" "
    assert f.read(3) == b"one"
    assert f.read() == BODY[8:]                      # the rest after partial reads
    assert f.read() == b"" and f.read(5) == b""      # past the end
    f = BodyInput(memoryview(BODY))
    assert f.read(len(BODY) + 100) == BODY and f.read(1) == b""
    f = BodyInput(memoryview(BODY))
    assert f.read(None) == BODY and f.read(-1) == b""


def test_body_readline_readlines_and_iteration():
    f = BodyInput(memoryview(BODY))
    assert f.readline(4) == b"line"                  # size cuts a line
    assert f.readline() == b" one\n"
    assert f.readline(100) == b"line two\n"
    assert f.readline() == b"\n"
    assert f.readline(0) == b""
    assert f.readline() == b"last line without newline" and f.readline() == b""
    assert BodyInput(memoryview(BODY)).readlines() == io.BytesIO(BODY).readlines()
    assert list(BodyInput(memoryview(BODY))) == io.BytesIO(BODY).readlines()
    f = BodyInput(memoryview(BODY))
    f.read(5)
    assert f.readlines() == io.BytesIO(BODY[5:]).readlines()


def test_body_readinto_and_mixed_reads_agree_with_bytesio():
    f, ref = BodyInput(memoryview(BODY)), io.BytesIO(BODY)
    buf = bytearray(6)
    assert f.readinto(buf) == 6 and bytes(buf) == BODY[:6]
    ref.read(6)
    for op in ("read", "readline", "read", "readline"):
        assert getattr(f, op)(3) == getattr(ref, op)(3)
    assert f.read() == ref.read()


def test_an_error_answer_to_head_carries_no_body():
    """A HEAD's 500 (the application raised) and its 503 (the manager's own)
    announce a length but send no body, so a keep-alive connection's next
    answer is not misread."""
    (req,) = HttpFrontEnd().receive(b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n")

    def boom(environ, start_response):
        raise RuntimeError("boom")

    answer = b"".join(call(boom, memoryview(req.payload), "1.2.3.4:5"))
    sent = HttpFrontEnd().response(req, answer, error=None)
    head, _, rest = bytes(sent).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 500 ") and b"content-length: 22" in head.lower() and rest == b""
    sent = HttpFrontEnd().response(req, b"no worker could start it", error="unavailable")
    head, _, rest = bytes(sent).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and rest == b""
