"""Buffer workers (DESIGN §5/§11) as workers of the Prefect work pool ``buffer``.

A heartbeat is a Prefect worker heartbeat (so the UI lists each buffer GPU online/offline, with Prefect's
own clock as the one time every orchestrator replica agrees on) plus a Prefect variable holding what §5's
heartbeat says and Prefect's worker record cannot: idle/busy, GPU class, capacity, the last error.

Cost, since every write contends for the Prefect database (SQLite has one writer at a time): a heartbeat
writes the variable only when what it says changed, and this process sends Prefect's worker heartbeat at
most once per sixth of the offline window — a worker beats every 5–10 s, so with the default 30 s window
every beat still reaches Prefect, and a longer window costs fewer writes. Claims read the roster (workers
and variables) through a cache of about a second shared by every claim in the process; a worker missing
or offline in it is read again before its claim is refused. Both are per-process shortcuts: a replica
that does not have them just writes and reads a little more."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any


from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.actions import VariableCreate, VariableUpdate
from prefect.exceptions import ObjectAlreadyExists

from deployments.workpool import BUFFER_POOL
from orchestrator.per_loop import PerLoop

VARIABLE_PREFIX = "buffer-worker-"
VARIABLE_TAG = "musetalk-buffer-worker"
# How stale a claim's view of the roster may be; the offline window it is judged against is 30 s.
ROSTER_MAX_AGE_S = 1.0


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


# Per event loop (orchestrator/per_loop.py), then per Prefect API and worker.
_beats_sent: PerLoop[dict[tuple[str, str], float]] = PerLoop(dict)


def _due(client: PrefectClient, worker_id: str, min_interval: float) -> bool:
    """Whether this process should pass this worker's beat on to Prefect now (at most once per interval)."""
    sent = _beats_sent.get()
    key = (str(client.api_url), worker_id)
    now = time.monotonic()
    if now - sent.get(key, float("-inf")) < min_interval:
        return False
    sent[key] = now
    return True


async def record_heartbeat(client: PrefectClient, worker_id: str, body: dict[str, Any], offline_sec: float) -> None:
    name = variable_name(worker_id)
    # Prefect marks a worker offline after a few missed intervals; this makes its "offline" ours. The record
    # lags this beat by at most a sixth of the window, far inside it.
    beat = client.send_worker_heartbeat(BUFFER_POOL, worker_id, heartbeat_interval_seconds=max(1, int(offline_sec // 3))) \
        if _due(client, worker_id, offline_sec / 6) else None
    try:
        previous, _ = await asyncio.gather(client.read_variable_by_name(name), beat or asyncio.sleep(0))
    except BaseException:
        _beats_sent.get().pop((str(client.api_url), worker_id), None)  # resend next time
        raise
    roster = _roster_of(client)
    known = roster.workers.get(worker_id)
    if beat is not None and (known is None or not known.online(utcnow(), offline_sec / 2)):
        # new, or back from (near) offline by this beat alone: a roster read begun before it could refuse its
        # claim; a healthy worker's beat leaves the shared roster alone (claims stay cheap)
        roster.changed_at = time.monotonic()
    try:
        before = json.loads(previous.value) if previous is not None and isinstance(previous.value, str) else {}
    except (TypeError, ValueError):
        before = {}
    idle_since = None
    if body.get("status") == "idle":
        # how long the worker has been idle without a break: the sweeper's evidence of a lost claim answer
        idle_since = (before.get("idle_since") if before.get("status") == "idle" else None) or utcnow().isoformat()
    data = {"worker_id": worker_id, **body, "idle_since": idle_since}
    if previous is not None and before == json.loads(json.dumps(data)):
        return  # nothing new to say: the Prefect heartbeat above is the whole beat
    value = json.dumps(data)
    try:
        if previous is not None:
            await client.update_variable(VariableUpdate(name=name, value=value))
            return
        try:
            await client.create_variable(VariableCreate(name=name, value=value, tags=[VARIABLE_TAG]))
        except ObjectAlreadyExists:  # another replica created it a moment ago
            await client.update_variable(VariableUpdate(name=name, value=value))
    finally:
        roster.changed_at = time.monotonic()  # a roster read before now is stale in this process


class _Roster:
    """The last roster this process read, and the read in flight that concurrent callers share."""

    def __init__(self) -> None:
        self.read_at = float("-inf")  # monotonic time the read started: its age errs on the old side
        self.changed_at = float("-inf")  # when this process last changed a worker's record: older reads are stale
        self.workers: dict[str, BufferWorker] = {}
        self.reading: asyncio.Future | None = None
        self.reading_from = float("-inf")  # when the read in flight started


_rosters: PerLoop[dict[str, _Roster]] = PerLoop(dict)


async def buffer_workers(client: PrefectClient, max_age: float = 0.0) -> dict[str, BufferWorker]:
    """Every buffer worker Prefect knows, with what it last reported; a roster read at most ``max_age``
    seconds ago will do (0: read now). Callers that ask while a read is in flight share it."""
    roster = _roster_of(client)
    if max_age > 0 and time.monotonic() - roster.read_at <= max_age and roster.read_at > roster.changed_at:
        return roster.workers
    if roster.reading is None or roster.reading_from <= roster.changed_at:
        roster.reading_from = time.monotonic()
        roster.reading = asyncio.ensure_future(_read_roster(client, roster, roster.reading_from))
    return await asyncio.shield(roster.reading)


def _roster_of(client: PrefectClient) -> _Roster:
    return _rosters.get().setdefault(str(client.api_url), _Roster())


async def _read_roster(client: PrefectClient, roster: _Roster, started: float) -> dict[str, BufferWorker]:
    try:
        workers = await _read_workers(client)
    finally:
        if roster.reading_from == started:
            roster.reading = None
    if started > roster.read_at:
        roster.read_at, roster.workers = started, workers
    return workers


async def _read_workers(client: PrefectClient) -> dict[str, BufferWorker]:
    records, variables = await asyncio.gather(client.read_workers_for_work_pool(BUFFER_POOL), client.read_variables())
    records = {w.name: w for w in records}
    details: dict[str, dict[str, Any]] = {}
    for variable in variables:
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
