"""The lifetime both API clients (orchestrator, SaladCloud) give their connection pool."""

from __future__ import annotations

from typing import Self

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
