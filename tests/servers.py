"""Servers the tests start on 127.0.0.1 and stop: an ASGI app under uvicorn, a static file server, a free
port, and polling until something holds."""

from __future__ import annotations

import functools
import http.server
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import uvicorn


def free_port() -> int:
    """A 127.0.0.1 port nothing listens on now (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_in_thread(app: Any, server_factory=None) -> Iterator[tuple[str, uvicorn.Server, threading.Thread]]:
    """Run an ASGI app under uvicorn on a free 127.0.0.1 port in a thread; stopped on exit."""
    sock = socket.socket()  # kept bound and handed to uvicorn: no other process can take the port meanwhile
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    if server_factory is None:
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    else:
        server = server_factory(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}", server, thread
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


@contextmanager
def media_server(root: Path) -> Iterator[str]:
    """A static file server for the job's inputs (404 for anything missing)."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def wait_until(predicate, timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()
