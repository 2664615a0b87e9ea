"""Where sessions went: the map of sessions that moved from one node to
another in a handoff, as this node learned it (MOVED messages, its own
handoffs, the sessions handed to it, and the maps peers send a node when it
(re)joins: a restarted node learns where the sessions its clients' cookies
and tokens still name went).

A request whose cookie names a node that handed its sessions away is
forwarded to the node that took it.  Each entry lives as long as its
session could (session_ttl after the move: an idle session expires by
then), and the map holds at most `capacity` entries, the oldest forgotten
first, so its memory is bounded whatever peers say.
"""
from __future__ import annotations

import time
from collections import OrderedDict


class Moves:
    def __init__(self, ttl: float = 1800.0, capacity: int = 1 << 20) -> None:
        self.ttl = ttl
        self.capacity = capacity
        self._map: OrderedDict[bytes, tuple[str, float]] = OrderedDict()   # session id -> (node, until)

    def record(self, sid: bytes, node: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._map[sid] = (node, now + self.ttl)
        self._map.move_to_end(sid)
        while len(self._map) > self.capacity:
            self._map.popitem(last=False)

    def forget(self, sid: bytes) -> None:
        self._map.pop(sid, None)

    def node_of(self, sid: bytes, now: float | None = None) -> str | None:
        """The node session sid moved to, if it moved and the entry is live."""
        entry = self._map.get(sid)
        if entry is None:
            return None
        if entry[1] < (time.monotonic() if now is None else now):
            del self._map[sid]
            return None
        return entry[0]

    def entries(self, now: float | None = None) -> list[tuple[bytes, str]]:
        """Every live entry (what a (re)joining peer is told)."""
        now = time.monotonic() if now is None else now
        return [(sid, node) for sid, (node, until) in self._map.items() if until >= now]

    def __len__(self) -> int:
        return len(self._map)
