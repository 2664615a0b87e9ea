"""Raw TCP frames: a 4-byte big-endian length, then that many payload bytes.

Each request frame gets one response frame, in order.  A response whose
length word has its top bit set is an error: the payload is a UTF-8 message.
A frame longer than max_frame gets an error frame and the connection closes;
its body is neither read nor buffered.  So does a frame not whole within
request_timeout (the error frame says so)."""
from __future__ import annotations

import struct

from pyshm.frontend import Event, FrontEnd, ProtocolError, Request
from pyshm.sizes import parse_size

ERROR_FLAG = 0x8000_0000
MAX_FRAME_LIMIT = ERROR_FLAG - 1
_LEN = struct.Struct(">I")


def frame(body: bytes, *, error: bool = False) -> bytes:
    """One frame: what clients send, and what the server answers."""
    if len(body) > MAX_FRAME_LIMIT:
        raise ValueError(f"a frame holds at most {MAX_FRAME_LIMIT} bytes, not {len(body)}")
    return _LEN.pack(len(body) | (ERROR_FLAG if error else 0)) + body


class TcpFrontEnd(FrontEnd):
    name = "tcp"
    defaults = {"max_frame": 16 << 20, "route_bytes": 64}

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        self.max_frame = parse_size(self.options["max_frame"])
        if not 0 < self.max_frame <= MAX_FRAME_LIMIT:
            raise ValueError(f"tcp max_frame must be 1 byte to 2 GiB, not {self.max_frame}")
        self.route_bytes = int(self.options["route_bytes"])
        self._buf = bytearray()
        self._need = 0        # body bytes of the frame being read; 0 = reading a length
        self._closed = False

    def receive(self, data: bytes) -> list[Event]:
        if self._closed:
            return []
        self._buf += data
        events: list[Event] = []
        while True:
            if not self._need:
                if len(self._buf) < 4:
                    break
                (n,) = _LEN.unpack_from(self._buf)
                if n > self.max_frame:
                    self._closed = True
                    self._buf.clear()
                    msg = f"frame of {n} bytes exceeds the limit of {self.max_frame}"
                    events.append(ProtocolError(msg, frame(msg.encode(), error=True)))
                    break
                del self._buf[:4]
                self._need = n
                if n == 0:
                    events.append(Request(b""))
                    continue
            if len(self._buf) < self._need:
                break
            payload = bytes(self._buf[:self._need])
            del self._buf[:self._need]
            self._need = 0
            events.append(Request(payload, route=payload[:self.route_bytes]))
        return events

    def eof(self) -> list[Event]:
        if self.partial():
            self._closed = True
            return [ProtocolError("connection closed in the middle of a frame")]
        return []

    def response(self, request: Request, body: bytes, *, error: str | None) -> bytes:
        return frame(body, error=error is not None)

    def partial(self) -> bool:
        return not self._closed and bool(self._buf or self._need)

    def buffered(self) -> int:
        """Bytes received of a frame not yet whole."""
        return len(self._buf)

    def timeout_reply(self) -> bytes:
        return frame(self.timeout_text().encode(), error=True)
