"""The front-end plugin interface.

A front-end is a sans-IO protocol object, one per client connection: bytes
in, events out (`receive`), and for each answered request the bytes to send
(`response`).  It never touches a socket; `pyshm.transport.Connection` drives
every front-end over asyncio the same way.

Front-ends are found through the entry-point group ``pyshm.frontends``; the
built-in ones in ``frontends/`` register there exactly as a third party's
would::

    [project.entry-points."pyshm.frontends"]
    lines = "mypkg.lines:LineFrontEnd"
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar, Union

log = logging.getLogger(__name__)

GROUP = "pyshm.frontends"


@dataclass
class Request:
    """A complete request a front-end parsed.

    route: what routing rules match against (a path, a method name, the
    first bytes of a frame).  meta: anything the front-end wants back in
    response() (e.g. the HTTP version).  label: how the log names the
    request ("method add"); when empty, meta.describe() if the meta has one
    (HTTP: "GET /cart"), else the route."""
    payload: bytes
    route: bytes = b""
    session: bytes | None = None
    meta: Any = None
    label: str = ""
    claim: bytes | None = None      # a session token the client presented (HTTP: the session cookie's value)

    def describe(self) -> str:
        """The label; else the meta's describe() (computed only when a log
        line needs it); else the route."""
        if self.label:
            return self.label
        describe = getattr(self.meta, "describe", None)
        return describe() if callable(describe) else repr(self.route[:64])


@dataclass
class ProtocolError:
    """The input is bad: send `reply` after the responses already due, then
    close the connection.  Nothing more is read."""
    message: str
    reply: bytes = b""


@dataclass
class Send:
    """Bytes to write now, before the request's answer (HTTP's 100 Continue)."""
    data: bytes


Event = Union[Request, ProtocolError, Send]

# Why a request got no answer from the application (the `error` passed to
# FrontEnd.response; None when the application answered).
APP_ERROR = "application"        # the application raised
WORKER_DIED = "worker-died"      # its worker died while running it
UNAVAILABLE = "unavailable"      # no worker free within queue_timeout
TOO_LARGE = "too-large"          # no shared memory for the payload
SHUTTING_DOWN = "shutting-down"  # the server stopped before it ran
SESSION_ENDED = "session-ended"  # its distributed session is gone
TIMED_OUT = "timed-out"          # it ran longer than its suite's timeout (its worker was replaced)
NODE_DIED = "node-died"          # the cluster node it was forwarded to died, or left, before answering
INTERNAL = "internal"


class FrontEnd:
    """Base class of front-ends.  Subclasses set `name` and `defaults` (the
    options a listener may override) and implement receive() and
    response()."""
    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    #: The worker interface the suites it feeds run (pyshm.worker): "handler"
    #: (handle(request) -> bytes, the payload as this front-end made it),
    #: "wsgi" or "rpc".  A suite without `interface` takes its front-end's.
    interface: ClassVar[str] = "handler"
    #: Options every front-end has: seconds a connection may idle between
    #: requests, and seconds a started request has to arrive whole.
    common: ClassVar[dict[str, Any]] = {"idle_timeout": 300.0, "request_timeout": 60.0}
    #: True: responses go out in request order (the transport holds back
    #: early ones); False: as they complete (a protocol with request ids).
    ordered: ClassVar[bool] = True

    def __init__(self, **options: Any) -> None:
        known = {**self.common, **self.defaults}
        unknown = set(options) - set(known)
        if unknown:
            raise ValueError(f"front-end {self.name!r} has no option {sorted(unknown)[0]!r} "
                             f"(it knows {', '.join(sorted(known))})")
        self.options = {**known, **options}

    def receive(self, data: bytes) -> list[Event]:
        """Feeds bytes from the client; returns the events they complete."""
        raise NotImplementedError

    def connection_made(self, peer: str, server: tuple[str, int]) -> None:
        """Where the connection comes from and which address it reached."""

    def eof(self) -> list[Event]:
        """The client closed its side.  Default: nothing more to do."""
        return []

    def response(self, request: Request, body: bytes, *, error: str | None) -> bytes | memoryview:
        """The bytes that answer `request` (any bytes-like object): the
        application's answer, or (error set to one of the kinds above) an
        error with `body` as message."""
        raise NotImplementedError

    def keep_alive(self, request: Request) -> bool:
        """False: close the connection once this request's answer is out."""
        return True

    def partial(self) -> bool:
        """True while a request is partly received (its timeout runs)."""
        return False

    def timeout_reply(self) -> bytes:
        """What to send before closing a connection that timed out."""
        return b""

    def timeout_text(self) -> str:
        """Why the connection is closed, for front-ends that answer it in words."""
        return f"request not received within {float(self.options['request_timeout']):g} s"


@dataclass
class Registry:
    """Front-end classes by name, loaded from the entry points."""
    classes: dict[str, type[FrontEnd]] = field(default_factory=dict)

    @classmethod
    def load(cls) -> Registry:
        reg = cls()
        for ep in entry_points(group=GROUP):
            try:
                fe = ep.load()
            except Exception as e:  # a broken third-party plugin must not stop the server
                log.error("front-end entry point %s (%s) failed to load: %s", ep.name, ep.value, e)
                continue
            reg.classes[ep.name] = fe
        return reg

    def interfaces(self) -> dict[str, str]:
        """The worker interface each front-end needs, by name: what
        pyshm.config infers a suite's interface from."""
        return {name: getattr(fe, "interface", "handler") for name, fe in self.classes.items()}

    def get(self, name: str) -> type[FrontEnd]:
        try:
            return self.classes[name]
        except KeyError:
            raise ValueError(f"no front-end named {name!r} (installed: {', '.join(sorted(self.classes))}); "
                             f"front-ends register in the entry-point group {GROUP!r}") from None
