"""RPC sessions that outlive their connection: the manager's answers to
two methods every RPC suite has.

    pyshm.session_token()   a token naming the connection's session
    pyshm.resume(token)     a new connection continues that session

A part of ConnectionManager (mixed into it): it uses the manager's
sessions, heap, cookies, cluster and _enqueue, and nothing else of it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import msgpack

from pyshm.frontend import APP_ERROR, SESSION_ENDED, UNAVAILABLE, Request
from pyshm.sessions import RESUMABLE

if TYPE_CHECKING:
    from pyshm.manager import Client

Reply = Callable[[bytes, "str | None"], None]

TOKEN_METHOD, RESUME_METHOD = b"pyshm.session_token", b"pyshm.resume"


class SessionTokens:
    def _session_method(self, client: Client, suite: str, request: Request, reply: Reply) -> None:
        """pyshm.session_token(): a token naming the connection's session
        (signed as the HTTP cookies are), which from then on outlives the
        connection by session_ttl.  pyshm.resume(token), as a connection's
        first call: the connection continues that session, here or (in a
        cluster) at the node owning it, for the rest of its life."""
        signer = self.cookies[suite]
        if request.route == TOKEN_METHOD:
            if client.session is None and client.session_error is None:
                self._open_session(client, suite)
            if client.session is None:
                reply((client.session_error or "no session").encode(), UNAVAILABLE)
                return
            if not client.owner:
                self.sessions.flags(client.session, set=RESUMABLE)
            reply(msgpack.packb(signer.sign(client.session, client.owner or self.node_number)), None)
            return
        try:
            _, _, params = msgpack.unpackb(request.payload, raw=False)
            claim = signer.verify(params[0].encode()) if params and isinstance(params[0], str) else None
        except (ValueError, TypeError, msgpack.UnpackException):
            claim = None
        if client.session is not None and not self._pristine(client):
            reply(b"pyshm.resume must come before any call that used the connection's session", APP_ERROR)
        elif claim is None:
            reply(b"not a session token of this server", APP_ERROR)
        elif self.sessions.brief(claim.sid) is not None:        # here (made here, or handed here)
            self._drop_pristine(client)
            client.session = claim.sid
            self.sessions.touch(claim.sid, self.config.session_ttl)
            reply(msgpack.packb(True), None)
        else:
            peer = self.cluster.moved_to(claim.sid) if self.cluster is not None else None
            if peer is None and self.cluster is not None and claim.owner != self.node_number:
                peer = self.cluster.peer_for(claim.owner)
            if peer is None:
                reply(b"the session ended", SESSION_ENDED)
                return
            # Its calls go to the owner from now on (set before the owner
            # answers: calls pipelined behind this one follow it there).
            self._drop_pristine(client)
            client.session, client.owner = claim.sid, peer.number
            request.session = claim.sid
            self._enqueue(suite, request, client.peer, reply, peer.number)

    def _pristine(self, client: Client) -> bool:
        """The connection's own session holds no state yet (nothing was
        checkpointed): a resume may replace it.  Clients such as pynvim send
        a notification just before their first call, which may still be
        running (it then ran for the session given up)."""
        brief = self.sessions.brief(client.session) if not client.owner else None
        return brief is not None and not brief[3] and not brief[4] & RESUMABLE     # (a token's session stays)

    def _drop_pristine(self, client: Client) -> None:
        if client.session is not None:
            self.sessions.end(client.session, self.heap)
            client.session = None
