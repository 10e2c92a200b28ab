"""Buffer workers (DESIGN §5/§11) as workers of the Prefect work pool ``buffer``.

A heartbeat is a Prefect worker heartbeat (so the UI lists each buffer GPU online/offline, with Prefect's
own clock as the one time every orchestrator replica agrees on) plus a Prefect variable holding what §5's
heartbeat says and Prefect's worker record cannot: idle/busy, GPU class, capacity, the last error."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import httpx

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.actions import VariableCreate, VariableUpdate
from prefect.exceptions import ObjectAlreadyExists

from deployments.workpool import BUFFER_POOL

VARIABLE_PREFIX = "buffer-worker-"
VARIABLE_TAG = "musetalk-buffer-worker"


def variable_name(worker_id: str) -> str:
    """Variable names allow letters, digits, ``-`` and ``_`` only: the worker id is hashed in."""
    return VARIABLE_PREFIX + hashlib.sha256(worker_id.encode()).hexdigest()[:24]


@dataclass
class BufferWorker:
    worker_id: str
    status: str  # idle | busy, as last reported
    gpu_class: str | None
    capacity: int
    error: str | None
    last_heartbeat: datetime | None  # Prefect's record (server clock)
    idle_since: datetime | None = None  # idle in every heartbeat since then

    def online(self, now: datetime, offline_sec: float) -> bool:
        return self.last_heartbeat is not None and (now - self.last_heartbeat).total_seconds() <= offline_sec


async def record_heartbeat(client: PrefectClient, worker_id: str, body: dict[str, Any], offline_sec: float) -> None:
    # Prefect marks a worker offline after a few missed intervals; this makes its "offline" ours.
    await client.send_worker_heartbeat(BUFFER_POOL, worker_id, heartbeat_interval_seconds=max(1, int(offline_sec // 3)))
    name = variable_name(worker_id)
    idle_since = None
    if body.get("status") == "idle":
        # how long the worker has been idle without a break: the sweeper's evidence of a lost claim answer
        previous = await client.read_variable_by_name(name)
        try:
            before = json.loads(previous.value) if previous is not None else {}
        except (TypeError, ValueError):
            before = {}
        idle_since = (before.get("idle_since") if before.get("status") == "idle" else None) or utcnow().isoformat()
    value = json.dumps({"worker_id": worker_id, **body, "idle_since": idle_since})
    try:
        await client.update_variable(VariableUpdate(name=name, value=value))
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code != 404:
            raise
        try:
            await client.create_variable(VariableCreate(name=name, value=value, tags=[VARIABLE_TAG]))
        except ObjectAlreadyExists:  # another replica created it a moment ago
            await client.update_variable(VariableUpdate(name=name, value=value))


async def buffer_workers(client: PrefectClient) -> dict[str, BufferWorker]:
    """Every buffer worker Prefect knows, with what it last reported."""
    records = {w.name: w for w in await client.read_workers_for_work_pool(BUFFER_POOL)}
    details: dict[str, dict[str, Any]] = {}
    for variable in await client.read_variables():
        if variable.name.startswith(VARIABLE_PREFIX):
            try:
                data = json.loads(variable.value) if isinstance(variable.value, str) else dict(variable.value)
                details[data["worker_id"]] = data
            except (ValueError, KeyError, TypeError):
                continue
    out = {}
    for name, record in records.items():
        data = details.get(name, {})
        beat = record.last_heartbeat_time
        if beat is not None and beat.tzinfo is None:
            beat = beat.replace(tzinfo=timezone.utc)
        try:
            idle_since = datetime.fromisoformat(data["idle_since"]) if data.get("idle_since") else None
        except (TypeError, ValueError):
            idle_since = None
        out[name] = BufferWorker(name, str(data.get("status") or "busy"), data.get("gpu_class"),
                                 int(data.get("capacity") or 1), data.get("error"), beat, idle_since)
    return out


def utcnow() -> datetime:
    return datetime.now(timezone.utc)
