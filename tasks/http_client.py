"""HTTP plumbing shared by the project's clients: the connection-pool lifetime of both API clients
(orchestrator, SaladCloud) and the wait for a server a child process is starting."""

from __future__ import annotations

import time
from typing import Callable, Literal, Self

import httpx


class PooledClient:
    """A client owning one ``httpx.Client`` in ``_http``: ``close()``, or leaving a ``with`` block, releases
    its pooled connections."""

    _http: httpx.Client

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def poll_http(url: str, timeout: float, *, exited: Callable[[], bool], request_timeout: float,
              not_yet: Callable[[httpx.Response], None] = lambda answer: None) -> Literal["up", "exited", "timeout"]:
    """Asks ``url`` every half second until it answers 200 ("up"), the process meant to serve it has
    ``exited()`` (checked before each try, so a crash is not waited out), or ``timeout`` s pass. Every
    other answer goes to ``not_yet``, which may raise to stop the wait (a server that says it never will)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if exited():
            return "exited"
        try:
            answer = httpx.get(url, timeout=request_timeout)
        except httpx.HTTPError:
            answer = None
        if answer is not None:
            if answer.status_code == 200:
                return "up"
            not_yet(answer)
        time.sleep(0.5)
    return "timeout"
