"""A fake orchestrator for the worker side of DESIGN §5 (progress, heartbeat, claim, status), served by the
tests on 127.0.0.1: it records every POST and answers as the test tells it to."""

from __future__ import annotations

import threading
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


class FakeOrchestrator:
    """Records every POST (raw path, body, key, arrival time); a claim hands out ``jobs`` once each.

    ``statuses`` maps a path suffix to the status of every call, ``fail_next`` to the statuses of the
    next calls only."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.jobs: list[dict[str, Any]] = []
        self.statuses: dict[str, int] = {}
        self.fail_next: dict[str, list[int]] = {}
        self.lock = threading.Lock()
        self.app = FastAPI()
        self.app.add_api_route("/{path:path}", self.handle, methods=["POST"])

    def _status(self, path: str) -> int:
        for suffix, codes in self.fail_next.items():
            if path.endswith(suffix) and codes:
                return codes.pop(0)
        return next((code for suffix, code in self.statuses.items() if path.endswith(suffix)), 200)

    async def handle(self, path: str, request: Request) -> JSONResponse:
        body = await request.json()  # before the lock: never hold a thread lock across an await
        with self.lock:
            # the raw path, so a test sees exactly what the client put on the wire (percent-encoding kept)
            self.requests.append({"path": request.scope["raw_path"].decode(), "body": body, "at": time.monotonic(),
                                  "key": request.headers.get("x-internal-api-key")})
            status = self._status(path)
            if path.endswith("jobs/claim") and status == 200:
                return JSONResponse({"job": self.jobs.pop(0) if self.jobs else None})
        return JSONResponse({"ok": status < 300}, status_code=status)

    def of(self, suffix: str) -> list[dict[str, Any]]:
        """The recorded requests whose path ends with ``suffix``."""
        with self.lock:
            return [r for r in self.requests if r["path"].endswith(suffix)]

    def bodies(self, suffix: str) -> list[dict[str, Any]]:
        return [r["body"] for r in self.of(suffix)]

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.jobs.clear()
            self.statuses.clear()
            self.fail_next.clear()
