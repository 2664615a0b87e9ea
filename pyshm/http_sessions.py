"""HTTP sessions: non-distributed, one request one command.

A signed cookie names the session; its entry is in the session table and
its state is a closure in the heap (named by sessions.state_closure), so the
next request can go to any worker.  The application sees
``environ["pyshm.session"]``, a MutableMapping that loads on first use and
is saved only when the request changed it.  A forged or tampered cookie, or
one whose session expired or ended, starts a fresh session.

    cookie:  pyshm_session=<hex id, owner, secondary>.<HMAC> (pyshm.session_cookie)

The manager verifies the cookie (pyshm.session_cookie) and passes the
verified id with the request; the worker signs new ones.
"""
from __future__ import annotations

import logging
import time
from collections.abc import MutableMapping
from typing import Any, Iterator

from pyshm.errors import ClosureNotFound
from pyshm.heap import SharedHeap
from pyshm.session_cookie import COOKIE, CookieSigner
from pyshm.sessions import MOVED, SessionKind, SessionTable, state_closure

log = logging.getLogger(__name__)

class SessionStore:
    """What a worker needs to load and save HTTP sessions."""

    def __init__(self, table: SessionTable, heap: SharedHeap, secret: bytes, *, ttl: float = 1800.0,
                 secure: bool = False, suite: int = 0, node: int = 0) -> None:
        self.table, self.heap = table, heap
        self.ttl, self.secure, self.suite = ttl, secure, suite
        self.node = node            # this node's number in its cluster (0: none): the owner of what it creates
        self.signer = CookieSigner(secret, suite)

    def sign(self, sid: bytes) -> str:
        return self.signer.sign(sid, self.node)

    def session_for(self, sid: bytes | None) -> HttpSession:
        """The request's session: `sid` is the id the manager verified from
        its cookie (None: no valid cookie)."""
        return HttpSession(self, sid)

    def end(self, sid: bytes) -> None:
        """Removes entry and closure (logout, invalidate)."""
        self.table.end(sid, self.heap)

    def cookie(self, value: str, *, clear: bool = False) -> tuple[str, str]:
        parts = [f"{COOKIE}={value}", "Path=/", "HttpOnly", "SameSite=Lax"]
        if self.secure:
            parts.append("Secure")
        if clear:
            parts.append("Max-Age=0")
        return ("Set-Cookie", "; ".join(parts))


class HttpSession(MutableMapping):
    """environ["pyshm.session"]: loads on first use, saved if changed."""

    def __init__(self, store: SessionStore, sid: bytes | None) -> None:
        self._store = store
        self._claimed = sid          # from a valid cookie; may still be gone from the table
        self.id: bytes | None = None
        self._data: dict[str, Any] | None = None
        self.modified = False
        self.invalidated = False
        self.moved = False           # handed to this node: the cookie is signed again, naming it

    def _load(self) -> dict[str, Any]:
        if self._data is None:
            self._data = {}
            sid = self._claimed
            brief = self._store.table.brief(sid) if sid else None
            if brief is not None and brief[2] and brief[2] <= time.time():
                brief = None            # expired: the sweep frees it; this client starts afresh
            if brief is not None:
                self.id = sid
                self.moved = bool(brief[4] & MOVED)
                if brief[3]:            # a closure version: state was saved
                    try:
                        self._data = self._store.heap.get(state_closure(sid))
                    except ClosureNotFound:
                        pass
        return self._data

    # -- MutableMapping ----------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        return self._load()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._load()[key] = value
        self.modified = True

    def __delitem__(self, key: str) -> None:
        del self._load()[key]
        self.modified = True

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())

    def invalidate(self) -> None:
        """Ends the session now: entry and closure go, the cookie is cleared."""
        self._load()
        self.invalidated = True
        self._data = {}

    # -- after the request ------------------------------------------------------------------

    def finish(self) -> list[tuple[str, str]]:
        """Saves what changed; returns the headers to add to the answer."""
        store = self._store
        if self.invalidated:
            if self.id is not None:
                store.end(self.id)
            return [store.cookie("", clear=True)] if self._claimed else []
        if self._data is None:
            return []                       # the application never looked
        headers = []
        if self.id is None and not self.modified:
            return []
        if self.id is None:                 # first write: a new session
            self.id = store.table.open(SessionKind.REQUEST, suite=store.suite, ttl=store.ttl,
                                       owner_node=store.node).id
            headers.append(store.cookie(store.sign(self.id)))
        elif self.moved and store.table.flags(self.id, clear=MOVED):
            headers.append(store.cookie(store.sign(self.id)))     # now naming this node as its owner
        if self.modified:
            name = state_closure(self.id)
            version = store.heap.put(name, self._data)
            if not store.table.saved(self.id, name, version, store.ttl):
                store.heap.delete(name)      # ended meanwhile (logout in a parallel request)
        else:
            store.table.touch(self.id, store.ttl)
        return headers
