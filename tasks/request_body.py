"""A request body read whole under a size limit, for the ASGI front doors of the worker
(``deployments/front_door.py``) and the orchestrator (``orchestrator/front_door.py``), which judge a body
before any handler, log line or Prefect call sees it, then hand it on unchanged."""

from __future__ import annotations

from starlette.types import Message, Receive, Scope

# How much of an over-size body is read and dropped: a client still sending when the 413 goes out would see
# its connection reset instead of the answer (found by the fuzz tests). At least this, or 4× the limit.
DRAIN_CAP_BYTES = 1024 * 1024


class ClientGone(Exception):
    """The client disconnected before its body was whole: nothing to answer."""


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None when it is over ``limit`` bytes (declared or sent; the rest is read and
    dropped up to the drain cap). ClientGone when the client left."""
    drain_cap = max(DRAIN_CAP_BYTES, 4 * limit)
    declared = next((v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"content-length"), "")
    if declared.isdigit() and int(declared) > drain_cap:
        return None
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        if not message.get("more_body", False) or size > drain_cap:
            break
    return None if size > limit else b"".join(chunks)


def replaying(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the app the body already read, then the connection's own messages."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
