"""The application's side of a worker: what an application may call, and how
it is loaded.

    from pyshm import application

    def handle(request: application.FrameRequest) -> bytes:   # a raw-frame suite's handler
        with application.heap().map("catalog") as catalog:     # the instance's closure heap
            ...

`import_app("module:attribute", interface)` loads an application the way
the worker (and the manager, for instance.preload) does.  This module
imports neither the worker's loop nor the C core."""
from __future__ import annotations

import importlib
import inspect
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyshm.heap import SharedHeap

_heap: SharedHeap | None = None
_node = ""


def heap() -> SharedHeap:
    """The instance's closure heap, from inside an application."""
    if _heap is None:
        raise RuntimeError("pyshm.application.heap() is only available inside a worker process")
    return _heap


def set_heap(h: SharedHeap) -> None:
    """The worker, once it attached the instance's heap."""
    global _heap
    _heap = h


def node() -> str:
    """The node running this request: its cluster node id, or the instance
    name outside a cluster (WSGI: also environ["pyshm.node"])."""
    return _node


def set_node(name: str) -> None:
    """The worker, from the manager's reply to its hello."""
    global _node
    _node = name


@dataclass
class FrameRequest:
    """What a raw-frame handler gets: the payload (a read-only memoryview of
    the request in shared memory, valid during the call), the distributed
    session's id (or None), the client's address, and the node running it."""
    payload: memoryview
    session: bytes | None
    peer: str
    node: str = ""


def import_app(spec: str, interface: str = "handler") -> Any:
    """The object `module:attribute` names, imported as a server would: the
    current directory first on the path.  An RPC suite names a module (its
    pyshm.rpc_method functions) or an RpcRegistry; a WSGI suite refuses an
    ASGI application."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    mod, _, attr = spec.partition(":")
    obj: Any = importlib.import_module(mod)
    if interface == "rpc":
        from pyshm import rpc

        obj = getattr(obj, attr) if attr else rpc.methods
        if not isinstance(obj, rpc.RpcRegistry):
            raise TypeError(f"{spec} is not a pyshm.RpcRegistry")
        return obj
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{spec} is not callable")
    if interface == "wsgi" and _is_asgi(obj):
        raise TypeError(f"{spec} is an ASGI application (async, called with scope, receive, send); pyshm serves "
                        f"WSGI applications over HTTP: give it a WSGI app (Flask, Django's get_wsgi_application())")
    return obj


def _is_asgi(app: Any) -> bool:
    """An async callable: a coroutine function, or an object whose __call__ is one."""
    return inspect.iscoroutinefunction(app) or inspect.iscoroutinefunction(getattr(type(app), "__call__", None))
