"""The example application of `pyshm demo` (and `make run`).

`setup` runs once in the connection manager: it puts a product catalog into
the instance's closure heap.  `handle` runs in every worker: it maps the
catalog (O(1), no copy: every worker reads the same pages) and answers raw
TCP frames:

    sku-0000042      -> that product as JSON
    stats            -> the catalog's size and the worker that answered
"""
from __future__ import annotations

import json
import os

from pyshm import application
from pyshm.demo import make_catalog
from pyshm.heap import SharedHeap

ITEMS = 200_000


def setup(heap: SharedHeap) -> None:
    heap.put("catalog", make_catalog(ITEMS))


def handle(request: application.FrameRequest) -> bytes:
    query = bytes(request.payload).decode("utf-8", "replace").strip()
    with application.heap().map("catalog") as catalog:
        if query == "stats":
            return json.dumps({"items": catalog["meta"]["items"], "worker_pid": os.getpid(),
                               "closure_version": application.heap().version("catalog")}).encode()
        item = catalog["items"].get(query)
        if item is None:
            raise KeyError(f"no product {query!r} (try sku-0000042 or stats)")
        return json.dumps({"sku": query, "name": item["name"], "price": item["price"],
                           "tags": list(item["tags"]), "worker_pid": os.getpid()}).encode()
