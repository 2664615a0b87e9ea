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
own `RpcRegistry`.  An endpoint's instance lives in the worker; until
sessions bind one per connection, each worker holds one per class.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import msgpack

log = logging.getLogger(__name__)

NOTIFY = 2


class UnknownMethod(LookupError):
    pass


class RpcRegistry:
    def __init__(self) -> None:
        self.functions: dict[str, Callable[..., Any]] = {}
        self.endpoints: dict[str, type] = {}
        self._instances: dict[str, Any] = {}

    def method(self, fn: Callable[..., Any] | None = None, *, name: str | None = None) -> Any:
        """Decorator: exposes fn under its name (or `name`)."""
        def register(f: Callable[..., Any]) -> Callable[..., Any]:
            self.functions[name or f.__name__] = f
            return f
        return register(fn) if fn is not None else register

    def endpoint(self, cls: type | None = None, *, name: str | None = None) -> Any:
        """Decorator: exposes the public methods of cls as "Name.method"."""
        def register(c: type) -> type:
            self.endpoints[name or c.__name__] = c
            return c
        return register(cls) if cls is not None else register

    def resolve(self, method: str) -> Callable[..., Any]:
        fn = self.functions.get(method)
        if fn is not None:
            return fn
        cls_name, dot, meth = method.partition(".")
        cls = self.endpoints.get(cls_name)
        if dot and cls is not None and not meth.startswith("_"):
            inst = self._instances.get(cls_name)
            if inst is None:
                inst = self._instances[cls_name] = cls()
            bound = getattr(inst, meth, None)
            if callable(bound):
                return bound
        raise UnknownMethod(f"unknown method {method!r}")


methods = RpcRegistry()          # the global registry of the decorators below
rpc_method = methods.method
endpoint = methods.endpoint


def call(registry: RpcRegistry, payload: memoryview) -> bytes | None:
    """Runs one call; returns the packed result, or None for a notification.
    Raises UnknownMethod or the method's exception for a request."""
    kind, method, params = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    try:
        fn = registry.resolve(method)
    except UnknownMethod:
        if kind == NOTIFY:
            return None        # an unknown notification is ignored
        raise
    if kind == NOTIFY:
        try:
            fn(*params)
        except Exception:
            log.exception("notification %s failed", method)
        return None
    return msgpack.packb(fn(*params), use_bin_type=True)
