"""WSGI applications the HTTP tests serve unchanged."""
from __future__ import annotations

import os
import time
from wsgiref.validate import validator

from flask import Flask, Response, request, stream_with_context


def _hello(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/boom":
        raise RuntimeError("boom")
    if path == "/sleep":
        time.sleep(float(environ["QUERY_STRING"] or "1"))
    if path == "/pid":
        body = str(os.getpid()).encode()
    elif path == "/echo":
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))  # PEP 3333: a size
    elif path == "/environ":
        keys = ("REQUEST_METHOD", "PATH_INFO", "QUERY_STRING", "SERVER_PROTOCOL", "CONTENT_LENGTH", "HTTP_X_TEST")
        body = "\n".join(f"{k}={environ.get(k, '')}" for k in keys).encode()
    elif path == "/big":
        body = b"0123456789" * 100_000
    else:
        body = b"hello"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


hello = validator(_hello)     # wsgiref's validator checks our environ and calls on every request

flask_app = Flask(__name__)


@flask_app.route("/")
def index():
    return "flask index"


@flask_app.route("/items/<int:item_id>")
def item(item_id: int):
    return {"id": item_id, "pid": os.getpid()}


@flask_app.post("/form")
def form():
    return f"name={request.form['name']};n={len(request.form)}"


@flask_app.route("/stream")
def stream():
    def gen():
        for i in range(5):
            yield f"chunk {i}\n"
    return Response(stream_with_context(gen()), mimetype="text/plain")


def counter(environ, start_response):
    """Counts visits per session; /logout ends it; /peek only reads it."""
    session = environ["pyshm.session"]
    if environ["PATH_INFO"] == "/logout":
        session.invalidate()
        body = b"bye"
    elif environ["PATH_INFO"] == "/peek":
        body = b"%d %d" % (session.get("visits", 0), len(session))
    else:
        session["visits"] = session.get("visits", 0) + 1
        body = b"%d %d" % (session["visits"], os.getpid())
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def tagged(environ, start_response):
    """/t/TAG?S sleeps S seconds and answers "<pid>:TAG"; /pid; /die: the
    worker SIGKILLs itself in the middle of the request."""
    path = environ["PATH_INFO"]
    if path == "/die":
        os.kill(os.getpid(), 9)
    if path == "/pid":
        body = str(os.getpid()).encode()
    elif path.startswith("/t/"):
        time.sleep(float(environ["QUERY_STRING"] or 0))
        body = b"%d:%s" % (os.getpid(), path[3:].encode())
    else:
        body = b"tagged"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def node_counter(environ, start_response):
    """Counts visits per session and names the node that ran the request:
    "<visits> <node>"; /sleep?S sleeps S seconds first; /peek only reads."""
    if environ["PATH_INFO"] == "/sleep":
        time.sleep(float(environ["QUERY_STRING"] or "1"))
    session = environ["pyshm.session"]
    if environ["PATH_INFO"] != "/peek":
        session["visits"] = session.get("visits", 0) + 1
    body = f"{session.get('visits', 0)} {environ['pyshm.node']}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def big_or_count(environ, start_response):
    """node_counter, but /huge answers 70 MiB (more than a link frame holds)."""
    if environ["PATH_INFO"] == "/huge":
        environ["pyshm.session"]["visits"] = environ["pyshm.session"].get("visits", 0)
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(70 << 20))])
        return [b"x" * (70 << 20)]
    return node_counter(environ, start_response)
