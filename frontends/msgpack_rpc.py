"""msgpack-RPC (https://github.com/msgpack-rpc/msgpack-rpc/blob/master/spec.md)
as a sans-IO front-end.

    request       [0, msgid, method, params]  ->  response [1, msgid, error, result]
    notification  [2, method, params]          ->  nothing

Responses go out as they complete (a client pipelines and matches msgids).
Malformed input (not msgpack, not one of these shapes, a message over
max_message) gets one error response [1, null, "<why>", null] and the
connection is closed.  Between this front-end and a worker (pyshm.rpc) a
call travels as msgpack [kind, method, params]; the worker answers with the
msgpack-encoded result, or an error message."""
from __future__ import annotations

from dataclasses import dataclass

import msgpack

from pyshm.frontend import APP_ERROR, Event, FrontEnd, ProtocolError, Request
from pyshm.sizes import parse_size

REQUEST, RESPONSE, NOTIFY = 0, 1, 2


@dataclass
class Call:
    kind: int          # REQUEST or NOTIFY
    msgid: int | None


def error_reply(why: str) -> bytes:
    return msgpack.packb([RESPONSE, None, why, None])


class MsgpackRpcFrontEnd(FrontEnd):
    name = "msgpack-rpc"
    defaults = {"max_message": 16 << 20}
    ordered = False

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        self.max_message = parse_size(self.options["max_message"])
        self._unpacker = msgpack.Unpacker(max_buffer_size=self.max_message, raw=False,
                                          strict_map_key=False)
        self._dead = False

    def receive(self, data: bytes) -> list[Event]:
        if self._dead:
            return []
        events: list[Event] = []
        try:
            self._unpacker.feed(data)
            for msg in self._unpacker:
                ev = self._event(msg)
                if ev is not None:
                    events.append(ev)
                if isinstance(ev, ProtocolError):
                    break
        except msgpack.BufferFull:
            events.append(self._fail(f"message over the limit of {self.max_message} bytes"))
        except (msgpack.UnpackException, ValueError) as e:
            events.append(self._fail(f"malformed msgpack: {e}"))
        return events

    def _fail(self, why: str) -> ProtocolError:
        self._dead = True
        return ProtocolError(why, error_reply(why))

    def _event(self, msg: object) -> Event | None:
        if not isinstance(msg, (list, tuple)) or not msg or msg[0] not in (REQUEST, NOTIFY):
            return self._fail("expected [0, msgid, method, params] or [2, method, params]")
        if msg[0] == REQUEST:
            if len(msg) != 4 or not isinstance(msg[1], int) or not 0 <= msg[1] < 2**32:
                return self._fail("a request is [0, msgid (uint32), method, params]")
            _, msgid, method, params = msg
        else:
            if len(msg) != 3:
                return self._fail("a notification is [2, method, params]")
            msgid = None
            _, method, params = msg
        if isinstance(method, bytes):
            method = method.decode("utf-8", "replace")
        if not isinstance(method, str) or not isinstance(params, (list, tuple)):
            return self._fail("method must be a string and params an array")
        payload = msgpack.packb([msg[0], method, params])
        return Request(payload, route=method.encode(), meta=Call(msg[0], msgid))

    def response(self, request: Request, body: bytes, *, error: str | None) -> bytes:
        call: Call = request.meta
        if call.kind == NOTIFY:
            return b""
        if error is None:
            return msgpack.packb([RESPONSE, call.msgid, None, None])[:-1] + body   # body: the packed result
        why = body.decode("utf-8", "replace") if error == APP_ERROR else f"{error}: {body.decode('utf-8', 'replace')}"
        return msgpack.packb([RESPONSE, call.msgid, why, None])
