"""msgpack-RPC applications: the methods a suite exposes.

    import pyshm

    @pyshm.rpc_method
    def add(a, b):
        return a + b

    @pyshm.endpoint
    class Counter:                 # called as "Counter.incr"
        def __init__(self):
            self.n = 0
        def incr(self, by=1):
            self.n += by
            return self.n

A suite serving them names the module: `app = "mymodule"` (the global
registry, filled by the decorators) or `app = "mymodule:registry"` for an
own `RpcRegistry`.  Each connection is a distributed session bound to one
worker, with its own endpoint instances there; their shareable attributes
are checkpointed after each call, so if the worker dies another one
restores them and the connection goes on.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import msgpack

from pyshm import _codec
from pyshm.errors import ClosureError, PyshmError, SessionLost, UnknownMethod
from pyshm.heap import SharedHeap
from pyshm.rpc_wire import NOTIFY
from pyshm.sessions import SessionTable, state_closure

log = logging.getLogger(__name__)


class RpcRegistry:
    def __init__(self) -> None:
        self.functions: dict[str, Callable[..., Any]] = {}
        self.endpoints: dict[str, type] = {}
        self.restorable: dict[str, bool] = {}

    def method(self, fn: Callable[..., Any] | None = None, *, name: str | None = None) -> Any:
        """Decorator: exposes fn under its name (or `name`)."""
        def register(f: Callable[..., Any]) -> Callable[..., Any]:
            self.functions[name or f.__name__] = f
            return f
        return register(fn) if fn is not None else register

    def endpoint(self, cls: type | None = None, *, name: str | None = None, restorable: bool = True) -> Any:
        """Decorator: exposes the public methods of cls as "Name.method".
        restorable=False: after its worker dies the session ends instead of
        continuing from the last checkpoint."""
        def register(c: type) -> type:
            self.endpoints[name or c.__name__] = c
            self.restorable[name or c.__name__] = restorable
            return c
        return register(cls) if cls is not None else register


methods = RpcRegistry()          # the global registry of the decorators below
rpc_method = methods.method
endpoint = methods.endpoint


@dataclass
class _Endpoints:
    """One session's endpoint instances in this worker."""
    objects: dict[str, Any] = field(default_factory=dict)
    restored_from: int = -1      # checkpoint version they came from; -1: fresh


class CallRunner:
    """Runs calls for one worker: functions directly, endpoint methods on the
    calling session's own instances.  After each call that reached an
    endpoint, its shareable attributes are checkpointed to the session's
    closure, so another worker can take the session over."""

    def __init__(self, registry: RpcRegistry, table: SessionTable | None = None,
                 heap: SharedHeap | None = None) -> None:
        self.registry, self.table, self.heap = registry, table, heap
        self.sessions: dict[bytes, _Endpoints] = {}
        self._local: dict[str, Any] = {}     # endpoint instances of calls without a session
        self._calls = 0

    def call(self, payload: memoryview, sid: bytes | None) -> bytes | None:
        """Runs one call; returns the packed result, or None for a
        notification.  Raises UnknownMethod, SessionLost or the method's
        exception for a request."""
        kind, method, params = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        self._calls += 1
        if self._calls % 1024 == 0:
            self.forget_ended()      # a busy worker never idles: drop ended sessions here too
        try:
            fn, ep = self.resolve(method, sid)
        except UnknownMethod:
            if kind == NOTIFY:
                return None        # an unknown notification is ignored
            raise
        keep = ep is not None and sid is not None
        try:
            result = fn(*params)
        except Exception:
            if keep:
                try:                  # what the method changed before it failed still counts
                    self.checkpoint(sid, ep)
                except PyshmError:    # but the client hears of the method's error, not this one
                    log.exception("checkpoint of session %s failed", sid.hex())
            if kind == NOTIFY:
                log.exception("notification %s failed", method)
                return None
            raise
        if keep:
            self.checkpoint(sid, ep)
        return None if kind == NOTIFY else msgpack.packb(result, use_bin_type=True)

    def resolve(self, method: str, sid: bytes | None) -> tuple[Callable[..., Any], _Endpoints | None]:
        fn = self.registry.functions.get(method)
        if fn is not None:
            return fn, None
        cls_name, dot, meth = method.partition(".")
        cls = self.registry.endpoints.get(cls_name)
        if not dot or cls is None or meth.startswith("_"):
            raise UnknownMethod(f"unknown method {method!r}")
        if sid is None or self.table is None:
            eps, inst = None, self._local.get(cls_name)
            if inst is None:
                inst = self._local[cls_name] = cls()
        else:
            eps = self.endpoints(sid)
            inst = eps.objects.get(cls_name)
            if inst is None:
                inst = eps.objects[cls_name] = self.restore(sid, eps, cls_name, cls)
        bound = getattr(inst, meth, None)
        if not callable(bound):
            raise UnknownMethod(f"unknown method {method!r}")
        return bound, eps

    # -- sessions ----------------------------------------------------------------------

    def endpoints(self, sid: bytes) -> _Endpoints:
        eps = self.sessions.get(sid)
        if eps is None:
            eps = self.sessions[sid] = _Endpoints()
            entry = self.table.get(sid)
            if entry is None:
                raise SessionLost("the session ended")
            if entry.closure:
                eps.restored_from = entry.closure_version
        return eps

    def restore(self, sid: bytes, eps: _Endpoints, name: str, cls: type) -> Any:
        """The session's instance of cls: from its checkpoint when the
        session was moved here from a dead worker, else new."""
        if eps.restored_from < 0:
            return cls()
        if not self.registry.restorable[name]:
            self.table.end(sid, self.heap)
            raise SessionLost(f"endpoint {name} is not restorable: its worker died, so the session ended")
        state = self.heap.get(state_closure(sid)).get(name)
        inst = cls.__new__(cls)
        if state is None:
            inst.__init__()
        else:
            inst.__dict__.update(state)
        return inst

    def checkpoint(self, sid: bytes, eps: _Endpoints) -> None:
        state = {name: _shareable_attrs(obj) for name, obj in eps.objects.items()
                 if self.registry.restorable.get(name, True)}
        name = state_closure(sid)
        version = self.heap.put(name, state)
        if not self.table.saved(sid, name, version, touch=False):   # ended meanwhile (the connection closed)
            self.heap.delete(name)

    def forget_ended(self) -> None:
        """Drops the instances of sessions that ended."""
        if self.table is None:
            return
        for sid in [sid for sid in self.sessions if self.table.get(sid) is None]:
            del self.sessions[sid]


def _shareable_attrs(obj: Any) -> dict[str, Any]:
    """The attributes of obj that can be put into the heap."""
    attrs = dict(vars(obj))
    try:
        _codec.encode(attrs)
        return attrs
    except ClosureError:
        keep = {}
        for k, v in attrs.items():
            try:
                _codec.encode(v)
                keep[k] = v
            except ClosureError:
                log.debug("attribute %s of %s is not shareable: not checkpointed", k, type(obj).__name__)
        return keep
