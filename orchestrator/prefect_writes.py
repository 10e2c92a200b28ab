"""At most N Prefect writes in flight from this orchestrator process (``MUSETALK_PREFECT_MAX_WRITES``).

Prefect's server on SQLite has one writer at a time; a write transaction that finds another one open
fails at once with "database is locked" (503 to the client, which retries after a backoff) instead of
waiting. Twenty claims, heartbeats and reports writing at once from one orchestrator mostly produce those
failures and their backoffs; queued here, one behind the other, each write finds the database free (the
Prefect server's own services still write beside them). PostgreSQL takes concurrent writes: 0 (no limit)
is the default, and ``musetalk-flow up`` and the load benchmark set 1 for their SQLite servers.

A request is a write unless it is a GET or one of Prefect's read-only POSTs (``…/filter``, ``…/count``,
``…/paginate``): reads never wait here. The gate wraps the transports of the client's httpx client, so it
covers every call the client makes, its own retries included (a retry waits for a slot again, its backoff
sleep holds none)."""

from __future__ import annotations

import asyncio
import logging

import httpx
from prefect.client.orchestration import PrefectClient

log = logging.getLogger(__name__)

READ_SUFFIXES = ("/filter", "/count", "/paginate")


def is_read(request: httpx.Request) -> bool:
    return request.method in ("GET", "HEAD", "OPTIONS") or request.url.path.rstrip("/").endswith(READ_SUFFIXES)


class WriteGate(httpx.AsyncBaseTransport):
    """A transport that lets at most ``semaphore``'s worth of write requests through at a time."""

    def __init__(self, inner: httpx.AsyncBaseTransport, semaphore: asyncio.Semaphore):
        self.inner, self.semaphore = inner, semaphore

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if is_read(request):
            return await self.inner.handle_async_request(request)
        async with self.semaphore:
            response = await self.inner.handle_async_request(request)
            try:
                await response.aread()  # the write is over when its answer is in, not when headers arrive
            except BaseException:
                await response.aclose()
                raise
            return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def limit_writes(client: PrefectClient, max_writes: int) -> bool:
    """Make ``client`` send at most ``max_writes`` writes at once (0: leave it unlimited); whether it did.

    httpx has no public hook around a request, so this wraps the client's transports (``_transport`` and
    the proxy ``_mounts``, where requests go); if a future httpx renames them, it logs and does nothing —
    the limit is an optimisation, never needed for correctness."""
    if max_writes <= 0:
        return False
    http = getattr(client, "_client", None)
    transport = getattr(http, "_transport", None)
    mounts = getattr(http, "_mounts", None)
    if not isinstance(transport, httpx.AsyncBaseTransport) or not isinstance(mounts, dict):
        log.warning("MUSETALK_PREFECT_MAX_WRITES=%d ignored: this httpx has no transport to wrap", max_writes)
        return False
    semaphore = asyncio.Semaphore(max_writes)
    http._transport = WriteGate(transport, semaphore)
    http._mounts = {pattern: (WriteGate(t, semaphore) if t is not None else None) for pattern, t in mounts.items()}
    log.info("at most %d Prefect write(s) at once from this process", max_writes)
    return True
