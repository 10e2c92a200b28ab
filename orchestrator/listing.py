"""``GET /v1/avatar/jobs``: the caller's jobs, newest first, a page at a time.

The cursor is the last item's (creation-ordered) expected start time and run id: runs are listed by
``expected_start_time`` descending — Prefect sets it once, when the run is first scheduled, so a requeue
does not move a job — and a page continues strictly after the cursor, so jobs added meanwhile (newer,
hence before the cursor) never shift or repeat the pages still to come."""

from __future__ import annotations

import base64
from datetime import datetime, timezone
from typing import Any
from uuid import UUID

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import (
    FlowRunFilter, FlowRunFilterExpectedStartTime, FlowRunFilterState, FlowRunFilterStateType, FlowRunFilterTags,
)
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.sorting import FlowRunSort

from orchestrator.jobs import JOB_TAG, STATES_OF_STATUS


class BadCursor(ValueError):
    pass


def encode_cursor(run: FlowRun) -> str:
    raw = f"{run.expected_start_time.isoformat()}|{run.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """What :func:`encode_cursor` wrote: an aware time that has a UTC equivalent (``0001-01-01T00:00+14:00``
    has none, and Prefect's database answered such a filter with a 500) and a run id."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        when, run_id = raw.split("|", 1)
        parsed = datetime.fromisoformat(when)
        if parsed.tzinfo is None:
            raise ValueError("a cursor's time is aware")
        return parsed.astimezone(timezone.utc), str(UUID(run_id))
    except Exception:  # noqa: BLE001 — anything a client may have mangled (ValueError, OverflowError, …)
        raise BadCursor("invalid cursor") from None


async def list_job_runs(client: PrefectClient, scope: str, *, status: str | None, limit: int,
                        cursor: str | None) -> tuple[list[FlowRun], str | None]:
    filters: dict[str, Any] = {"tags": FlowRunFilterTags(all_=[JOB_TAG, f"key:{scope}"])}
    if status:
        filters["state"] = FlowRunFilterState(type=FlowRunFilterStateType(any_=STATES_OF_STATUS[status]))
    after_id = None
    if cursor:
        when, after_id = decode_cursor(cursor)
        filters["expected_start_time"] = FlowRunFilterExpectedStartTime(before_=when)
    runs: list[FlowRun] = []
    offset = 0
    while len(runs) < limit + 1:
        page = await client.read_flow_runs(flow_run_filter=FlowRunFilter(**filters),
                                           sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=limit + 1 + 20,
                                           offset=offset)
        if not page:
            break
        for run in page:
            # runs at the cursor's very instant: skip through the cursor's own run (ties ordered by id)
            if cursor and run.expected_start_time == when and str(run.id) >= after_id:
                continue
            runs.append(run)
        offset += len(page)
        if len(page) < limit + 1 + 20:
            break
    runs.sort(key=lambda r: (r.expected_start_time, str(r.id)), reverse=True)
    page, more = runs[:limit], len(runs) > limit
    return page, (encode_cursor(page[-1]) if more and page else None)
