"""msgpack-RPC (https://github.com/msgpack-rpc/msgpack-rpc/blob/master/spec.md)
as a sans-IO front-end.

    request       [0, msgid, method, params]  ->  response [1, msgid, error, result]
    notification  [2, method, params]          ->  nothing

Responses go out as they complete (a client pipelines and matches msgids).
Malformed input (not msgpack, not one of these shapes, a message over
max_message bytes or nested deeper than MAX_DEPTH levels) gets one error
response [1, null, "<why>", null] and the connection is closed; so does a
message not whole within request_timeout.  Between this front-end and a
worker (pyshm.rpc) a call travels as msgpack [kind, method, params] (kind:
pyshm.rpc_wire's REQUEST or NOTIFY); the worker answers with the
msgpack-encoded result, or an error message.

Memory: msgpack's unpacker preallocates a list for each array header it
reads (an array32 header announces up to 2**32 elements in 5 bytes), so the
unpacker that builds objects never sees a message before it is whole.  A
second unpacker, fed the same bytes, only skip()s (skipping builds nothing)
and so counts the complete messages; only those are unpacked, and every
element a list is preallocated for is then backed by an input byte.  At most
max_message bytes of an incomplete message are held (twice, once in each
unpacker)."""
from __future__ import annotations

from dataclasses import dataclass

import msgpack

from pyshm.frontend import APP_ERROR, Event, FrontEnd, ProtocolError, Request
from pyshm.rpc_wire import NOTIFY, REQUEST, RESPONSE
from pyshm.sizes import parse_size

#: The deepest nesting of arrays and maps a message may have.  It is
#: msgpack's own (the fixed stack of its C unpacker, which its packer also
#: allows), stated here so the refusal can name it; tests pin it.
MAX_DEPTH = 1024


@dataclass
class Call:
    kind: int          # REQUEST or NOTIFY
    msgid: int | None


def error_reply(why: str) -> bytes:
    return msgpack.packb([RESPONSE, None, why, None])


def decode_error(e: Exception) -> str:
    """What was wrong, for an exception msgpack raised on client input (its
    own exception classes carry no message)."""
    if isinstance(e, msgpack.FormatError):
        return "byte 0xc1 is not valid msgpack"       # the one byte the format never uses
    if isinstance(e, msgpack.StackError) or "recursion limit" in str(e):
        return f"nested more than {MAX_DEPTH} levels"
    if isinstance(e, UnicodeDecodeError):
        return f"a string is not valid UTF-8 ({e.reason})"
    if isinstance(e, TypeError) and "unhashable" in str(e):
        return "a map key is an array or a map"
    return str(e) or type(e).__name__


class MsgpackRpcFrontEnd(FrontEnd):
    name = "msgpack-rpc"
    interface = "rpc"
    defaults = {"max_message": 16 << 20}
    ordered = False

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        self.max_message = n = parse_size(self.options["max_message"])
        # The skipper finds where messages end; the unpacker only ever holds
        # whole ones.  No string, array or map can be longer than its message.
        self._skipper = msgpack.Unpacker(max_buffer_size=n)
        self._unpacker = msgpack.Unpacker(max_buffer_size=n, raw=False, strict_map_key=False,
                                          max_str_len=n, max_bin_len=n, max_ext_len=n,
                                          max_array_len=n, max_map_len=n // 2)
        self._packer = msgpack.Packer()
        self._fed = 0          # bytes fed to both unpackers so far
        self._dead = False

    # -- bytes in ----------------------------------------------------------------------

    def receive(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        if self._dead:
            return events
        if self.buffered() + len(data) <= self.max_message:
            self._feed(data, events)
            return events
        # Feed no more than the unpackers may hold at a time: a read may
        # carry many small messages, each well under the limit.
        view = memoryview(data)
        while view and not self._dead:
            room = self.max_message - self.buffered()
            self._feed(view[:room], events)
            view = view[room:]
        return events

    def _feed(self, piece: bytes | memoryview, events: list[Event]) -> None:
        self._fed = fed = self._fed + len(piece)
        self._skipper.feed(piece)
        self._unpacker.feed(piece)
        # Count the messages now whole: skip() builds nothing.  The skipper's
        # position counts a message in progress too, so stop at the end
        # rather than let skip() raise OutOfData.
        skip, tell = self._skipper.skip, self._skipper.tell
        whole, refused = 0, None
        try:
            while tell() < fed:
                skip()
                whole += 1
        except msgpack.OutOfData:
            pass
        except Exception as e:
            refused = e
        try:
            unpack = self._unpacker.unpack
            for _ in range(whole):
                ev = self._event(unpack())
                if ev is not None:
                    events.append(ev)
                if self._dead:
                    return
        except Exception as e:   # anything msgpack raises on client bytes is the client's error
            events.append(self._fail(f"malformed msgpack: {decode_error(e)}"))
            return
        if refused is not None:
            events.append(self._fail(f"malformed msgpack: {decode_error(refused)}"))
        elif fed - self._unpacker.tell() >= self.max_message:
            # max_message bytes held and still no whole message: it is longer.
            events.append(self._fail(f"message over the limit of {self.max_message} bytes"))

    def _fail(self, why: str) -> ProtocolError:
        self._dead = True
        return ProtocolError(why, error_reply(why))

    def _event(self, msg: object) -> Event | None:
        if not isinstance(msg, list) or not msg or type(msg[0]) is not int or msg[0] not in (REQUEST, NOTIFY):
            return self._fail("expected [0, msgid, method, params] or [2, method, params]")
        if msg[0] == REQUEST:
            if len(msg) != 4 or type(msg[1]) is not int or not 0 <= msg[1] < 2**32:
                return self._fail("a request is [0, msgid (uint32), method, params]")
            _, msgid, method, params = msg
        else:
            if len(msg) != 3:
                return self._fail("a notification is [2, method, params]")
            msgid = None
            _, method, params = msg
        if isinstance(method, bytes):
            method = method.decode("utf-8", "replace")
        if not isinstance(method, str) or not isinstance(params, list):
            return self._fail("method must be a string and params an array")
        payload = self._packer.pack([msg[0], method, params])
        return Request(payload, route=method.encode(), meta=Call(msg[0], msgid), label=f"method {method[:200]}")

    def eof(self) -> list[Event]:
        if self.partial():
            self._dead = True
            return [ProtocolError("connection closed in the middle of a message")]
        return []

    def partial(self) -> bool:
        return not self._dead and self.buffered() > 0

    def buffered(self) -> int:
        """Bytes received of a message not yet whole (held by each unpacker)."""
        return self._fed - self._unpacker.tell()

    def timeout_reply(self) -> bytes:
        return error_reply(self.timeout_text())

    # -- bytes out ---------------------------------------------------------------------

    def response(self, request: Request, body: bytes, *, error: str | None) -> bytes:
        call: Call = request.meta
        if call.kind == NOTIFY:
            return b""
        if error is None:
            return msgpack.packb([RESPONSE, call.msgid, None, None])[:-1] + body   # body: the packed result
        why = body.decode("utf-8", "replace") if error == APP_ERROR else f"{error}: {body.decode('utf-8', 'replace')}"
        return msgpack.packb([RESPONSE, call.msgid, why, None])
